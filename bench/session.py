"""Streaming benchmark: a session of real speech through the virtual microphone into the real daemon.

Builds a session from recordings (dev corpus clips, or with --corpus continuous whole recordings with
their own pauses inside) separated by pauses and long silences, plays it in real time into a
PulseAudio virtual microphone, records what `captiond run` publishes on its socket, and compares it
with decoding offline, with the same model (beam 5): each recording whole, as recording and
transcribing afterwards gives it (full window, faster-whisper's defaults: the reference), and each
utterance the daemon's gate finds in the session whole (same segmentation, no streaming). The daemon's 30 ms frames fall on the speech wherever
its capture happened to begin, and which words tiny.en hears depends on that, so the utterance
reference is the mean over --phases alignments of the frames (its spread is printed too).

    .venv/bin/python bench/session.py [--clips N] [--seed S] [--set section.key=value ...]
    .venv/bin/python bench/session.py --corpus continuous --part heldout --clips 40
    .venv/bin/python bench/session.py --soak [MINUTES]
    .venv/bin/python bench/session.py --audio-dir bench/heldout/librispeech --audio-dir /usr/share/sounds/alsa

--audio-dir builds the session from other recordings instead: every WAV or FLAC in the folders, its
reference from a LibriSpeech-style *.trans.txt beside it, else the file name with underscores as
spaces (a name starting with "noise" has none: no words may be emitted there).

Runs the session twice: captiond as configured, and a naive baseline (the same daemon decoding each
utterance once, at its end), and prints a table with both and their ratio. Numbers are from one run
on this machine, so run it more than once. --soak replays the session for an hour (or MINUTES)
into one daemon and prints its RSS and final latency after every replay.
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
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import CORPUS, Daemon, manifest, read_wav, silence, trimmed, write_wav  # noqa: E402
from corpora import CORPORA, PARTS, Recording, WholeReference, recordings  # noqa: E402
from vmic import VirtualMic  # noqa: E402
from wer import corpus_wer, normalize  # noqa: E402

from captiond.capture import decode_file  # noqa: E402
from captiond.config import Config, load  # noqa: E402
from captiond.engine import SHORT, WhisperDecoder  # noqa: E402
from captiond.events import NOT_PARTIAL  # noqa: E402
from captiond.models import resolve_model  # noqa: E402
from captiond.frames import FRAME_SAMPLES, int16_to_float  # noqa: E402
from captiond.gate import UtteranceEnd, UtteranceStart  # noqa: E402
from captiond.gatedriver import segment  # noqa: E402

GAPS_S = (0.8, 1.5, 3.0, 8.0)  # a short pause, sentence pauses, a long silence
IDLE_S = 10.0
LEAD_S = 1.0


def pcm_of(item: dict) -> np.ndarray:
    """A clip's audio as 16 kHz mono int16."""
    if "pcm" in item:
        return item["pcm"]
    if "path" in item:
        return np.concatenate(list(decode_file(item["path"])))
    return read_wav(CORPUS / item["file"])


def folder_clips(folder: Path) -> list[dict]:
    """Every WAV or FLAC in a folder as a clip, with its reference."""
    refs = dict(line.split(" ", 1) for t in folder.glob("*.trans.txt") for line in t.read_text().splitlines() if " " in line)
    return [{"file": p.name, "path": p,
             "text": refs.get(p.stem, "" if p.stem.lower().startswith("noise") else p.stem.replace("_", " "))}
            for p in sorted(folder.iterdir()) if p.suffix.lower() in (".wav", ".flac")]


def joined(clips: list[dict], k: int) -> list[dict]:
    """Every k clips said as one long utterance: their speech with 0.25 s pauses (below the gate's hangover)."""
    if k == 1:
        return clips
    pause = silence(0.25)
    return [{"file": "+".join(c["file"] for c in group), "text": " ".join(c["text"] for c in group),
             "pcm": np.concatenate([x for c in group for x in (trimmed(pcm_of(c)), pause)][:-1])}
            for group in (clips[i:i + k] for i in range(0, len(clips), k))]


def build_session(clips: list[dict], seed: int, out: Path) -> list[tuple[dict, float, float]]:
    """Write the session WAV; return (clip, start, end) in session seconds."""
    rng = np.random.default_rng(seed)
    parts, spans, pos = [silence(LEAD_S)], [], LEAD_S
    for item in clips:
        pcm = pcm_of(item)
        spans.append((item, pos, pos + len(pcm) / 16000))
        gap = float(rng.choice(GAPS_S))
        parts += [pcm, silence(gap)]
        pos += len(pcm) / 16000 + gap
    parts.append(silence(3.0))
    write_wav(out, np.concatenate(parts))
    return spans


def offline(clips: list[dict], session: Path, spans, config: Config,
            phases: int) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Decoded offline with the daemon's model: (each clip whole, as recording and transcribing
    afterwards gives it: bench/corpora.py; each utterance the daemon's gate finds in the session at
    each of `phases` frame alignments, with the daemon's final settings), the utterances' text joined
    per clip they overlap most.

    Alignments: the session shifted by k/phases of a 30 ms frame, k = 0 .. phases-1. The daemon's
    frames fall on the speech wherever its capture happened to begin; tiny.en answers a shift of
    5 samples with other words on a third of these clips, so one alignment is one draw, and the
    reference is the mean over them.

    With word times, as the daemon's finals are decoded: the engine then leaves out a loop run on
    past the audio's end, which it can only find with them."""
    decoder = WhisperDecoder(config.asr)
    decoder.load()
    fallback = config.asr.temperature_fallback  # as the daemon's finals
    reference = WholeReference(resolve_model(config.asr.model).load_target(), config.asr.compute_type, config.asr.cpu_threads)
    whole = {c["file"]: reference.text(Recording(c["file"], c["text"], pcm_of(c))) for c in clips}
    texts, recorded = [], read_wav(session)
    for k in range(phases):
        shift = k * FRAME_SAMPLES // phases
        pcm = np.concatenate([np.zeros(shift, dtype=np.int16), recorded])
        starts, per_clip = {}, {item["file"]: [] for item, _, _ in spans}
        for event in segment([pcm], config.gate):
            if isinstance(event, UtteranceStart):
                starts[event.utt] = event.start
            elif isinstance(event, UtteranceEnd):
                s, e = (starts[event.utt] - shift) / 16000, (event.audio_end - shift) / 16000
                item = max(spans, key=lambda span: min(e, span[2]) - max(s, span[1]))[0]
                per_clip[item["file"]].append(decoder.decode(int16_to_float(pcm[starts[event.utt]:event.audio_end]),
                                                             beam_size=config.asr.beam_size, words=True,
                                                             fallback=fallback,
                                                             window=SHORT if config.asr.short_window else None).text)
        texts.append({key: " ".join(v) for key, v in per_clip.items()})
    return whole, texts


def stream(session: Path, overrides: list[str], tmp: Path, subscribe: dict | None = None) -> dict:
    """Play the session into the daemon and collect what it published (the events `subscribe` asks for)."""
    with VirtualMic() as mic:
        args = ["--source", "mic", "--set", "server.stats_interval_s=1", *(["--debug"] if os.environ.get("BENCH_DEBUG") else [])]
        for o in overrides:
            args += ["--set", o]
        started = time.monotonic()
        daemon = Daemon(tmp, *args, env=mic.env)
        try:
            events = daemon.connect(timeout=120, subscribe=subscribe)
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
            if os.environ.get("BENCH_DEBUG"):  # the daemon's debug log, kept: it says what each final waited for
                Path(f"{os.environ['BENCH_DEBUG']}.{tmp.name}").write_text(daemon.stderr)
    return {"events": events.events, "ready": ready, "idle": idle, "busy": busy, "memory": memory,
            "stderr": daemon.stderr}


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


NAIVE = ["asr.partials=false", "asr.early_final=false", "asr.carry_over_s=0"]
"""The naive baseline: the same daemon decoding each utterance only once it has ended, with no context."""


def score(run: dict, spans, audio_s: float) -> dict:
    """The figures of one streamed run against the clips it heard."""
    events = run["events"]
    finals = [e for e in events if e["type"] == "final"]
    starts = {e["utt"]: e for e in events if e["type"] == "speech_start"}
    # Stream time 0 is when capture opened, a moment before playback began. The gaps between clips
    # differ, so one shift of the session lays the finals over the clips best: find it by overlap.
    def overlap(f: dict, shift: float, s: float, e: float) -> float:
        return max(0.0, min(f["end"] - shift, e + 0.6) - max(f["start"] - shift, s - 0.6))

    shifts = [f["start"] - s for f in finals for _, s, _ in spans] or [0.0]
    offset = max(shifts, key=lambda shift: sum(overlap(f, shift, s, e) for f in finals for _, s, e in spans))
    per_clip: dict[str, list[str]] = {item["file"]: [] for item, _, _ in spans}
    outside = []
    for f in finals:
        best = max(spans, key=lambda span: overlap(f, offset, span[1], span[2]))
        (per_clip[best[0]["file"]] if overlap(f, offset, best[1], best[2]) > 0 else outside).append(f["text"])
    first_partial, cadence = [], []
    for utt, s in starts.items():
        times = [e["ts"] for e in events if e["type"] == "partial" and e["utt"] == utt]
        if times:
            first_partial.append(times[0] - s["ts"])
            cadence += list(np.diff(times))
    stats = [e for e in events if e["type"] == "stats"]
    return {
        "pairs": [(item["text"], " ".join(per_clip[item["file"]])) for item, _, _ in spans],
        "clips": sum(bool(v) for v in per_clip.values()),
        "finals": finals, "outside": outside, "offset": offset,
        "latencies": [f["latency"] for f in finals if f["text"]],
        "first_partial": first_partial, "cadence": cadence,
        "cpu_per_audio_s": run["busy"] / (audio_s + 4.0),
        "rtf": stats[-1]["rtf"] if stats else float("nan"),
        "lag": max((s["lag"] for s in stats), default=0), "dropped": max((s["dropped_frames"] for s in stats), default=0),
    }


def ratio(a: float, b: float) -> str:
    """a / b, or n/a."""
    return f"{a / b:.2f}" if b and b == b and a == a else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=14, help="how many clips in the session")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the daemon (and the offline decode's [asr])")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline run")
    parser.add_argument("--soak", type=float, metavar="MINUTES", nargs="?", const=60.0,
                        help="instead: replay sessions for this long (default 60) and report RSS and latency drift")
    parser.add_argument("--audio-dir", type=Path, action="append", metavar="DIR",
                        help="build the session from the WAV/FLAC files in DIR (repeatable) instead of the dev corpus")
    parser.add_argument("--corpus", choices=CORPORA, default="dev", help="where the clips come from (default dev)")
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="continuous only: the part settings were tuned on, the held-out part, or all")
    parser.add_argument("--join", type=int, default=1, metavar="K",
                        help="say every K clips as one long utterance (0.25 s pauses): decode windows past asr.max_window_s")
    parser.add_argument("--phases", type=int, default=8, metavar="N",
                        help="offline reference: the mean over N alignments of the frames on the session (default 8)")
    parser.add_argument("--finals-only", action="store_true",
                        help="the daemon's subscriber wants every event but partials, as dictation does: no partial is decoded")
    parser.add_argument("--verbose", action="store_true",
                        help="print per clip the reference, streamed, naive and offline (utterances, whole) text")
    args = parser.parse_args()

    config, _ = load(None, args.set)
    rng = np.random.default_rng(args.seed)
    if args.audio_dir:
        usable = [c for d in args.audio_dir for c in folder_clips(d)]
    elif args.corpus == "dev":
        usable = [m for m in manifest() if m["wer_ok"] and m["duration"] <= 15.0]
    else:  # whole recordings, their own pauses inside
        usable = [{"file": r.id, "text": r.text, "pcm": r.pcm} for r in recordings(args.corpus, args.part)]
    clips = joined([usable[i] for i in rng.permutation(len(usable))[: args.clips]], args.join)
    with tempfile.TemporaryDirectory(prefix="captiond-bench-") as tmpdir:
        tmp = Path(tmpdir)
        spans = build_session(clips, args.seed, tmp / "session.wav")
        if args.soak:
            soak(tmp / "session.wav", args.soak * 60, args.set, tmp)
            return
        t0 = time.monotonic()
        ref_offline, ref_utterances = offline(clips, tmp / "session.wav", spans, config, max(1, args.phases))
        offline_s = time.monotonic() - t0
        (tmp / "ours").mkdir()
        run = stream(tmp / "session.wav", args.set, tmp / "ours",
                     {"cmd": "subscribe", "types": NOT_PARTIAL} if args.finals_only else None)
        naive = None
        if not args.no_baseline:
            (tmp / "naive").mkdir()
            naive = stream(tmp / "session.wav", [*args.set, *NAIVE], tmp / "naive")

    audio_s = spans[-1][2] + 3.0
    ours = score(run, spans, audio_s)
    base = score(naive, spans, audio_s) if naive else None
    pairs_offline = [(item["text"], ref_offline[item["file"]]) for item, _, _ in spans]
    wer_off = corpus_wer(pairs_offline)
    wer_utts = [corpus_wer([(item["text"], texts[item["file"]]) for item, _, _ in spans]) for texts in ref_utterances]
    wer_utt = float(np.mean(wer_utts))

    def figures(r: dict) -> dict[str, tuple[str, float]]:
        wer_stream = corpus_wer(r["pairs"])
        return {
            "clips with a final": (f"{r['clips']} / {len(spans)}", float("nan")),
            "finals (non-empty)": (f"{len(r['finals'])} ({len(r['latencies'])})", float("nan")),
            "words emitted in silence": (f"{sum(len(normalize(t)) for t in r['outside'])}"
                                         + (f" {r['outside']}" if r["outside"] else ""), float("nan")),
            "WER streamed finals": (f"{wer_stream:.3f}", wer_stream),
            "WER ratio to offline, each utterance whole": (ratio(wer_stream, wer_utt), float("nan")),
            "WER ratio to offline, whole recordings": (ratio(wer_stream, wer_off), float("nan")),
            "final latency p50": (f"{pct(r['latencies'], 50):.2f} s", pct(r["latencies"], 50)),
            "final latency p95": (f"{pct(r['latencies'], 95):.2f} s", pct(r["latencies"], 95)),
            "first partial after speech_start p50": (f"{pct(r['first_partial'], 50):.2f} s", float("nan")),
            "partial cadence p50 / p95": (f"{pct(r['cadence'], 50):.2f} s / {pct(r['cadence'], 95):.2f} s",
                                          float("nan")),
            "CPU seconds per audio second": (f"{r['cpu_per_audio_s']:.2f}", r["cpu_per_audio_s"]),
            "decoder real-time factor (finals)": (f"{r['rtf']:.3f}", float("nan")),
            "max lag / dropped frames": (f"{r['lag']:.1f} s / {r['dropped']}", float("nan")),
        }

    shared = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"),
        ("model", f"{config.asr.model}, {config.asr.compute_type}, beam {config.asr.beam_size}"),
        ("session", f"{len(spans)} clips, {audio_s:.0f} s, gaps {GAPS_S} s, seed {args.seed}"),
        ("WER offline, each utterance whole (the gate's, beam 5)",
         f"{wer_utt:.3f}" + (f" (mean of {len(wer_utts)} frame alignments, {min(wer_utts):.3f}-{max(wer_utts):.3f}; "
                             f"unshifted {wer_utts[0]:.3f})" if len(wer_utts) > 1 else "")),
        ("WER offline, whole recordings (full window, beam 5)", f"{wer_off:.3f} (both decoded in {offline_s:.1f} s)"),
        ("time to ready", f"{run['ready']:.1f} s"),
        ("idle CPU (listening to silence)", f"{100 * run['idle']:.1f} % of one core"),
        ("RSS peak / at the end", f"{run['memory'][0] / 1024:.0f} MB / {run['memory'][1] / 1024:.0f} MB"),
    ]
    mine = figures(ours)
    theirs = figures(base) if base else {}
    rows = [(k, v, "", "") for k, v in shared]
    for key, (text, value) in mine.items():
        other = theirs.get(key)
        rows.append((key, text, other[0] if other else "", ratio(value, other[1]) if other else ""))
    head = ("measure", "captiond", "naive baseline (decode at speech end)", "ratio")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    if args.verbose:
        for i, ((item, s, e), (ref, hyp), (_, off)) in enumerate(zip(spans, ours["pairs"], pairs_offline)):
            naive_text = f"\nNAI {base['pairs'][i][1]}" if base else ""
            print(f"\n{item['file']} at {s:.1f}-{e:.1f} s\nREF {ref}\nSTR {hyp}{naive_text}\nUTT {ref_utterances[0][item['file']]}"
                  f"\nOFF {off}")
        print("\nfinals (session time):")
        for f in ours["finals"]:
            print(f"  {f['start'] - ours['offset']:6.1f}-{f['end'] - ours['offset']:6.1f} latency {f['latency']:.2f} s "
                  f"{f['flags']} {f['text']}")


def soak(session: Path, seconds: float, overrides: list[str], tmp: Path) -> None:
    """Replay the session into one daemon for `seconds`; print RSS and latency per replay."""
    with VirtualMic() as mic:
        daemon = Daemon(tmp, "--source", "mic", "--set", "server.stats_interval_s=0",
                        *[a for o in overrides for a in ("--set", o)], env=mic.env)
        try:
            events = daemon.connect(timeout=120)
            pid = daemon.proc.pid
            print("| minute | replays | RSS now (MB) | RSS peak (MB) | final latency p50 (s) | finals |")
            print("|-------:|--------:|-------------:|--------------:|----------------------:|-------:|")
            t0, replays, seen = time.monotonic(), 0, 0
            first_rss = None
            while time.monotonic() - t0 < seconds:
                mic.play(session).wait()
                replays += 1
                time.sleep(2.0)
                finals = [e for e in events.of("final") if e["text"]]
                new, seen = finals[seen:], len(finals)
                peak, now = rss_kib(pid)
                first_rss = first_rss or now
                print(f"| {(time.monotonic() - t0) / 60:6.1f} | {replays:7d} | {now / 1024:12.0f} | {peak / 1024:13.0f} "
                      f"| {pct([f['latency'] for f in new], 50):21.2f} | {len(new):6d} |", flush=True)
            peak, now = rss_kib(pid)
            print(f"\nRSS growth over the soak: {100 * (now - first_rss) / first_rss:+.1f} % "
                  f"(after the first replay {first_rss / 1024:.0f} MB, at the end {now / 1024:.0f} MB, peak {peak / 1024:.0f} MB)")
            daemon.stop()
        finally:
            daemon.kill()


if __name__ == "__main__":
    main()
