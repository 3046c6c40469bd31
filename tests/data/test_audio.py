"""Audio decoding: formats, rates and channel counts -> mono at the codec's rate; every bad file's reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tinymusician.data.audio import (
    AUDIO_EXTENSIONS,
    BadSampleError,
    is_audio_file,
    load_audio,
    resample,
    supported_extensions,
)

TARGET = 16000
LOSSY = {"ogg", "mp3"}
# (extension, source rate, channels): every format libsndfile here decodes, at several rates and layouts.
CASES = [
    ("wav", 44100, 2),
    ("flac", 22050, 1),
    ("ogg", 48000, 2),
    ("wav", 16000, 1),
    ("flac", 32000, 6),
] + ([("mp3", 44100, 1)] if "mp3" in AUDIO_EXTENSIONS else [])


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def dominant_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1.0 / rate)[np.argmax(spectrum)])


def test_supported_extensions_follow_libsndfile():
    formats = sf.available_formats()
    assert {"wav", "flac"} <= supported_extensions()
    assert ("ogg" in AUDIO_EXTENSIONS) == ("OGG" in formats)
    assert ("mp3" in AUDIO_EXTENSIONS) == ("MP3" in formats)
    assert is_audio_file(Path("a/B.FLAC")) and not is_audio_file(Path("notes.txt"))


@pytest.mark.parametrize("ext,rate,channels", CASES)
def test_formats_rates_and_channels_decode_to_mono_at_target_rate(tmp_path, ext, rate, channels):
    mono = tone(440.0, 1.0, rate)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono, rate)
    audio = load_audio(path, TARGET)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - TARGET) <= (1200 if ext == "mp3" else 1)  # mp3 adds encoder delay/padding
    assert dominant_hz(audio, TARGET) == pytest.approx(440.0, abs=2.0)
    if ext not in LOSSY:  # downmix of identical channels + resampling reproduce the sine itself
        middle = slice(500, TARGET - 500)
        np.testing.assert_allclose(audio[middle], tone(440.0, 1.0, TARGET)[middle], atol=2e-3)
    else:
        assert np.sqrt(np.mean(audio**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.15)


def test_downmix_averages_the_channels(tmp_path):
    left, right = tone(300.0, 0.5, TARGET, 0.6), tone(500.0, 0.5, TARGET, 0.2)
    sf.write(tmp_path / "two.wav", np.stack([left, right], axis=1), TARGET, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "two.wav", TARGET), (left + right) / 2, atol=1e-6)


def level_db(audio: np.ndarray, reference: float = 0.5) -> float:
    return float(20 * np.log10(np.max(np.abs(audio[2000:-2000])) / reference))


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resampler_keeps_the_passband_and_removes_what_would_alias(rate):
    passband = resample(tone(7000.0, 1.0, rate), rate, TARGET)  # 0.875 of the new Nyquist
    assert dominant_hz(passband, TARGET) == pytest.approx(7000.0, abs=3.0)
    assert abs(level_db(passband)) < 0.1
    # above the new Nyquist (8 kHz): naive decimation would fold these into the band at full level
    for freq in (8500.0, 9000.0, 12000.0):
        assert level_db(resample(tone(freq, 1.0, rate), rate, TARGET)) < -80.0


def test_upsampling_is_exact_on_a_band_limited_tone():
    up = resample(tone(1000.0, 1.0, 8000), 8000, TARGET)
    assert len(up) == TARGET
    np.testing.assert_allclose(up[2000:-2000], tone(1000.0, 1.0, TARGET)[2000:-2000], atol=1e-4)


def write_bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio")
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "no_frames":
        sf.write(path, np.zeros(0, dtype=np.float32), TARGET)
    elif kind == "short":
        sf.write(path, tone(440.0, 0.05, TARGET), TARGET)
    elif kind == "nan":
        audio = tone(440.0, 0.5, TARGET)
        audio[100] = np.nan
        sf.write(path, audio, TARGET, subtype="FLOAT")
    elif kind == "silent":
        sf.write(path, np.zeros(TARGET, dtype=np.float32), TARGET)
    elif kind == "quiet":
        sf.write(path, tone(440.0, 1.0, TARGET, amplitude=10 ** (-70 / 20)), TARGET, subtype="FLOAT")
    elif kind == "cancelling":  # stereo whose channels cancel: silent once downmixed
        sf.write(path, np.stack([tone(440.0, 1.0, TARGET), -tone(440.0, 1.0, TARGET)], axis=1), TARGET)
    return path


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("corrupt", "cannot decode"),
        ("zero_bytes", "empty file"),
        ("no_frames", "no audio frames"),
        ("short", "too short"),
        ("nan", "NaN"),
        ("silent", "silent"),
        ("quiet", "silent"),
        ("cancelling", "silent"),
        ("absent", "listed but absent"),
    ],
)
def test_bad_files_raise_with_name_and_reason(tmp_path, kind, reason):
    path = write_bad(tmp_path, kind)
    with pytest.raises(BadSampleError, match=reason) as info:
        load_audio(path, TARGET, min_samples=TARGET // 10)
    assert info.value.name == str(path) and reason in info.value.reason


def test_unreadable_file_is_a_bad_sample(tmp_path, monkeypatch):
    path = tmp_path / "locked.wav"
    sf.write(path, tone(440.0, 0.5, TARGET), TARGET)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sf, "read", denied)  # tests run as root, where chmod 000 does not stop reads
    with pytest.raises(BadSampleError, match="unreadable: Permission denied"):
        load_audio(path, TARGET)


def test_silence_check_can_be_disabled(tmp_path):
    audio = load_audio(write_bad(tmp_path, "silent"), TARGET, silence_db=None)
    assert len(audio) == TARGET and not audio.any()
