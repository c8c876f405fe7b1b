"""Opt-in WebSocket API and captions page: GET / (the page), /events (the Hub's protocol v1 events),
/listen (a live session for the client's own audio). Runs inside the daemon's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures
import errno
import hmac
import http
import json
import logging
import socket
from collections import Counter
from importlib import resources
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server as _WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .config import WebSocketConfig
from .events import Error
from .frames import SAMPLE_RATE
from .server import Client, Hub, Occasional, ServerError
from .session import AudioError, LiveSession
from .tasks import spawn, within

log = logging.getLogger(__name__)

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_SINGLE_HEADERS = ("Host", "Origin", "Upgrade", "Authorization")  # two of one would make the checks ambiguous
_SESSION_QUEUE = 512  # events buffered for one /listen client before partials are dropped
_SESSION_CLOSE_S = 10.0  # a closing session that decodes nothing for this long loses what it has left
_STOP_FLUSH_S = 1.0  # what a session's client gets, at a daemon stop, to read its last events
_WRITE_LIMIT = 16 * 1024
_EVENTS = "WebSocket /events"
_HANDSHAKES = 64  # connections past the clients' and sessions' limits: handshakes, the page, refusals


def _host_name(host: str) -> str:
    """A Host header without its port: "[::1]:8765" and "[::1]" are "[::1]", "localhost:80" is "localhost"."""
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0]


def _rate(text: str) -> int:
    """A sample_rate query value as a number; AudioError naming it when it is not a whole number (int()'s
    own words were Python's: "invalid literal for int() with base 10", "sys.set_int_max_str_digits()")."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise AudioError(f"sample_rate={text[:20]!r} is not a whole number of Hz")
    return int(text)


def _keepalive(sock: socket.socket | None) -> None:
    """Have the kernel find a peer that is gone (a laptop shut, a cable out) within about a minute.

    Not WebSocket pings: a /listen client sending audio faster than it is decoded has its pong queued
    behind that audio, and the server's ping timeout closed it (1011) with finals still to come."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _capped(most: int, dropped: Callable[[int], None]) -> type[ServerConnection]:
    """ServerConnection that drops a TCP connection as it comes, before any handshake, while `most`
    are open. The clients' and sessions' own limits count only after the handshake, and until its
    timeout any local process could hold connections open: 1100 of them took every file descriptor
    of a daemon at 1024 (its transcript log could not be written, nor a model file opened)."""
    open_now = 0

    class Capped(ServerConnection):
        counted = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal open_now
            if open_now >= most:
                dropped(most)
                transport.abort()
                return
            open_now += 1
            self.counted = True
            _keepalive(transport.get_extra_info("socket"))
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            nonlocal open_now
            if self.counted:
                open_now -= 1
                super().connection_lost(exc)

    return Capped


class WebError(ServerError):
    """The WebSocket server cannot start; the message says why and what to do."""


def _page() -> bytes:
    return resources.files("captiond").joinpath("web/index.html").read_bytes()


class WebServer:
    """HTTP + WebSocket front of the daemon; sessions are made by `new_session` and share its engine."""

    def __init__(self, cfg: WebSocketConfig, hub: Hub, new_session: Callable[..., LiveSession]) -> None:
        self._cfg = cfg
        self._hub = hub
        self._new_session = new_session
        self._server: _WsServer | None = None
        self._sessions: dict[LiveSession, Hub] = {}  # each with the hub of its one client
        self._closing: set[asyncio.Task] = set()  # connections being closed by the Hub (a slow client)
        self.refused: Counter[str] = Counter()
        """Handshakes refused since the start, by kind: host, token, origin; connections: dropped before one."""
        self._worth_a_line = Occasional()
        self.gate_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="captiond-ws-gate")
        """The gate of every live session runs here, off the event loop and off the microphone's gate thread."""

    @property
    def listening(self) -> bool:
        """True once start() has bound the port."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The port actually bound (differs from the config when it is 0 in tests)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind host:port; a port in use is a clear error."""
        try:
            most = self._hub.max_clients + self._cfg.max_sessions + _HANDSHAKES
            self._server = await serve(self._handle, self._cfg.host, self._cfg.port, process_request=self._check,
                                       max_size=self._cfg.max_message_bytes, write_limit=_WRITE_LIMIT,
                                       compression=None, server_header=None, ping_interval=None,
                                       create_connection=_capped(most, self._dropped))
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:  # a systemd unit with RestrictAddressFamilies=AF_UNIX
                fix = "allow AF_INET AF_INET6 in the unit's RestrictAddressFamilies (systemctl edit captiond)"
            elif isinstance(exc, socket.gaierror):
                fix = "set websocket.host to an address or name of this machine"
            else:
                fix = "set websocket.port to a free port"
            raise WebError(f"websocket: cannot listen on {self._cfg.host}:{self._cfg.port}: {exc.strerror or exc}; "
                           f"{fix}, or set websocket.enabled = false") from None
        log.info("WebSocket API and captions page on http://%s:%d/", self._url_host(), self.port)

    def _dropped(self, most: int) -> None:
        self.refused["connections"] += 1
        if self._worth_a_line("connections"):
            log.warning("%d connection(s) to the WebSocket port dropped so far: %d were open, the most it takes",
                        self.refused["connections"], most)

    def _url_host(self) -> str:
        return f"[{self._cfg.host}]" if ":" in self._cfg.host else self._cfg.host

    async def close(self, timeout: float) -> None:
        """Stop accepting; end live sessions and connections within `timeout`."""
        if self._server is None:
            return
        # Every speech_start still gets its final: empty, flagged error, with a decode_failed error saying
        # why, delivered (briefly) before the close.
        for session in self._sessions:
            session.cancel()
            session.worker.abandon("the daemon is stopping")
        flushes = {spawn(hub.close_clients(_STOP_FLUSH_S, drop=False), "websocket-session-flush")
                   for hub in self._sessions.values()}
        if flushes:
            await asyncio.wait(flushes, timeout=min(timeout, _STOP_FLUSH_S))
        self._server.close(close_connections=True)
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        except asyncio.TimeoutError:
            log.warning("websocket: connections still open after %.0f s; dropping them", timeout)
            for connection in self._server.all_connections:  # clients that never answer our close frame
                connection.transport.abort()
        self.gate_thread.shutdown(wait=False, cancel_futures=True)

    # --- the opening handshake -------------------------------------------------------------

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        """Serve the page; refuse unknown paths, missing tokens, foreign origins and rebinding hosts."""
        url = urlsplit(request.path)
        if any(len(request.headers.get_all(name)) > 1 for name in _SINGLE_HEADERS):
            return connection.respond(http.HTTPStatus.BAD_REQUEST,
                                      f"at most one of each of these headers: {', '.join(_SINGLE_HEADERS)}\n")
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if url.path in ("/", "/index.html") and not upgrade:
            headers = Headers({"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
                               "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
                               "script-src 'unsafe-inline' blob:; style-src 'unsafe-inline'; worker-src blob:"})
            return Response(200, "OK", headers, _page())
        if url.path == "/favicon.ico":
            return Response(204, "No Content", Headers())
        if url.path not in ("/events", "/listen"):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found: use /, /events or /listen\n")
        if not upgrade:
            return connection.respond(http.HTTPStatus.UPGRADE_REQUIRED, f"{url.path} is a WebSocket endpoint\n")
        kind, problem = self._refusal(request, url.query)
        if problem:
            self.refused[kind] += 1
            # The captions page retries every 2 s, refused or not: a line now and then for each kind,
            # so that a stale tab's token does not hide a first foreign origin.
            if self._worth_a_line(kind):
                log.warning("websocket: refused %r from %s: %s (%d refused for this so far)", url.path,
                            connection.remote_address, problem, self.refused[kind])
            return connection.respond(http.HTTPStatus.FORBIDDEN, problem + "\n")
        return None

    def _refusal(self, request: Request, query: str) -> tuple[str, str]:
        """Why the handshake is refused, as (a kind, a one-line text); ("", "") when it is not."""
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host is None:
            return "host", "a Host header is required"
        if self._cfg.token:
            given = parse_qs(query).get("token", [""])[0]
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), self._cfg.token.encode()):
                return "token", "missing or wrong token (send ?token=... or Authorization: Bearer ...)"
        elif _host_name(host) not in _LOCAL_HOSTS:
            # Without a token only this machine may connect, and only by a loopback name: a page on
            # another site that resolves its own name to 127.0.0.1 (DNS rebinding) is turned away here.
            return "host", f"Host {host!r} is not a loopback name; use http://127.0.0.1 or set websocket.token"
        if origin is not None and origin.rstrip("/") not in (f"http://{host}", f"https://{host}",
                                                             *self._cfg.allowed_origins):
            return "origin", f"Origin {origin!r} is not allowed; add it to websocket.origins"
        return "", ""

    # --- connections -----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        url = urlsplit(ws.request.path)
        if url.path == "/events":
            await self._events(ws)
        else:
            await self._listen(ws, parse_qs(url.query, keep_blank_values=True))

    @staticmethod
    def _sender(ws: ServerConnection) -> Callable[[bytes], Awaitable[None]]:
        async def send(line: bytes) -> None:
            try:
                await ws.send(line.decode().rstrip("\n"))
            except ConnectionClosed as exc:
                raise ConnectionError(str(exc)) from None
        return send

    async def _events(self, ws: ServerConnection) -> None:
        """The Hub's events; commands as on the Unix socket, one JSON object per text message."""
        def close() -> None:
            # Reached once the Hub let the client go: at a daemon stop (1001, as /listen sessions get
            # then; 1000 read as "closed on purpose, do not reconnect"), or after the client left.
            spawn(ws.close(1001), "websocket-close", keep=self._closing)

        refused = self._hub.refusal(_EVENTS)
        if refused is not None:
            with contextlib.suppress(ConnectionClosed):  # a client gone before it read why
                await ws.send(refused.decode().rstrip("\n"))
                await ws.close(1013, "too many clients")
            return
        client = self._hub.attach(self._sender(ws), close, ws.transport.abort, str(ws.remote_address), _EVENTS)
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self._hub.reply(client, Error("bad_message", "send commands as text messages, not binary"))
                    continue
                await self._hub.take_line(client, message.encode())
        except ConnectionClosed:
            pass
        finally:
            self._hub.detach(client)

    async def _listen(self, ws: ServerConnection, query: dict[str, list[str]]) -> None:
        """One live session: binary audio in; partial/final events for this stream out."""
        hub = Hub(client_queue=_SESSION_QUEUE, keep_finals=0, hello=self._hub.hello)
        # This handler closes the connection itself, with the reason the stream ended.
        client = hub.attach(self._sender(ws), lambda: None, ws.transport.abort, str(ws.remote_address),
                            "WebSocket /listen")
        session, closed = None, False
        try:
            if len(self._sessions) >= self._cfg.max_sessions:
                await self._end(ws, hub, client, 1013, "too many sessions", Error(
                    "too_many_sessions", f"{self._cfg.max_sessions} live sessions are running "
                    "(websocket.max_sessions); try again later"))
                return
            try:
                encoding = query.get("encoding", ["linear16"])[0]
                rate = _rate(query.get("sample_rate", ["16000"])[0]) if encoding == "linear16" else 16000
                session = self._new_session(hub.publish, encoding=encoding,
                                            sample_rate=rate, gate_thread=self.gate_thread,
                                            name=f"live session from {ws.remote_address}")
            except (ValueError, AudioError) as exc:
                await self._end(ws, hub, client, 1008, "bad request", Error(
                    "bad_request", f"{exc}; e.g. /listen?encoding=linear16&sample_rate=16000"))
                return
            self._sessions[session] = hub
            log.info("live session from %s: %d in use", ws.remote_address, len(self._sessions))
            session.start()
            reason = await self._session_loop(ws, hub, client, session)
            # A client gone while its session closes would have it decode, for no one, all it sent.
            gone = spawn(self._cancel_when_gone(ws, session), "websocket-listen-gone")
            try:
                await session.close(_SESSION_CLOSE_S)
                closed = True
            finally:
                gone.cancel()
            # Its decoding is done: the slot is free while the connection closes, which waits for a client
            # that keeps sending after CloseStream up to websockets' close timeout (it held the slot 10 s).
            self._sessions.pop(session, None)
            await self._end(ws, hub, client, 1000, reason)
            log.info("live session from %s %s after %.1f s of audio", ws.remote_address,
                     "was abandoned" if session.abandoned else f"ended ({reason})", session.samples / SAMPLE_RATE)
        except ConnectionClosed:
            # Every session's end is logged, as the Unix socket logs each client's (_cancel_when_gone
            # already said so for one abandoned while it closed).
            if session is not None and not session.abandoned:
                log.info("live session from %s: the client disconnected after %.1f s of audio%s", ws.remote_address,
                         session.samples / SAMPLE_RATE, "" if closed else "; its session is abandoned")
        finally:
            if session is not None:
                session.cancel()
                self._sessions.pop(session, None)
            hub.detach(client)

    @staticmethod
    async def _cancel_when_gone(ws: ServerConnection, session: LiveSession) -> None:
        """Cancel the session once the client's connection is closed."""
        await ws.wait_closed()
        log.info("live session from %s: the client went while its session closed; abandoned it", ws.remote_address)
        session.cancel()

    @staticmethod
    async def _end(ws: ServerConnection, hub: Hub, client: Client, code: int, reason: str,
                   error: Error | None = None) -> None:
        """Deliver what the session's client still has queued (and a last error), then close with `code`."""
        if error is not None:
            hub.reply(client, error)
        await hub.close_clients(1.0)
        await ws.close(code, reason)

    async def _next_message(self, ws: ServerConnection, session: LiveSession) -> str | bytes | None:
        """The client's next message, None once the session broke (it need not wait for the client to
        speak again); TimeoutError after websocket.idle_timeout_s."""
        # recv() may be cancelled without losing a message (websockets' promise); its exception, a
        # closed connection, is read here, so the task is not spawn()ed to log it.
        receive = asyncio.get_running_loop().create_task(ws.recv(), name="websocket-recv")
        broken = spawn(session.broken.wait(), "websocket-session-broken")
        try:
            done = await within({receive, broken}, self._cfg.idle_timeout_s)
        finally:
            broken.cancel()
            if not receive.done():
                receive.cancel()
        if receive in done:
            return receive.result()
        if broken in done:
            return None
        raise asyncio.TimeoutError

    async def _session_loop(self, ws: ServerConnection, hub: Hub, client: Client, session: LiveSession) -> str:
        """Read the client's messages until it closes the stream; returns why the stream ended."""
        while True:
            try:
                message = await self._next_message(ws, session)
            except asyncio.TimeoutError:
                hub.reply(client, Error("idle_timeout", f"no audio or KeepAlive for {self._cfg.idle_timeout_s:g} s "
                                        "(websocket.idle_timeout_s); closing"))
                return "idle timeout"
            if message is None or session.failed:
                return session.failed
            if isinstance(message, bytes):
                await session.feed(message)
                continue
            kind = _message_type(message)
            if kind == "KeepAlive":
                continue
            if kind == "Finalize":
                await session.finalize()
            elif kind == "CloseStream":
                return "CloseStream"
            else:
                hub.reply(client, Error("bad_message", f"{kind}; expected binary audio or "
                                        '{"type": "KeepAlive" | "Finalize" | "CloseStream"}'))


def _message_type(text: str) -> str:
    """The `type` of a control message, or a description of what is wrong with it."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # json nests by recursion: "[" * 60000 is no ValueError
        return "not JSON"
    if not isinstance(data, dict) or data.get("type") not in ("KeepAlive", "Finalize", "CloseStream"):
        return f"unknown control message {text[:80]!r}"
    return data["type"]

