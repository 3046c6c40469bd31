"""Codec tokenisation: mono audio clips -> codes ``[K, T]``, batched and chunked to bound memory."""

from __future__ import annotations

import numpy as np
import torch
from transformers import MusicgenForConditionalGeneration

from tinymusician.models.musicgen import codec_encode, codec_hop


@torch.no_grad()
def encode_audio(
    model: MusicgenForConditionalGeneration,
    clips: list[np.ndarray],
    batch_size: int = 8,
    chunk_samples: int | None = None,
) -> list[torch.Tensor]:
    """Codes ``[K, ceil(len / hop)]`` of every mono clip at the codec's rate.

    Clips longer than ``chunk_samples`` (a multiple of the hop) are encoded in pieces to bound memory;
    pieces are batched shortest first so little of each batch is padding.
    """
    codec = model.audio_encoder
    hop = codec_hop(codec.config)
    if chunk_samples is not None:
        chunk_samples = max(hop, chunk_samples // hop * hop)
    pieces: list[tuple[int, np.ndarray]] = []
    for index, clip in enumerate(clips):
        step = chunk_samples or max(len(clip), 1)
        pieces += [(index, clip[start : start + step]) for start in range(0, len(clip), step)]
    order = sorted(range(len(pieces)), key=lambda p: len(pieces[p][1]))
    piece_codes: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(len(pieces[p][1]) for p in batch)
        padded = torch.zeros(len(batch), longest)
        for row, p in enumerate(batch):
            padded[row, : len(pieces[p][1])] = torch.from_numpy(pieces[p][1])
        codes = codec_encode(model, padded.to(codec.dtype)).cpu()
        for row, p in enumerate(batch):
            frames = min(-(-len(pieces[p][1]) // hop), codes.shape[-1])
            piece_codes[p] = codes[row, :, :frames]
    by_clip: list[list[torch.Tensor]] = [[] for _ in clips]
    for p, (index, _) in enumerate(pieces):
        by_clip[index].append(piece_codes[p])
    return [torch.cat(parts, dim=-1).long() for parts in by_clip]
