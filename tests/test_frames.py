import numpy as np

from captiond.frames import FRAME_SAMPLES, Frame, FrameAssembler, FrameRing, int16_to_float


def test_assembler_cuts_any_chunking_into_the_same_numbered_frames():
    pcm = np.arange(10 * FRAME_SAMPLES + 123, dtype=np.int16)
    asm = FrameAssembler()
    frames = []
    pos = 0
    for size in [1, 479, 480, 1000, 7, 2000]:
        frames += asm.insert(pcm[pos:pos + size], 0.0)
        pos += size
    frames += asm.insert(pcm[pos:], 0.0)
    assert [f.index for f in frames] == list(range(10))
    assert np.array_equal(np.concatenate([f.pcm for f in frames]), pcm[:10 * FRAME_SAMPLES])
    tail = asm.finish(1.0)
    assert len(tail) == 1 and tail[0].index == 10
    assert np.array_equal(tail[0].pcm[:123], pcm[10 * FRAME_SAMPLES:])
    assert not tail[0].pcm[123:].any()
    assert asm.finish(2.0) == []


def test_frame_knows_its_samples():
    f = Frame(3, np.zeros(FRAME_SAMPLES, np.int16), 0.0)
    assert (f.start, f.end) == (3 * FRAME_SAMPLES, 4 * FRAME_SAMPLES)


def _frame(i):
    return Frame(i, np.full(FRAME_SAMPLES, i, np.int16), 0.0)


def test_ring_returns_frames_in_order():
    ring = FrameRing(4)
    for i in range(3):
        ring.push(_frame(i))
    assert len(ring) == 3 and not ring.full
    assert [ring.pop().index for _ in range(3)] == [0, 1, 2]
    assert ring.pop() is None and ring.overruns == 0


def test_ring_overwrites_oldest_and_counts_overruns():
    ring = FrameRing(4)
    for i in range(10):
        ring.push(_frame(i))
    assert ring.overruns == 6
    assert [ring.pop().index for _ in range(4)] == [6, 7, 8, 9]
    assert ring.pop() is None



def test_int16_scales_to_unit_floats():
    f = int16_to_float(np.array([-32768, 0, 16384], np.int16))
    assert f.dtype == np.float32 and list(f) == [-1.0, 0.0, 0.5]
