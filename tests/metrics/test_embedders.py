"""Embedders: resampling, VGGish front end and layout, tiny CLAP / EnCodec through the public loading paths,
determinism, lazy loading, and clear errors on bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tinymusician.metrics import (
    AudioInputError,
    ClapEmbedder,
    EmbedderError,
    EncodecEmbedder,
    VGGishEmbedder,
    build_embedder,
    resample,
)
from tinymusician.metrics.vggish import VGGish, vggish_examples, vggish_mel_matrix
from tinymusician.models.musicgen import ModelSourceError


def tone(freq: float, rate: int, seconds: float = 1.0, channels: int | None = None) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    wave = 0.5 * torch.sin(2 * math.pi * freq * t)
    return wave if channels is None else wave.expand(channels, -1).clone()


def peak_hz(audio: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(audio * torch.hann_window(audio.shape[-1], dtype=audio.dtype)).abs()
    return float(spectrum.argmax()) * rate / audio.shape[-1]


@pytest.mark.parametrize(
    ("freq", "orig", "new"), [(1000.0, 44100, 16000), (440.0, 32000, 48000), (3000.0, 48000, 32000)]
)
def test_resampling_preserves_a_tones_frequency(freq, orig, new):
    out = resample(tone(freq, orig), orig, new)
    assert out.shape[-1] == new  # one second in, one second out
    assert peak_hz(out, new) == pytest.approx(freq, abs=1.0)
    assert float(out[1000:-1000].abs().max()) == pytest.approx(0.5, rel=0.01)  # passband gain ~1


def test_resampling_does_not_alias_above_the_new_nyquist():
    # 10 kHz cannot exist at 16 kHz: it must be filtered out, not folded down to 6 kHz
    out = resample(tone(10000.0, 32000), 32000, 16000)
    assert float(out[1000:-1000].abs().max()) < 0.5 * 10 ** (-40 / 20)


def test_vggish_front_end_and_state_dict_layout():
    mel = vggish_mel_matrix()
    assert mel.shape == (257, 64) and float(mel[0].abs().sum()) == 0.0  # DC bin carries nothing
    examples = vggish_examples(tone(1000.0, 16000, seconds=2.0)[None].float())
    assert examples.shape == (1, 2, 96, 64)  # 2 s -> 198 STFT frames -> two 0.96 s examples
    band_centres = torch.linspace(1127 * math.log1p(125 / 700), 1127 * math.log1p(7500 / 700), 66)[1:-1]
    band_hz = 700 * (torch.exp(band_centres / 1127) - 1)
    loudest = int(examples[0].mean(dim=(0, 1)).argmax())
    assert abs(float(band_hz[loudest]) - 1000) < 60  # the loudest band is the one around the tone
    with torch.device("meta"):
        full = VGGish()  # the published architecture, with torchvggish's parameter names and shapes
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert shapes["features.0.weight"] == (64, 1, 3, 3) and shapes["features.13.weight"] == (512, 512, 3, 3)
    assert shapes["embeddings.0.weight"] == (4096, 512 * 24) and shapes["embeddings.4.weight"] == (128, 4096)
    assert sum(math.prod(s) for s in shapes.values()) == 72_141_184


def test_vggish_embedder_loads_lazily_from_the_weight_file(tiny_vggish_path, make_clips):
    embedder = build_embedder({"name": "vggish", "weights": str(tiny_vggish_path)})
    assert isinstance(embedder, VGGishEmbedder) and embedder.dim == 12 and not embedder.loaded
    audio, _ = make_clips(3, seconds=3.0, sample_rate=32000)
    frames = embedder.embed(audio, 32000)
    assert embedder.loaded and [f.shape for f in frames] == [(3, 12)] * 3
    again = embedder.embed(audio, 32000)
    assert all(torch.equal(a, b) for a, b in zip(frames, again, strict=True))
    # stereo with identical channels == mono; a single clip of a different length batches on its own
    stereo = torch.from_numpy(np.stack([audio[0], audio[0]]))
    assert torch.allclose(embedder.embed([stereo], 32000)[0], frames[0], atol=1e-6)
    embedder.unload()
    assert not embedder.loaded and embedder._model is None


def test_tiny_clap_embeds_deterministically_through_the_public_path(tiny_clap_dir, make_clips):
    embedder = ClapEmbedder(str(tiny_clap_dir))
    assert (embedder.dim, embedder.sample_rate, embedder.window) == (16, 48000, 96000) and not embedder.loaded
    audio, captions = make_clips(2, seconds=5.0, sample_rate=32000)
    frames = embedder.embed(audio, 32000)
    # 5 s with a 2 s window -> windows at 0, 2 and 3 s (the last one aligned to the end), never random
    assert embedder.window_starts(5 * 48000) == [0, 96000, 144000]
    assert [f.shape for f in frames] == [(3, 16)] * 2
    assert all(torch.equal(a, b) for a, b in zip(frames, embedder.embed(audio, 32000), strict=True))
    torch.testing.assert_close(frames[0].norm(dim=-1), torch.ones(3))
    short = embedder.embed([audio[0][:32000]], 32000)[0]  # 1 s: one repeat-padded window
    assert short.shape == (1, 16)
    text = embedder.embed_text(captions)
    assert text.shape == (2, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    embedder.unload()
    assert embedder._model is None


def test_encodec_embedder_from_a_musicgen_checkpoint(tiny_pair, make_clips):
    from tinymusician.models.musicgen import load_musicgen

    embedder = EncodecEmbedder(str(tiny_pair.student))
    assert (embedder.dim, embedder.sample_rate, embedder.frame_rate) == (
        64,  # the tiny world codec's latent width (hidden_size)
        16000,
        50.0,
    ) and not embedder.loaded
    audio, _ = make_clips(2, seconds=1.0, sample_rate=32000)
    frames = embedder.embed(audio, 32000)
    assert [f.shape for f in frames] == [(50, 64)] * 2
    codec = load_musicgen(str(tiny_pair.student)).audio_encoder
    given = EncodecEmbedder("student", codec=codec)
    torch.testing.assert_close(given.embed(audio, 32000)[0], frames[0])
    given.unload()
    assert given._codec is codec  # a codec we were given is its owner's: never dropped


def test_bad_audio_gives_clear_errors(tiny_vggish_path):
    embedder = VGGishEmbedder(tiny_vggish_path)
    with pytest.raises(AudioInputError, match="no audio clips"):
        embedder.embed([], 16000)
    with pytest.raises(AudioInputError, match="clip 1 is empty"):
        embedder.embed([torch.zeros(16000), torch.zeros(0)], 16000)
    nan = torch.zeros(20000)
    nan[5] = float("nan")
    with pytest.raises(AudioInputError, match="clip 0 contains 1 NaN"):
        embedder.embed([nan], 16000)
    with pytest.raises(
        AudioInputError, match=r"clip 0 is 0.500 s .*shorter than the 0.975 s analysis window of the vggish"
    ):
        embedder.embed([torch.zeros(8000)], 16000)
    with pytest.raises(AudioInputError, match="sample_rate"):
        embedder.embed([torch.zeros(20000)], 0)
    with pytest.raises(AudioInputError, match=r"shape \(1, 2, 3, 4\)"):
        embedder.embed(torch.zeros(1, 2, 3, 4), 16000)
    assert not embedder.loaded  # bad input fails before any weights load


def test_bad_embedder_settings_give_clear_errors(tmp_path, tiny_vggish_path):
    with pytest.raises(EmbedderError, match=r"unknown embedder 'passt'.*\['clap', 'encodec', 'vggish'\]"):
        build_embedder("passt")
    with pytest.raises(
        FileNotFoundError, match="VGGish weight file .*nope.pth.* does not exist.*vggish-10086976.pth"
    ):
        VGGishEmbedder(tmp_path / "nope.pth")
    with pytest.raises(EmbedderError, match="weights` is required"):
        build_embedder("vggish")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(EmbedderError, match="not a VGGish state dict"):
        VGGishEmbedder(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(EmbedderError, match="cannot read VGGish weights"):
        VGGishEmbedder(tmp_path / "junk.pth")
    with pytest.raises(EmbedderError, match="encodec embedder: give `source`"):
        build_embedder("encodec")
    with pytest.raises(FileNotFoundError, match="clap source.*does not exist"):
        ClapEmbedder(str(tmp_path / "no-clap"))
    with pytest.raises(ModelSourceError, match="laion/larger_clap_music.*hf download"):
        ClapEmbedder()  # the default hub id, offline in tests
    with pytest.raises(EmbedderError, match="bad arguments"):
        build_embedder("vggish", weights=str(tiny_vggish_path), colour="red")
