"""systemd notification: READY/STATUS/WATCHDOG/STOPPING over a datagram socket the test binds."""

import asyncio
import signal
import socket
import time

import pytest

from captiond.capture import Source
from captiond.config import load
from captiond.engine import Engine
from captiond.service import Service
from conftest import FakeDecoder


def bind(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    return sock


def drain(sock, until, timeout=60.0):
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return got


@pytest.mark.slow
def test_daemon_notifies_ready_status_watchdog_and_stopping(vmic, daemon_factory, tmp_path):
    sock = bind(tmp_path)
    env = {**vmic.env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    daemon = daemon_factory("--source", "mic", env=env)
    got = drain(sock, lambda g: g.count("WATCHDOG=1") >= 3)
    assert "READY=1" in got and any(m.startswith("STATUS=listening") for m in got)
    assert got[0] == "STATUS=starting", "said while the model loads"
    assert got.index("READY=1") < got.index("WATCHDOG=1")
    assert "ready in" in daemon.stderr  # READY follows the model load and warm-up
    daemon.proc.send_signal(signal.SIGTERM)
    got += drain(sock, lambda g: "STOPPING=1" in g, timeout=20)
    assert "STOPPING=1" in got and any(m.startswith("STATUS=stopping") for m in got)
    assert daemon.proc.wait(20) == 0


class QuietLiveSource(Source):
    """A live source whose device hangs: no audio, no error (a stuck driver call)."""

    live = True
    description = "stuck microphone"

    def check(self):
        pass

    async def run(self, capture):
        await asyncio.Event().wait()


def test_watchdog_pings_only_while_the_pipeline_moves(tmp_path, monkeypatch, caplog):
    sock = bind(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    service = Service(load(None, [])[0], source=QuietLiveSource(), engine=Engine(FakeDecoder()))

    async def main():
        task = asyncio.create_task(service.watchdog.run(0.05))
        await asyncio.sleep(0.3)
        healthy = drain(sock, lambda g: len(g) >= 3, timeout=1)
        service.capture.last_chunk = time.monotonic() - 100  # capture stalled
        await asyncio.sleep(0.3)
        drain(sock, lambda g: False, timeout=0.3)  # pings already in flight
        await asyncio.sleep(0.3)
        stalled = drain(sock, lambda g: False, timeout=0.3)
        service.capture.last_chunk = time.monotonic()
        service.engine.busy_since = time.monotonic() - 100  # a decode that never returns
        await asyncio.sleep(0.3)
        drain(sock, lambda g: False, timeout=0.3)
        stuck_worker = drain(sock, lambda g: False, timeout=0.3)
        service.engine.busy_since = None
        await asyncio.sleep(0.3)
        recovered = drain(sock, lambda g: len(g) >= 1, timeout=1)
        task.cancel()
        return healthy, stalled, stuck_worker, recovered

    healthy, stalled, stuck_worker, recovered = asyncio.run(main())
    assert healthy.count("WATCHDOG=1") >= 3
    assert stalled == [] and stuck_worker == []
    assert "WATCHDOG=1" in recovered
    assert "no audio from stuck microphone" in caplog.text and "decoder has been busy" in caplog.text


def test_a_file_name_that_is_not_utf8_or_holds_a_newline_neither_stops_the_daemon_nor_writes_systemd_lines(tmp_path):
    # The source's name is the state's detail: sent to clients (a byte that is not UTF-8 could not be
    # encoded, and the daemon died) and to systemd, which reads its message line by line.
    import os
    import shutil

    from conftest import CORPUS, Daemon

    sock = bind(tmp_path)
    name = os.fsencode(tmp_path) + b"/bad\xffname\nREADY=1\nSTOPPING=1.wav"
    shutil.copy(CORPUS / "ps_forever.wav", name)
    daemon = Daemon(tmp_path, "--source", "file:" + os.fsdecode(name), "--set", "audio.realtime=true",
                    env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        events = daemon.connect()
        status = events.wait_for(lambda e: e.get("state") == "listening")
        assert "bad\\xffname\\nREADY=1" in status["detail"]
        assert events.wait_for(lambda e: e["type"] == "final" and e["text"])
        got = drain(sock, lambda g: any(m.startswith("STATUS=listening") for m in g), timeout=30)
        assert [m for m in got if m.startswith("STATUS=listening")][0].count("\n") == 0
        assert daemon.stop() == 0
        got += drain(sock, lambda g: "STOPPING=1" in g, timeout=20)
        assert "READY=1" in got and not any("\nREADY=1" in m or "\nSTOPPING=1" in m for m in got)
    finally:
        daemon.kill()
