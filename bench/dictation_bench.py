"""Dictation latency: from the end of speech (or from `captiond ptt stop`) to the text in a window.

Plays dev corpus clips in real time into the PulseAudio virtual microphone of a `captiond run`
(the real model), with `captiond type --with xdotool` typing into a Tk text field that has the focus
in a virtual X server (Xvfb), and times each final's arrival in the field from the field's own log of
its changes (time.monotonic(), the same clock here).

    .venv/bin/python bench/dictation_bench.py [--clips N] [--mode vad|ptt|both] [--set section.key=value ...]
    .venv/bin/python bench/dictation_bench.py --silence-minutes 10    # then 10 minutes of no speech

vad: each clip is followed by 2.5 s of silence; the end of speech is the end of the clip's last loud
frame, placed by paplay's exit (it returns once the sink has played everything), so the microphone's
own transport delay counts against us. ptt: `captiond ptt start`, the clip (nothing after it), and
`captiond ptt stop` spawned the moment playback ends; the time counts from that spawn (the CLI's own
start-up included, as a key binding pays it). The text is in the field when its last change for that
clip has happened. --silence-minutes plays that long of the e2e test's non-speech (faint noise, mains
hum, buzz, clicks, breaths, noise bursts) and counts what was typed: it must be nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import CORPUS, Daemon, manifest, read_wav, silence, trimmed, write_wav  # noqa: E402
from vmic import VirtualMic  # noqa: E402
from wer import corpus_wer  # noqa: E402
from xsession import TextField, XServer  # noqa: E402

from captiond.dictation import NOT_TYPED, Composer, vocabulary_casing  # noqa: E402
from captiond.events import decode  # noqa: E402

TAIL_S = 2.5  # silence after a clip in vad mode: the hangover and the decode fit in it
SETTLE_S = 1.0  # a field unchanged this long after the final has all of it
LEAD = silence(0.4)


def clips(n: int) -> list[dict]:
    """Short clear dev clips (1.5 to 8 s, WER-usable), shortest last so every length is sampled."""
    usable = [c for c in manifest() if c.get("wer_ok") and 1.5 <= c["duration"] <= 8 and len(c["text"].split()) >= 3]
    step = max(1, len(usable) // n)
    return usable[::step][:n]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank), nan for none."""
    return float(np.percentile(values, q, method="nearest")) if values else float("nan")


class Rig:
    """The virtual microphone, the X server, a focused field, the daemon and `captiond type`."""

    def __init__(self, tmp: Path, overrides: list[str]) -> None:
        self.tmp = tmp
        self._parts: list = []  # what to stop, newest first
        try:
            self.mic = self._started(VirtualMic().start())
            self.x = self._started(XServer().start())
            self.field = self._started(self.x.field(tmp / "field.txt"))
            args = [a for o in overrides for a in ("--set", o)]
            self.daemon = self._started(Daemon(tmp, "--source", "mic", *args, env=self.mic.env))
            self.events = self.daemon.connect(timeout=120, subscribe={
                "cmd": "subscribe", "types": ["status", "final", "speech_start"]})
            err = tmp / "type.stderr"
            self.typer = self._started(subprocess.Popen(
                [sys.executable, "-m", "captiond", "type", "--with", "xdotool", *args,
                 "--set", f"server.socket={self.daemon.socket}"], env=self.x.env, cwd=ROOT, stderr=open(err, "wb")))
            while "[connected:" not in err.read_text():
                if self.typer.poll() is not None:
                    raise RuntimeError(err.read_text())
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        self.clock = time.time() - time.monotonic()  # final.ts is wall-clock

    def _started(self, part):
        self._parts.insert(0, part)
        return part

    def ptt(self, action: str) -> None:
        """`captiond ptt ACTION`, waited for."""
        subprocess.run([sys.executable, "-m", "captiond", "ptt", action, "--set", f"server.socket={self.daemon.socket}"],
                       check=True, capture_output=True, cwd=ROOT, timeout=60)

    def settled(self, since: float) -> float | None:
        """Wait until the field has not changed for SETTLE_S; the time of its last change after `since`."""
        while True:
            changes = self.field.changes()
            last = changes[-1][0]
            if time.monotonic() - max(last, since) >= SETTLE_S:
                after = [t for t, _ in changes if t > since]
                return after[-1] if after else None
            time.sleep(0.05)

    def close(self) -> None:
        """Stop everything that was started, whatever happens to each."""
        for part in self._parts:
            try:
                if isinstance(part, subprocess.Popen):
                    part.terminate()
                    part.wait(10)
                elif isinstance(part, Daemon):
                    part.stop()
                else:
                    (part.close if isinstance(part, TextField) else part.stop)()
            except Exception as exc:  # noqa: BLE001 - the others must still be stopped
                print(f"could not stop {part!r}: {exc}", file=sys.stderr)
                if isinstance(part, Daemon):
                    part.kill()


def run_clip(rig: Rig, item: dict, mode: str) -> dict:
    """Say one clip; the latency from the end of speech (vad) or the ptt stop (ptt) to the text in the field."""
    speech = trimmed(read_wav(CORPUS / item["file"]))
    tail = silence(TAIL_S) if mode == "vad" else silence(0)
    wav = write_wav(rig.tmp / "clip.wav", np.concatenate([LEAD, speech, tail]))
    finals_before, starts_before = len(rig.events.of("final")), len(rig.events.of("speech_start"))
    if mode == "ptt":
        rig.ptt("start")
    player = rig.mic.play(wav)
    player.wait(120)
    played = time.monotonic()
    command_s = None
    if mode == "ptt":
        start = played
        rig.ptt("stop")
        command_s = time.monotonic() - start
    else:  # trimmed() keeps 0.1 s after the last loud frame
        start = played - TAIL_S - 0.1
    started = rig.events.of("speech_start")[starts_before:]
    if started:  # every utterance begun gets its final, then the field settles
        rig.events.wait_for(lambda e: e["type"] == "final" and e["utt"] == started[-1]["utt"], timeout=120)
    last = rig.settled(start)
    finals = rig.events.of("final")[finals_before:]
    arrived = [f["ts"] - rig.clock - start for f in finals]
    return {"clip": item["file"], "ref": item["text"], "finals": finals,
            "latency": None if last is None else last - start,
            "final_at": max(arrived) if arrived else None, "command_s": command_s,
            "end_of_stream": any("end_of_stream" in f["flags"] for f in finals)}


def silence_run(rig: Rig, minutes: float) -> dict:
    """Play `minutes` of non-speech; what reached the field and the socket meanwhile."""
    from test_e2e import _non_speech

    parts, seed = [], 0
    while sum(len(p) for p in parts) < minutes * 60 * 16000:
        parts.append(_non_speech(seed))
        seed += 1
    pcm = np.concatenate(parts)[: int(minutes * 60 * 16000)]
    wav = write_wav(rig.tmp / "silence.wav", pcm)
    before_text, before_finals = rig.field.text, len(rig.events.of("final"))
    rig.mic.play(wav).wait(minutes * 60 + 120)
    rig.settled(time.monotonic())
    finals = rig.events.of("final")[before_finals:]
    return {"minutes": minutes, "typed": len(rig.field.text) - len(before_text), "finals": len(finals),
            "with_text": sum(bool(f["text"]) for f in finals),
            "flagged": sum(bool(f["text"]) and bool(set(f["flags"]) & set(NOT_TYPED)) for f in finals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=12, help="clips per mode (default 12)")
    parser.add_argument("--mode", choices=("vad", "ptt", "both"), default="both")
    parser.add_argument("--silence-minutes", type=float, default=0.0, metavar="M",
                        help="afterwards, M minutes of non-speech: nothing may be typed (default: skip)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a daemon/dictation config override (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="print every clip")
    args = parser.parse_args()
    modes = ("vad", "ptt") if args.mode == "both" else (args.mode,)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="captiond-dictation-") as tmp:
        rig = Rig(Path(tmp), args.set)
        try:
            for mode in modes:
                for item in clips(args.clips):
                    r = run_clip(rig, item, mode)
                    results[mode].append(r)
                    if args.verbose:
                        print(f"{mode} {r['clip']:32} latency {r['latency'] if r['latency'] is None else round(r['latency'], 3)}"
                              f"  final at {r['final_at'] if r['final_at'] is None else round(r['final_at'], 3)}"
                              f"  {[f['text'] for f in r['finals']]}", flush=True)
                rig.ptt("start")
            quiet = silence_run(rig, args.silence_minutes) if args.silence_minutes else None
            field = rig.field.text
            finals = rig.events.of("final")
        finally:
            rig.close()
    composer, expected = Composer(keeps_capital=vocabulary_casing()), ""  # as `captiond type` does
    for f in finals:
        keys = composer.take(decode(json.dumps(f)).event)
        if keys is not None:
            expected = expected[: len(expected) - keys.erase] + keys.text

    print(f"\ndictation bench: {platform.machine()}, {os.cpu_count()} cores, `captiond type --with xdotool` into a Tk "
          f"field under Xvfb; overrides: {' '.join(args.set) or 'none'}")
    print("\n| from | clips | typed | p50 (s) | p95 (s) | max (s) | of which: the final's arrival, p50 (s) | "
          "the `ptt stop` command's run, p50 (s) | finalised by ptt stop | WER of the field |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        lat = [r["latency"] for r in rows if r["latency"] is not None]
        arrive = [r["final_at"] for r in rows if r["final_at"] is not None]
        wer = corpus_wer([(r["ref"], " ".join(f["text"] for f in r["finals"] if not set(f["flags"]) & set(NOT_TYPED)))
                          for r in rows])
        origin = "end of speech" if mode == "vad" else "`captiond ptt stop`"
        eos = f"{sum(r['end_of_stream'] for r in rows)}/{len(rows)}" if mode == "ptt" else "—"
        command = f"{pct([r['command_s'] for r in rows], 50):.2f}" if mode == "ptt" else "—"
        print(f"| {origin} | {len(rows)} | {len(lat)} | {pct(lat, 50):.2f} | {pct(lat, 95):.2f} | "
              f"{max(lat) if lat else float('nan'):.2f} | {pct(arrive, 50):.2f} | {command} | {eos} | {wer:.3f} |")
    print(f"\nthe field holds exactly what the finals compose to: {'yes' if field == expected else 'NO'} "
          f"({len(field)} characters)")
    if quiet:
        print(f"\n{quiet['minutes']:g} min of non-speech: {quiet['typed']} characters typed; {quiet['finals']} finals "
              f"({quiet['with_text']} with text, {quiet['flagged']} of those flagged and not typed)")


if __name__ == "__main__":
    main()
