import os
import threading
import time
from pathlib import Path

from captiond.events import Final
from captiond.translog import LogWriter, TranscriptLog


def final(utt, text="hello world"):
    return Final(utt, 0.0, 1.0, text, (), "en", 0.2)


def test_one_flushed_line_per_final(tmp_path):
    log = TranscriptLog(tmp_path / "sub" / "t.log", 10_000, 2)
    assert log.write(final(1, "hello\n  world"), 1_700_000_000.0)
    lines = (tmp_path / "sub" / "t.log").read_text().splitlines()
    when, utt, text = lines[0].split("\t")
    assert utt == "1" and text == "hello world" and when.startswith("2023-11-1")


def test_rotation_keeps_the_configured_number_of_backups(tmp_path):
    path = tmp_path / "t.log"
    log = TranscriptLog(path, 1024, 2)
    for i in range(200):
        assert log.write(final(i, "x" * 40), 1_700_000_000.0)
    assert path.with_name("t.log.1").exists() and path.with_name("t.log.2").exists()
    assert not path.with_name("t.log.3").exists()
    line = len(TranscriptLog.format(final(199, "x" * 40), 1_700_000_000.0))
    assert 1024 - line < path.with_name("t.log.1").stat().st_size <= 1024  # full: the next line did not fit
    assert path.read_text().splitlines()[-1].split("\t")[1] == "199"


def test_with_no_backups_the_final_just_written_stays_in_the_log(tmp_path):
    # An attack run: the final that took the file past log.max_bytes was written, then the file deleted
    # (rotating with no backups), so 6 of 100 finals clients were sent were in no log.
    path = tmp_path / "t.log"
    log = TranscriptLog(path, 300, 0)
    for i in range(100):
        assert log.write(final(i, "x" * 40), 1_700_000_000.0)
        assert path.read_text().splitlines()[-1].split("\t")[1] == str(i)
        assert path.stat().st_size <= 300
    assert not path.with_name("t.log.1").exists()
    big = "y" * 400  # longer than the whole file may be: alone in it, not lost
    assert log.write(final(100, big), 1_700_000_000.0)
    assert path.read_text().splitlines() == [TranscriptLog.format(final(100, big), 1_700_000_000.0).rstrip("\n")]


def test_a_new_log_and_each_rotated_one_are_the_owners_alone_whatever_the_umask(tmp_path):
    # Run by hand under umask 022 the log of what was said was world-readable (the socket is 0600).
    old = os.umask(0o022)
    try:
        path = tmp_path / "t.log"
        log = TranscriptLog(path, 1024, 1)
        for i in range(60):
            assert log.write(final(i, "x" * 40), 1_700_000_000.0)
    finally:
        os.umask(old)
    assert path.with_name("t.log.1").exists()
    assert {p.stat().st_mode & 0o777 for p in (path, path.with_name("t.log.1"))} == {0o600}


def test_a_log_that_cannot_be_rotated_stops_growing_and_holds_its_lines_until_it_can(tmp_path):
    path = tmp_path / "t.log"
    path.with_name("t.log.1").mkdir()  # rename(2) puts no file over a folder, even for root
    log = TranscriptLog(path, 1024, 1)
    line = len(TranscriptLog.format(final(0, "x" * 40), 1.0).encode())
    count = 1024 // line + 6  # a file's worth, and 5 more
    for i in range(count):
        log.write(final(i, "x" * 40), 1.0)
    assert path.stat().st_size < 1024 + line, "the log grew past log.max_bytes"
    assert log.error.startswith(f"cannot rotate transcript log {path}: Is a directory") and log.backlog
    path.with_name("t.log.1").rmdir()
    assert log.flush() and log.error is None and log.backlog == 0
    lines = path.with_name("t.log.1").read_text().splitlines() + path.read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == [str(i) for i in range(count)], "a held line was lost"


def test_full_disk_is_reported_and_nothing_is_lost_once_it_recovers(tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    log = TranscriptLog(blocker / "t.log", 10_000, 1)
    assert not log.write(final(1), 1.0)
    assert log.error and "cannot write transcript log" in log.error
    assert not log.write(final(2), 2.0) and log.backlog == 2
    blocker.unlink()
    assert log.write(final(3), 3.0)
    assert log.error is None and log.backlog == 0
    assert [line.split("\t")[1] for line in (blocker / "t.log").read_text().splitlines()] == ["1", "2", "3"]


def test_dev_full_gives_enospc(tmp_path):
    log = TranscriptLog(Path("/dev/full"), 10_000, 1)
    assert not log.write(final(1), 1.0)
    assert "No space left on device" in log.error


def test_a_fifo_at_the_log_path_is_written_only_while_read_and_never_waited_on(tmp_path):
    path = tmp_path / "t.log"
    os.mkfifo(path)
    log = TranscriptLog(path, 10_000, 1)
    outcome = []

    def use():  # opening a FIFO for writing waits for a reader: this thread would never end
        try:
            log.check()
        except OSError as exc:
            outcome.append(exc.strerror)
        outcome.append(log.write(final(1), 1.0))

    thread = threading.Thread(target=use, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the log waited on the FIFO"
    assert outcome == ["a FIFO nobody reads; give log.path a regular file", False], outcome
    assert "FIFO nobody reads" in log.error
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # once something reads it, lines go to it
    try:
        assert log.flush() and os.read(reader, 4096).endswith(b"\thello world\n")
    finally:
        os.close(reader)
    log.write(final(2), 1.0)  # nobody reads it again: the line waits, nothing blocks
    assert log.backlog == 1
    path.unlink()
    assert log.flush() and path.read_text().endswith("\thello world\n")  # the held line, once a file can be made


def test_a_line_is_in_the_log_whole_or_not_at_all_when_the_disk_fills(small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(b"x" * 16384)
    log = TranscriptLog(small_disk / "t.log", 1 << 20, 1)
    utt = 0
    while log.write(final(utt + 1, f"line {utt + 1} " + "word " * 200), 1.0):
        utt += 1
        assert utt < 100, "the disk never filled"
    assert "No space left" in log.error
    full = (small_disk / "t.log").read_bytes()
    assert full.endswith(b"\n") and len(full.splitlines()) == utt, "no fragment of the refused line"
    filler.unlink()
    assert log.write(final(utt + 2, "after"), 2.0)
    lines = (small_disk / "t.log").read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == [str(i) for i in range(1, utt + 3)]
    assert all(line.split("\t")[2].startswith(f"line {i}") for i, line in enumerate(lines[:-1], 1))


class HeldLog:
    """A log writer whose lines are written when the test says so."""

    def __init__(self, accept=True):
        self.accept = accept
        self.pending = []

    @property
    def queued(self):
        return len(self.pending)

    def offer(self, final, ts, written):
        self.pending.append(written)
        return self.accept

    def write_next(self):
        """The writer thread writes the oldest line it has."""
        self.pending.pop(0)()


def test_the_outbox_sends_a_final_only_once_its_line_is_written_and_keeps_the_order():
    import asyncio
    import threading

    from captiond.events import SpeechEnd, SpeechStart
    from captiond.outbox import Outbox

    async def main():
        sent = []
        outbox = Outbox(sent.append, hold_s=30)
        outbox.log = HeldLog()
        outbox.publish(SpeechEnd(1, 1.0))
        outbox.publish(final(1))
        outbox.publish(SpeechStart(2, 2.0))  # after the final: waits behind it
        outbox.publish(final(2, ""))  # an empty final has no line to wait for, but keeps its place
        await asyncio.sleep(0.05)
        assert [e.type for e in sent] == ["speech_end"]
        threading.Thread(target=outbox.log.pending[0]).start()  # the writer thread wrote line 1
        while len(sent) < 4:
            await asyncio.sleep(0.01)
        assert [(e.type, getattr(e, "utt", 0)) for e in sent] == [("speech_end", 1), ("final", 1),
                                                                    ("speech_start", 2), ("final", 2)]
        outbox.log.accept = False  # a writer this far behind drops the line: nothing waits for it
        outbox.publish(final(3))
        assert sent[-1].utt == 3

    asyncio.run(main())


def test_a_log_slower_than_the_hold_holds_nothing_until_it_catches_up_and_a_flush_sends_all():
    import asyncio

    from captiond.outbox import Outbox

    async def main():
        sent = []
        outbox = Outbox(sent.append, hold_s=0.1)
        outbox.log = HeldLog()
        outbox.publish(final(1))
        outbox.publish(final(2))
        while len(sent) < 2:  # the disk hangs: both go after the hold, in order
            await asyncio.sleep(0.01)
        outbox.publish(final(3))
        assert [e.utt for e in sent] == [1, 2, 3], "stalled: not held at all"
        while outbox.log.pending:  # the log catches up
            outbox.log.write_next()
        await asyncio.sleep(0.01)
        outbox.publish(final(4))
        assert [e.utt for e in sent] == [1, 2, 3], "held again"
        await outbox.flush(0.01)  # shutdown: whatever is held goes now
        assert [e.utt for e in sent] == [1, 2, 3, 4]

    asyncio.run(main())


def test_a_log_steadily_slower_than_the_hold_is_warned_about_once_and_holds_nothing_until_caught_up(caplog):
    import asyncio

    from captiond.outbox import Outbox

    async def main():
        sent = []
        outbox = Outbox(sent.append, hold_s=0.1)
        outbox.log = HeldLog()
        outbox.publish(final(1))
        while not sent:  # the disk is slow: 1 goes after the hold
            await asyncio.sleep(0.01)
        outbox.publish(final(2))
        outbox.publish(final(3))
        outbox.log.write_next()  # line 1 is down, but 2 and 3 still wait: the log has not caught up
        await asyncio.sleep(0.01)
        outbox.publish(final(4))
        assert [e.utt for e in sent] == [1, 2, 3, 4], "held again while the log is still behind"
        assert len([r for r in caplog.records if "has not written" in r.getMessage()]) == 1
        while outbox.log.pending:  # caught up: finals wait for their lines again
            outbox.log.write_next()
        await asyncio.sleep(0.01)
        outbox.publish(final(5))
        assert [e.utt for e in sent] == [1, 2, 3, 4]
        outbox.log.write_next()
        await asyncio.sleep(0.01)
        assert [e.utt for e in sent] == [1, 2, 3, 4, 5]

    asyncio.run(main())


def test_at_the_stop_held_lines_get_one_more_try_and_lines_still_refused_are_reported(tmp_path, caplog):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    writer = LogWriter(TranscriptLog(blocker / "t.log", 10_000, 1), report=lambda error, lost: None)
    writer.start()
    writer.offer(final(1), 1.0)
    writer.offer(final(2), 2.0)
    deadline = time.monotonic() + 30
    while writer.log.backlog < 2:  # both refused by now
        assert time.monotonic() < deadline, "the writer thread took neither line"
        time.sleep(0.01)
    blocker.unlink()  # the disk is back, but no final comes to write them before the stop
    writer.close(10)
    assert [line.split("\t")[1] for line in (blocker / "t.log").read_text().splitlines()] == ["1", "2"]

    full = LogWriter(TranscriptLog(Path("/dev/full"), 10_000, 1), report=lambda error, lost: None)
    full.start()
    full.offer(final(3), 3.0)
    full.close(10)
    assert [r.getMessage() for r in caplog.records if "are lost" in r.getMessage()] == [
        "1 transcript line(s) could not be written (cannot write transcript log /dev/full: No space left on device) "
        "and are lost; clients had their finals"]


class HangingLog(TranscriptLog):
    """A disk whose writes hang while `answers` is clear; `hung` is set once a write waits on it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.answers = threading.Event()
        self.answers.set()
        self.hung = threading.Event()

    def write(self, final, ts):
        if not self.answers.is_set():
            self.hung.set()
            self.answers.wait(60)
        return super().write(final, ts)


def _hang_and_fill(writer, first_utt):
    """Hang the disk under a line and queue finals until the writer drops them; the utts it took."""
    writer.log.answers.clear()
    writer.log.hung.clear()
    assert writer.offer(final(first_utt), 1.0)
    assert writer.log.hung.wait(30), "the writer thread never took the line"
    utt = first_utt
    while writer.offer(final(utt + 1), 1.0):
        utt += 1
    return list(range(first_utt, utt + 1))


def test_turning_the_log_off_while_its_queue_is_full_ends_the_writer_once_it_has_written_the_queue(tmp_path):
    path = tmp_path / "t.log"
    writer = LogWriter(HangingLog(path, 10_000, 1), report=lambda error, lost: None, capacity=3)
    writer.start()
    taken = _hang_and_fill(writer, 1)
    writer.close(0)  # a reload turns the log off: nothing waits for the hung disk
    writer.log.answers.set()
    writer._thread.join(30)
    assert not writer._thread.is_alive(), "the writer thread never ended"
    assert [line.split("\t")[1] for line in path.read_text().splitlines()] == [str(u) for u in taken]


def test_each_hang_of_the_disk_is_reported_and_its_end_with_the_lines_it_dropped(tmp_path):
    reports = []
    writer = LogWriter(HangingLog(tmp_path / "t.log", 10_000, 1), capacity=3,
                       report=lambda error, lost: reports.append((error, lost)))
    writer.start()
    for episode in (1, 2):
        _hang_and_fill(writer, 10 * episode)
        assert not writer.offer(final(99), 1.0)  # dropped too, and not reported on its own
        writer.log.answers.set()
        deadline = time.monotonic() + 30
        while len(reports) < 2 * episode:
            assert time.monotonic() < deadline, f"hang {episode} or its end was not reported: {reports}"
            time.sleep(0.01)
    writer.close(10)
    behind = (f"transcript log {tmp_path / 't.log'} is 3 lines behind (a disk that does not answer?); "
              "dropping lines until it catches up")
    assert reports == [(behind, 1), (None, 2), (behind, 1), (None, 2)]


def test_lines_the_full_backlog_lost_are_counted_when_the_log_works_again(tmp_path, monkeypatch):
    import captiond.translog

    monkeypatch.setattr(captiond.translog, "_PENDING_MAX", 2)
    monkeypatch.setattr(captiond.translog, "_RETRY_S", 0.05)  # the held lines are retried soon
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    reports = []
    writer = LogWriter(TranscriptLog(blocker / "t.log", 10_000, 1), report=lambda error, lost: reports.append(lost))
    writer.start()
    for utt in range(1, 6):
        writer.offer(final(utt), 1.0)
    deadline = time.monotonic() + 30
    while writer.log.dropped < 3:  # 2 held, 3 pushed out
        assert time.monotonic() < deadline, "the writer thread did not take the lines"
        time.sleep(0.01)
    blocker.unlink()
    while len(reports) < 2:
        assert time.monotonic() < deadline, f"the log's recovery was not reported: {reports}"
        time.sleep(0.01)
    writer.close(10)
    assert reports == [0, 3]
    assert [line.split("\t")[1] for line in (blocker / "t.log").read_text().splitlines()] == ["4", "5"]


def test_held_lines_go_to_the_path_a_reload_gives_without_another_final(tmp_path):
    reports = []
    writer = LogWriter(TranscriptLog(Path("/proc/captiond-nope/t.log"), 10_000, 1), report=lambda error, lost: reports.append(error))
    writer.start()
    writer.offer(final(1), 1.0)
    deadline = time.monotonic() + 30
    while not reports:  # refused: held in memory
        assert time.monotonic() < deadline
        time.sleep(0.01)
    good = tmp_path / "good.log"
    writer.reconfigure(good, 10_000, 1)  # SIGHUP: a path that works
    while not good.exists():
        assert time.monotonic() < deadline, "the held line waited for another final"
        time.sleep(0.05)
    writer.close(5)
    assert good.read_text().endswith("\t1\thello world\n") and reports[-1] is None
