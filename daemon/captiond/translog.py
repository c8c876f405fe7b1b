"""Rotating transcript log: one line per final, flushed as written."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import queue
import stat
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .events import Final

log = logging.getLogger(__name__)

_PENDING_MAX = 10000  # lines held in memory while the disk refuses them
_QUEUE_MAX = 1000  # finals waiting for the writer thread; past it the disk is hung, not slow
_RETRY_S = 2.0  # how often lines a disk refused are tried again while no new final comes


def _append_whole(fd: int, data: bytes) -> None:
    """Append data with one or more write()s; if one fails, cut the file back so no fragment stays
    (a disk that fills part way through a line would leave half of it, and the retry the whole)."""
    before = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        with contextlib.suppress(OSError):  # shrinking works on a full disk; if not, the error stands
            os.ftruncate(fd, before)
        raise


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _open_append(path: Path) -> int:
    """Open the log for appending, never waiting. A FIFO nobody reads would block the open, and one
    whose reader stops would block every write: a FIFO is refused until something reads it, and then
    written without blocking (a full pipe refuses the line, which waits in the backlog). A new file
    is the owner's alone (what was said, like the socket's events): the units' UMask=0077 made it so,
    a run by hand under a usual umask made it world-readable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENXIO and _is_fifo(path):
            raise OSError(errno.ENXIO, "a FIFO nobody reads; give log.path a regular file") from None
        raise
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)
    return fd


def check_writable(path: Path) -> None:
    """Make a transcript log's folder and open the file once, raising OSError with the cause if that fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(_open_append(path))


class TranscriptLog:
    """Appends `wall-time<TAB>utt<TAB>text` lines; rotates by size to path.1 … path.N.

    A write that fails (disk full, unwritable) keeps the line in a bounded backlog that is
    retried before the next line, so a passing disk problem loses nothing.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._backlog: deque[str] = deque(maxlen=_PENDING_MAX)
        self.error: str | None = None
        """Why the last write failed, or None when the log is healthy."""
        self.dropped = 0
        """Lines lost because the backlog overflowed while the disk refused writes."""

    def reconfigure(self, path: Path, max_bytes: int, backups: int) -> None:
        """Write to a new path and/or rotate differently from the next line on; the backlog is kept."""
        self.path, self._max_bytes, self._backups = path, max_bytes, backups

    def check(self) -> None:
        """Make the log's folder and open the file once, raising OSError with the cause if that fails."""
        check_writable(self.path)

    @staticmethod
    def format(final: Final, ts: float) -> str:
        """The log line for a final emitted at wall-clock ts."""
        when = dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")
        return f"{when}\t{final.utt}\t{' '.join(final.text.split())}\n"

    def write(self, final: Final, ts: float) -> bool:
        """Log one final; False when the disk or a rotation refused it (`error` says why)."""
        if len(self._backlog) == self._backlog.maxlen:
            self.dropped += 1
        self._backlog.append(self.format(final, ts))
        return self.flush()

    def flush(self) -> bool:
        """Write the backlog, rotating at max_bytes; False when the disk or a rotation refused it (what
        is not written stays, `error` says why)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while not self._append():
                if not self._rotate():
                    return False
        except OSError as exc:
            self.error = f"cannot write transcript log {self.path}: {exc.strerror or exc}"
            return False
        self.error = None
        return True

    def _append(self) -> bool:
        """Append the backlog's lines that fit in max_bytes (one longer than that goes alone into an
        empty file); True when all did.

        The file is rotated before a line that does not fit, not after the line that filled it: with
        log.backups = 0 rotating deletes the file, and that took the final just written (and sent to
        clients) with it. A file that could not be rotated takes no more: its lines wait in the
        bounded backlog."""
        fd = _open_append(self.path)
        try:
            while self._backlog:
                line = self._backlog[0].encode("utf-8")
                size = os.fstat(fd).st_size
                if size and size + len(line) > self._max_bytes:
                    return False
                _append_whole(fd, line)
                self._backlog.popleft()
            return True
        finally:
            os.close(fd)

    @property
    def backlog(self) -> int:
        """Lines waiting for the disk."""
        return len(self._backlog)

    def _rotate(self) -> bool:
        # Rename, never copy: `tail -F` and log shippers follow the name and see the new file.
        try:
            if self._backups == 0:
                os.unlink(self.path)
                return True
            for i in range(self._backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        except OSError as exc:
            self.error = (f"cannot rotate transcript log {self.path}: {exc.strerror or exc}; "
                          f"captiond must be able to rename files in {self.path.parent}")
            return False
        return True


@dataclass(frozen=True)
class _Line:
    """A final waiting for the writer thread, emitted at wall-clock `ts`; `written` is called once it is down."""

    final: Final
    ts: float
    written: Callable[[], None]


@dataclass(frozen=True)
class _Settings:
    """A reconfiguration waiting for the writer thread: where to write and how to rotate."""

    path: Path
    max_bytes: int
    backups: int


class LogWriter:
    """The transcript log as an ordinary subscriber: finals go into a bounded queue that a thread of
    its own writes, so no disk call (open, write, rotate) ever runs on the event loop.

    `report(error, lost)` is called on that thread (for a full queue, on offer()'s) when the log's
    health changes: the new error text, or None once it works again and the writer has caught up;
    `lost` is how many lines were lost since it last worked (dropped here, or out of the full backlog).
    """

    def __init__(self, translog: TranscriptLog, report: Callable[[str | None, int], None],
                 capacity: int = _QUEUE_MAX) -> None:
        self.log = translog
        self._report = report
        self._queue: queue.Queue[_Line | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._next: _Settings | None = None  # applied between two lines
        # close() came: end once the queue is empty, for a full queue has no room for the stop marker.
        self._stopping = threading.Event()
        self.dropped = 0
        """Finals never written because the writer was this far behind (a disk that hangs)."""
        self._behind = False  # the queue was full: one report until it is empty again, not one per drop
        self._lost_before = 0  # lines lost (dropped here and by the backlog) when the log last worked
        self._thread = threading.Thread(target=self._run, name="captiond-translog", daemon=True)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def offer(self, final: Final, ts: float, written: Callable[[], None] = lambda: None) -> bool:
        """Queue a final emitted at wall-clock ts for the log, never waiting; False when it was dropped.

        `written()` is called on the writer's thread once the line is in the file, or in the backlog
        of a disk that refused it.
        """
        try:
            self._queue.put_nowait(_Line(final, ts, written))
        except queue.Full:
            with self._lock:
                self.dropped += 1
                starting, self._behind = not self._behind, True
                lost = self._lost()
            if starting:
                self._report(f"transcript log {self.log.path} is {self._queue.maxsize} lines behind "
                             "(a disk that does not answer?); dropping lines until it catches up", lost)
            return False
        return True

    @property
    def queued(self) -> int:
        """Finals waiting for the writer thread."""
        return self._queue.qsize()

    def reconfigure(self, path: Path, max_bytes: int, backups: int) -> None:
        """Write to a new path and/or rotate differently from the next line on."""
        with self._lock:
            self._next = _Settings(path, max_bytes, backups)

    def _take_settings(self) -> None:
        """Apply a reload's path and rotation (between two lines)."""
        with self._lock:
            if self._next is not None:
                self.log.reconfigure(self._next.path, self._next.max_bytes, self._next.backups)
                self._next = None

    def _lost(self) -> int:
        """Lines lost since the log last worked."""
        return self.dropped + self.log.dropped - self._lost_before

    def _write(self, write: Callable[[], object], then: Callable[[], None] = lambda: None) -> None:
        """One write of the log, then `then()`; the log's health is reported when it changed."""
        had_error = self.log.error
        write()
        then()
        if self.log.error is not None:
            if self.log.error != had_error:
                self._report(self.log.error, self._lost())
            return
        with self._lock:  # a hang ends once the writer has caught up, not at the first line it writes
            was_behind = self._behind
            self._behind = was_behind and not self._queue.empty()
            if self._behind or (had_error is None and not was_behind):
                return
            lost = self._lost()
            self._lost_before += lost
        self._report(None, lost)

    def close(self, timeout: float) -> None:
        """Write what is queued within timeout seconds, then stop (a hung disk's thread is abandoned)."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # full: the thread sees _stopping once it has emptied it
            self._queue.put(None, timeout=timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            try:  # lines a disk refused are tried again now and then, not only when the next final comes
                item = self._queue.get(timeout=_RETRY_S if self.log.backlog else None)
            except queue.Empty:
                self._take_settings()  # a reload may have pointed the log at a disk that takes the lines
                self._write(self.log.flush)
                continue
            if item is None:
                break
            self._take_settings()
            self._write(lambda: self.log.write(item.final, item.ts), item.written)
        # Stopping: the lines a refusing disk held get one more try, and are never lost in silence.
        self._take_settings()
        if self.log.backlog and not self.log.flush():
            log.error("%d transcript line(s) could not be written (%s) and are lost; clients had their finals",
                      self.log.backlog, self.log.error)
