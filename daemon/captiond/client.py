"""Subscriber library: connect to the daemon's socket and read protocol v1 events.

    from captiond.client import AsyncClient, Client
    from captiond.events import Final

    with Client() as c:                                  # blocking
        c.subscribe(["final"])
        for env in c.events():
            print(env.event.text)

    async with AsyncClient() as c:                       # asyncio
        async for env in c:
            if isinstance(env.event, Final): ...
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator

from .config import ServerConfig, socket_path
from .events import MAX_LINE, Envelope, Error, Hello, decode
from .sockets import peer_ids, shared_tmp_folder, too_long, unsafe_folder

if TYPE_CHECKING:
    import asyncio


class NotRunning(ConnectionError):
    """No daemon answers on the socket; the message says where we looked and what to do."""


class BadDaemon(ConnectionError):
    """What answered broke the protocol (a line too long or not a v1 event), or refused us (an
    error instead of hello, e.g. too_many_clients); the message says which."""


class Closed(ConnectionError):
    """The daemon closed the connection before a command could reach it (it stopped, or dropped us)."""


CLOSED = "the daemon closed the connection before answering"
"""What a client says when the daemon hung up before its answer came."""

_LINE_MAX = 4 * MAX_LINE  # the longest line a client reads (a final with every word's time fits many times)


def _not_running(path: Path, exc: OSError) -> NotRunning:
    if isinstance(exc, PermissionError):
        try:
            path.lstat()
        except PermissionError:
            return NotRunning(f"not allowed to reach {path}: this user may not look into {path.parent} "
                              "(see server.group to share it)")
        except OSError:
            pass
        return NotRunning(f"not allowed to connect to {path}: the socket belongs to another user "
                          "(see server.group to share it)")
    if path.exists() and not path.is_socket():
        return NotRunning(f"{path} is not a socket (a file is in the way): point at captiond's socket with "
                          "--set server.socket=PATH")
    return NotRunning(f"captiond is not running: nothing listens on {path} "
                      "(start it with `captiond run`, or point at its socket with --set server.socket=PATH)")


def _check_path(path: Path) -> None:
    """NotRunning if `path` cannot be a socket's, or is the default socket in /tmp and another user
    could have put it there: they would be sent our commands and could send us any text (`captiond
    type` types it)."""
    if problem := too_long(path):
        raise NotRunning(problem)
    if path.parent == shared_tmp_folder() and (unsafe := unsafe_folder(path.parent)):
        raise NotRunning(f"not connecting to {path}: {unsafe}, so it may not be captiond's; remove the folder "
                         "and restart captiond, or point at its socket with --set server.socket=PATH")


def _check_peer(path: Path, sock: socket.socket) -> None:
    """For the default socket in /tmp, NotRunning unless the process that answers is this user's or
    root's: the folder was looked at before connecting, and another user may have changed it since."""
    if path.parent != shared_tmp_folder():
        return
    uid = ids[1] if (ids := peer_ids(sock)) is not None else -1
    if uid not in (os.getuid(), os.geteuid(), 0):
        raise NotRunning(f"not connecting to {path}: another user's process answers there (uid {uid}), so it is "
                         "not your captiond; remove the folder and restart captiond, or point at its socket "
                         "with --set server.socket=PATH")


def _checked(path: Path, line: bytes, first: bool) -> Envelope | None:
    """One line from the daemon as a typed event (None for a type this version does not know); BadDaemon
    for a line that is not a v1 event, or a first line that is not hello (an error there is a refusal)."""
    try:
        env = decode(line)
    except ValueError as exc:
        raise BadDaemon(f"{path} sent something that is not a captiond event ({exc})") from None
    if first and env is not None and isinstance(env.event, Error):
        raise BadDaemon(f"captiond refused the connection: {env.event.message}")
    if first and (env is None or not isinstance(env.event, Hello)):
        raise BadDaemon(f"{path} did not start with hello, as captiond does; is that captiond's socket?")
    return env


def _line_too_long(path: Path) -> str:
    return f"{path} sent a line longer than {_LINE_MAX} bytes; is that captiond's socket?"


def _subscribe_line(types: list[str] | None, since: int | None) -> dict:
    command: dict = {"cmd": "subscribe"}
    if types is not None:  # [] asks for none: answers to this client's own commands only
        command["types"] = list(types)
    if since is not None:
        command["since"] = since
    return command


class Client:
    """A blocking connection to captiond."""

    def __init__(self, path: Path | None = None, timeout: float | None = None) -> None:
        self.path = path or socket_path(ServerConfig())
        _check_path(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            self._sock.close()
            raise _not_running(self.path, exc) from None
        except OSError as exc:  # e.g. EAGAIN: its backlog of connections is full (a daemon that hangs?)
            self._sock.close()
            raise NotRunning(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        try:
            _check_peer(self.path, self._sock)
        except NotRunning:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")
        self._read = 0  # lines read so far: the first must be hello, whichever call reads it

    def send(self, command: dict) -> None:
        """Send one command, e.g. {"cmd": "pause"}; Closed when the daemon has gone."""
        try:
            self._sock.sendall((json.dumps(command) + "\n").encode())
        except (BrokenPipeError, ConnectionResetError):
            raise Closed(CLOSED) from None

    def subscribe(self, types: list[str] | None = None, since: int | None = None) -> None:
        """Ask for only some event types and/or a replay of kept finals after seq `since`."""
        self.send(_subscribe_line(types, since))

    def lines(self) -> Iterator[bytes]:
        """Raw JSON lines as they arrive, until the daemon closes the connection; BadDaemon for a
        line longer than any event (memory stays bounded whatever answers on the socket), and for a
        first line that is not hello (an error there is a refusal, e.g. too_many_clients)."""
        while True:
            try:
                line = self._file.readline(_LINE_MAX + 1)
            except ConnectionResetError:  # it closed with a command of ours unread: as much an end as a close
                return
            if not line:
                return
            if len(line) > _LINE_MAX:
                raise BadDaemon(_line_too_long(self.path))
            self._read += 1
            if self._read == 1:
                _checked(self.path, line, first=True)
            yield line

    def events(self) -> Iterator[Envelope]:
        """Typed events as they arrive (types this version does not know are skipped); BadDaemon when
        a line is not a v1 event, or the daemon answers the connection with an error, not hello."""
        for line in self.lines():  # which checked the first line
            env = _checked(self.path, line, first=False)
            if env is not None:
                yield env

    def __iter__(self) -> Iterator[dict]:
        for line in self.lines():
            yield json.loads(line)

    def close(self) -> None:
        """Close the connection (also from another thread while one reads: the read then ends)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        self._file.close()
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """An asyncio connection to captiond; `async for env in client` yields typed events."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or socket_path(ServerConfig())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read = 0  # as in Client

    async def connect(self) -> "AsyncClient":
        """Open the connection, raising NotRunning when no daemon answers."""
        import asyncio  # only here: blocking clients (`captiond ptt` on a key press) start faster without it

        _check_path(self.path)
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.path), limit=_LINE_MAX)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise _not_running(self.path, exc) from None
        try:
            _check_peer(self.path, self._writer.get_extra_info("socket"))
        except NotRunning:
            self._writer.close()
            raise
        return self

    async def send(self, command: dict) -> None:
        """Send one command; Closed when the daemon has gone."""
        assert self._writer is not None, "connect() first"
        try:
            self._writer.write((json.dumps(command) + "\n").encode())
            await self._writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise Closed(CLOSED) from None

    async def subscribe(self, types: list[str] | None = None, since: int | None = None) -> None:
        """Ask for only some event types and/or a replay of kept finals after seq `since`."""
        await self.send(_subscribe_line(types, since))

    async def __aiter__(self) -> AsyncIterator[Envelope]:
        assert self._reader is not None, "connect() first"
        while True:
            try:
                line = await self._reader.readline()
            except ValueError:  # asyncio's word for a line over the reader's limit
                raise BadDaemon(_line_too_long(self.path)) from None
            except ConnectionResetError:  # as in Client.lines: an end like a close
                return
            if not line:
                return
            self._read += 1
            env = _checked(self.path, line, first=self._read == 1)
            if env is not None:
                yield env

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except ConnectionError:
                pass

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def connect_when_running(path: Path, note: Callable[[str], None], retry_s: float = 1.0,
                         sleep: Callable[[float], None] = time.sleep) -> Client:
    """A client of the daemon at `path`, once it runs: until then retry every retry_s, saying so once."""
    waiting = False
    while True:
        try:
            return Client(path)
        except NotRunning as exc:
            if not waiting:
                note(f"{exc}; waiting for it")
                waiting = True
            sleep(retry_s)
