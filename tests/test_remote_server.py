"""asr.backend = openai through the real parts: the daemon recording from the virtual microphone, its
finals decoded by a real faster-whisper-server on loopback (the bundled tiny.en), which the tests stall
(SIGSTOP) and kill; and a tiny HTTP server of the test's own for 500s and a server that never answers."""

import http.server
import threading
import time

import numpy as np
import pytest

from conftest import CORPUS, Daemon, read_wav, silence, write_wav
from whisper_server import WhisperServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def thoughts(tmp_path):
    return write_wav(tmp_path / "thoughts.wav",
                     np.concatenate([silence(0.5), read_wav(CORPUS / "mfa_thoughts.wav"), silence(1.5)]))


@pytest.fixture(scope="module")
def server():
    with WhisperServer() as s:
        yield s


def remote_daemon(vmic, tmp_path, url, *args):
    return Daemon(tmp_path, "--source", "mic", "--set", "asr.backend=openai", "--set", f"asr.remote_url={url}",
                  "--set", "server.stats_interval_s=1", *args, env=vmic.env)


def say(vmic, wav):
    assert vmic.play(wav).wait(60) == 0


def final(events, utt):
    return events.wait_for(lambda e: e["type"] == "final" and e["utt"] == utt, 60)


def test_finals_come_from_the_server_and_survive_its_stall_and_its_death(vmic, server, thoughts, tmp_path):
    daemon = remote_daemon(vmic, tmp_path, server.url, "--set", "asr.remote_timeout_s=4")
    try:
        events = daemon.connect()
        answered = server.requests
        say(vmic, thoughts)
        first = final(events, 1)
        assert "thousand thoughts" in first["text"] and "fallback" not in first["flags"]
        assert server.requests > answered  # the server decoded it
        events.wait_for(lambda e: e["type"] == "stats" and e["remote_requests"] >= 1 and e["remote_latency"] > 0)

        server.pause()  # stalled: connections are accepted, nothing is answered
        try:
            say(vmic, thoughts)
            stalled = final(events, 2)
            assert "thousand thoughts" in stalled["text"] and "fallback" in stalled["flags"]
            down = events.wait_for(lambda e: e["type"] == "status"
                                   and "unreachable (no answer within 4 s)" in e["detail"])
        finally:
            server.resume()
        server.answer()  # answering again (and the requests the stall queued, begun before it) before utterance 3

        # Recovery: the backoff (1 s after one failure) is over by the next utterance's end.
        say(vmic, thoughts)
        again = final(events, 3)
        assert "thousand thoughts" in again["text"] and "fallback" not in again["flags"]
        events.wait_for(lambda e: e["type"] == "status" and e["seq"] > down["seq"] and "unreachable" not in e["detail"])

        # Killed mid-stream: the utterance being spoken and the next one still get their finals.
        two = vmic.play(write_wav(tmp_path / "two.wav", np.concatenate([
            silence(0.5), read_wav(CORPUS / "mfa_thoughts.wav"), silence(1.5), read_wav(CORPUS / "mfa_thoughts.wav"),
            silence(1.5)])))
        events.wait_for(lambda e: e["type"] == "speech_start" and e["utt"] == 4)
        server.kill()
        assert two.wait(60) == 0
        for utt in (4, 5):
            lost = final(events, utt)
            assert "thousand thoughts" in lost["text"] and "fallback" in lost["flags"]
        events.wait_for(lambda e: e["type"] == "status" and "connection refused" in e["detail"])
        events.wait_for(lambda e: e["type"] == "stats" and e["fallbacks"] >= 3)
        assert daemon.stop() == 0
        starts = {e["utt"] for e in events.of("speech_start")}
        assert starts == {e["utt"] for e in events.of("final")}  # every utterance got its final
    finally:
        daemon.kill()
        server.stop()


class FailingServer(http.server.ThreadingHTTPServer):
    """Answers every transcription with a 500, or never answers (mode "hang"); keeps what it was sent."""

    daemon_threads = True

    def __init__(self):
        self.mode = "500"
        self.requests = []
        self.released = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers), body))
                if outer.mode == "hang":
                    outer.released.wait(60)
                    return
                reply = b'{"error": {"message": "CUDA out of memory", "type": "server_error"}}'
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_server_answering_500_or_nothing_at_shutdown_costs_no_final(vmic, thoughts, tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-test-0123456789\n")
    fake = FailingServer()
    url = f"http://127.0.0.1:{fake.server_address[1]}/v1"
    daemon = remote_daemon(vmic, tmp_path, url, "--set", f"asr.remote_key_file={key}", "--set",
                           "asr.remote_timeout_s=60", "--set", "asr.remote_model=large-v3")
    try:
        events = daemon.connect()
        say(vmic, thoughts)
        failed = final(events, 1)
        assert "thousand thoughts" in failed["text"] and "fallback" in failed["flags"]
        events.wait_for(lambda e: e["type"] == "status"
                        and "unreachable (HTTP 500 Internal Server Error: CUDA out of memory)" in e["detail"])
        path, headers, body = fake.requests[0]
        assert path == "/v1/audio/transcriptions" and headers["Authorization"] == "Bearer sk-test-0123456789"
        for field in (b'name="model"\r\n\r\nlarge-v3\r\n', b'name="response_format"\r\n\r\nverbose_json\r\n',
                      b'name="timestamp_granularities[]"\r\n\r\nword\r\n', b'name="language"\r\n\r\nen\r\n',
                      b'filename="audio.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFF'):
            assert field in body

        # A server that takes the request and never answers, as the daemon stops: the stop does not wait
        # out the 60 s timeout, and the utterance still gets its final.
        fake.mode = "hang"
        asked = len(fake.requests)
        say(vmic, thoughts)
        events.wait_for(lambda e: e["type"] == "speech_end" and e["utt"] == 2)
        deadline = time.monotonic() + 30
        while len(fake.requests) == asked:  # the final's request (the backoff of 1 s is long over)
            assert time.monotonic() < deadline, "the final's request never came"
            time.sleep(0.05)
        assert daemon.stop(timeout=15) == 0
        last = final(events, 2)
        assert "thousand thoughts" in last["text"] and "fallback" in last["flags"]
        assert "sk-test-0123456789" not in daemon.stderr
    finally:
        fake.released.set()
        daemon.kill()
        fake.shutdown()
