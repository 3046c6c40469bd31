"""CLAP score as a torchmetrics ``Metric``: how well generated audio matches the text it was generated from.

As audiocraft defines it (its ``TextConsistencyMetric``): the mean over clips of the cosine similarity between
the CLAP text embedding of a prompt and the CLAP audio embedding of the audio generated for it, with LAION's
music CLAP at 48 kHz. Range [-1, 1]; MusicGen's published numbers are about 0.27-0.28.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from tinymusician.metrics.audio import AudioInput, AudioInputError, split_clips


class TextAudioEmbedder(Protocol):
    """What the CLAP score needs: :class:`~tinymusician.metrics.embedders.ClapEmbedder` provides it."""

    name: str

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor: ...

    def embed_clips(self, audio: AudioInput, sample_rate: int) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


class CLAPScore(Metric):
    """Mean cosine similarity between CLAP embeddings of prompts and of the audio generated for them.

    ``update(audio, texts, sample_rate)``: ``audio`` holds one clip per prompt, in the same order. A clip
    longer than CLAP's 10 s window is embedded as the mean of consecutive windows (no random crop).

    Args:
        embedder: a ``ClapEmbedder`` (or anything with ``embed_text``/``embed_clips``), or the hub id /
            directory of a CLAP model (default ``laion/larger_clap_music``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, embedder: TextAudioEmbedder | str = "laion/larger_clap_music", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(embedder, str):
            from tinymusician.metrics.embedders import ClapEmbedder

            embedder = ClapEmbedder(embedder)
        self.embedder = embedder  # plain attribute: never part of a state_dict
        self.add_state("cosine_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scores", [], dist_reduce_fx="cat")

    def update(self, audio: AudioInput, texts: Sequence[str], sample_rate: int) -> None:
        if isinstance(texts, str):
            raise AudioInputError("texts must be a list of prompts (one per clip), not a single string")
        num_clips = len(split_clips(audio))
        if num_clips != len(texts):
            raise AudioInputError(
                f"CLAP score pairs each clip with its prompt: got {len(texts)} prompts for {num_clips} clips"
            )
        audio_embeds = self.embedder.embed_clips(audio, sample_rate).double()
        text_embeds = self.embedder.embed_text(list(texts)).double()
        cosine = F.cosine_similarity(audio_embeds, text_embeds, dim=-1, eps=1e-8).to(self.device)
        self.cosine_sum += cosine.sum()
        self.count += cosine.numel()
        self.scores.append(cosine)

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise AudioInputError("CLAP score: no prompt/audio pairs; call update() first")
        return self.cosine_sum / self.count

    def per_clip(self) -> torch.Tensor:
        """Each clip's cosine, in update order (synced across processes)."""
        with self.sync_context(should_unsync=True):
            scores = self.scores
            return torch.cat(scores) if isinstance(scores, list) else scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(embedder={getattr(self.embedder, 'name', '?')})"
