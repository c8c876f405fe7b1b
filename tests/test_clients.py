"""Client-side tools: typed events, AsyncClient, captions under tmux, status, listen, tail -F on the log."""

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from captiond.client import AsyncClient, Client
from captiond.events import Final, Hello, Partial, decode
from captiond.translog import TranscriptLog
from conftest import CORPUS, ROOT, SPEECH, Daemon, Harness, read_wav, silence


def test_decode_gives_typed_events_and_tolerates_newer_daemons():
    env = decode(b'{"type":"final","seq":4,"ts":1.5,"utt":2,"start":0.1,"end":1.0,"text":"hi","words":'
                 b'[{"word":"hi","start":0.1,"end":0.4,"p":0.9,"extra":1}],"language":"en","latency":0.3,'
                 b'"flags":["x"],"new_field":true}')
    assert env.seq == 4 and isinstance(env.event, Final)
    assert env.event.words[0].word == "hi" and env.event.flags == ("x",)
    assert decode(b'{"type":"brand_new_event","seq":5,"ts":2.0}') is None
    with pytest.raises(ValueError):
        decode(b'[1,2,3]')
    with pytest.raises(ValueError):
        decode(b'{"type":"final","seq":1,"ts":1}')


def test_async_and_sync_clients_read_typed_events(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    got = []

    async def listen():
        async with AsyncClient(h.sock) as client:
            await client.subscribe(["final"])
            async for env in client:
                got.append(env)
                if isinstance(env.event, Final):
                    return

    with Client(h.sock) as sync:
        first = next(sync.events())
        assert isinstance(first.event, Hello)
        h.say(SPEECH)
        asyncio.run(asyncio.wait_for(listen(), 30))
        kinds = []
        for env in sync.events():
            kinds.append(env.event.type)
            if isinstance(env.event, Final):
                break
    h.end()
    assert isinstance(got[0].event, Hello) and isinstance(got[-1].event, Final)
    assert not any(isinstance(e.event, Partial) for e in got), "subscribe filter"
    assert kinds[-1] == "final" and "speech_start" in kinds


def test_tail_follows_the_log_across_rotations(tmp_path):
    path = tmp_path / "transcript.log"
    log = TranscriptLog(path, 1024, 3)
    log.check()
    tail = subprocess.Popen(["tail", "-n", "+1", "-F", str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for i in range(60):
            log.write(Final(i, 0.0, 1.0, f"line number {i} " + "x" * 20, (), "en", 0.1), 1_700_000_000.0)
            time.sleep(0.05)
        assert path.with_name("transcript.log.3").exists(), "the log must have rotated several times"
        time.sleep(2.0)  # tail -F notices a renamed file within a second
    finally:
        tail.terminate()
    seen = [line.split("\t")[1] for line in tail.stdout.read().decode().splitlines() if "\t" in line]
    assert seen == [str(i) for i in range(60)]


def tmux(*args):
    return subprocess.run(["tmux", "-L", "captiond-test", *args], capture_output=True, text=True)


def screen():
    return tmux("capture-pane", "-p", "-t", "cap", "-S", "-50").stdout


def wait_screen(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = screen()
        if pred(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"screen never matched:\n{screen()}")


@pytest.mark.slow
def test_captions_status_and_listen_against_a_real_daemon(tmp_path):
    assert shutil.which("tmux"), "tmux is needed (make test installs it)"
    sock = tmp_path / "captiond.sock"
    speech = silence(0.5).tobytes() + read_wav(CORPUS / "mfa_thoughts.wav").tobytes() + silence(1.5).tobytes()

    def start_daemon():
        daemon = Daemon(tmp_path, "--source", "-", stdin=subprocess.PIPE)
        daemon.proc.stdin.write(silence(0.3).tobytes())  # "listening" means audio is flowing
        daemon.proc.stdin.flush()
        daemon.connect()
        return daemon

    daemon = start_daemon()
    tmux("kill-server")
    # Given as separate words, tmux runs the command itself (no shell), so the pane's exit status is ours.
    tmux("new-session", "-d", "-s", "cap", "-x", "100", "-y", "20", "-c", str(ROOT),
         sys.executable, "-m", "captiond", "captions", "--timestamps", "--set", f"server.socket={sock}")
    tmux("set-option", "-t", "cap", "remain-on-exit", "on")
    try:
        wait_screen(lambda s: "connected: model tiny.en (bundled)" in s)
        daemon.proc.stdin.write(speech)
        daemon.proc.stdin.flush()
        # The partial shows the words first, dimmed; the final replaces it, stamped HH:MM:SS.
        wait_screen(lambda s: re.search(r"^\d\d:\d\d:\d\d I have a thousand thoughts", s, re.M | re.I))

        status = subprocess.run([sys.executable, "-m", "captiond", "status", "--set", f"server.socket={sock}"],
                                capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert status.returncode == 0 and "state:        listening" in status.stdout
        # The test's own reader, captions, and status itself.
        assert "subscribers:  3" in status.stdout and "tiny.en" in status.stdout

        listen = subprocess.Popen([sys.executable, "-m", "captiond", "listen", "--since", "0", "--types", "final",
                                   "--set", f"server.socket={sock}"], stdout=subprocess.PIPE, cwd=ROOT)
        hello = json.loads(listen.stdout.readline())
        replayed = json.loads(listen.stdout.readline())
        listen.terminate()
        assert hello["type"] == "hello" and replayed["type"] == "final" and "thoughts" in replayed["text"]

        daemon.proc.stdin.close()  # end of input: the daemon stops
        assert daemon.proc.wait(30) == 0
        wait_screen(lambda s: "not running" in s and "waiting for it" in s)

        daemon = start_daemon()
        wait_screen(lambda s: s.count("connected: model") == 2)
        daemon.proc.stdin.write(speech)
        daemon.proc.stdin.flush()
        wait_screen(lambda s: len(re.findall(r"^\d\d:\d\d:\d\d I have a thousand thoughts", s, re.M | re.I)) == 2)

        tmux("send-keys", "-t", "cap", "C-c")
        deadline = time.monotonic() + 10
        while tmux("list-panes", "-t", "cap", "-F", "#{pane_dead}").stdout.strip() != "1":
            assert time.monotonic() < deadline, f"captions did not quit on Ctrl-C:\n{screen()}"
            time.sleep(0.1)
        assert "Traceback" not in screen()
    finally:
        tmux("kill-server")
        daemon.kill()
