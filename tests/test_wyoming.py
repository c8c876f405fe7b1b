"""The Wyoming server through the wyoming package's own client, driven the way Home Assistant's Wyoming
integration drives a speech-to-text service: against the real daemon and model for transcripts, and
against a Service with the fake decoder for the protocol's errors, limits and audio conversion."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
from typing import Awaitable, Callable

import numpy as np
import pytest
import soxr
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error as WyError
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping

from captiond.config import ConfigError, load
from conftest import CORPUS, SPEECH, Daemon, FakeDecoder, Harness, HeldDecoder, HeldLoad, clip, read_wav, silence

RATE, WIDTH, CHANNELS = 16000, 2, 1  # what Home Assistant sends
READ_S = 60.0  # the longest wait for one event: a busy machine decodes slowly, a broken server never answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spoken(name: str) -> np.ndarray:
    """A corpus clip with silence before it and enough after it for the gate to end the utterance."""
    return np.concatenate([silence(0.5), read_wav(CORPUS / name), silence(1.5)])


def key_words(name: str) -> set[str]:
    """The reference's longer words, which tiny.en gets right on these clips."""
    return {w.strip(".,!?;:\"'").lower() for w in clip(name)["text"].split() if len(w.strip(".,!?;:\"'")) >= 5}


def words(text: str) -> set[str]:
    return {w.strip(".,!?;:\"'").lower() for w in text.split()}


def to_bytes(pcm: np.ndarray, width: int = WIDTH, channels: int = CHANNELS) -> bytes:
    """int16 mono samples as little-endian PCM of `width` bytes, the same signal on every channel."""
    frames = np.repeat(pcm.astype(np.int32)[:, None], channels, axis=1)
    if width == 2:
        return frames.astype("<i2").tobytes()
    if width == 4:
        return (frames << 16).astype("<i4").tobytes()
    raise ValueError(width)


async def read_until(client: AsyncTcpClient, kind: str) -> list[Event]:
    """Every event up to and including the first of type `kind`."""
    got = []
    while True:
        event = await asyncio.wait_for(client.read_event(), READ_S)
        assert event is not None, f"connection closed before {kind}; got {[e.type for e in got]}"
        got.append(event)
        if event.type == kind:
            return got


async def session(port: int, pcm: np.ndarray, *, rate: int = RATE, width: int = WIDTH, channels: int = CHANNELS,
                  pace: float = 0.0, transcribe: Transcribe | None = None,
                  before_stop: Callable[[list[Event]], Awaitable[None]] | None = None) -> list[Event]:
    """One transcription as Home Assistant makes it: transcribe, audio-start, 100 ms chunks (sent every
    `pace` s), audio-stop; events are read all along, as HA reads them, until transcript-stop."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        events: list[Event] = []

        async def receive() -> None:
            while True:
                event = await asyncio.wait_for(client.read_event(), READ_S)
                assert event is not None, f"connection closed; got {[e.type for e in events]}"
                events.append(event)
                if event.type in ("transcript-stop", "error"):
                    return

        reader = asyncio.create_task(receive(), name="test-wyoming-reader")
        await client.write_event((transcribe or Transcribe(language="en")).event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        step = rate // 10
        for i in range(0, len(pcm), step):
            audio = to_bytes(pcm[i:i + step], width, channels)
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
            if pace:
                await asyncio.sleep(pace)
        if before_stop is not None:
            await before_stop(events)
        await client.write_event(AudioStop().event())
        await reader
        return events


def transcript_of(events: list[Event]) -> tuple[str, list[str]]:
    """The final transcript's text and the chunk texts, after checking the event order."""
    types = [e.type for e in events]
    assert "error" not in types, [e.data for e in events if e.type == "error"]
    assert types.count("transcript") == 1 and types[-2:] == ["transcript", "transcript-stop"], types
    chunks = [TranscriptChunk.from_event(e).text for e in events if e.type == "transcript-chunk"]
    if chunks:
        assert types.index("transcript-start") < types.index("transcript-chunk")
    return Transcript.from_event(events[-2]).text, chunks


async def until(pred: Callable[[], bool], timeout: float = READ_S) -> None:
    async def poll() -> None:
        while not pred():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)


# --- against the real daemon and model ------------------------------------------------------

@pytest.fixture
def daemon(tmp_path):
    """A real daemon (silent stdin as its microphone) with the Wyoming server on a free port."""
    made = []

    def start(*overrides: str) -> int:
        port = free_port()
        args = ["--source", "-", "--set", "wyoming.enabled=true", "--set", f"wyoming.uri=tcp://127.0.0.1:{port}"]
        for override in overrides:
            args += ["--set", override]
        d = Daemon(tmp_path, *args, stdin=subprocess.PIPE)
        made.append(d)
        d.proc.stdin.write(silence(0.3).tobytes())  # "listening" means audio is flowing
        d.proc.stdin.flush()
        d.connect().close()
        return port

    yield start
    for d in made:
        try:
            assert d.proc.poll() is None, f"the daemon died:\n{d.stderr}"
            d.proc.stdin.close()  # the end of its input: the daemon stops by itself
            assert d.proc.wait(30) == 0, d.stderr
        finally:
            d.kill()


@pytest.mark.slow
def test_home_assistant_session_streams_settled_chunks_that_join_into_the_transcript(daemon):
    port = daemon()

    async def describe() -> Info:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            return Info.from_event((await read_until(client, "info"))[-1])

    asr = asyncio.run(describe()).asr[0]
    assert asr.supports_transcript_streaming and asr.installed
    assert asr.models[0].languages == ["en"] and "tiny.en" in asr.models[0].name

    async def chunk_before_stop(events: list[Event]) -> None:
        # The utterance ended in the trailing silence: its text is streamed while the audio is still open.
        await until(lambda: any(e.type == "transcript-chunk" for e in events))

    name = "jfk_inaugural.wav"
    events = asyncio.run(session(port, spoken(name), pace=0.1, before_stop=chunk_before_stop))
    text, chunks = transcript_of(events)
    assert "".join(chunks) == text
    assert key_words(name) <= words(text), text


@pytest.mark.slow
def test_two_sessions_at_once_each_get_their_own_transcript(daemon):
    port = daemon()
    names = ["ps_forever.wav", "mfa_thoughts.wav"]

    async def both() -> list[list[Event]]:
        return await asyncio.gather(*(session(port, spoken(n), pace=0.1) for n in names))

    for name, events in zip(names, asyncio.run(both())):
        text, chunks = transcript_of(events)
        assert "".join(chunks) == text
        assert key_words(name) <= words(text), (name, text)
        other = next(n for n in names if n != name)
        assert not key_words(other) & words(text), (name, text)


@pytest.mark.slow
def test_a_client_that_vanishes_mid_stream_frees_its_session(daemon):
    port = daemon("wyoming.max_sessions=1")
    pcm = spoken("mfa_thoughts.wav")

    async def vanish() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await async_write_event(Transcribe(language="en").event(), writer)
        await async_write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event(), writer)
        for i in range(0, len(pcm) // 2, RATE // 10):
            await async_write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                               audio=to_bytes(pcm[i:i + RATE // 10])).event(), writer)
            await asyncio.sleep(0.05)
        writer.transport.abort()  # gone without audio-stop or a FIN: a satellite losing power

    asyncio.run(vanish())
    # The only session slot is free again and the model still answers.
    text, chunks = transcript_of(asyncio.run(session(port, spoken("ps_forever.wav"), pace=0.05)))
    assert "".join(chunks) == text and key_words("ps_forever.wav") <= words(text)


# --- against a Service with the fake decoder (protocol, limits, conversion) -------------------

@pytest.fixture
def harness(tmp_path):
    """A service with the Wyoming server on a free port; the fake decoder says how much audio it heard."""
    made = []

    def make(*overrides: str, delay: float = 0.0, decoder: FakeDecoder | None = None) -> Harness:
        port = free_port()
        config = load(None, ["server.stats_interval_s=0", "wyoming.enabled=true",
                             f"wyoming.uri=tcp://127.0.0.1:{port}", *overrides])[0]
        h = Harness(tmp_path, tmp_path / "t.log", config, decode_delay=delay, decoder=decoder)
        h.port = port

        async def bound() -> None:
            while True:
                try:
                    client = AsyncTcpClient("127.0.0.1", port)
                    await client.connect()
                    await client.disconnect()
                    return
                except OSError:
                    await asyncio.sleep(0.05)
        asyncio.run(asyncio.wait_for(bound(), 30))
        made.append(h)
        return h

    yield make
    for h in made:
        h.end()


def heard_seconds(text: str) -> float:
    """The fake decoder's final says `heard S.SS` for S.SS seconds of audio."""
    assert text.startswith("heard "), text
    return float(text.split()[-1])


def test_fake_session_streams_a_chunk_before_audio_stop_and_they_join(harness):
    h = harness()
    pcm = np.concatenate([SPEECH, silence(1.0)])

    async def chunk_before_stop(events: list[Event]) -> None:
        await until(lambda: any(e.type == "transcript-chunk" for e in events))

    text, chunks = transcript_of(asyncio.run(session(h.port, pcm, before_stop=chunk_before_stop)))
    assert "".join(chunks) == text and heard_seconds(text) > 2.0


def test_wyoming_sessions_bind_their_finals_to_the_chunks_whatever_asr_bind_finals_says(harness):
    # A chunk sent can never be taken back, so a Wyoming final must begin with the stable words it carried;
    # the microphone's finals, unbound by default, may revise them.
    h = harness()
    session = h.service.wyoming.new_session(lambda event: None, sample_rate=16000)
    assert session.worker.binds and not h.service.worker.binds


def test_44100_hz_stereo_and_32_bit_input_is_heard_like_16_khz_mono(harness):
    h = harness()
    reference = heard_seconds(transcript_of(asyncio.run(session(h.port, SPEECH)))[0])
    stereo = soxr.resample(SPEECH, RATE, 44100).astype(np.int16)
    text, chunks = transcript_of(asyncio.run(session(h.port, stereo, rate=44100, width=4, channels=2)))
    assert "".join(chunks) == text
    # The same speech, so the gate cuts the same utterance (to within a few 30 ms frames, and a final
    # decoded at the pause ends 4 frames before one decoded at the end: which one it is depends on how
    # busy the machine is); a wrong rate or channel count would stretch it 2-3 times.
    assert abs(heard_seconds(text) - reference) <= 0.25, (text, reference)


def test_a_sessions_log_lines_name_its_client_and_a_hostile_name_cannot_forge_or_lose_them(harness, caplog):
    from captiond.lognames import Named

    h = harness()
    with caplog.at_level("DEBUG", logger="captiond"):
        text, _ = transcript_of(asyncio.run(session(h.port, SPEECH)))
    assert heard_seconds(text) > 2.0
    decodes = [r.getMessage() for r in caplog.records if r.name == "captiond.worker" and "decode of" in r.getMessage()]
    assert decodes and all(m.startswith("wyoming session from ('127.0.0.1', ") for m in decodes), decodes
    server = [r.getMessage() for r in caplog.records if r.name == "captiond.wyoming_server"]
    assert any(m.startswith("wyoming connection from ('127.0.0.1', ") and ": transcription: 16000 Hz" in m
               for m in server), server
    # An event type is the client's to choose too: shown escaped.
    caplog.clear()

    async def hostile_type() -> None:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            await client.write_event(Event(type="evil\nINFO forged"))
            await client.write_event(Ping(text="sync").event())
            await read_until(client, "pong")

    with caplog.at_level("DEBUG", logger="captiond"):
        asyncio.run(hostile_type())
    assert any(r.getMessage().endswith("ignoring a 'evil\\nINFO forged' event") for r in caplog.records)
    assert not any("\n" in r.getMessage() for r in caplog.records)
    # A Wyoming client on a Unix socket names itself by the path it binds: a newline, a % and all.
    caplog.clear()
    with caplog.at_level("DEBUG", logger="captiond"):
        Named(logging.getLogger("captiond.worker"), "/tmp/x\nINFO forged %s %d").debug("utterance %d: %s", 3, "heard")
    assert [r.getMessage() for r in caplog.records] == ["/tmp/x\\nINFO forged %s %d: utterance 3: heard"]


def test_transcribe_context_prompt_and_names_reach_the_decoder(harness):
    h = harness()
    ask = Transcribe(language="en", context={"prompt": "Kitchen lights, Zoë's room."}, transcript_names=["Zoë"],
                     transcript_terms=["dimmer"])
    transcript_of(asyncio.run(session(h.port, SPEECH, transcribe=ask)))
    assert any(prompt and "Zoë's room" in prompt for *_, prompt in h.decoder.calls)
    assert "Zoë dimmer" in h.decoder.hotwords_seen
    transcript_of(asyncio.run(session(h.port, SPEECH)))  # the next transcription starts without them
    assert h.decoder.hotwords_seen[-1] is None and not h.decoder.calls[-1][3]


def test_wrong_audio_format_is_an_error_event_and_the_connection_stays(harness):
    h = harness()

    async def run() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            await client.write_event(AudioStart(rate=16000, width=5, channels=1).event())
            first = (await read_until(client, "error"))[-1]
            await client.write_event(AudioStop().event())
            # A chunk that does not match its audio-start (half a stereo frame)
            await client.write_event(AudioStart(rate=RATE, width=2, channels=2).event())
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=2, audio=b"\x00" * 6).event())
            second = (await read_until(client, "error"))[-1]
            await client.write_event(AudioStop().event())
            await client.write_event(Describe().event())
            info = (await read_until(client, "info"))[-1]
            return [first, second, info]

    first, second, info = asyncio.run(run())
    assert WyError.from_event(first).code == "bad_audio" and "width 5" in WyError.from_event(first).text
    assert WyError.from_event(second).code == "bad_audio"
    assert Info.from_event(info).asr


def test_describe_while_the_model_loads_is_answered_once_it_is_loaded(harness):
    # While Whisper base loaded, describe said English only (Home Assistant reads it at its setup,
    # e.g. when both start after a reboot) and a French transcribe was refused as not served.
    decoder = HeldLoad(multilingual=True)
    h = harness("asr.language=auto", decoder=decoder)

    async def run() -> Info:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            await client.write_event(Describe().event())
            await asyncio.sleep(0.5)  # the answer, were it given now, would say what is known before the load
            decoder.release.set()
            return Info.from_event((await read_until(client, "info"))[-1])

    languages = asyncio.run(run()).asr[0].models[0].languages
    assert len(languages) > 50 and "fr" in languages


def test_malformed_fields_are_bad_request_errors_and_the_connection_stays(harness):
    h = harness()

    async def run() -> list[WyError]:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            errors = []
            for event in (Event("audio-start", {"rate": RATE, "width": "x", "channels": 10 ** 9}),
                          Event("audio-start", {"width": 2, "channels": 1}),
                          Event("audio-start", {"rate": 16000.5, "width": 2.0, "channels": 1}),
                          Event("transcribe", {"language": ["en"]}),
                          Event("transcribe", {"context": "a prompt"}),
                          Event("transcribe", {"transcript_names": "Zoë"})):
                await client.write_event(event)
                errors.append(WyError.from_event((await read_until(client, "error"))[-1]))
            await client.write_event(Describe().event())
            await read_until(client, "info")
            return errors

    errors = asyncio.run(run())
    assert [e.code for e in errors] == ["bad_request"] * 6
    assert "width 'x'" in errors[0].text and "'rate'" in errors[1].text and "rate 16000.5" in errors[2].text
    assert "language" in errors[3].text and "context" in errors[4].text and "transcript_names" in errors[5].text
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH)))  # nothing of it stayed behind
    assert heard_seconds(text) > 2.0


@pytest.mark.parametrize("header", [
    b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": 4000000000}',
    b'{"type": "describe", "data_length": 100000000}',
    b'{"type": "describe", "payload_length": "many"}',
    b"[" * 60000,
    b"not json",
    b"x" * 70000,
])
def test_a_header_that_is_no_event_or_announces_too_much_ends_the_connection_with_an_error(harness, header):
    h = harness()

    async def run() -> tuple[WyError, Event | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port, limit=1 << 20)
        writer.write(header + b"\n")
        await writer.drain()
        client = AsyncTcpClient("127.0.0.1", h.port)
        client._reader, client._writer = reader, writer  # read what came back with the package's reader
        error = WyError.from_event((await read_until(client, "error"))[-1])
        after = await asyncio.wait_for(client.read_event(), READ_S)
        writer.close()
        return error, after

    error, after = asyncio.run(run())
    assert error.code == "bad_event" and after is None  # the framing is lost: closed, nothing read into memory
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH)))
    assert heard_seconds(text) > 2.0


def test_a_client_sending_a_chunk_too_big_reads_the_error_not_a_reset(harness):
    # A script sending a whole recording as one 2 MiB chunk: closing on its unread bytes would reset
    # the connection, and the client would lose the error that says why.
    h = harness()
    pcm = np.zeros(16000 * 64, dtype="<i2").tobytes()

    async def run() -> tuple[WyError, Event | None]:
        client = AsyncTcpClient("127.0.0.1", h.port)
        await client.connect()
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm).event())
        error = WyError.from_event((await read_until(client, "error"))[-1])
        after = await asyncio.wait_for(client.read_event(), READ_S)
        await client.disconnect()
        return error, after

    error, after = asyncio.run(run())
    assert error.code == "bad_event" and "payload_length" in error.text and after is None


def test_a_bad_event_mid_transcription_ends_it_before_the_close_without_a_traceback(harness, caplog):
    # The session must not write into the half-closed connection while the server drops the rest.
    h = harness(delay=0.3)
    pcm = spoken("ps_forever.wav").astype("<i2").tobytes()

    async def run() -> tuple[WyError, Event | None]:
        client = AsyncTcpClient("127.0.0.1", h.port)
        await client.connect()
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        for i in range(0, len(pcm), 3200):
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i:i + 3200]).event())
        client._writer.write(b"not json\n")
        error = WyError.from_event((await read_until(client, "error"))[-1])
        after = await asyncio.wait_for(client.read_event(), READ_S)
        await asyncio.sleep(1.0)  # still connected while the server drops what comes: the decodes finish meanwhile
        await client.disconnect()
        return error, after

    with caplog.at_level("ERROR"):
        error, after = asyncio.run(run())
        text, _ = transcript_of(asyncio.run(session(h.port, SPEECH)))  # and the slot is free again
    assert error.code == "bad_event" and after is None and heard_seconds(text) > 2.0
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_a_client_that_never_reads_is_dropped_and_frees_its_session(harness):
    h = harness("wyoming.max_sessions=1", "wyoming.idle_timeout_s=1")

    async def flood() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        await async_write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event(), writer)
        try:
            while True:  # asks and asks, reads nothing: the server's answers pile up in its socket
                for _ in range(1000):
                    await async_write_event(Describe().event(), writer)
                await asyncio.sleep(0.01)
        except ConnectionError:
            return  # dropped by the server

    asyncio.run(asyncio.wait_for(flood(), READ_S))
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH)))  # the only session slot is free again
    assert heard_seconds(text) > 2.0


def test_a_daemon_stop_tells_a_transcription_under_way_that_it_ends(harness):
    # Its client met the end of the stream: no transcript, no error.
    decoder = HeldDecoder()
    h = harness("asr.partials=false", decoder=decoder)

    async def run() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
            await client.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                                audio=to_bytes(SPEECH)).event())
            await client.write_event(AudioStop().event())
            while not any(t.session is not None and t.session.samples >= len(SPEECH)
                          for t in h.service.wyoming.sessions):
                await asyncio.sleep(0.01)  # the session has it all; its decode is held
            h.loop.call_soon_threadsafe(h.service.stop)
            got = []
            while (event := await asyncio.wait_for(client.read_event(), READ_S)) is not None:
                got.append(event)
            return got

    try:
        got = asyncio.run(run())
    finally:
        decoder.go.set()
    errors = [WyError.from_event(e) for e in got if WyError.is_type(e.type)]
    assert [e.code for e in errors] == ["stopping"] and "transcript" in errors[0].text
    assert not any(Transcript.is_type(e.type) for e in got)


def test_a_client_gone_after_audio_stop_is_not_decoded_for(harness):
    # Twenty utterances at once, audio-stop, and once the server has taken them all in the client goes:
    # the session is abandoned when a chunk cannot be written, where it used to decode all twenty for
    # no one (and hold its slot meanwhile).
    h = harness("asr.partials=false", decoder=HeldDecoder(delay=0.2))
    pcm = np.tile(SPEECH, 20)

    def taken() -> bool:
        return any(t.session is not None and t.session.samples >= len(pcm) for t in h.service.wyoming.sessions)

    async def send_and_vanish() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", h.port)
        await async_write_event(Transcribe(language="en").event(), writer)
        await async_write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event(), writer)
        for i in range(0, len(pcm), RATE):
            await async_write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                               audio=to_bytes(pcm[i:i + RATE])).event(), writer)
        await async_write_event(AudioStop().event(), writer)
        await until(taken)
        writer.close()  # the server's next writes meet a closed socket

    asyncio.run(send_and_vanish())
    h.decoder.go.set()
    asyncio.run(until(lambda: not h.service.wyoming.sessions))
    # The decode that was waiting (its chunk goes into the closed socket, which answers with a reset),
    # the next (its chunk cannot be written: the session is cancelled) and one begun meanwhile.
    assert len(h.decoder.calls) <= 3


def test_connections_beyond_max_connections_get_an_error_event_and_are_closed(harness):
    h = harness("wyoming.max_sessions=1", "wyoming.max_connections=2")

    async def run() -> tuple[WyError, Event | None]:
        async with AsyncTcpClient("127.0.0.1", h.port) as probe:  # served: every earlier connection was taken
            await probe.write_event(Describe().event())
            await read_until(probe, "info")
        await until(lambda: not h.service.wyoming.handlers)  # and has ended, the harness's probes included
        async with AsyncTcpClient("127.0.0.1", h.port), AsyncTcpClient("127.0.0.1", h.port) as second:
            await second.write_event(Describe().event())
            await read_until(second, "info")  # both are being served
            async with AsyncTcpClient("127.0.0.1", h.port) as third:
                error = WyError.from_event((await read_until(third, "error"))[-1])
                return error, await asyncio.wait_for(third.read_event(), READ_S)

    error, after = asyncio.run(run())
    assert error.code == "too_many_connections" and "wyoming.max_connections" in error.text and after is None
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH)))  # closed ones no longer count
    assert heard_seconds(text) > 2.0


def test_a_stream_past_max_audio_s_gets_its_transcript_and_frees_its_slot(harness):
    h = harness("wyoming.max_sessions=1", "wyoming.max_audio_s=2")

    async def run() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            await client.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
            for i in range(0, len(SPEECH), RATE // 10):  # 4.5 s, and then it would go on for ever
                await client.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                                    audio=to_bytes(SPEECH[i:i + RATE // 10])).event())
            got = await read_until(client, "transcript-stop")
            await client.write_event(AudioStop().event())  # ends the ignored rest of the stream
            await client.write_event(Describe().event())
            got += await read_until(client, "info")
            return got

    got = asyncio.run(run())
    types = [e.type for e in got]
    assert types.count("error") == 1 and WyError.from_event(got[types.index("error")]).code == "too_long"
    assert types.index("error") < types.index("transcript") and types[-1] == "info", types
    assert 0 < heard_seconds(Transcript.from_event(got[types.index("transcript")]).text) <= 2.5
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH[:RATE])))  # the slot is free; 1 s fits
    assert text == "" or text.startswith("heard")


def test_too_many_sessions_is_an_error_event_then_a_slot_frees(harness):
    h = harness("wyoming.max_sessions=1")

    async def run() -> tuple[list[Event], Event]:
        first = AsyncTcpClient("127.0.0.1", h.port)
        await first.connect()
        await first.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
        await first.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                           audio=to_bytes(SPEECH)).event())
        async with AsyncTcpClient("127.0.0.1", h.port) as second:
            await second.write_event(Transcribe(language="en").event())
            await second.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
            refused = (await read_until(second, "error"))[-1]
        await first.write_event(AudioStop().event())
        done = await read_until(first, "transcript-stop")
        await first.disconnect()
        return done, refused

    done, refused = asyncio.run(run())
    assert WyError.from_event(refused).code == "too_many_sessions"
    assert heard_seconds(transcript_of(done)[0]) > 2.0
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH)))  # the slot is free again
    assert heard_seconds(text) > 2.0


def test_voice_events_only_when_the_client_asks_for_vad(harness):
    h = harness()
    plain = asyncio.run(session(h.port, SPEECH))
    assert not {"voice-started", "voice-stopped"} & {e.type for e in plain}
    vad = asyncio.run(session(h.port, SPEECH, transcribe=Transcribe(language="en", vad_sensitivity="default")))
    types = [e.type for e in vad]
    assert types.index("voice-started") < types.index("voice-stopped") < types.index("transcript")
    # Timestamps in ms of the session's audio: SPEECH's voice begins after its leading silence, ends before its end.
    started, stopped = (vad[types.index(kind)].data["timestamp"] for kind in ("voice-started", "voice-stopped"))
    assert 0 < started < stopped <= len(SPEECH) / 16


def test_a_multilingual_model_decodes_each_session_in_its_clients_language(harness):
    h = harness("asr.language=auto")
    h.decoder.multilingual = True  # as base under auto
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH, transcribe=Transcribe(language="fr-FR"))))
    assert text and set(h.decoder.languages) == {"fr"}, "every decode of the session is told its language"
    refused = asyncio.run(session(h.port, SPEECH, transcribe=Transcribe(language="xx")))
    assert WyError.from_event(refused[-1]).code == "unsupported_language"


def test_the_languages_a_user_names_are_the_ones_served(harness):
    h = harness("asr.language=auto", "asr.languages=en,fr")
    h.decoder.multilingual = True
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH, transcribe=Transcribe(language="fr"))))
    assert text and set(h.decoder.languages) == {"fr"}
    refused = asyncio.run(session(h.port, SPEECH, transcribe=Transcribe(language="es")))
    assert WyError.from_event(refused[-1]).code == "unsupported_language"


def test_a_transcription_that_trickles_pings_and_scraps_of_audio_is_ended_at_max_audio_s(harness):
    h = harness("wyoming.max_sessions=1", "wyoming.max_audio_s=2")

    async def run() -> tuple[list[Event], str]:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            await client.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
            got: list[Event] = []
            for _ in range(60):  # 10 ms of audio and a ping every 0.1 s: 0.3 s of audio in 6 s
                await client.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                                    audio=to_bytes(SPEECH[:RATE // 100])).event())
                await client.write_event(Ping(text="still here").event())
                got.append(await asyncio.wait_for(client.read_event(), READ_S))
                if got[-1].type == "error":
                    break
                await asyncio.sleep(0.1)
            got += await read_until(client, "transcript-stop")
            await client.write_event(AudioStop().event())
            text, _ = transcript_of(await session(h.port, SPEECH[:RATE]))  # the slot is free again
            return got, text

    got, text = asyncio.run(run())
    errors = [WyError.from_event(e) for e in got if e.type == "error"]
    assert [e.code for e in errors] == ["too_long"] and "of time" in errors[0].text
    assert text == "" or text.startswith("heard")


def test_a_prompt_or_names_the_decoder_cannot_take_are_refused_with_an_error_event(harness):
    h = harness()

    async def run() -> list[WyError]:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        errors = []
        for data in ({"context": {"prompt": "\ud800"}}, {"transcript_names": ["Ada", "\x1b[2Jrm"]},
                     {"transcript_terms": ["\u202eevil"]}):
            # json.dumps escapes the lone surrogate, which the wyoming package's writer cannot encode.
            writer.write((json.dumps({"type": "transcribe", "data": {"language": "en", **data}}) + "\n").encode())
            await async_write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event(), writer)
            while (event := await asyncio.wait_for(async_read_event(reader), READ_S)).type != "error":
                assert event.type != "transcript"
            errors.append(WyError.from_event(event))
            await async_write_event(AudioStop().event(), writer)
        writer.close()
        return errors

    errors = asyncio.run(run())
    assert [e.code for e in errors] == ["bad_request"] * 3
    assert "prompt" in errors[0].text and "transcript_names" in errors[1].text and "transcript_terms" in errors[2].text
    text, _ = transcript_of(asyncio.run(session(h.port, SPEECH, transcribe=Transcribe(
        language="en", context={"prompt": "Plain words, two lines.\nFine."}))))
    assert text, "a plain prompt is taken"


def test_unsupported_language_and_idle_connections_get_error_events(harness):
    h = harness("wyoming.idle_timeout_s=1")

    async def run() -> tuple[Event, list[Event]]:
        async with AsyncTcpClient("127.0.0.1", h.port) as client:
            await client.write_event(Transcribe(language="de-DE").event())
            await client.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
            language = (await read_until(client, "error"))[-1]
            await client.write_event(AudioStop().event())
            idle = await read_until(client, "error")
            assert await asyncio.wait_for(client.read_event(), READ_S) is None  # then closed
            return language, idle

    language, idle = asyncio.run(run())
    assert WyError.from_event(language).code == "unsupported_language"
    assert WyError.from_event(idle[-1]).code == "idle_timeout"


def test_a_non_loopback_address_needs_allow_remote():
    with pytest.raises(ConfigError, match="wyoming.allow_remote"):
        load(None, ["wyoming.uri=tcp://0.0.0.0:10300"])
    assert load(None, ["wyoming.uri=tcp://0.0.0.0:10300", "wyoming.allow_remote=true"])[0].wyoming.remote
    with pytest.raises(ConfigError, match="wyoming.uri"):
        load(None, ["wyoming.uri=http://127.0.0.1:10300"])


def test_chunks_carry_only_settled_text_across_utterances():
    from captiond.events import Final, Partial
    from captiond.wyoming_server import _Transcription

    class Writer:
        def __init__(self) -> None:
            self.events: list[Event] = []

        async def write_event(self, event: Event) -> None:
            self.events.append(event)

    def partial(utt: int, stable: str, unstable: str) -> Partial:
        return Partial(utt, 1, 0.0, 1.0, stable, unstable, _join(stable, unstable))

    def final(utt: int, text: str) -> Final:
        return Final(utt, 0.0, 1.0, text, (), "en", 0.1, ())

    def _join(a: str, b: str) -> str:
        return f"{a} {b}".strip()

    async def run() -> list[Event]:
        writer = Writer()
        t = _Transcription(writer, vad=False, language="en")  # type: ignore[arg-type]
        t.start_emitter("test-emitter")
        for event in [partial(1, "", "Turn of"), partial(1, "Turn", "on the"), partial(1, "Turn on", "the lights"),
                      final(1, "Turn on the lights."), partial(2, "", "You"), partial(2, "", "You"),
                      final(2, "")]:  # withheld: a guess on noise, nothing of it was stable
            t.on_event(event)
            await asyncio.sleep(0)  # let the emitter write what is settled so far
        t.on_event(final(3, "Please."))
        await t.finish()
        return writer.events

    events = asyncio.run(run())
    chunks = [TranscriptChunk.from_event(e).text for e in events if e.type == "transcript-chunk"]
    text, _ = transcript_of(events)
    assert chunks[:3] == ["Turn", " on", " the lights."]  # unstable words never; settled ones once
    assert "".join(chunks) == text == "Turn on the lights. Please."


def test_partials_are_spaced_out_by_the_number_of_open_transcriptions():
    from types import SimpleNamespace

    from captiond.config import WyomingConfig
    from captiond.wyoming_server import WyomingServer, _Transcription

    asr = load(None, [])[0].asr
    seen: dict[int, list[tuple[float, float]]] = {}

    def transcription(k: int) -> _Transcription:
        t = _Transcription(None, vad=False, language="en")  # type: ignore[arg-type]
        worker = SimpleNamespace(reconfigure=lambda cfg: seen.setdefault(k, []).append(
            (cfg.first_partial_s, cfg.partial_interval_s)))
        t.session = SimpleNamespace(worker=worker)  # type: ignore[assignment]
        return t

    server = WyomingServer(WyomingConfig(), lambda: asr, "tiny.en", lambda: False,
                           lambda *a, **k: None)  # type: ignore[arg-type]
    first, second = transcription(1), transcription(2)
    server.admit(first)
    server.admit(second)
    server.release(second)
    one, two = (asr.first_partial_s, asr.partial_interval_s), (2 * asr.first_partial_s, 2 * asr.partial_interval_s)
    assert seen == {1: [one, two, one], 2: [two]}
    server.gate_thread.shutdown()


def test_a_unix_uri_never_takes_a_file_or_a_live_socket_in_its_way(tmp_path):
    from captiond.server import Server
    from captiond.wyoming_server import WyomingError, WyomingServer

    def server_at(path) -> WyomingServer:
        cfg = load(None, [f"wyoming.uri=unix://{path}"])[0]
        return WyomingServer(cfg.wyoming, lambda: cfg.asr, "tiny.en", lambda: False, lambda *a, **k: None)

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")

    async def main() -> list[str]:
        errors = []
        live = Server(tmp_path / "captiond.sock")
        await live.start()
        for path in (notes, live.path):
            with pytest.raises(WyomingError, match="wyoming.uri") as err:
                await server_at(path).start()
            errors.append(str(err.value))
        await live.close()
        return errors

    errors = asyncio.run(main())
    assert "not a socket" in errors[0] and "already listening" in errors[1]
    assert notes.read_text() == "mine"
