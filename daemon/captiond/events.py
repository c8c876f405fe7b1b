"""Socket protocol v1: event dataclasses, JSON Lines encoding, client command parsing.

Imports nothing of ours. Field names here are the wire names in ../shared/design.md.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, get_type_hints

PROTOCOL = 1
MAX_LINE = 64 * 1024
"""Longest client line accepted, in bytes."""

@dataclass(frozen=True)
class Event:
    """Base of every server-to-client event."""

    type: ClassVar[str] = ""


@dataclass(frozen=True)
class Hello(Event):
    type: ClassVar[str] = "hello"
    version: str
    model: str
    sample_rate: int
    state: str
    protocol: int = PROTOCOL


@dataclass(frozen=True)
class Status(Event):
    """The daemon's state; the fields after detail are additions to design.md's v1 table."""

    type: ClassVar[str] = "status"
    state: str
    detail: str = ""
    model: str = ""
    uptime: float = 0.0
    subscribers: int = 0
    lag: float = 0.0
    dropped_frames: int = 0


@dataclass(frozen=True)
class SpeechStart(Event):
    type: ClassVar[str] = "speech_start"
    utt: int
    start: float


@dataclass(frozen=True)
class Partial(Event):
    type: ClassVar[str] = "partial"
    utt: int
    rev: int
    start: float
    end: float
    stable: str
    unstable: str
    text: str


@dataclass(frozen=True)
class Word:
    """One recognised word with its times in seconds of stream audio and its probability."""

    word: str
    start: float
    end: float
    p: float


@dataclass(frozen=True)
class Final(Event):
    type: ClassVar[str] = "final"
    utt: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...]
    language: str
    latency: float
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpeechEnd(Event):
    type: ClassVar[str] = "speech_end"
    utt: int
    end: float
    reason: str = "silence"
    """What ended it: UtteranceEnd.reason."""


@dataclass(frozen=True)
class Stats(Event):
    type: ClassVar[str] = "stats"
    lag: float
    rtf: float
    dropped_frames: int
    queue: int
    remote_latency: float = 0.0
    remote_requests: int = 0
    fallbacks: int = 0


@dataclass(frozen=True)
class Error(Event):
    type: ClassVar[str] = "error"
    code: str
    message: str


@dataclass(frozen=True)
class Lost(Event):
    type: ClassVar[str] = "lost"
    count: int


@dataclass(frozen=True)
class Pong(Event):
    """Answer to a ping (an addition to v1: clients ignore types they do not know)."""

    type: ClassVar[str] = "pong"


EVENT_TYPES = {cls.type: cls for cls in (Hello, Status, SpeechStart, Partial, Final, SpeechEnd, Stats, Error, Lost, Pong)}
NOT_PARTIAL = [t for t in EVENT_TYPES if t != "partial"]
"""What a client that shows no partials subscribes to: the daemon decodes none that nobody is sent."""


@dataclass(frozen=True)
class Envelope:
    """An event as a client receives it: the event with its seq and wall-clock ts."""

    seq: int
    ts: float
    event: Event


_HINTS = {cls: get_type_hints(cls) for cls in (*EVENT_TYPES.values(), Word)}
_LAST_TS = 253402300799.0
"""9999-12-31 23:59:59 UTC in seconds since 1970: the last wall-clock time an event's ts may hold."""


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` from the wire as the field's type (str, int, float, tuple of str or of Word); ValueError if it is not."""
    if hint is str and isinstance(value, str):
        return _shown(value)
    if hint in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and (hint is float or isinstance(value, int)):
        if hint is int:
            return value
        try:
            number = float(value)
        except OverflowError:  # a 400-digit integer
            number = math.inf
        if math.isfinite(number):  # NaN and Infinity (no JSON, yet json.loads takes them) are no time, lag or count
            return number
        raise ValueError(f"{where} is {str(value)[:40]!r}, not a finite number")
    elif hint == tuple[str, ...] and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(_shown(v) for v in value)
    elif hint == tuple[Word, ...] and isinstance(value, list) and all(isinstance(w, dict) for w in value):
        return tuple(Word(**{k: _typed(w.get(k), h, f"{where}.{k}") for k, h in _HINTS[Word].items()})
                     for w in value)
    raise ValueError(f"{where} is {str(value)[:40]!r}, not a {getattr(hint, '__name__', hint)}")


def decode(line: bytes | str) -> Envelope | None:
    """Parse one server line into a typed event; None for event types this version does not know.

    Fields this version does not know are ignored, so newer daemons stay readable.
    Raises ValueError for a line that is not a v1 event, or holds a field of the wrong type (a NaN or
    infinite number, a ts no clock shows, included).
    """
    try:
        body = json.loads(line)
    except RecursionError:  # json nests by recursion
        raise ValueError("not a protocol v1 event: nested too deeply") from None
    cls = EVENT_TYPES.get(body.get("type")) if isinstance(body, dict) else None
    if cls is None:
        if isinstance(body, dict) and isinstance(body.get("type"), str):
            return None
        raise ValueError(f"not a protocol v1 event: {line!r:.80}")
    hints = _HINTS[cls]
    values = {k: _typed(v, hints[k], f"{cls.type}.{k}") for k, v in body.items() if k in hints and k != "type"}
    ts = _typed(body.get("ts", 0.0), float, "ts")
    if not 0 <= ts <= _LAST_TS:  # a client shows it as a local time, which cannot go past year 9999
        raise ValueError(f"ts is {ts:g}, not a time in seconds since 1970")
    try:
        return Envelope(_typed(body.get("seq", 0), int, "seq"), ts, cls(**values))
    except TypeError as exc:
        raise ValueError(f"{body.get('type')} event with missing fields: {exc}") from None


def _finite(value: float) -> float:
    return round(value, 3) if math.isfinite(value) else 0.0


def encode(event: Event, seq: int, ts: float) -> bytes:
    """One JSON line (with its newline) for an event stamped with seq and wall-clock ts."""
    body = {"type": event.type, "seq": seq, "ts": round(ts, 3)}
    for key, value in asdict(event).items():
        if isinstance(value, float):
            value = _finite(value)
        elif isinstance(value, tuple):
            value = list(value)
        body[key] = value
    line = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if not line.isprintable():
        # json escapes C0 controls only: C1 ones (U+009B is a CSI), bidi overrides and lone surrogates
        # (a file name that is not UTF-8) are written as escapes too, so no line can drive a terminal
        # that `captiond listen` prints to, nor fail to encode.
        line = "".join(f"\\u{ord(c):04x}" if _acts(c) else c for c in line)
    return (line + "\n").encode()


class ProtocolError(ValueError):
    """A client line that is not a valid v1 command; `code` goes into the error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


COMMANDS = ("subscribe", "pause", "resume", "status", "ping", "context", "finalize")
MAX_CONTEXT = 1000
"""Longest prompt or hotwords text a context command may set, in characters."""


@dataclass(frozen=True)
class Command:
    """A parsed client command."""

    cmd: str
    types: frozenset[str] | None = None
    """For subscribe: the event types wanted, None for all."""
    since: int | None = None
    """For subscribe: replay kept finals whose seq is above this."""
    prompt: str | None = None
    """For context: new context text for the decoder (None leaves it as it is)."""
    hotwords: str | None = None
    """For context: new words to favour (None leaves them as they are)."""


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Embeddings, overrides and isolates: they reorder how a terminal or log viewer shows the text around them."""


def _acts(c: str) -> bool:
    """True for a character a terminal, log viewer or typing tool acts on rather than shows: a control
    character (ESC, CR, a newline in a caption line), a bidi control, or a lone surrogate (no encoder
    writes it)."""
    return unicodedata.category(c) in ("Cc", "Cs") or c in _BIDI_CONTROLS


def _shown(text: str) -> str:
    """Text from the wire with every character that would act replaced by U+FFFD: a client prints it
    to a terminal or types it into a window."""
    return text if text.isprintable() else "".join("\ufffd" if _acts(c) else c for c in text)


def undecoded(text: str) -> str:
    """A name from the file system as text any encoder writes: bytes that were not UTF-8 (held as lone
    surrogates by os.fsdecode) become \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """Text for one line of a terminal or log: undecoded() names, and characters that would act (a
    newline, ESC, a bidi override) as their escapes, so a name can neither break nor drive its line."""
    text = undecoded(text)
    return text if text.isprintable() else "".join(repr(c)[1:-1] if _acts(c) else c for c in text)


def text_problem(text: str) -> str | None:
    """Why text from outside (a client, the config, a server) cannot go to the decoder or into a
    final (lone surrogates, control characters, bidirectional overrides), or None. Tab, newline and
    CR pass: a prompt or a context may be several lines."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate)"
    if not _BIDI_CONTROLS.isdisjoint(text):
        return "holds bidirectional override characters"
    if any(_acts(c) and c not in "\t\n\r" for c in text):
        return "holds control characters"
    return None


def parse_command(line: bytes) -> Command:
    """Parse one client line, raising ProtocolError with a clear message when it is not a command."""
    if len(line) > MAX_LINE:
        raise ProtocolError("line_too_long", f"line longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("bad_json", "line is not UTF-8") from None
    except ValueError as exc:
        # A number of more than 4300 digits is refused by int() with advice for Python programmers.
        why = "a number too long" if "int_max_str_digits" in str(exc) else str(exc)
        raise ProtocolError("bad_json", f"line is not JSON: {why}") from None
    except RecursionError:  # json nests by recursion: "[" * 60000 is no ValueError
        raise ProtocolError("bad_json", "line is not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_command", "a command is a JSON object with a \"cmd\" key")
    cmd = obj.get("cmd")
    if cmd not in COMMANDS:
        raise ProtocolError("unknown_command", f"unknown cmd {cmd!r}; known: {', '.join(COMMANDS)}")
    if cmd == "context":
        values = {}
        for key in ("prompt", "hotwords"):
            value = obj.get(key)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_CONTEXT):
                raise ProtocolError("bad_command", f"context: \"{key}\" must be a string of at most {MAX_CONTEXT} characters")
            problem = text_problem(value) if value is not None else None
            if problem:
                raise ProtocolError("bad_command", f"context: \"{key}\" {problem}; send plain UTF-8 text")
            values[key] = value
        return Command("context", **values)
    if cmd != "subscribe":
        return Command(cmd)
    types = obj.get("types")
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ProtocolError("bad_command", "subscribe: \"types\" must be a list of event type names")
        unknown = sorted(set(types) - set(EVENT_TYPES))
        if unknown:
            raise ProtocolError("bad_command", f"subscribe: unknown event types {unknown}")
        types = frozenset(types)
    since = obj.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise ProtocolError("bad_command", "subscribe: \"since\" must be a non-negative integer seq")
    return Command("subscribe", types=types, since=since)
