"""The service wired for real (socket, gate, worker, log) with a fake decoder and a pipe as the source."""

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np

from captiond.capture import StdinSource
from captiond.config import Config, load
from captiond.engine import Engine
from captiond.server import Server
from captiond.service import Service
from captiond.translog import TranscriptLog
from conftest import CORPUS, EventLog, FakeDecoder, read_wav, silence

SPEECH = np.concatenate([silence(0.5), read_wav(CORPUS / "ps_forever.wav"), silence(1.0)])


class Harness:
    """A Service on a real socket in a background event loop, fed through a pipe the test writes."""

    def __init__(self, tmp: Path, log_path: Path, config: Config | None = None):
        self.config = config or load(None, ["server.stats_interval_s=0"])[0]
        self.read_fd, self.write_fd = os.pipe()
        self.sock = tmp / "s.sock"
        self.exit_code = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main(log_path)), daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    async def _main(self, log_path):
        service = None
        server = Server(self.sock, hello=lambda: service.hello(), on_command=lambda c: service.on_command(c))
        service = Service(self.config, source=StdinSource(os.fdopen(self.read_fd, "rb")),
                          engine=Engine(FakeDecoder()), server=server,
                          translog=TranscriptLog(log_path, 100_000, 1))
        self.service = service
        task = asyncio.create_task(service.run())
        while not self.sock.exists():
            await asyncio.sleep(0.01)
        self.ready.set()
        self.exit_code = await task

    def say(self, pcm):
        os.write(self.write_fd, pcm.tobytes())

    def end(self):
        os.close(self.write_fd)
        self.thread.join(30)


def test_full_disk_for_the_log_is_reported_and_finals_keep_coming(tmp_path):
    h = Harness(tmp_path, Path("/dev/full"))
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    error = events.wait_for(lambda e: e["type"] == "error")
    assert error["code"] == "log_write_failed" and "No space left" in error["message"]
    h.say(SPEECH)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    assert len(events.of("error")) == 1, "the same failure is reported once, not per line"
    h.end()
    assert h.exit_code == 0
    assert h.service.translog.backlog == 2


def test_pause_stops_listening_until_resume(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 1)
    events.client.send({"cmd": "pause"})
    paused = events.wait_for(lambda e: e["type"] == "status" and e["state"] == "paused")
    h.say(SPEECH)  # said while paused: never heard
    # More silence than a pipe holds: once written, all the speech has left the pipe; once the
    # ring is empty, the gate loop has passed it by while paused.
    h.say(silence(3.0))
    while len(h.service.ring):
        time.sleep(0.01)
    events.client.send({"cmd": "status"})
    reply = events.wait_for(lambda e: e["type"] == "status" and e["state"] == "paused" and e is not paused)
    assert reply["state"] == "paused" and reply["subscribers"] == 1 and reply["model"] == "fake"
    events.client.send({"cmd": "resume"})
    events.wait_for(lambda e: e["type"] == "status" and e["state"] == "listening" and e["seq"] > reply["seq"])
    h.say(SPEECH)
    h.end()
    finals = events.of("final")
    assert [f["utt"] for f in finals] == [1, 2]
    assert finals[1]["start"] > (2 * len(SPEECH)) / 16000, "the second final is the speech after resume"
    assert [line.split("\t")[1] for line in (tmp_path / "t.log").read_text().splitlines()] == ["1", "2"]
    assert h.exit_code == 0
