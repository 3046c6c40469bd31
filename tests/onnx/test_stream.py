"""Streaming generation: chunks of audio while the codes arrive, equal to the one-shot decode of the same codes."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from tests.onnx.conftest import decoder_calls
from tinymusician.generate import main as generate_main
from tinymusician.onnx.runtime import (
    STREAM_FIRST_CHUNK_SECONDS,
    STREAM_LOOKAHEAD_FRAMES,
    GenerationError,
    TinyMusicianONNX,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["calm piano with soft drums", "loud fast guitar"]


@pytest.fixture(scope="module")
def runtime(bundle) -> TinyMusicianONNX:
    return TinyMusicianONNX(bundle)


@pytest.mark.parametrize("options", [{"do_sample": False}, {"seed": 3}])
def test_streamed_chunks_concatenate_to_the_one_shot_audio(runtime, options):
    chunks = list(runtime.stream(PROMPTS, 3.0, chunk_seconds=0.5, **options))
    assert runtime.last_stats["chunks"] == len(chunks) >= 5
    hop = runtime.sampling_rate // runtime.frame_rate
    assert all(c.shape[0] == 2 for c in chunks)
    # 0.2 s first, then 0.5 s at 50 Hz
    assert chunks[0].shape[1] == 10 * hop and chunks[1].shape[1] == 25 * hop
    streamed = np.concatenate(chunks, axis=1)
    one_shot = runtime.generate(PROMPTS, 3.0, **options)
    assert streamed.shape == one_shot.shape
    np.testing.assert_allclose(streamed, one_shot, atol=1e-4, rtol=0)  # seams included


def test_without_context_and_lookahead_the_seams_are_wrong(runtime):
    """The overlap is what makes it exact: decoded window by window, the seams differ from the one-shot decode."""
    chunks = list(runtime.stream(PROMPTS[:1], 2.0, context_frames=0, lookahead_frames=0, do_sample=False))
    one_shot = runtime.generate(PROMPTS[:1], 2.0, do_sample=False)
    assert np.abs(np.concatenate(chunks, axis=1) - one_shot).max() > 1e-2


@pytest.mark.parametrize(
    ("first_chunk_seconds", "first_frames"), [(STREAM_FIRST_CHUNK_SECONDS, 10), (None, 25)]
)
def test_the_first_chunk_comes_before_the_codes_are_done(runtime, first_chunk_seconds, first_frames):
    with decoder_calls(runtime) as calls:
        stream = runtime.stream(
            PROMPTS[:1], 3.0, chunk_seconds=0.5, first_chunk_seconds=first_chunk_seconds, do_sample=False
        )
        next(stream)
        at_first_chunk = len(calls)
        list(stream)
    codebooks = runtime.facts["num_codebooks"]
    # the first chunk's frames + the lookahead, each written in every codebook (the delay adds K - 1 steps)
    assert at_first_chunk == first_frames + STREAM_LOOKAHEAD_FRAMES + codebooks - 1
    assert at_first_chunk < len(calls) == 150 + codebooks - 1
    assert 0 < runtime.last_stats["first_audio_s"] < runtime.last_stats["compute_s"]


def test_bad_stream_arguments_are_clear_errors(runtime):
    with pytest.raises(GenerationError, match="chunk_seconds=0"):
        next(runtime.stream("a tune", 1.0, chunk_seconds=0))
    with pytest.raises(GenerationError, match="first_chunk_seconds=-1"):
        next(runtime.stream("a tune", 1.0, first_chunk_seconds=-1))
    with pytest.raises(GenerationError, match="seconds=999"):
        next(runtime.stream("a tune", 999.0))


def test_generate_stream_writes_the_same_wav_chunk_by_chunk(bundle, tmp_path, capsys, tiny_pair):
    common = ["calm piano", "--model", str(bundle), "--seconds", "2", "--greedy"]
    assert generate_main([*common, "--stream", "--out", str(tmp_path / "s.wav")]) == 0
    assert "first audio after" in capsys.readouterr().out
    assert generate_main([*common, "--out", str(tmp_path / "o.wav")]) == 0
    streamed, rate = sf.read(str(tmp_path / "s.wav"), dtype="int16")
    one_shot, _ = sf.read(str(tmp_path / "o.wav"), dtype="int16")
    assert rate == 16000 and streamed.shape == one_shot.shape == (32000,)
    assert np.abs(streamed.astype(int) - one_shot).max() <= 1  # 16-bit rounding
    assert generate_main(["calm piano", "--model", str(tiny_pair.student), "--stream"]) == 2
    assert "--stream needs an ONNX bundle" in capsys.readouterr().err
    assert (
        generate_main([*common, "--stream", "--first-chunk-seconds", "0", "--out", str(tmp_path / "z.wav")])
        == 2
    )
    assert "--first-chunk-seconds 0.0: must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "z.wav").exists()


def test_long_clips_are_decoded_window_by_window_as_the_one_shot_decode(runtime, monkeypatch):
    """generate's codec decode holds one window's activations, not the clip's, and gives the same audio."""
    _, codes = runtime.generate(PROMPTS, 7.0, do_sample=False, return_codes=True)
    one_shot = runtime.decode_audio(codes, window_seconds=None)
    windows: list[tuple[int, int, int]] = []
    span = runtime.decode_span

    def recording(window, low, start, until):
        windows.append((window.shape[-1], start, until))
        return span(window, low, start, until)

    monkeypatch.setattr(runtime, "decode_span", recording)
    windowed = runtime.decode_audio(codes, window_seconds=3.0)
    # 350 frames: 150 + 150 + 50, each with 32 frames of context on the left, 8 of lookahead on the right
    assert windows == [(158, 0, 150), (190, 150, 300), (82, 300, 350)]
    assert windowed.shape == one_shot.shape
    np.testing.assert_allclose(windowed, one_shot, atol=1e-4, rtol=0)
    assert np.abs(one_shot).max() > 1e-3
