"""The WebSocket API with a real WebSocket client against a Service on real sockets (fake decoder):
the page, /events, /listen sessions, their control messages and limits, and the security checks."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
import soxr
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from captiond.config import ConfigError, WebSocketConfig, load
from captiond.engine import Engine
from captiond.events import Error, Final, Pong, SpeechStart
from captiond.server import Hub
from captiond.websocket import WebError, WebServer
from captiond.worker import MIC
from conftest import SPEECH, EventLog, FakeDecoder, Harness, HeldDecoder, silence

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def harness(tmp_path):
    """A service with the WebSocket API on a free port; the microphone side stays silent unless fed."""
    made = []

    def make(*overrides: str, delay: float = 0.0, decoder: FakeDecoder | None = None) -> Harness:
        config = load(None, ["server.stats_interval_s=0", "websocket.enabled=true", "websocket.port=0",
                             *overrides])[0]
        h = Harness(tmp_path, tmp_path / "t.log", config, decode_delay=delay, decoder=decoder)
        h.base = f"127.0.0.1:{h.service.web.port}"
        made.append(h)
        return h

    yield make
    for h in made:
        h.end()


def events_until(ws, kind: str, timeout: float = 30.0) -> list[dict]:
    """Every event received up to and including the first of type `kind`."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        got.append(event)
        if event["type"] == kind:
            return got


def stream(ws, pcm: np.ndarray, rate: int = 16000, chunk_s: float = 0.1) -> None:
    """Send int16 audio as binary messages of chunk_s seconds."""
    step = int(rate * chunk_s)
    for i in range(0, len(pcm), step):
        ws.send(pcm[i:i + step].astype("<i2").tobytes())


def webm_opus(pcm: np.ndarray) -> bytes:
    """16 kHz int16 audio as a WebM/Opus stream, as a browser's MediaRecorder makes it."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as out:
        st = out.add_stream("libopus", rate=48000)
        st.layout = "mono"
        for i in range(0, len(pcm), 320):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + 320], format="s16", layout="mono")
            frame.rate = 16000
            for packet in st.encode(frame):
                out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_page_is_served_and_unknown_paths_are_not_found(harness):
    h = harness()
    with urllib.request.urlopen(f"http://{h.base}/", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/html")
        page = resp.read().decode()
    assert "Use my microphone" in page and "/listen" in page and "/events" in page
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{h.base}/secrets", timeout=10)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:  # a plain GET on an endpoint is told to upgrade
        urllib.request.urlopen(f"http://{h.base}/events", timeout=10)
    assert err.value.code == 426


def test_events_carry_the_unix_socket_protocol_with_the_same_seqs(harness):
    h = harness()
    unix = EventLog(h.sock)
    with connect(f"ws://{h.base}/events") as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello" and hello["protocol"] == 1
        h.say(SPEECH)
        over_ws = [e for e in events_until(ws, "final") if e["type"] != "status"]
        from_unix = unix.wait_for(lambda e: e["type"] == "final")
        assert over_ws[-1] == {**from_unix, "ts": over_ws[-1]["ts"]}
        assert [e["type"] for e in over_ws[-2:]] == ["speech_end", "final"]
        assert over_ws[-1]["text"].startswith("heard")
        # Commands work as on the socket; a malformed one gets an error and the connection stays open.
        ws.send("{not json")
        assert json.loads(ws.recv(timeout=10))["type"] == "error"
        ws.send("[" * 60000)  # deeper than json's recursion limit
        assert json.loads(ws.recv(timeout=10))["code"] == "bad_json"
        ws.send(b"\x00binary")
        assert json.loads(ws.recv(timeout=10))["code"] == "bad_message"
        ws.send(json.dumps({"cmd": "ping"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "pong"
    unix.close()


def test_listen_session_at_44100_hz_gets_its_own_events_only(harness):
    h = harness()
    unix = EventLog(h.sock)
    pcm = soxr.resample(SPEECH, 16000, 44100).astype(np.int16)
    with connect(f"ws://{h.base}/listen?encoding=linear16&sample_rate=44100") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        stream(ws, pcm, rate=44100)
        got = events_until(ws, "final")
        kinds = [e["type"] for e in got]
        assert kinds[0] == "speech_start" and kinds[-2:] == ["speech_end", "final"]
        assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
        heard = float(got[-1]["text"].split()[1])  # the fake decoder says how much audio it got
        assert abs(heard - (len(SPEECH) / 16000 - 1.5)) < 1.0  # the speech, resampled to 16 kHz (not 2.8x as long)
        ws.send(json.dumps({"type": "CloseStream"}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1000
    assert not unix.of("final") and not unix.of("speech_start")  # the session's speech is not the daemon's
    unix.close()


def test_finalize_closes_the_open_utterance_and_the_stream_goes_on(harness):
    h = harness()
    speech_only = SPEECH[8000:-16000]  # no trailing silence: the gate would keep the utterance open
    with connect(f"ws://{h.base}/listen?encoding=linear16&sample_rate=16000") as ws:
        ws.recv(timeout=10)
        stream(ws, speech_only)
        ws.send(json.dumps({"type": "Finalize"}))
        first = events_until(ws, "final")[-1]
        assert "end_of_stream" in first["flags"] and first["utt"] == 1
        stream(ws, speech_only)  # the same session goes on with a new utterance
        ws.send(json.dumps({"type": "KeepAlive"}))
        ws.send(json.dumps({"type": "Nonsense"}))
        error = events_until(ws, "error")[-1]
        assert error["code"] == "bad_message" and "Nonsense" in error["message"]
        ws.send(json.dumps({"type": "CloseStream"}))  # the open utterance gets its final before the close
        second = events_until(ws, "final")[-1]
        assert second["utt"] == 2


def test_idle_session_is_closed_unless_kept_alive(harness):
    h = harness("websocket.idle_timeout_s=3")
    with connect(f"ws://{h.base}/listen") as ws:
        ws.recv(timeout=10)
        for _ in range(10):  # 5 s of KeepAlive, more than the timeout; a 2.5 s stall of this test would not matter
            ws.send(json.dumps({"type": "KeepAlive"}))
            time.sleep(0.5)
        stream(ws, SPEECH[:16000])
        error = events_until(ws, "error", timeout=10)[-1]
        assert error["code"] == "idle_timeout"
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd.reason == "idle timeout"


def test_a_daemon_frozen_past_the_idle_timeout_keeps_a_client_that_streamed_all_along(harness):
    # SIGSTOP, a paused VM: the client's audio waited in the socket, and the session was closed as idle.
    h = harness("websocket.idle_timeout_s=2")
    with connect(f"ws://{h.base}/listen") as ws:
        ws.recv(timeout=10)
        stream(ws, SPEECH[:8000])
        h.loop.call_soon_threadsafe(time.sleep, 3.5)  # the daemon's event loop away for longer than the timeout
        for i in range(8000, len(SPEECH), 1600):
            ws.send(SPEECH[i:i + 1600].astype("<i2").tobytes())
            time.sleep(0.1)
        ws.send(json.dumps({"type": "CloseStream"}))
        got = events_until(ws, "final")
        assert not [e for e in got if e["type"] == "error"], got
        assert got[-1]["text"].startswith("heard")


def test_sessions_beyond_the_limit_are_refused_clearly(harness):
    h = harness("websocket.max_sessions=1")
    with connect(f"ws://{h.base}/listen") as first:
        first.recv(timeout=10)
        with connect(f"ws://{h.base}/listen") as second:
            second.recv(timeout=10)
            error = json.loads(second.recv(timeout=10))
            assert error["code"] == "too_many_sessions" and "websocket.max_sessions" in error["message"]
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=10)
            assert closed.value.rcvd.code == 1013
        stream(first, SPEECH)  # the running session is unaffected
        assert events_until(first, "final")[-1]["text"].startswith("heard")


@pytest.mark.parametrize("query", ["encoding=mp3", "sample_rate=abc", "sample_rate=1000", "sample_rate=", "encoding=", "sample_rate=" + "9" * 5000])
def test_bad_listen_parameters_get_an_error_and_a_close(harness, query):
    h = harness()
    with connect(f"ws://{h.base}/listen?{query}") as ws:
        ws.recv(timeout=10)
        error = json.loads(ws.recv(timeout=10))
        assert error["code"] == "bad_request" and "linear16" in error["message"]
        assert "int()" not in error["message"] and "sys." not in error["message"]  # Python's words were shown
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1008


def test_webm_ignores_sample_rate_as_documented(harness):
    h = harness()
    with connect(f"ws://{h.base}/listen?encoding=webm&sample_rate=abc") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.send(json.dumps({"type": "KeepAlive"}))
        with pytest.raises(TimeoutError):  # no bad_request: the session runs
            ws.recv(timeout=1)


def test_oversized_message_closes_only_that_connection(harness):
    h = harness("websocket.max_message_bytes=65536")
    with connect(f"ws://{h.base}/events") as bystander:
        bystander.recv(timeout=10)
        with connect(f"ws://{h.base}/listen", max_size=None) as ws:
            ws.recv(timeout=10)
            ws.send(b"\x00" * 70000)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1009
        bystander.send(json.dumps({"cmd": "ping"}))
        assert json.loads(bystander.recv(timeout=10))["type"] == "pong"


def test_webm_opus_stream_is_transcribed(harness):
    h = harness()
    data = webm_opus(SPEECH)
    with connect(f"ws://{h.base}/listen?encoding=webm") as ws:
        ws.recv(timeout=10)
        for i in range(0, len(data), 1000):  # MediaRecorder-sized pieces, cut anywhere
            ws.send(data[i:i + 1000])
        final = events_until(ws, "final")[-1]
        heard = float(final["text"].split()[1])
        assert abs(heard - (len(SPEECH) / 16000 - 1.5)) < 1.0


def test_undecodable_webm_gets_an_error(harness):
    h = harness()
    with connect(f"ws://{h.base}/listen?encoding=webm") as ws:
        ws.recv(timeout=10)
        ws.send(b"this is not a webm stream " * 200)
        ws.send(json.dumps({"type": "CloseStream"}))
        error = events_until(ws, "error")[-1]
        assert error["code"] == "bad_audio" and "WebM" in error["message"] and "Errno" not in error["message"]
    with connect(f"ws://{h.base}/events") as ws:  # the daemon is fine
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_a_webm_session_closed_before_any_audio_ends_at_once(harness, caplog):
    h = harness()
    with connect(f"ws://{h.base}/listen?encoding=webm") as ws:  # the microphone button, on and straight off
        ws.recv(timeout=10)
        ws.send(json.dumps({"type": "CloseStream"}))
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got.append(json.loads(ws.recv(timeout=60)))
    assert closed.value.rcvd.code == 1000
    assert [e for e in got if e["type"] == "error"] == []  # it was a bad_audio in FFmpeg's words
    # Its tasks ended by themselves: none had to be abandoned at the close's bound.
    assert not [r for r in caplog.records if "abandoning it" in r.getMessage()]


def test_a_session_whose_pause_already_lasted_long_enough_ends_at_its_sentence_end_without_more_audio():
    # The whole message (speech, then 0.6 s of quiet) goes through the gate before the final's decode
    # ends the sentence: the gate has passed gate.sentence_end_ms already, and no later message comes.
    import concurrent.futures

    from captiond.events import SpeechEnd
    from captiond.session import LiveSession

    config = load(None, ["gate.hangover_ms=1000", "gate.sentence_end_ms=300", "asr.partials=false"])[0]
    sent = []

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as gate_thread:
            session = LiveSession(Engine(FakeDecoder(ending=" of speech.")), config, sent.append,
                                  encoding="linear16", sample_rate=16000, gate_thread=gate_thread)
            session.start()
            await session.feed(np.concatenate([SPEECH[:-16000], silence(0.6)]).tobytes())
            for _ in range(600):
                if any(isinstance(e, SpeechEnd) for e in sent):
                    break
                await asyncio.sleep(0.05)
            session.cancel()

    asyncio.run(main())
    ends = [e for e in sent if isinstance(e, SpeechEnd)]
    assert [e.reason for e in ends] == ["sentence_end"], sent
    finals = [e for e in sent if isinstance(e, Final)]
    assert len(finals) == 1 and finals[0].text.endswith(" of speech."), finals


def test_a_webm_session_cancelled_with_its_pipe_full_ends_its_decoder_thread(monkeypatch):
    # A client that sent its stream's header in small messages, then vanished while they all waited:
    # the decoder thread, still reading the header, emptied the queue the end could not be put on, and
    # waited for more bytes for ever (a thread per such client, not counted against max_sessions).
    import concurrent.futures
    import threading

    from captiond import capture
    from captiond.session import _PIPE_CHUNKS, LiveSession

    header = webm_opus(SPEECH[:16000])[:200]
    decode_file, filled = capture.decode_file, threading.Event()

    def late_reader(*args, **kwargs):  # the thread begins reading once the queue is full
        filled.wait(30)
        return decode_file(*args, **kwargs)

    monkeypatch.setattr(capture, "decode_file", late_reader)

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as gate_thread:
            session = LiveSession(Engine(FakeDecoder()), load(None, [])[0], lambda event: None, encoding="webm",
                                  sample_rate=48000, gate_thread=gate_thread)
            before = set(threading.enumerate())
            session.start()
            ours = [t for t in threading.enumerate() if t.name == "captiond-webm" and t not in before]
            for i in range(_PIPE_CHUNKS):
                await session.feed(header[i:i + 1])
            session.cancel()
            filled.set()
            for _ in range(600):
                if len(ours) == 1 and not ours[0].is_alive():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the WebM decoder thread never ended")

    asyncio.run(main())


def test_foreign_origins_and_rebinding_hosts_are_refused(harness):
    h = harness("websocket.origins='http://localhost:3000'")
    port = h.service.web.port
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}):
        with pytest.raises(InvalidStatus) as err:
            connect(f"ws://{h.base}/events", additional_headers=headers)
        assert err.value.response.status_code == 403
    # DNS rebinding: a page on a foreign name that resolves to 127.0.0.1 is same-origin with itself.
    with pytest.raises(InvalidStatus) as err:
        connect(f"ws://evil.example:{port}/events", sock=socket.create_connection(("127.0.0.1", port)),
                additional_headers={"Origin": f"http://evil.example:{port}"})
    assert err.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as err:  # a second Host header: which one names the server?
        connect(f"ws://{h.base}/events", additional_headers={"Host": h.base})
    assert err.value.response.status_code == 400
    for origin in (f"http://{h.base}", "http://localhost:3000"):  # the page's own origin and a listed one
        with connect(f"ws://{h.base}/events", additional_headers={"Origin": origin}) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_refusals_are_logged_now_and_then_not_each(harness, caplog):
    # A captions page left open with an old token retries every 2 s: 43,200 warnings a day.
    h = harness()
    for _ in range(30):
        with pytest.raises(InvalidStatus):
            connect(f"ws://{h.base}/events", additional_headers={"Origin": "http://evil.example"})
    with pytest.raises(InvalidStatus):  # another kind of refusal is said at once
        connect(f"ws://evil.example:{h.service.web.port}/events",
                sock=socket.create_connection(("127.0.0.1", h.service.web.port)))
    said = [r.getMessage() for r in caplog.records if "websocket: refused" in r.getMessage()]
    assert len(said) == 2, said  # the next origin refusal is said five minutes on (test_server)
    assert "(1 refused for this so far)" in said[0], said
    assert "'evil.example:" in said[1] and "(1 refused for this so far)" in said[1], said
    assert h.service.web.refused == {"origin": 30, "host": 1}


def _raw_status(port: int, headers: str) -> int:
    """The status line's code for a hand-written handshake to /events (headers end with CRLF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\n" + headers.encode() + b"Connection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        return int(sock.makefile("rb").readline().split()[1])


def test_a_header_given_twice_is_a_bad_request_and_a_bare_ipv6_loopback_host_is_local(harness, caplog):
    h = harness()
    port = h.service.web.port
    for twice in ("Upgrade: websocket\r\nUpgrade: websocket\r\nHost: 127.0.0.1\r\n",
                  "Upgrade: websocket\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n",
                  "Upgrade: websocket\r\nHost: 127.0.0.1\r\nOrigin: http://127.0.0.1\r\nOrigin: null\r\n",
                  "Upgrade: websocket\r\nHost: 127.0.0.1\r\nAuthorization: a\r\nAuthorization: b\r\n"):
        assert _raw_status(port, twice) == 400, twice
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a bad request is no server error"
    assert _raw_status(port, "Upgrade: websocket\r\nHost: [::1]\r\n") == 101
    assert _raw_status(port, f"Upgrade: websocket\r\nHost: [::1]:{port}\r\n") == 101
    assert _raw_status(port, "Upgrade: websocket\r\nHost: [::1\r\n") == 403


def test_token_is_required_when_set(harness):
    h = harness(f"websocket.token='{TOKEN}'")
    for url, headers in ((f"ws://{h.base}/events", {}), (f"ws://{h.base}/events?token=wrong", {})):
        with pytest.raises(InvalidStatus) as err:
            connect(url, additional_headers=headers)
        assert err.value.response.status_code == 403
    for url, headers in ((f"ws://{h.base}/events?token={TOKEN}", {}),
                         (f"ws://{h.base}/events", {"Authorization": f"Bearer {TOKEN}"})):
        with connect(url, additional_headers=headers) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_non_local_bind_needs_a_token():
    with pytest.raises(ConfigError, match="websocket.token"):
        WebSocketConfig(host="0.0.0.0")
    with pytest.raises(ConfigError, match="websocket.token"):
        WebSocketConfig(host="0.0.0.0", token="short")
    assert WebSocketConfig(host="0.0.0.0", token=TOKEN).host == "0.0.0.0"
    with pytest.raises(ConfigError, match="websocket.origins"):
        WebSocketConfig(origins="localhost:3000")


def test_port_in_use_is_a_clear_error():
    async def main():
        first = WebServer(WebSocketConfig(enabled=True, port=0), Hub(), lambda *a, **k: None)
        await first.start()
        second = WebServer(WebSocketConfig(enabled=True, port=first.port), Hub(), lambda *a, **k: None)
        try:
            with pytest.raises(WebError, match="websocket.port"):
                await second.start()
        finally:
            await first.close(1.0)
            await second.close(1.0)

    asyncio.run(main())


def test_close_drops_connections_that_never_answer_its_close_frame():
    async def main() -> bool:
        web = WebServer(WebSocketConfig(enabled=True, port=0), Hub(hello=lambda: Pong()), lambda *a, **k: None)
        await web.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 101")
        # ... and then the client answers nothing, not even the close frame.
        await web.close(0.5)
        connections = web._server.all_connections
        dropped = bool(connections) and all(c.transport.is_closing() for c in connections)
        writer.close()
        return dropped

    assert asyncio.run(main())


def test_a_host_name_that_does_not_resolve_names_websocket_host():
    async def main():
        web = WebServer(WebSocketConfig(enabled=True, host="no-such-host.invalid", port=0, token="t" * 16), Hub(),
                        lambda *a, **k: None)
        with pytest.raises(WebError, match="set websocket.host to an address"):
            await web.start()

    asyncio.run(main())


def test_microphone_finals_go_before_queued_session_decodes():
    """The shared engine serves finals before partials and the microphone before sessions."""
    order = []

    class Recording(FakeDecoder):
        def decode(self, audio, **kw):
            order.append(len(audio))
            return super().decode(audio, **kw)

    async def main():
        engine = Engine(Recording(delay=0.2))
        audio = {n: np.zeros(n, dtype=np.float32) for n in (100, 200, 300, 400, 500)}
        first = asyncio.create_task(engine.decode(audio[500], beam_size=1, words=False, priority=3))
        await asyncio.sleep(0.05)  # it is running; the rest queue behind it
        rest = [asyncio.create_task(engine.decode(audio[n], beam_size=1, words=False, priority=p))
                for n, p in ((400, 3), (300, 2), (200, 1), (100, 0))]
        await asyncio.gather(first, *rest)
        engine.close()

    asyncio.run(main())
    assert order == [500, 100, 200, 300, 400]


def test_session_does_not_starve_the_microphone(harness):
    """With a slow engine and a session streaming all the time, the microphone's utterance still gets its final."""
    h = harness(delay=0.3)
    unix = EventLog(h.sock)
    with connect(f"ws://{h.base}/listen") as ws:
        ws.recv(timeout=10)
        for _ in range(3):
            stream(ws, SPEECH)
            h.say(SPEECH)
        h.say(silence(1.0))
        finals = [unix.wait_for(lambda e, n=n: e["type"] == "final" and e["utt"] == n, timeout=60) for n in (1, 2, 3)]
        assert all(f["text"].startswith("heard") for f in finals)
        mine = [e for e in events_until(ws, "final", timeout=60)]
        assert mine[-1]["text"].startswith("heard")
    unix.close()


def test_events_refuse_a_context_text_the_decoder_cannot_take(harness):
    h = harness()
    with connect(f"ws://{h.base}/events") as ws:
        json.loads(ws.recv(timeout=10))  # hello
        ws.send(json.dumps({"cmd": "context", "hotwords": "\udc80"}))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["code"] == "bad_command" and "hotwords" in error["message"]
    assert h.service.worker.hotwords == ""


def test_a_session_whose_task_fails_tells_its_client_and_its_feed_never_blocks():
    from concurrent.futures import ThreadPoolExecutor

    from captiond.session import LiveSession

    engine = Engine(FakeDecoder())
    sent = []
    gate_thread = ThreadPoolExecutor(max_workers=1)
    session = LiveSession(engine, load(None, ["asr.queue_seconds=5"])[0], sent.append, encoding="linear16",
                          sample_rate=16000, gate_thread=gate_thread)
    fed = []

    async def broken() -> None:
        # Fails only once everything is full: the gate waits on the worker's queue, feed() on the gate's.
        while not (session.worker.queue.full() and fed and fed[-1] == "waiting"):
            await asyncio.sleep(0.01)
        raise RuntimeError("a bug in the worker")

    session.worker.run = broken  # a failure outside every decode's own try

    async def main():
        session.start()
        speech = np.tile(SPEECH, 60 * 16000 // len(SPEECH) + 1).astype("<i2").tobytes()
        for at in range(0, len(speech), 16000):
            fed.append("waiting")
            await asyncio.wait_for(session.feed(speech[at:at + 16000]), 30)  # the one waiting when it failed returns
            fed.append("done")
        await session.finalize()
        await asyncio.wait_for(session.close(1.0), 10)

    asyncio.run(main())
    gate_thread.shutdown()
    engine.close()
    assert session.failed == "session failed" and session.broken.is_set()  # its client's handler stops waiting
    errors = [e for e in sent if getattr(e, "code", "") == "session_failed"]
    assert len(errors) == 1 and "a bug in the worker" in errors[0].message


def test_a_feed_waiting_for_room_returns_when_the_session_is_cancelled():
    # A Wyoming session is cancelled by its emitter when the client is gone, while the handler may be
    # waiting in feed() for room no task will make any more.
    from concurrent.futures import ThreadPoolExecutor

    from captiond.session import LiveSession

    engine, gate_thread = Engine(FakeDecoder(delay=1.0)), ThreadPoolExecutor(max_workers=1)
    session = LiveSession(engine, load(None, ["asr.queue_seconds=5", "asr.partials=false"])[0], lambda e: None,
                          encoding="linear16", sample_rate=16000, gate_thread=gate_thread)
    speech = np.tile(SPEECH, 30).astype("<i2").tobytes()

    async def main():
        session.start()

        async def feed_all():
            for at in range(0, len(speech), 16000):
                await session.feed(speech[at:at + 16000])

        feeding = asyncio.create_task(feed_all())
        deadline = time.monotonic() + 60
        while not (session.worker.queue.full() and session._audio.full()):  # the feed now waits for room
            assert not feeding.done() and time.monotonic() < deadline
            await asyncio.sleep(0.01)
        session.cancel()
        await asyncio.wait_for(feeding, 30)

    try:
        asyncio.run(main())
    finally:
        gate_thread.shutdown()
        engine.close()


def _closed_session(decoder: FakeDecoder, utterances: int, timeout: float, others: int = 0,
                    stall_s: float = 60.0) -> list:
    """What a linear16 session sends when `utterances` clips arrive at once and the stream then ends
    while `others` decodes of someone else's, ahead of the session's in the model's queue, come first."""
    from concurrent.futures import ThreadPoolExecutor

    from captiond.gate import features
    from captiond.session import LiveSession

    # The gate's filterbank is designed once per process, in a child (a second or two): not inside the
    # close bound, or a test run alone abandons the session before its first utterance.
    features(np.zeros(1600, np.int16))
    engine, sent, gate_thread = Engine(decoder, stall_s), [], ThreadPoolExecutor(max_workers=1)
    session = LiveSession(engine, load(None, ["asr.partials=false"])[0], sent.append, encoding="linear16",
                          sample_rate=16000, gate_thread=gate_thread)

    async def neighbour():  # the microphone's finals go first; two at once, so one always waits
        for _ in range(others // 2):
            await engine.decode(np.zeros(1600, np.float32), beam_size=1, words=False, priority=MIC)

    async def main():
        session.start()
        speech = np.tile(SPEECH, utterances).astype("<i2").tobytes()
        for at in range(0, len(speech), 32000):
            await asyncio.wait_for(session.feed(speech[at:at + 32000]), 60)
        ahead = [asyncio.create_task(neighbour()) for _ in range(2)]
        await asyncio.wait_for(session.close(timeout), 120)
        await asyncio.gather(*ahead)

    try:
        asyncio.run(main())
    finally:
        gate_thread.shutdown()
        engine.close()
    return sent


def test_a_closing_session_decodes_everything_it_took_in_while_it_makes_progress():
    # Eight utterances sent at once take longer to decode than the close bound, one decode at a time
    # well within it: the wait goes on, and every utterance gets its final.
    sent = _closed_session(FakeDecoder(delay=0.3), 8, timeout=1.5)
    finals = [e for e in sent if isinstance(e, Final)]
    assert len(finals) == 8 and all(f.text.startswith("heard") for f in finals)
    assert not [e for e in sent if isinstance(e, Error)]


def test_a_closing_session_waits_while_the_model_decodes_for_someone_else():
    # Two Wyoming clients streaming 8 minutes each at once: one's decodes waited behind the other's
    # for the close bound, and it was abandoned and its finals lost while the model decoded all along.
    # Here twelve decodes of the microphone's, each well within the bound, all of them together past it.
    sent = _closed_session(FakeDecoder(delay=0.3), 4, timeout=1.0, others=12)
    finals = [e for e in sent if isinstance(e, Final)]
    assert len(finals) == 4 and all(f.text.startswith("heard") for f in finals)
    assert not [e for e in sent if isinstance(e, Error)]


def test_a_closing_session_waits_for_a_decode_slower_than_its_bound_that_is_not_stuck():
    # The daemon under `nice` beside busy processes: one decode took longer than the close bound, and
    # the session was abandoned while its decode ran.
    sent = _closed_session(FakeDecoder(delay=1.5), 3, timeout=0.5, stall_s=60.0)
    finals = [e for e in sent if isinstance(e, Final)]
    assert len(finals) == 3 and all(f.text.startswith("heard") for f in finals)
    assert not [e for e in sent if isinstance(e, Error)]


def test_a_closing_session_that_decodes_nothing_for_its_bound_is_abandoned_and_says_so():
    class Stuck(FakeDecoder):
        def decode(self, audio, **kw):
            if len(self.calls) >= 2:  # a decoder thread that hangs from the third decode on
                time.sleep(6.0)
            return super().decode(audio, **kw)

    # Stuck: a decode under way for longer than the model's stall bound (the watchdog's 60 s, here 1 s).
    sent = _closed_session(Stuck(), 4, timeout=1.0, stall_s=1.0)
    errors = [e for e in sent if isinstance(e, Error)]
    assert [e.code for e in errors][-1] == "audio_dropped" and "not transcribed" in errors[-1].message
    assert {e.code for e in errors[:-1]} <= {"decode_failed"}
    finals = [e for e in sent if isinstance(e, Final)]
    assert 1 <= len([f for f in finals if f.text]) < 4
    # Every utterance the session announced has its final, the one it gave up on flagged error.
    assert [e.utt for e in sent if isinstance(e, SpeechStart)] == [f.utt for f in finals]


def test_a_client_gone_while_its_session_closes_is_not_decoded_for(harness):
    # Twenty utterances at once, CloseStream, and once the session has taken them all in the connection
    # drops without a close frame: the session is abandoned, where it used to decode all twenty for no
    # one (and hold its slot meanwhile).
    h = harness("asr.partials=false", decoder=HeldDecoder(delay=0.2))
    pcm = np.tile(SPEECH, 20)
    with connect(f"ws://{h.base}/listen?encoding=linear16&sample_rate=16000") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        stream(ws, pcm, chunk_s=1.0)
        ws.send(json.dumps({"type": "CloseStream"}))
        deadline = time.monotonic() + 60
        while not any(s.samples >= len(pcm) for s in h.service.web._sessions):
            assert time.monotonic() < deadline, "the session did not take the audio in"
            time.sleep(0.05)
        ws.socket.shutdown(socket.SHUT_RDWR)
    time.sleep(0.5)  # not needed by the fix: it only gives the server time to see the close first
    h.decoder.go.set()
    deadline = time.monotonic() + 60
    while h.service.web._sessions:
        assert time.monotonic() < deadline, "the session outlived its client"
        time.sleep(0.05)
    assert len(h.decoder.calls) <= 2  # the decode that was waiting, and one begun before the cancel


def test_events_clients_beyond_server_max_clients_get_an_error_and_a_1013_close(harness):
    h = harness("server.max_clients=1")
    with connect(f"ws://{h.base}/events") as first:
        assert json.loads(first.recv(timeout=10))["type"] == "hello"
        with connect(f"ws://{h.base}/events") as second:
            refused = json.loads(second.recv(timeout=10))
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=10)
            # The Unix socket keeps its own budget: any local user can reach the loopback port, and
            # filling it locked the socket's owner out (its captiond status was refused).
            with socket.socket(socket.AF_UNIX) as own:
                own.settimeout(10)
                own.connect(str(h.sock))
                assert json.loads(own.makefile("rb").readline())["type"] == "hello"
    assert refused["code"] == "too_many_clients" and closed.value.rcvd.code == 1013
    assert "over WebSocket /events" in refused["message"]


def test_tcp_connections_past_the_limits_are_dropped_before_any_handshake(harness):
    # Idle connections count against no client or session limit until their handshake: any local
    # process held 1100 of them and the daemon had no file descriptor left.
    h = harness("server.max_clients=1", "websocket.max_sessions=1")
    most = 1 + 1 + 64
    host, port = h.base.split(":")
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(most)]
    try:
        extra = socket.create_connection((host, int(port)), timeout=10)
        with extra:
            try:
                assert extra.recv(1) == b""  # closed (the count below tells it from the handshake timeout's close)
            except ConnectionResetError:
                pass
        assert h.service.web.refused["connections"] >= 1
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 30
    while True:  # once they are gone, the port takes clients again
        try:
            with connect(f"ws://{h.base}/events", open_timeout=10) as ws:
                assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            break
        except (ConnectionClosed, OSError, InvalidStatus):
            assert time.monotonic() < deadline, "the port took no client after the connections closed"
            time.sleep(0.1)


def test_the_server_sends_no_pings_and_leaves_gone_peers_to_tcp_keepalive(harness):
    # A /listen client sending audio faster than it was decoded had its pong queued behind that audio,
    # and the server's 20 s ping timeout closed it (1011) with most of its finals still to come.
    h = harness()
    with connect(f"ws://{h.base}/events") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        (server_side,) = h.service.web._server.connections
        assert server_side.ping_interval is None
        sock = server_side.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


def test_a_session_slot_is_free_once_its_decoding_is_done_though_its_client_never_reads(harness):
    # A client that keeps sending after CloseStream and reads nothing cannot answer the close: its
    # connection lingers until websockets' close timeout, and the session's slot went with it (10 s).
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    h = harness("websocket.max_sessions=1")
    host, port = h.base.split(":")
    raw = socket.create_connection((host, int(port)), timeout=10)
    protocol = ClientProtocol(parse_uri(f"ws://{h.base}/listen?encoding=linear16&sample_rate=16000"))
    protocol.send_request(protocol.connect())
    raw.sendall(b"".join(protocol.data_to_send()))
    while protocol.handshake_exc is None and not protocol.events_received():
        protocol.receive_data(raw.recv(65536))  # up to the hello: the only reading it ever does
    protocol.send_binary(SPEECH[:16000].astype("<i2").tobytes())
    protocol.send_text(json.dumps({"type": "CloseStream"}).encode())
    raw.sendall(b"".join(protocol.data_to_send()))
    admitted = threading.Event()

    def keep_sending():
        with contextlib.suppress(OSError):
            while not admitted.is_set():
                protocol.send_binary(silence(0.1).astype("<i2").tobytes())
                raw.sendall(b"".join(protocol.data_to_send()))
                time.sleep(0.05)

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while not admitted.is_set():
            assert time.monotonic() < deadline, "no second session was admitted"
            with connect(f"ws://{h.base}/listen") as second:
                assert json.loads(second.recv(timeout=10))["type"] == "hello"
                try:
                    refused = json.loads(second.recv(timeout=0.3))
                    assert refused["code"] == "too_many_sessions", refused
                except TimeoutError:  # no refusal: it runs
                    # ...while the first client's connection is still there, answering nothing.
                    assert len(h.service.web._server.all_connections) == 2  # open, and closing
                    admitted.set()
            time.sleep(0.1)
    finally:
        admitted.set()
        raw.close()
        sender.join(10)


def test_a_daemon_stop_closes_events_subscribers_with_going_away_after_stopping(harness):
    h = harness()
    with connect(f"ws://{h.base}/events") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        h.loop.call_soon_threadsafe(h.service.stop)
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got.append(json.loads(ws.recv(timeout=60)))
    assert any(e["type"] == "status" and e["state"] == "stopping" for e in got)
    assert closed.value.rcvd.code == 1001  # a client reconnects after 1001; 1000 says "closed on purpose"


def test_a_daemon_stop_still_gives_the_open_utterance_of_a_session_its_final(harness):
    # The client got speech_start, then a close: no final, no word of why.
    decoder = HeldDecoder()
    h = harness("asr.partials=false", decoder=decoder)
    try:
        with connect(f"ws://{h.base}/listen?encoding=linear16&sample_rate=16000") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            stream(ws, SPEECH)
            start = events_until(ws, "speech_start")[-1]
            h.loop.call_soon_threadsafe(h.service.stop)
            got = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    got.append(json.loads(ws.recv(timeout=60)))
        finals = [e for e in got if e["type"] == "final"]
        assert [(f["utt"], f["text"], "error" in f["flags"]) for f in finals] == [(start["utt"], "", True)]
        assert any(e["type"] == "error" and "stopping" in e["message"] for e in got)
        assert closed.value.rcvd.code == 1001
    finally:
        decoder.go.set()


def test_a_session_whose_client_just_leaves_has_its_end_logged(harness, caplog):
    # Sessions ended by CloseStream were logged, those whose client closed the connection were not:
    # the log could not tell a session still running from one gone.
    caplog.set_level(logging.INFO, logger="captiond.websocket")
    h = harness("asr.partials=false")
    with connect(f"ws://{h.base}/listen?encoding=linear16&sample_rate=16000") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        stream(ws, SPEECH[:16000])
        deadline = time.monotonic() + 60
        while not any(s.samples >= 16000 for s in h.service.web._sessions):
            assert time.monotonic() < deadline, "the session did not take the audio in"
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while h.service.web._sessions:
        assert time.monotonic() < deadline, "the session outlived its client"
        time.sleep(0.05)
    assert "the client disconnected after 1.0 s of audio" in caplog.text
