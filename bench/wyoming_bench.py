"""Wyoming benchmark: captiond's Wyoming server beside wyoming-faster-whisper, same clips, same model folder.

Each client does what Home Assistant does for a voice command: transcribe, audio-start, the clip in
1024-sample chunks paced in real time (0.3 s of silence before it, 0.7 s after it: Home Assistant's
VAD sends audio-stop after 0.7 s of silence by default), audio-stop, then waits for the transcript.
Measured per server, with 1 and with 4 clients at once (the clips shared out between them):
audio-stop -> transcript p50/p95, WER against the corpus references, and the server's CPU seconds per
second of audio sent. The servers take turns; the idle one uses no CPU.

    .venv/bin/python bench/wyoming_bench.py [--clips N] [--wfw-venv /tmp/captiond-wfw] [--set section.key=value ...] [--texts FILE]
                                            [--wyoming-bench]

wyoming-faster-whisper is installed from PyPI into --wfw-venv (once, with pip) and started by the
bench on the bundled tiny.en folder, with captiond's decode settings (int8, beam 5, 2 threads, en).
`--wyoming-bench` then runs PyPI's wyoming-bench (installed into the same venv) against both servers on
the same clips: a second, independent client and scorer.
The numbers are from one run on one machine, which may have been busy with other work: run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from wyoming.asr import Transcribe, Transcript  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402

from conftest import CORPUS, manifest, read_wav, silence, trimmed, write_wav  # noqa: E402
from session import cpu_seconds, pct  # noqa: E402
from wer import corpus_wer  # noqa: E402

from captiond.config import load  # noqa: E402
from captiond.models import resolve_model  # noqa: E402

CHUNK = 1024  # samples per audio-chunk, as wyoming-bench and satellites send
LEAD_S, TAIL_S = 0.3, 0.7
READ_S = 120.0


@dataclass(frozen=True)
class Clip:
    """One voice command: its audio (16 kHz mono int16) and reference text."""

    name: str
    pcm: np.ndarray
    text: str


@dataclass(frozen=True)
class Result:
    """One transcription as a client saw it."""

    clip: Clip
    text: str
    stop_to_transcript: float


def clips(count: int) -> list[Clip]:
    """The first `count` corpus clips of voice-command length (1-12 s) with a reference, trimmed."""
    chosen = [m for m in manifest() if m.get("wer_ok") and 1.0 <= m["duration"] <= 12.0][:count]
    return [Clip(m["file"], np.concatenate([silence(LEAD_S), trimmed(read_wav(CORPUS / m["file"])), silence(TAIL_S)]),
                 m["text"]) for m in chosen]


async def transcribe(port: int, clip: Clip) -> Result:
    """One Home Assistant-style transcription, paced in real time."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        began = time.monotonic()
        for n, i in enumerate(range(0, len(clip.pcm), CHUNK)):
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1,
                                                audio=clip.pcm[i:i + CHUNK].astype("<i2").tobytes()).event())
            await asyncio.sleep(max(0.0, began + (n + 1) * CHUNK / 16000 - time.monotonic()))
        await client.write_event(AudioStop().event())
        stopped = time.monotonic()
        while True:
            event = await asyncio.wait_for(client.read_event(), READ_S)
            if event is None:
                raise RuntimeError(f"{clip.name}: the server closed the connection before the transcript")
            if event.type == "error":
                raise RuntimeError(f"{clip.name}: error event {event.data}")
            if Transcript.is_type(event.type):
                return Result(clip, Transcript.from_event(event).text, time.monotonic() - stopped)


async def run_clients(port: int, work: list[Clip], clients: int) -> list[Result]:
    """`clients` clients at once, each doing its share of the clips one after another."""
    async def client(share: list[Clip]) -> list[Result]:
        return [await transcribe(port, c) for c in share]
    shares = await asyncio.gather(*(client(work[k::clients]) for k in range(clients)))
    return [r for share in shares for r in share]


async def wait_ready(port: int, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    """Until the server answers describe."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it served")
        try:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                if (await asyncio.wait_for(client.read_event(), 10)) is not None:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer describe within {timeout:.0f} s")
        await asyncio.sleep(0.2)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_python(venv: Path, package: str, module: str) -> Path:
    """The bench venv's python, with `package` (importable as `module`) installed from PyPI on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-I", "-c", f"import {module}"], capture_output=True).returncode:  # -I: not bench/'s
        subprocess.run([str(python), "-m", "pip", "install", "-q", package], check=True)
    return python


def run_wyoming_bench(venv: Path, work: list[Clip], tmp: Path, ports: dict[str, int]) -> None:
    """PyPI's wyoming-bench against both servers on the same clips (its own pacing and scoring):
    non-streaming (the clip sent at once) and streaming (1024-sample chunks in real time)."""
    corpus = tmp / "wyoming-bench-corpus"
    corpus.mkdir()
    for clip in work:
        write_wav(corpus / clip.name, clip.pcm)
        (corpus / clip.name).with_suffix(".txt").write_text(clip.text)
    tool = bench_python(venv, "wyoming-bench", "wyoming_bench").parent / "wyoming-bench"
    done = subprocess.run([str(tool), "stt", "--corpus", str(corpus), "--mode", "both", "--rounds", "1", "--warmup", "1",
                           "--chunk-delay", f"{CHUNK / 16000:.3f}", *(f"127.0.0.1:{port}" for port in ports.values())])
    if done.returncode:
        print(f"wyoming-bench exited with {done.returncode}; the table below is this bench's own", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=16, help="corpus clips to send (default 16)")
    parser.add_argument("--clients", default="1,4", help="concurrent clients per round, comma-separated")
    parser.add_argument("--wfw-venv", type=Path, default=Path(tempfile.gettempdir()) / "captiond-wfw",
                        help="venv for wyoming-faster-whisper (made and filled with pip when missing)")
    parser.add_argument("--set", action="append", default=[], metavar="section.key=value",
                        help="captiond config override, e.g. asr.beam_size=1")
    parser.add_argument("--texts", type=Path, help="also write each transcript, a JSON line per clip, to this file")
    parser.add_argument("--wyoming-bench", action="store_true",
                        help="then run PyPI's wyoming-bench (installed into --wfw-venv) against both servers")
    args = parser.parse_args()
    config = load(None, args.set)[0]
    texts_out = args.texts.open("w", buffering=1) if args.texts else None  # a bad path fails now, not minutes in
    model = resolve_model(config.asr.model).load_target()
    work = clips(args.clips)
    audio_s = sum(len(c.pcm) for c in work) / 16000
    tmp = Path(tempfile.mkdtemp(prefix="captiond-bench-wyoming-"))
    cap_port, wfw_port = free_port(), free_port()
    servers = {
        "captiond": [sys.executable, "-m", "captiond", "run", "--source", "-", "--set", "log.enabled=false",
                     "--set", f"server.socket={tmp / 'captiond.sock'}", "--set", "wyoming.enabled=true",
                     "--set", f"wyoming.uri=tcp://127.0.0.1:{cap_port}", "--set", "wyoming.max_sessions=4",
                     *(x for s in args.set for x in ("--set", s))],
        "wyoming-faster-whisper": [str(bench_python(args.wfw_venv, "wyoming-faster-whisper", "wyoming_faster_whisper")), "-m", "wyoming_faster_whisper",
                                   "--uri", f"tcp://127.0.0.1:{wfw_port}", "--model", model,
                                   "--data-dir", str(tmp / "wfw"), "--local-files-only", "--language", "en",
                                   "--beam-size", str(config.asr.beam_size), "--compute-type", config.asr.compute_type,
                                   "--cpu-threads", str(config.asr.cpu_threads or 4)],
    }
    ports = {"captiond": cap_port, "wyoming-faster-whisper": wfw_port}
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stderr=open(tmp / f"{name}.log", "wb"))
             for name, cmd in servers.items()}
    rows = []
    try:
        for name, proc in procs.items():
            asyncio.run(wait_ready(ports[name], proc, name))
        for clients in (int(c) for c in args.clients.split(",")):
            for name, proc in procs.items():
                asyncio.run(transcribe(ports[name], work[0]))  # warm-up, untimed
                cpu = cpu_seconds(proc.pid)
                results = asyncio.run(run_clients(ports[name], work, clients))
                cpu = cpu_seconds(proc.pid) - cpu
                if texts_out:
                    texts_out.writelines(json.dumps({"server": name, "clients": clients, "set": args.set,
                                                     "clip": r.clip.name, "reference": r.clip.text, "text": r.text})
                                         + "\n" for r in results)
                waits = [r.stop_to_transcript for r in results]
                rows.append((name, clients, pct(waits, 50), pct(waits, 95),
                             corpus_wer([(r.clip.text, r.text) for r in results]), cpu / audio_s))
                print(f"{name:24} {clients} client(s): stop->transcript p50 {rows[-1][2]:.3f} s, "
                      f"p95 {rows[-1][3]:.3f} s, WER {rows[-1][4]:.3f}", file=sys.stderr)
        if args.wyoming_bench:
            run_wyoming_bench(args.wfw_venv, work, tmp, ports)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\n{len(work)} clips, {audio_s:.1f} s of audio per round, paced in real time; model {model} "
          f"(beam {config.asr.beam_size}, {config.asr.compute_type}); {platform.machine()}, {os.cpu_count()} CPUs "
          "(shared: other work may have run too)\n")
    print("| server | clients | audio-stop -> transcript p50 | p95 | WER | CPU s / audio s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, clients, p50, p95, wer, cpu in rows:
        print(f"| {name} | {clients} | {p50:.3f} s | {p95:.3f} s | {wer:.3f} | {cpu:.3f} |")
    for clients in sorted({r[1] for r in rows}):
        by = {r[0]: r for r in rows if r[1] == clients}
        if len(by) == 2 and by["captiond"][2] > 0:
            print(f"\n{clients} client(s): captiond's p50 is {by['wyoming-faster-whisper'][2] / by['captiond'][2]:.1f}x "
                  "faster than wyoming-faster-whisper's", end="")
    print()


if __name__ == "__main__":
    main()
