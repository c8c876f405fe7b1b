"""Streaming benchmark: a session of real speech through the virtual microphone into the real daemon.

Builds a session from dev corpus clips separated by pauses and long silences, plays it in real
time into a PulseAudio virtual microphone, records what `captiond run` publishes on its socket,
and compares it with decoding each clip whole, offline, with the same model (beam 5).

    .venv/bin/python bench/session.py [--clips N] [--seed S] [--set section.key=value ...]

Prints a table; numbers are from one run on this machine, so run it more than once.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import CORPUS, Daemon, manifest, read_wav, silence, write_wav  # noqa: E402
from vmic import VirtualMic  # noqa: E402
from wer import corpus_wer, normalize  # noqa: E402

from captiond.config import AsrConfig, load  # noqa: E402
from captiond.engine import WhisperDecoder  # noqa: E402
from captiond.frames import int16_to_float  # noqa: E402

GAPS_S = (0.8, 1.5, 3.0, 8.0)  # a short pause, sentence pauses, a long silence
IDLE_S = 10.0
LEAD_S = 1.0


def build_session(clips: list[dict], seed: int, out: Path) -> list[tuple[dict, float, float]]:
    """Write the session WAV; return (clip, start, end) in session seconds."""
    rng = np.random.default_rng(seed)
    parts, spans, pos = [silence(LEAD_S)], [], LEAD_S
    for item in clips:
        pcm = read_wav(CORPUS / item["file"])
        spans.append((item, pos, pos + len(pcm) / 16000))
        gap = float(rng.choice(GAPS_S))
        parts += [pcm, silence(gap)]
        pos += len(pcm) / 16000 + gap
    parts.append(silence(3.0))
    write_wav(out, np.concatenate(parts))
    return spans


def offline(clips: list[dict], asr: AsrConfig) -> dict[str, str]:
    """Each clip decoded whole with the daemon's model and settings."""
    decoder = WhisperDecoder(asr)
    decoder.load()
    return {c["file"]: decoder.decode(int16_to_float(read_wav(CORPUS / c["file"])), beam_size=asr.beam_size,
                                      words=False).text for c in clips}


def stream(session: Path, spans, overrides: list[str], tmp: Path) -> dict:
    """Play the session into the daemon and collect what it published."""
    with VirtualMic() as mic:
        args = ["--source", "mic", "--set", "server.stats_interval_s=1"]
        for o in overrides:
            args += ["--set", o]
        started = time.monotonic()
        daemon = Daemon(tmp, *args, env=mic.env)
        try:
            events = daemon.connect(timeout=120)
            ready = time.monotonic() - started
            pid = daemon.proc.pid
            cpu0 = cpu_seconds(pid)
            time.sleep(IDLE_S)  # nobody speaks: what does listening cost?
            idle = (cpu_seconds(pid) - cpu0) / IDLE_S
            cpu1 = cpu_seconds(pid)
            player = mic.play(session)
            player.wait()
            time.sleep(4.0)  # the last hangover and decode
            busy = cpu_seconds(pid) - cpu1
            memory = rss_kib(pid)
            daemon.stop()
        finally:
            daemon.kill()
    return {"events": events.events, "ready": ready, "idle": idle, "busy": busy, "memory": memory}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> tuple[int, int]:
    """(peak, current) resident memory of a process in KiB, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0])


def pct(values: list[float], q: float) -> float:
    """q-th percentile, nan for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=14, help="how many clips in the session")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the daemon (and the offline decode's [asr])")
    parser.add_argument("--verbose", action="store_true", help="print reference, streamed and offline text per clip")
    args = parser.parse_args()

    config, _ = load(None, args.set)
    rng = np.random.default_rng(args.seed)
    usable = [m for m in manifest() if m["wer_ok"] and m["duration"] <= 15.0]
    clips = [usable[i] for i in rng.permutation(len(usable))[: args.clips]]
    with tempfile.TemporaryDirectory(prefix="captiond-bench-") as tmpdir:
        tmp = Path(tmpdir)
        spans = build_session(clips, args.seed, tmp / "session.wav")
        t0 = time.monotonic()
        ref_offline = offline(clips, config.asr)
        offline_s = time.monotonic() - t0
        run = stream(tmp / "session.wav", spans, args.set, tmp)

    events = run["events"]
    finals = [e for e in events if e["type"] == "final"]
    starts = {e["utt"]: e for e in events if e["type"] == "speech_start"}
    # Stream time 0 is when capture opened, a moment before playback began. The gaps between clips
    # differ, so one shift of the session lays the finals over the clips best: find it by overlap.
    def overlap(f: dict, shift: float, s: float, e: float) -> float:
        return max(0.0, min(f["end"] - shift, e + 0.6) - max(f["start"] - shift, s - 0.6))

    def placed(shift: float) -> list[dict | None]:
        homes = []
        for f in finals:
            best = max(spans, key=lambda span: overlap(f, shift, span[1], span[2]))
            homes.append(best[0] if overlap(f, shift, best[1], best[2]) > 0 else None)
        return homes

    shifts = [f["start"] - s for f in finals for _, s, _ in spans] or [0.0]
    offset = max(shifts, key=lambda shift: sum(overlap(f, shift, s, e) for f in finals for _, s, e in spans))
    per_clip: dict[str, list[str]] = {item["file"]: [] for item, _, _ in spans}
    outside = []
    for f, home in zip(finals, placed(offset)):
        (per_clip[home["file"]] if home else outside).append(f["text"])
    pairs_stream = [(item["text"], " ".join(per_clip[item["file"]])) for item, _, _ in spans]
    pairs_offline = [(item["text"], ref_offline[item["file"]]) for item, _, _ in spans]
    wer_stream, wer_off = corpus_wer(pairs_stream), corpus_wer(pairs_offline)
    latencies = [f["latency"] for f in finals if f["text"]]
    first_partial = []
    for utt, s in starts.items():
        partials = [e for e in events if e["type"] == "partial" and e["utt"] == utt]
        if partials:
            first_partial.append(partials[0]["ts"] - s["ts"])
    stats = [e for e in events if e["type"] == "stats"]
    audio_s = spans[-1][2] + 3.0

    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"),
        ("model", f"{config.asr.model}, {config.asr.compute_type}, beam {config.asr.beam_size}"),
        ("session", f"{len(spans)} clips, {audio_s:.0f} s, gaps {GAPS_S} s, seed {args.seed}"),
        ("clips with a final", f"{sum(bool(v) for v in per_clip.values())} / {len(spans)}"),
        ("finals (non-empty)", f"{len(finals)} ({len(latencies)})"),
        ("finals outside speech", f"{len(outside)} {outside if outside else ''}"),
        ("words emitted in silence", f"{sum(len(normalize(t)) for t in outside)}"),
        ("WER streamed finals", f"{wer_stream:.3f}"),
        ("WER offline, whole clips", f"{wer_off:.3f}"),
        ("WER ratio stream/offline", f"{wer_stream / wer_off:.2f}" if wer_off else "n/a"),
        ("WER whole session, unaligned", f"{corpus_wer([(' '.join(r for r, _ in pairs_stream), ' '.join(f['text'] for f in finals))]):.3f}"),
        ("final latency p50 / p95", f"{pct(latencies, 50):.2f} s / {pct(latencies, 95):.2f} s"),
        ("first partial after speech_start p50", f"{pct(first_partial, 50):.2f} s"),
        ("time to ready", f"{run['ready']:.1f} s"),
        ("idle CPU (listening to silence)", f"{100 * run['idle']:.1f} % of one core"),
        ("CPU seconds per audio second", f"{run['busy'] / (audio_s + 4.0):.2f}"),
        ("RSS peak / at the end", f"{run['memory'][0] / 1024:.0f} MB / {run['memory'][1] / 1024:.0f} MB"),
        ("decoder real-time factor (finals)", f"{stats[-1]['rtf']:.3f}" if stats else "n/a"),
        ("max lag / dropped frames", f"{max((s['lag'] for s in stats), default=0):.1f} s / "
                                     f"{max((s['dropped_frames'] for s in stats), default=0)}"),
        ("offline decode of all clips", f"{offline_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    if args.verbose:
        for (item, s, e), (ref, hyp), (_, off) in zip(spans, pairs_stream, pairs_offline):
            print(f"\n{item['file']} at {s:.1f}-{e:.1f} s\nREF {ref}\nSTR {hyp}\nOFF {off}")
        print("\nfinals (session time):")
        for f in finals:
            print(f"  {f['start'] - offset:6.1f}-{f['end'] - offset:6.1f} {f['flags']} {f['text']}")


if __name__ == "__main__":
    main()
