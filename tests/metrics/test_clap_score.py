"""CLAP score: the audiocraft definition (mean cosine of paired text/audio embeddings) and its error cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinymusician.metrics import AudioInputError, ClapEmbedder, CLAPScore
from tinymusician.metrics.embedders import AudioEmbedder

TONES = [220.0, 330.0, 495.0, 742.5, 1113.75, 1670.6]


class ToneTextStub(AudioEmbedder):
    """Built to make text and audio match: ``"tone k"`` <-> a sine at ``TONES[k]`` (one-hot on the loudest band).

    Used for the matched-vs-shuffled property only; the real CLAP path is tested with the tiny CLAP.
    """

    name = "tone-stub"
    sample_rate = 8000
    dim = len(TONES)

    def _load(self) -> None:
        pass

    def _release(self) -> None:
        pass

    def _embed_batch(self, audio: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(audio).abs()
        freqs = torch.fft.rfftfreq(audio.shape[-1], 1 / self.sample_rate)
        peak = freqs[spectrum.argmax(dim=-1)]
        nearest = (peak[:, None] - torch.tensor(TONES)).abs().argmin(dim=-1)
        return F.one_hot(nearest, self.dim).float()[:, None, :] + 0.05

    def embed_text(self, texts):
        return F.one_hot(torch.tensor([int(t.split()[-1]) for t in texts]), self.dim).float() + 0.05


def tones(indices, rate=16000, seconds=0.5) -> list[torch.Tensor]:
    t = torch.arange(int(rate * seconds)) / rate
    return [0.5 * torch.sin(2 * math.pi * TONES[i] * t) for i in indices]


def test_matching_pairs_score_higher_than_shuffled_ones():
    audio = tones(range(6))
    prompts = [f"tone {i}" for i in range(6)]
    matched, shuffled = CLAPScore(ToneTextStub()), CLAPScore(ToneTextStub())
    matched.update(audio, prompts, 16000)
    shuffled.update(audio, prompts[1:] + prompts[:1], 16000)
    assert float(matched.compute()) > 0.95
    assert float(shuffled.compute()) < 0.2
    assert matched.per_clip().shape == (6,)


def test_tiny_clap_score_is_the_mean_cosine_of_its_embeddings(tiny_clap_dir, make_clips):
    audio, captions = make_clips(4, seconds=1.5, sample_rate=32000)
    score = CLAPScore(str(tiny_clap_dir))  # loads through ClapEmbedder's public path
    assert isinstance(score.embedder, ClapEmbedder) and not score.embedder.loaded
    score.update(audio[:3], captions[:3], 32000)
    score.update(audio[3:], captions[3:], 32000)
    value = float(score.compute())
    embedder = score.embedder
    expected = F.cosine_similarity(embedder.embed_clips(audio, 32000), embedder.embed_text(captions)).mean()
    assert value == pytest.approx(float(expected), abs=1e-6)
    assert -1.0 <= value <= 1.0 and int(score.count) == 4
    assert "embedder" not in dict(score.named_modules())  # the CLAP model is no submodule of the metric


def test_mismatched_prompts_and_empty_metric_fail_clearly():
    score = CLAPScore(ToneTextStub())
    with pytest.raises(AudioInputError, match="got 2 prompts for 3 clips"):
        score.update(tones([0, 1, 2]), ["tone 0", "tone 1"], 16000)
    with pytest.raises(AudioInputError, match="list of prompts"):
        score.update(tones([0]), "tone 0", 16000)
    with pytest.raises(AudioInputError, match="no prompt/audio pairs"):
        score.compute()
