"""The synthetic corpus is deterministic, and its captions are true to the audio they describe."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from tinymusician.data.synthetic import (
    ATTRIBUTES,
    SyntheticClip,
    caption_words,
    split_caption,
    synthesize_clip,
    synthesize_corpus,
)

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def corpus() -> list[SyntheticClip]:
    return synthesize_corpus(240, seed=0)


def _by_attribute(corpus: list[SyntheticClip], attribute: str, measure) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for clip in corpus:
        groups[clip.attributes[attribute]].append(measure(clip.audio))
    return {value: float(np.mean(measures)) for value, measures in groups.items()}


def _dominant_log2_hz(audio: np.ndarray) -> float:
    """Strongest spectral peak in the melodic range; every timbre has its fundamental as strongest partial."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    freqs = np.fft.rfftfreq(len(audio), 1.0 / SAMPLE_RATE)
    band = (freqs > 60.0) & (freqs < 2000.0)
    return float(np.log2(freqs[band][np.argmax(spectrum[band])]))


def _onsets_per_second(audio: np.ndarray, win: int = 512, hop: int = 160) -> float:
    """Peaks of positive log-spectral flux, at least 50 ms apart: a rough count of note onsets."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, win)[::hop]
    magnitude = np.abs(np.fft.rfft(frames * np.hanning(win), axis=1))
    log_magnitude = np.log1p(100.0 * magnitude / magnitude.max())
    flux = np.maximum(np.diff(log_magnitude, axis=0), 0.0).sum(axis=1)
    middle = flux[1:-1]
    is_peak = (middle > flux.mean() + flux.std()) & (middle >= flux[:-2]) & (middle > flux[2:])
    onsets: list[int] = []
    for frame in np.flatnonzero(is_peak):
        if not onsets or frame - onsets[-1] >= 5:
            onsets.append(frame)
    return len(onsets) / (len(audio) / SAMPLE_RATE)


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))


def test_same_index_and_seed_give_identical_clip():
    first, second = synthesize_clip(7, seed=3), synthesize_clip(7, seed=3)
    np.testing.assert_array_equal(first.audio, second.audio)
    assert first.caption == second.caption
    assert first.attributes == second.attributes


def test_different_seed_or_index_gives_different_clip():
    base = synthesize_clip(7, seed=3)
    for other in (synthesize_clip(7, seed=4), synthesize_clip(8, seed=3)):
        assert not np.array_equal(base.audio, other.audio)
    captions = {synthesize_clip(7, seed=s).caption for s in range(8)}
    assert len(captions) > 1


def test_clip_does_not_depend_on_corpus_window():
    window = synthesize_corpus(5, seed=2, start=10)
    prefix = synthesize_corpus(15, seed=2)
    for offset, clip in enumerate(window):
        alone = synthesize_clip(10 + offset, seed=2)
        np.testing.assert_array_equal(clip.audio, alone.audio)
        np.testing.assert_array_equal(clip.audio, prefix[10 + offset].audio)
        assert clip.caption == alone.caption == prefix[10 + offset].caption


def test_caption_and_attributes_do_not_depend_on_duration():
    short, long = synthesize_clip(3, seconds=1.0), synthesize_clip(3, seconds=4.0)
    assert short.caption == long.caption
    assert short.attributes == long.attributes


@pytest.mark.parametrize(
    ("seconds", "sample_rate"), [(2.0, 16000), (1.0, 32000), (0.5, 24000), (1.37, 16000)]
)
def test_length_dtype_finite_and_peak(seconds: float, sample_rate: int):
    for clip in synthesize_corpus(20, seconds=seconds, sample_rate=sample_rate):
        assert clip.audio.shape == (round(seconds * sample_rate),)
        assert clip.audio.dtype == np.float32
        assert np.isfinite(clip.audio).all()
        assert 0.0 < np.abs(clip.audio).max() <= 1.0


def test_no_silent_clips_and_no_edge_clicks(corpus: list[SyntheticClip]):
    for clip in corpus:
        assert _rms(clip.audio) > 0.02
        # Notes start from zero and the clip fades out, so concatenating clips never clicks.
        assert clip.audio[0] == 0.0
        assert abs(clip.audio[-1]) < 1e-6


def test_loudness_attribute_matches_level(corpus: list[SyntheticClip]):
    for clip in corpus:
        peak = np.abs(clip.audio).max()
        if clip.attributes["loudness"] == "loud":
            assert peak >= 0.8
        else:
            assert peak <= 0.3
    mean_rms = _by_attribute(corpus, "loudness", _rms)
    assert mean_rms["loud"] > 2.5 * mean_rms["quiet"]


def test_register_attribute_matches_dominant_pitch(corpus: list[SyntheticClip]):
    mean_log2_hz = _by_attribute(corpus, "register", _dominant_log2_hz)
    # Tonics are an octave apart; allow for melodies that wander within a register.
    assert mean_log2_hz["mid"] - mean_log2_hz["low"] > 0.7
    assert mean_log2_hz["high"] - mean_log2_hz["mid"] > 0.7
    for instrument in ATTRIBUTES["instrument"]:
        clips = [c for c in corpus if c.attributes["instrument"] == instrument]
        per_register = _by_attribute(clips, "register", _dominant_log2_hz)
        assert per_register["low"] < per_register["mid"] < per_register["high"], instrument


def test_tempo_attribute_matches_onset_rate(corpus: list[SyntheticClip]):
    rate = _by_attribute(corpus, "tempo", _onsets_per_second)
    assert rate["slow"] < rate["moderate"] < rate["fast"]
    # 150 vs 70 BPM on the same rhythms: about twice the notes per second.
    assert rate["fast"] > 1.6 * rate["slow"]


def test_caption_names_each_attribute_value_unambiguously(corpus: list[SyntheticClip]):
    for clip in corpus:
        words = set(split_caption(clip.caption))
        for attribute, values in ATTRIBUTES.items():
            assert {v for v in values if v in words} == {clip.attributes[attribute]}, clip.caption


def test_caption_words_cover_every_caption(corpus: list[SyntheticClip]):
    vocabulary = caption_words()
    assert vocabulary == sorted(set(vocabulary))
    assert all(word == word.lower() and word.strip() == word and word for word in vocabulary)
    for values in ATTRIBUTES.values():
        assert set(values) <= set(vocabulary)
    for clip in corpus:
        assert set(split_caption(clip.caption)) <= set(vocabulary), clip.caption


def test_captions_vary_in_wording(corpus: list[SyntheticClip]):
    # Mask attribute values: what remains is the template and synonyms, which should vary a lot.
    value_words = {v for values in ATTRIBUTES.values() for v in values}
    templates = {
        " ".join("*" if word in value_words else word for word in split_caption(c.caption)) for c in corpus
    }
    assert len(templates) > 50


def test_attributes_cover_every_value(corpus: list[SyntheticClip]):
    for clip in corpus:
        assert set(clip.attributes) == set(ATTRIBUTES)
    for attribute, values in ATTRIBUTES.items():
        assert {c.attributes[attribute] for c in corpus} == set(values)


@pytest.mark.parametrize(
    "kwargs",
    [{"index": -1}, {"index": 0, "seed": -1}, {"index": 0, "seconds": 0.0}, {"index": 0, "sample_rate": 100}],
)
def test_bad_arguments_raise(kwargs: dict):
    with pytest.raises(ValueError):
        synthesize_clip(**kwargs)


def test_corpus_rejects_negative_size():
    with pytest.raises(ValueError):
        synthesize_corpus(-1)
    assert synthesize_corpus(0) == []
