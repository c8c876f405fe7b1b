"""Unix socket publisher: protocol v1 events to any number of subscribers, each with a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import math
import os
import socket
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from .events import MAX_LINE, Command, Error, Event, Final, Lost, ProtocolError, encode, parse_command
from .sockets import peer_ids, too_long, unsafe_folder
from .tasks import spawn

log = logging.getLogger(__name__)

_WRITE_BUFFER = 16 * 1024
_UNIX = "the Unix socket"
_BACKLOG = 1024  # bursts of connects (a dashboard's reconnect storm) queue rather than get EAGAIN
_COMMANDS_PER_S = 50.0  # a client's commands taken per second after a burst; a flood waits in its own socket
_COMMAND_BURST = 50


class ServerError(RuntimeError):
    """The socket cannot be set up; the message says why and what to do."""


class Taken(ServerError):
    """Another process listens on the socket's path."""


@dataclass
class _Item:
    seq: int
    type: str
    line: bytes


@dataclass
class Client:
    """One connected subscriber, on whichever transport (Unix socket or WebSocket)."""

    ident: int
    send: Callable[[bytes], Awaitable[None]]
    """Writes one encoded event line and waits until the transport has room again."""
    close: Callable[[], None]
    """Closes the connection once everything queued was sent."""
    abort: Callable[[], None]
    """Drops the connection at once."""
    capacity: int
    peer: str = ""
    transport: str = ""
    """What it connected over ("the Unix socket", "WebSocket /events", "WebSocket /listen"): each has its
    own server.max_clients."""
    audited: bool = True
    """Its connection and disconnection are logged at info level (others: debug)."""
    types: frozenset[str] | None = None
    lost: int = 0
    queue: deque[_Item] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    commands: int = 0
    """Command lines taken from this client so far."""
    due: float = 0.0
    """When its commands would be taken up at _COMMANDS_PER_S (monotonic seconds): the pace it keeps."""

    def offer(self, item: _Item, reply: bool = False) -> None:
        """Queue an event; when full, drop the oldest partial, then the oldest other event, a final last.

        Replies to this client's own commands skip its subscription filter, not the bound.
        """
        if not reply and self.types is not None and item.type not in self.types:
            return
        if len(self.queue) >= self.capacity:
            self.lost += 1
            victim = self._victim(item)
            if victim is None:
                return
            self.queue.remove(victim)
        self.queue.append(item)
        self.wake.set()


    def _victim(self, item: _Item) -> _Item | None:
        """What a full queue drops to take `item`, None to drop `item` itself.

        A newer partial replaces an older one (it says more); a final outranks everything else.
        """
        partial = next((i for i in self.queue if i.type == "partial"), None)
        if partial is not None:
            return partial
        if item.type == "partial":
            return None  # everything queued matters more than a partial
        other = next((i for i in self.queue if i.type != "final"), None)
        if other is not None:
            return other
        return self.queue[0] if item.type == "final" else None


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[str, int | None]:
    """The peer's pid, uid and gid as a log text, and its uid (None when the system does not say)."""
    ids = peer_ids(writer.get_extra_info("socket"))
    if ids is None:
        return "peer unknown", None
    pid, uid, gid = ids
    return f"pid={pid} uid={uid} gid={gid}", uid


_WATCH_S = 5.0  # how often the daemon checks that its socket is still at its path


def check_socket_path(path: Path, key: str = "server.socket") -> None:
    """Refuse a path too long for a socket, a socket a live process answers on, or a file that is no
    socket; remove a socket a dead daemon left behind. `key` is the setting the error tells the user
    to change."""
    if problem := too_long(path, key):
        raise ServerError(problem)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket; remove it or set {key} to another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s left by a daemon that is gone", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise ServerError(f"cannot check existing socket {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise Taken(f"another process (a captiond?) is already listening on {path}; stop it first "
                f"(systemctl --user stop captiond) or set {key} to another path")


def _lock_path(path: Path) -> Path:
    """The lock file beside socket `path`."""
    return path.with_name(path.name + ".lock")


def _holds(path: Path, fd: int) -> bool:
    """True when `fd` is the lock file now at socket `path`'s lock path (not one removed since)."""
    try:
        return os.stat(_lock_path(path)).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock(path: Path) -> int:
    """Lock `path`'s lock file (beside it) and return its descriptor, held for the daemon's life: two
    daemons started at once both found the path free, and the second bind unlinked the first's socket."""
    lock = _lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ServerError(f"cannot create {lock}: {exc.strerror or exc}; set server.socket to a writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _holds(path, fd):
                return fd
        except BlockingIOError:
            os.close(fd)
            raise Taken(f"another captiond is already listening on {path} (it holds {lock.name}); stop it "
                        "first (systemctl --user stop captiond) or set server.socket to another path") from None
        except OSError as exc:
            os.close(fd)
            raise ServerError(f"cannot lock {lock}: {exc.strerror or exc}; set server.socket to a path on a "
                              "local file system") from None
        os.close(fd)  # the daemon that held it removed it as we opened it: lock the one at the path now


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file if it is still the one `fd` holds, then let it go."""
    try:
        if _holds(path, fd):
            _lock_path(path).unlink()
    except OSError:
        pass
    os.close(fd)


class Occasional:
    """Whether a repeated refusal is worth a log line: the first of each kind, then at most one every
    `every_s` (saying the count so far). Clients retry every second or two, and one reconnecting in a
    loop was refused ~4000 times a second: every 100th refusal made 40 lines a second."""

    def __init__(self, every_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every_s
        self._clock = clock
        self._next: dict[str, float] = {}  # by kind: a few fixed names

    def __call__(self, kind: str = "") -> bool:
        """True when a refusal of this kind now should be logged."""
        now = self._clock()
        if now < self._next.get(kind, -math.inf):
            return False
        self._next[kind] = now + self._every
        return True


_ACCEPT_FAILED = "socket.accept() out of system resource"
_ACCEPT_LINE_S = 60.0


def quiet_accept_failures(loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic) -> None:
    """Have the loop say that it cannot accept connections (no file descriptor left) once a minute with
    a count, not with a traceback per connection: Python 3.11 tries a listening socket's whole backlog
    (1024) each time, and 1400 lines a second past journald's rate limit dropped the daemon's own."""
    failed, said = 0, -math.inf

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal failed, said
        if context.get("message") != _ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        failed += 1
        if clock() - said >= _ACCEPT_LINE_S:
            said = clock()
            exc = context.get("exception")
            log.error("cannot accept connections: %s (%d time(s) so far); too many connections are open: "
                      "see who holds them (ss -xp, ss -tnp) or raise the open-files limit (LimitNOFILE=)",
                      getattr(exc, "strerror", None) or exc, failed)

    loop.set_exception_handler(handler)


class Hub:
    """Subscribers on any transport: publish() fans events out without ever waiting for a reader."""

    def __init__(self, *, client_queue: int = 256, keep_finals: int = 200, hello: Callable[[], Event] | None = None,
                 on_command: Callable[[Command], Event | None] | None = None, max_clients: int = 100) -> None:
        self._capacity = client_queue
        self._max_clients = max_clients
        self.refused = 0
        """Connections refused because server.max_clients were connected."""
        self._worth_a_line = Occasional()
        self.hello = hello
        """Makes the first event of each connection; the Service sets it when not given."""
        self.on_command = on_command
        """Answers a client command; the Service sets it when not given."""
        self._finals: deque[_Item] = deque(maxlen=keep_finals)
        self._clients: dict[int, Client] = {}
        self._writers: set[asyncio.Task] = set()
        self._next_client = 0
        self.seq = 0
        """Seq of the last broadcast event; per-client replies carry it without advancing it."""

    @property
    def clients(self) -> int:
        """Connected subscribers."""
        return len(self._clients)

    @property
    def max_clients(self) -> int:
        """Subscribers each transport takes at once (server.max_clients)."""
        return self._max_clients

    def wants(self, event_type: str) -> bool:
        """True when a connected subscriber's filter lets events of this type through."""
        return any(c.types is None or event_type in c.types for c in self._clients.values() if not c.closing)

    def publish(self, event: Event) -> int:
        """Stamp an event with the next seq and queue it for every subscriber; returns the seq."""
        self.seq += 1
        item = _Item(self.seq, event.type, encode(event, self.seq, time.time()))
        if isinstance(event, Final):
            self._finals.append(item)
        for client in self._clients.values():
            client.offer(item)
        return self.seq

    def refusal(self, transport: str) -> bytes | None:
        """The error line a new connection over `transport` gets when server.max_clients are connected over
        it; None when there is room. Each transport counts its own: any local user can reach a loopback
        WebSocket port, and by filling it locked the owner out of the 0600 Unix socket."""
        connected = sum(c.transport == transport for c in self._clients.values())
        if connected < self._max_clients:
            return None
        self.refused += 1
        if self._worth_a_line(transport):
            log.warning("%d client connection(s) refused so far: %d connected over %s (server.max_clients)",
                        self.refused, connected, transport)
        return encode(Error("too_many_clients", f"{self._max_clients} clients are connected over {transport} "
                                                "(server.max_clients); close one or raise the limit"),
                      self.seq, time.time())

    def reply(self, client: Client, event: Event) -> None:
        """Send an event to one client only (hello, errors, answers), without advancing seq,
        so every client sees the broadcast seq gap-free."""
        client.offer(_Item(self.seq, event.type, encode(event, self.seq, time.time())), reply=True)

    def attach(self, send: Callable[[bytes], Awaitable[None]], close: Callable[[], None], abort: Callable[[], None],
               peer: str, transport: str, audited: bool = True) -> Client:
        """Register a new subscriber, queue its hello and start its writer; `audited`: log who came and
        went at info level (a connection other users or machines can make), else at debug level."""
        self._next_client += 1
        client = Client(self._next_client, send, close, abort, self._capacity, peer, transport, audited)
        self._clients[client.ident] = client
        log.log(logging.INFO if audited else logging.DEBUG, "client %d connected over %s (%s); %d connected",
                client.ident, transport, peer, len(self._clients))
        self.reply(client, self.hello())
        spawn(self._write_loop(client), f"client-{client.ident}-writer", keep=self._writers)
        return client

    def detach(self, client: Client) -> None:
        """The client stopped sending: let its writer deliver what is queued, then end."""
        client.closing = True
        client.wake.set()

    async def take_line(self, client: Client, line: bytes) -> None:
        """Act on one command line from a client, then yield to the event loop, and wait once it
        has sent more than _COMMAND_BURST commands faster than _COMMANDS_PER_S: without that, a client
        flooding commands held the loop for seconds at a time (lines already read need no await),
        stalling every other client and the finals."""
        self._handle_line(client, line)
        client.commands += 1
        now = time.monotonic()
        client.due = max(client.due, now) + 1 / _COMMANDS_PER_S
        await asyncio.sleep(max(0.0, client.due - now - _COMMAND_BURST / _COMMANDS_PER_S))

    def _handle_line(self, client: Client, line: bytes) -> None:
        if not line.strip():
            return
        try:
            cmd = parse_command(line)
        except ProtocolError as exc:
            self.reply(client, Error(exc.code, str(exc)))
            return
        if cmd.cmd == "subscribe":
            client.types = cmd.types
            if cmd.since is not None and (cmd.types is None or "final" in cmd.types):
                for item in self._finals:
                    if item.seq > cmd.since:
                        client.offer(item, reply=True)  # through the bound, like every other event
            return
        answer = self.on_command(cmd)
        if answer is not None:
            self.reply(client, answer)

    async def _write_loop(self, client: Client) -> None:
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                while client.queue or client.lost:
                    if client.lost:
                        lost, client.lost = client.lost, 0
                        await client.send(encode(Lost(lost), self.seq, time.time()))
                    if client.queue:
                        await client.send(client.queue.popleft().line)
                if client.closing:
                    return
        except ConnectionError:  # transports raise it (or a subclass) when the peer is gone
            pass
        finally:
            self._clients.pop(client.ident, None)
            client.close()
            log.log(logging.INFO if client.audited else logging.DEBUG, "client %d disconnected after %d command(s); "
                    "%d connected", client.ident, client.commands, len(self._clients))

    async def close_clients(self, flush_timeout: float, drop: bool = True) -> None:
        """Give every subscriber up to flush_timeout to receive what is queued, then drop it (unless not
        `drop`: its connection is then closed by its own transport's close, as a WebSocket's, 1001)."""
        for client in self._clients.values():
            client.closing = True
            client.wake.set()
        if self._writers:
            _, stuck = await asyncio.wait(list(self._writers), timeout=flush_timeout)
            for task in stuck:
                log.warning("subscriber %s did not read its last events in %.1f s; dropping it",
                            task.get_name().removesuffix("-writer"), flush_timeout)
                task.cancel()
        for client in list(self._clients.values()) if drop else ():
            client.abort()


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The client's next line (b"" once it closed the stream), or None for a line longer than the
    reader's limit, which is read to its end and dropped (parse_command refuses one just over MAX_LINE). asyncio's readline() drops only what it has buffered of such
    a line, so the rest, come in later reads, was taken for lines of their own: its tail ran as a command."""
    too_long = False
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # the stream ended: what came after the last newline
            line = exc.partial
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)  # buffered already: drop it and read on to the newline
            too_long = True
            continue
        return None if too_long else line


class Server(Hub):
    """The Hub's Unix socket: protocol v1 as JSON lines."""

    def __init__(self, path: Path, *, mode: int = 0o600, group: str = "", **hub: Any) -> None:
        super().__init__(**hub)
        self.path = path
        self._mode = mode
        self._group = group
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None  # of the socket file we bound; only that one is ours to remove
        self._lock: int | None = None  # descriptor of the lock file beside the socket, held while we serve
        self._unreachable: str | None = None  # why the socket, once removed, could not be made again

    async def start(self) -> None:
        """Check for a live or stale socket, then bind with the configured mode (and group)."""
        gid = -1
        if self._group:  # before anything is made, so a bad name leaves nothing behind
            try:
                gid = grp.getgrnam(self._group).gr_gid
            except KeyError:
                raise ServerError(f"server.group: no such group {self._group!r}; "
                                  "create it (groupadd) or set server.group to an existing one") from None
        if problem := too_long(self.path):  # before the folder is made
            raise ServerError(problem)
        folder = self.path.parent
        made = not folder.exists()
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ServerError(f"cannot create socket folder {folder}: {exc.strerror or exc}; "
                              "set server.socket to a writable path") from None
        # Looked at as it is now, made or found: another user could put a socket of their own in its
        # place, and clients would trust it.
        if unsafe := unsafe_folder(folder):
            raise ServerError(f"socket folder {unsafe}; remove it, or set server.socket to a path in a "
                              "folder of yours")
        if gid != -1:
            self._share_folder(folder, gid, made)
        self._hold_lock()
        try:
            self._server = await self._bind(gid)
        except ServerError:
            self._release_lock()
            raise
        self._inode = self.path.stat().st_ino
        log.info("listening on %s (mode %04o)", self.path, self._mode)

    async def _bind(self, gid: int) -> asyncio.base_events.Server:
        check_socket_path(self.path)
        old = os.umask(0o177)  # never let the socket exist, even briefly, with wider permissions
        try:
            server = await asyncio.start_unix_server(self._accept, path=str(self.path), limit=MAX_LINE + 1,
                                                     backlog=_BACKLOG)
        except OSError as exc:
            raise ServerError(f"cannot listen on {self.path}: {exc.strerror or exc}; set server.socket to a writable path") from None
        finally:
            os.umask(old)
        try:
            if gid != -1:
                os.chown(self.path, -1, gid)
            os.chmod(self.path, self._mode)
        except OSError as exc:
            server.close()
            self.path.unlink(missing_ok=True)
            raise ServerError(f"cannot give {self.path} group {self._group!r} and mode {self._mode:04o}: "
                              f"{exc.strerror or exc}; run as a member of that group or unset server.group") from None
        return server

    def _hold_lock(self) -> None:
        """Hold the lock file at the path (again, if it was removed: another daemon would take it)."""
        if self._lock is not None:
            if _holds(self.path, self._lock):
                return
            self._release_lock()
        self._lock = _lock(self.path)

    def _release_lock(self) -> None:
        if self._lock is not None:
            _unlock(self.path, self._lock)
            self._lock = None

    async def watch(self, interval: float = _WATCH_S) -> None:
        """Every `interval` seconds, make sure the socket is still ours at its path (keep_path)."""
        while True:
            await asyncio.sleep(interval)
            await self.keep_path()

    async def keep_path(self) -> None:
        """Listen again if the socket file (or its folder) was removed: a /tmp cleaner, or the end of
        the login session that emptied $XDG_RUNTIME_DIR, left a daemon nobody could reach, and a second
        one started beside it. ServerError if another daemon listens there now; a path that cannot be
        made again is retried at the next call (the transcript log goes on meanwhile)."""
        try:
            inode: int | None = self.path.lstat().st_ino
        except (FileNotFoundError, NotADirectoryError):
            inode = None
        except OSError:
            return  # cannot look (a folder made unsearchable): nothing is known to be wrong
        if inode is not None and inode == self._inode:
            with contextlib.suppress(ServerError):  # the socket still serves; a newcomer finds it and stops
                self._hold_lock()
            return
        if inode is not None:
            raise ServerError(f"{self.path} is now another process's socket; no client can reach this daemon "
                              "any more, so it stops")
        if self._unreachable is None:
            log.warning("%s was removed; listening on it again", self.path)
        old = self._server
        try:
            await self.start()
        except Taken:
            raise ServerError(f"another captiond took {self.path} after it was removed; stopping this one") from None
        except ServerError as exc:
            if str(exc) != self._unreachable:
                log.warning("%s; no client can reach this daemon until it can listen again (tried every %.0f s)",
                            exc, _WATCH_S)
            self._unreachable = str(exc)
            return
        self._unreachable = None
        if old is not None:
            old.close()  # stops accepting only: connected clients keep their connections

    def _share_folder(self, folder: Path, gid: int, made: bool) -> None:
        """Let the group reach the socket: members need search (x) on its folder, or connect gets EACCES."""
        if made:
            try:
                os.chown(folder, -1, gid)
                os.chmod(folder, 0o710)
            except OSError as exc:
                log.warning("server.group %r: cannot give socket folder %s that group (%s); members will get "
                            "'permission denied'; make the folder group-searchable or run as a member",
                            self._group, folder, exc.strerror)
                return
            log.info("socket folder %s made 0710 with group %r so members can connect", folder, self._group)
            return
        st = folder.stat()
        if not (st.st_mode & 0o001 or (st.st_gid == gid and st.st_mode & 0o010)):
            log.warning("server.group %r: socket folder %s (mode %04o) does not let that group in, so members "
                        "will get 'permission denied'; chgrp %s and chmod g+x it", self._group, folder,
                        stat.S_IMODE(st.st_mode), self._group)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A small transport buffer keeps a stalled reader's backlog in our queue, where it is counted.
        writer.transport.set_write_buffer_limits(high=_WRITE_BUFFER)

        async def send(line: bytes) -> None:
            writer.write(line)
            await writer.drain()

        refused = self.refusal(_UNIX)
        if refused is not None:
            writer.write(refused)  # a line fits the transport's buffer: no wait for a client that may not read
            writer.close()
            return
        # The daemon's own user's `captiond status`, polled by a status bar every 2 s, made 86,000 journal
        # lines a day; every other user's connection keeps its audit line.
        peer, uid = _peer_credentials(writer)
        client = self.attach(send, writer.close, writer.transport.abort, peer, _UNIX,
                             audited=uid != os.geteuid())
        try:
            while not client.closing:
                try:
                    line = await _read_line(reader)
                except ConnectionError:
                    return
                if line is None:
                    self.reply(client, Error("line_too_long", f"line longer than {MAX_LINE} bytes"))
                    continue
                if not line:
                    return
                await self.take_line(client, line)
        except asyncio.CancelledError:
            # Only shutdown cancels a connection's reader, and asyncio's stream callback would print a
            # cancelled handler as an unhandled exception: this one has nothing left to do.
            return
        finally:
            self.detach(client)

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Stop accepting, give subscribers up to flush_timeout to receive what is queued, remove the socket."""
        if self._server is not None:
            self._server.close()
        await self.close_clients(flush_timeout)
        try:
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._release_lock()
