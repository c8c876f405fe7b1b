"""Client-side tools: typed events, AsyncClient, captions under tmux, status, listen, tail -F on the log."""

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from captiond.client import AsyncClient, Client
from captiond.events import Final, Hello, Partial, Status, decode
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
    seen: list[str] = []

    def read() -> None:
        for line in tail.stdout:
            if b"\t" in line:
                seen.append(line.decode().split("\t")[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def shown(n: int) -> None:  # tail has printed n lines: each rotation comes after it read the file
        deadline = time.monotonic() + 30
        while len(seen) < n:
            assert time.monotonic() < deadline, f"tail printed {seen}, not line {n - 1}"
            time.sleep(0.01)

    try:
        for i in range(60):
            log.write(Final(i, 0.0, 1.0, f"line number {i} " + "x" * 20, (), "en", 0.1), 1_700_000_000.0)
            shown(i + 1)
        assert path.with_name("transcript.log.3").exists(), "the log must have rotated several times"
    finally:
        tail.terminate()
        reader.join(10)
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
        replayed = json.loads(listen.stdout.readline())  # first: hello is not a type it asked for
        listen.terminate()
        assert replayed["type"] == "final" and "thoughts" in replayed["text"]

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


class FakeDaemon:
    """A Unix socket that answers each connection with the next script of raw lines, then closes it."""

    def __init__(self, path, scripts, linger=0.0, pace=0.0):
        import socket
        import threading

        self.path, self.scripts, self.linger, self.pace = path, list(scripts), linger, pace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            lines = self.scripts.pop(0) if self.scripts else []
            try:
                for line in lines:
                    conn.sendall(line)
                    time.sleep(self.pace)
                time.sleep(self.linger)
            except OSError:
                pass
            conn.close()

    def close(self):
        self.sock.close()


HELLO = b'{"type":"hello","seq":0,"ts":1.0,"version":"x","model":"m","sample_rate":16000,"state":"listening","protocol":1}\n'
REFUSED = b'{"type":"error","seq":0,"ts":1.0,"code":"too_many_clients","message":"2 clients are connected"}\n'
FINAL = (b'{"type":"final","seq":1,"ts":2.0,"utt":1,"start":0,"end":1,"text":"at last","words":[],"language":"en",'
         b'"latency":0.1}\n')


@pytest.mark.parametrize("bad", [
    b"not json\n", b"\xff\xfe\n", b"[1,2,3]\n", b'{"type":"final","text":5}\n', b"[" * 60000 + b"\n",
    b'{"type":"final","seq":1,"ts":2,"utt":1,"start":0,"end":1,"text":"x","words":[{"word":"a"}],"language":"en",'
    b'"latency":0}\n',
    # json.loads takes these, but no time or count is NaN or infinite (`status --json` printed NaN, not JSON)
    b'{"type":"status","seq":1,"ts":1,"state":"listening","uptime":NaN}\n',
    b'{"type":"status","seq":1,"ts":1,"state":"listening","lag":-Infinity}\n',
    b'{"type":"status","seq":1,"ts":1,"state":"listening","uptime":1e400}\n',
    FINAL.replace(b'"ts":2.0', b'"ts":NaN'),
    FINAL.replace(b'"ts":2.0', b'"ts":1e300'),  # no local time to show it as
])
def test_a_line_that_is_no_event_is_a_clear_error_for_every_client(tmp_path, bad):
    from captiond.client import BadDaemon

    fake = FakeDaemon(tmp_path / "s.sock", [[HELLO, bad]])
    with Client(fake.path) as client, pytest.raises(BadDaemon, match="not a captiond event"):
        list(client.events())
    fake.close()


def test_a_line_longer_than_any_event_is_refused_without_reading_it_all(tmp_path):
    from captiond.client import BadDaemon

    fake = FakeDaemon(tmp_path / "s.sock", [[HELLO, b"x" * (1 << 20)]], linger=5)  # and no newline, for a while
    with Client(fake.path) as client, pytest.raises(BadDaemon, match="longer than"):
        list(client.events())
    fake.close()


def test_captions_back_off_from_a_refusing_or_broken_daemon_and_show_what_a_good_one_says(tmp_path):
    from captiond.captions import CaptionView, follow
    import io

    fake = FakeDaemon(tmp_path / "s.sock", [[REFUSED], [HELLO, b"garbage\n"], [], [HELLO, FINAL]])
    out = io.StringIO()
    sleeps = []

    class Done(Exception):
        pass

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) > 6:
            raise Done

    with pytest.raises(Done):
        follow(fake.path, CaptionView(out, color=False), retry_s=0.01, sleep=sleep)
    fake.close()
    shown = out.getvalue()
    assert "captiond refused the connection: 2 clients are connected" in shown
    assert "not a captiond event" in shown and "at last" in shown
    assert fake.accepted <= 8, "it waited between tries rather than spinning"


def test_terminal_escapes_and_bidi_overrides_in_event_text_are_shown_not_acted_on(tmp_path):
    from captiond.captions import CaptionView, follow
    from captiond.dictation import Composer
    import io

    hostile = FINAL.replace(b'"at last"', b'"at \\u001b]0;pwned\\u0007\\u001b[2Jlast \\u202eevil\\nline\\ud800"'
                            b',"flags":["\\u001b[31m"]')
    fake = FakeDaemon(tmp_path / "s.sock", [[HELLO, hostile]])
    with Client(fake.path) as client:
        final = next(e.event for e in client.events() if e.event.type == "final")
    fake.close()
    assert final.text == "at \ufffd]0;pwned\ufffd\ufffd[2Jlast \ufffdevil\ufffdline\ufffd"
    assert final.flags == ("\ufffd[31m",)
    assert Composer().take(final).text.count("\ufffd") == 6  # what `captiond type` would type: no ESC
    fake = FakeDaemon(tmp_path / "s2.sock", [[HELLO, hostile]])
    out = io.StringIO()

    class Done(Exception):
        pass

    def sleep(seconds):
        raise Done

    with pytest.raises(Done):
        follow(fake.path, CaptionView(out, color=True), retry_s=0.01, sleep=sleep)
    fake.close()
    shown = out.getvalue()
    assert "\ufffd[2Jlast" in shown and "\x1b[2J" not in shown and "\x1b]0;" not in shown and "\u202e" not in shown


def test_status_and_ptt_against_a_refusing_or_babbling_daemon_exit_1_with_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "captiond", *args, "--set", f"server.socket={tmp_path}/s.sock"],
                              capture_output=True, timeout=120, cwd=ROOT)

    fake = FakeDaemon(tmp_path / "s.sock", [[REFUSED], [REFUSED], [REFUSED]])
    for args in (["status"], ["ptt", "stop"], ["listen"]):
        result = cli(*args)
        err = result.stderr.decode()
        assert result.returncode == 1 and "refused the connection" in err and "Traceback" not in err, (args, err)
    fake.close()
    (tmp_path / "s.sock").unlink()
    # Another program on the socket: `listen` printed its lines (escape sequences included) as they came.
    fake = FakeDaemon(tmp_path / "s.sock", [[b"raw \x1b[2J garbage\n", HELLO]])
    result = cli("listen")
    assert result.returncode == 1 and result.stdout == b"" and b"not a captiond event" in result.stderr
    fake.close()
    (tmp_path / "s.sock").unlink()
    stats = b'{"type":"stats","seq":1,"ts":1.0,"lag":0,"rtf":0,"dropped_frames":0,"queue":0}\n'
    # Never the pong, but a line every half second: each read is answered, the exchange never is.
    fake = FakeDaemon(tmp_path / "s.sock", [[HELLO] + [stats] * 60], pace=0.5)
    result = cli("ptt", "stop")
    err = result.stderr.decode()
    assert result.returncode == 1 and "did not answer within" in err and "Traceback" not in err, err
    fake.close()


def cli(path, *args):
    """`captiond ARGS` on the socket at path, in this process (short timeouts apply): exit code, out, err."""
    import contextlib
    import io

    from captiond import cli as captiond_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = captiond_cli.main([*args, "--set", f"server.socket={path}"])
    return code, out.getvalue(), err.getvalue()


def test_status_gives_up_on_a_daemon_that_does_not_answer(tmp_path, monkeypatch):
    from captiond import cli as captiond_cli

    monkeypatch.setattr(captiond_cli, "_ANSWER_TIMEOUT_S", 0.2)
    stats = b'{"type":"stats","seq":1,"ts":1.0,"lag":0,"rtf":0,"dropped_frames":0,"queue":0}\n'
    # Says hello and then nothing (a stopped daemon); babbles stats and never answers. Both hang up
    # after a few seconds, so a status without a time limit fails here rather than hanging.
    for name, script, kw in [("silent", [HELLO], {"linger": 5}), ("babbling", [HELLO] + [stats] * 100, {"pace": 0.05})]:
        fake = FakeDaemon(tmp_path / f"{name}.sock", [script], **kw)
        code, out, err = cli(fake.path, "status")
        fake.close()
        assert code == 1 and out == "", (name, err)
        assert err.startswith("captiond: error: captiond did not answer within 0.2 s") and err.count("\n") == 1, err


def test_status_against_a_daemon_that_hangs_up_or_breaks_the_protocol_is_one_line(tmp_path):
    bad_status = b'{"type":"status","seq":1,"ts":1,"state":"listening","uptime":NaN,"lag":Infinity}\n'
    cases = {
        "closed": ([], "the daemon closed the connection before answering"),  # not "[Errno 32] Broken pipe"
        "nan": ([HELLO, bad_status], "not a captiond event (status.uptime is 'nan', not a finite number)"),
        "no_hello": ([bad_status.replace(b"NaN", b"1").replace(b"Infinity", b"0")], "did not start with hello"),
    }
    for name, (script, said) in cases.items():
        for args in (["status"], ["status", "--json"]):
            fake = FakeDaemon(tmp_path / f"{name}.sock", [script], linger=5 if script else 0)
            code, out, err = cli(fake.path, *args)
            fake.close()
            (tmp_path / f"{name}.sock").unlink()
            assert code == 1 and out == "" and said in err and err.count("\n") == 1, (name, args, err)


def test_a_command_to_a_daemon_that_has_gone_is_a_clear_error_and_a_reset_ends_the_events(tmp_path):
    import select
    import socket
    import threading

    from captiond.client import Closed

    fake = FakeDaemon(tmp_path / "gone.sock", [[]])
    with Client(fake.path) as client:
        assert list(client.events()) == []
        with pytest.raises(Closed, match="^the daemon closed the connection before answering$"):
            client.send({"cmd": "status"})
    fake.close()

    # A daemon that closes with a command of ours unread resets the connection: an end, as a close is.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "reset.sock"))
    server.listen(1)

    def daemon():
        conn, _ = server.accept()
        select.select([conn], [], [], 10)  # the command is there, unread
        conn.close()

    thread = threading.Thread(target=daemon)
    thread.start()
    with Client(tmp_path / "reset.sock") as client:
        client.send({"cmd": "status"})
        thread.join(10)
        assert list(client.lines()) == []
    server.close()


@pytest.mark.parametrize("client", ["captions", "type"])
def test_clients_wait_before_reconnecting_to_a_daemon_that_says_hello_and_hangs_up(tmp_path, client):
    from captiond.captions import CaptionView, follow
    from captiond.dictation import Composer, type_finals
    import io

    # Its hello's seq is below the final's, as a restarted daemon's: nothing is sent, nothing fails.
    fake = FakeDaemon(tmp_path / "s.sock", [[HELLO, FINAL]] * 3, linger=0.2)  # linger: it reads `type`'s subscribe
    out = io.StringIO()

    class Done(Exception):
        pass

    def sleep(seconds):
        raise Done

    class Typist:
        name = "recorder"

        def press(self, keys):
            out.write("typed\n")

    with pytest.raises(Done):
        if client == "captions":
            follow(fake.path, CaptionView(out, color=False), retry_s=0.01, sleep=sleep)
        else:
            type_finals(fake.path, Composer(), Typist(), lambda text: out.write(text + "\n"), retry_s=0.01,
                        sleep=sleep)
    fake.close()
    assert fake.accepted == 1, out.getvalue()
    assert out.getvalue().count("at last") == 1, out.getvalue()  # shown, or typed, once


def test_a_partial_of_wide_characters_fits_on_one_row(monkeypatch):
    import io
    import unicodedata

    from captiond.captions import CaptionView
    from captiond.events import Envelope

    def columns(text):
        return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
                   for c in text)

    monkeypatch.setenv("COLUMNS", "40")
    said = "我们今天讨论的是一个非常重要的问题关于人工智能的发展以及它对社会的影响"  # 35 characters, 70 columns
    for text, shown in [(said, "…" + said[-19:]), (said[:19], said[:19]), ("e\u0301" * 50, "…" + "e\u0301" * 38),
                        ("a" * 50, "…" + "a" * 38)]:
        out = io.StringIO()
        CaptionView(out, color=False).show(Envelope(1, 1.0, Partial(1, 1, 0.0, 1.0, "", text, text)))
        assert out.getvalue() == "\r\x1b[2K" + shown and columns(shown) <= 39


def test_async_client_refuses_a_long_line_and_an_error_for_hello_as_the_blocking_one_does(tmp_path):
    from captiond.client import BadDaemon

    async def read(path):
        async with AsyncClient(path) as client:
            return [env async for env in client]

    fake = FakeDaemon(tmp_path / "long.sock", [[HELLO, b"x" * (1 << 20)]], linger=5)
    with pytest.raises(BadDaemon, match="sent a line longer than"):
        asyncio.run(read(fake.path))
    fake.close()
    fake = FakeDaemon(tmp_path / "full.sock", [[REFUSED]])
    with pytest.raises(BadDaemon, match="captiond refused the connection: 2 clients are connected"):
        asyncio.run(read(fake.path))
    fake.close()


def test_captions_into_a_file_writes_finals_only():
    # `captiond captions > notes.txt`: partials rewritten in place left every one of them in the file,
    # each behind a carriage return and an erase sequence.
    import io

    from captiond.captions import CaptionView
    from captiond.events import Envelope

    out, notes = io.StringIO(), io.StringIO()
    view = CaptionView(out, color=False, terminal=False, notes=notes)
    view.show(Envelope(0, 0.5, Hello("x", "m", 16000, "listening")))
    view.show(Envelope(1, 1.0, Partial(1, 1, 0.0, 1.0, "", "hello wor", "hello wor")))
    view.show(Envelope(2, 2.0, Final(1, 0.0, 1.5, "Hello world.", (), "en", 0.3, ())))
    long = "word " * 40  # a sentence is one line in a file, whatever the terminal's width (it was wrapped at 80)
    view.show(Envelope(3, 3.0, Final(2, 2.0, 9.0, long.strip(), (), "en", 0.3, ())))
    assert out.getvalue() == f"Hello world.\n{long.strip()}\n"
    assert notes.getvalue() == "[connected: model m, listening; Ctrl-C to quit]\n"  # not into the file


def test_captions_say_when_listening_again_after_a_pause_a_lost_device_or_a_start():
    # The last line shown said paused or device_lost until someone spoke.
    import io

    from captiond.captions import CaptionView
    from captiond.events import Envelope

    out = io.StringIO()
    view = CaptionView(out, color=False)
    for seq, (state, detail) in enumerate([("listening", ""), ("paused", "paused by a client"), ("listening", ""),
                                           ("device_lost", "gone"), ("device_lost", "still gone"),
                                           ("listening", ""), ("listening", "")], 1):
        view.show(Envelope(seq, 1.0, Status(state, detail, "m", 1.0, 0, 0)))
    assert out.getvalue().splitlines() == ["[paused: paused by a client]", "[listening]", "[device_lost: gone]",
                                           "[device_lost: still gone]", "[listening]"]
    out = io.StringIO()
    view = CaptionView(out, color=False)
    view.show(Envelope(0, 1.0, Hello("x", "m", 16000, "paused")))  # connected while paused
    view.show(Envelope(1, 1.0, Status("listening", "", "m", 1.0, 0, 0)))
    view.show(Envelope(2, 1.0, Hello("x", "m", 16000, "starting")))  # reconnected to a restarted daemon
    view.show(Envelope(3, 1.0, Status("listening", "", "m", 1.0, 0, 0)))
    assert out.getvalue().splitlines()[1:] == ["[listening]", "[connected: model m, starting; Ctrl-C to quit]",
                                               "[listening]"]


def test_captions_into_a_file_do_not_ask_for_partials_so_none_are_decoded(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    server = h.service.server
    captions = subprocess.Popen([sys.executable, "-m", "captiond", "captions", "--set", f"server.socket={h.sock}"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not server.clients or server.wants("partial"):  # it shows no partials outside a terminal
            assert captions.poll() is None and time.monotonic() < deadline, "captions did not subscribe"
            time.sleep(0.05)
        assert server.wants("final")
    finally:
        captions.kill()
        captions.wait()
        h.end()


def test_subscribing_to_no_types_asks_for_answers_only(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    server = h.service.server
    with Client(h.sock) as client:
        next(client.events())  # hello
        assert server.wants("partial")
        client.subscribe([])  # a status bar's connection: it must not make the daemon decode partials
        deadline = time.monotonic() + 30
        while server.wants("partial") or server.wants("final"):
            assert time.monotonic() < deadline, "subscribe([]) still asks for events"
            time.sleep(0.05)
    h.end()


def test_a_socket_path_with_a_newline_and_an_escape_stays_on_one_line_in_status_and_captions(tmp_path):
    path = str(tmp_path / "x\ny\x1b[31m.sock")
    status = subprocess.run([sys.executable, "-m", "captiond", "status", "--set", f"server.socket={path}"],
                            capture_output=True, timeout=60, cwd=ROOT)
    err = status.stderr.decode()
    assert status.returncode == 3 and len(err.strip().splitlines()) == 1 and "\x1b" not in err, err
    captions = subprocess.Popen([sys.executable, "-m", "captiond", "captions", "--set", f"server.socket={path}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        first = captions.stderr.readline().decode()  # its note that it waits for the daemon (not a terminal: stderr)
    finally:
        captions.kill()
        captions.wait()
    assert "\x1b" not in first and "\\n" in first and first.endswith("]\n"), first
