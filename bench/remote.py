"""Finals from an inference server: the local backend against faster-whisper-server on loopback with the
same model (tiny.en), and a fleet of daemons sharing one server.

Default: one session of dev-corpus clips (bench/session.py's) played in real time into the virtual
microphone three times: asr.backend = local, local with the full window (as the server encodes),
and openai against the loopback server. Prints streamed WER,
final latency, fallbacks, and the CPU the daemon and the server spent.

--fleet 1,2,4,8: for each N, N daemons read the same session as file sources paced in real time
(audio.realtime), all against one server, at once. Prints final latency p50 / p95, finals flagged
fallback and the server's CPU per N: where the server (here: the machine) saturates.

    .venv/bin/python bench/remote.py [--clips N] [--seed S] [--timeout S]
    .venv/bin/python bench/remote.py --fleet 1,2,4,8 [--clips N]
    .venv/bin/python bench/remote.py --url http://127.0.0.1:8000/v1 --server-pid PID   # another server

The server decodes as the local finals do where its options allow (beam 5, temperature 0) but always
encodes Whisper's full 30 s window (the local finals: 10 s), and it shares this machine's 2 cores with
the daemons' partials: on loopback the remote backend can only cost, never save.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import Daemon, manifest, read_wav, silence, write_wav  # noqa: E402
from session import build_session, cpu_seconds, pct, score, stream  # noqa: E402
from wer import corpus_wer  # noqa: E402
from whisper_server import WhisperServer  # noqa: E402


class Running:
    """An OpenAI-compatible server started by someone else (--url), shaped like a WhisperServer."""

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.proc = SimpleNamespace(pid=pid)


def table(head: tuple[str, ...], rows: list[tuple]) -> None:
    """Print a Markdown table."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def flagged(finals: list[dict], flag: str) -> int:
    """Finals carrying a flag."""
    return sum(flag in f["flags"] for f in finals)


def compare(session: Path, spans, server: WhisperServer | Running, timeout: float, tmp: Path) -> None:
    """The same session through the local backend and through the loopback server."""
    audio_s = spans[-1][2] + 3.0
    rows = []
    # The server always encodes the full 30 s window: the local backend's finals do too with
    # asr.short_window = false, which leaves the round trip as the only difference.
    for name, overrides in (("local", []), ("local, full window", ["asr.short_window=false"]),
                            ("openai, loopback", ["asr.backend=openai", f"asr.remote_url={server.url}",
                                                  f"asr.remote_timeout_s={timeout}"])):
        (tmp / name).mkdir()
        server_cpu = cpu_seconds(server.proc.pid)
        run = stream(session, overrides, tmp / name)
        server_cpu = cpu_seconds(server.proc.pid) - server_cpu
        r = score(run, spans, audio_s)
        stats = [e for e in run["events"] if e["type"] == "stats"]
        remote = stats[-1].get("remote_latency", 0.0) if stats else 0.0
        rows.append((name, f"{corpus_wer(r['pairs']):.3f}", f"{pct(r['latencies'], 50):.2f} s",
                     f"{pct(r['latencies'], 95):.2f} s", f"{len(r['finals'])}",
                     f"{flagged(r['finals'], 'fallback')} / {flagged(r['finals'], 'unbound')}",
                     f"{remote:.2f} s" if remote else "-",
                     f"{r['cpu_per_audio_s']:.2f} + {server_cpu / audio_s:.2f}" if remote
                     else f"{r['cpu_per_audio_s']:.2f}"))
    print(f"\nsession: {len(spans)} clips, {audio_s:.0f} s of audio, played once per backend\n")
    table(("backend", "WER streamed", "final latency p50", "p95", "finals", "fallback / unbound",
           "remote latency (avg)", "CPU s per audio s (daemon + server)"), rows)


def fleet(session: Path, sizes: list[int], server: WhisperServer | Running, timeout: float, tmp: Path) -> None:
    """N daemons at once, each reading the session in real time, against one server."""
    audio_s = len(read_wav(session)) / 16000
    rows = []
    for n in sizes:
        daemons = [Daemon(_mkdir(tmp / f"fleet{n}-{i}"), "--source", f"file:{session}", "--set", "audio.realtime=true",
                          "--set", "asr.backend=openai", "--set", f"asr.remote_url={server.url}",
                          "--set", f"asr.remote_timeout_s={timeout}", "--set", "log.enabled=false",
                          "--set", "server.stats_interval_s=0")
                   for i in range(n)]
        try:
            server_cpu = cpu_seconds(server.proc.pid)
            events = [d.connect(timeout=180, subscribe={"cmd": "subscribe", "since": 0}) for d in daemons]
            for d in daemons:  # a file source ends the daemon when the file does
                d.proc.wait(audio_s + 120)
            server_cpu = cpu_seconds(server.proc.pid) - server_cpu
        finally:
            for d in daemons:
                d.kill()
        finals = [f for e in events for f in e.of("final")]
        latencies = [f["latency"] for f in finals if f["text"]]
        rows.append((n, len(finals), f"{pct(latencies, 50):.2f} s", f"{pct(latencies, 95):.2f} s",
                     f"{flagged(finals, 'fallback')} ({100 * flagged(finals, 'fallback') / max(1, len(finals)):.0f} %)",
                     flagged(finals, "unbound"), f"{server_cpu / audio_s:.2f}"))
        print(f"N = {n} done", file=sys.stderr)
    print(f"\nfleet: each daemon reads the same {audio_s:.0f} s session in real time; one faster-whisper-server "
          f"(tiny.en, 2 threads); asr.remote_timeout_s = {timeout}\n")
    table(("daemons", "finals", "final latency p50", "p95", "fallback", "unbound", "server CPU s per audio s"), rows)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=8, help="dev-corpus clips in the session (default 8)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0, help="asr.remote_timeout_s (default 5)")
    parser.add_argument("--fleet", metavar="N,N,...", help="run the fleet bench for these numbers of daemons")
    parser.add_argument("--url", help="a running OpenAI-compatible server's base URL (e.g. http://127.0.0.1:8000/v1) "
                                      "instead of starting faster-whisper-server")
    parser.add_argument("--server-pid", type=int, default=0, help="with --url: the server's process id, for its CPU")
    args = parser.parse_args()
    if args.url and not args.server_pid:
        parser.error("--url needs --server-pid (the server's CPU is measured)")
    rng = np.random.default_rng(args.seed)
    usable = [m for m in manifest() if m["wer_ok"] and m["duration"] <= 15.0]
    clips = [usable[i] for i in rng.permutation(len(usable))[: args.clips]]
    began = time.monotonic()
    running = contextlib.nullcontext(Running(args.url, args.server_pid)) if args.url else WhisperServer()
    with tempfile.TemporaryDirectory(prefix="captiond-bench-remote-") as tmpdir, running as server:
        tmp = Path(tmpdir)
        spans = build_session(clips, args.seed, tmp / "session.wav")
        if args.fleet:
            # A few seconds of silence first: the daemons load their model while the file plays.
            write_wav(tmp / "fleet.wav", np.concatenate([silence(4.0), read_wav(tmp / "session.wav")]))
            fleet(tmp / "fleet.wav", [int(n) for n in args.fleet.split(",")], server, args.timeout, tmp)
        else:
            compare(tmp / "session.wav", spans, server, args.timeout, tmp)
    print(f"\n(run took {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
