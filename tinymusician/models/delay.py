"""MusicGen's delay pattern: codebook k is shifted right by k steps so one decoder step predicts all K.

Everything here works on tokens ``[B, K, T]``; the Hugging Face ``(B*K, T)`` layout lives in
``tinymusician.models.musicgen`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DelayedCodes:
    """Teacher-forcing tensors for one batch, all ``[B, K, T + K - 1]``.

    ``inputs`` start with the BOS (= pad) token, ``labels`` are ``inputs`` shifted left by one, and ``valid`` is
    False where a label is delay-pattern padding or sequence padding (those positions carry no loss).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


def delay_codes(codes: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Codes ``[B, K, T]`` -> the full delayed sequence ``[B, K, T + K]``.

    Row k holds pad at positions ``0..k``, the codes at ``k+1..k+T`` and pad after: the same matrix as
    transformers' ``build_delay_pattern_mask`` applied to ``[BOS, codes]`` with ``max_length = T + K``.
    """
    batch, num_codebooks, length = codes.shape
    delayed = codes.new_full((batch, num_codebooks, length + num_codebooks), pad_token_id)
    for k in range(num_codebooks):
        delayed[:, k, k + 1 : k + 1 + length] = codes[:, k]
    return delayed


def undelay_codes(delayed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`delay_codes` (also accepts the BOS-less ``[B, K, T + K - 1]`` labels): ``[B, K, T]``."""
    num_codebooks = delayed.shape[1]
    offset = 1 if delayed.shape[-1] >= length + num_codebooks else 0
    return torch.stack([delayed[:, k, k + offset : k + offset + length] for k in range(num_codebooks)], dim=1)


def delay_pattern(
    codes: torch.Tensor, pad_token_id: int, lengths: torch.Tensor | None = None
) -> DelayedCodes:
    """Codes ``[B, K, T]`` (and optional true lengths ``[B]``) -> inputs, labels and ``valid``.

    Label position j of codebook k is the code of frame ``j - k``; it is valid when ``0 <= j - k < length``.
    """
    batch, num_codebooks, length = codes.shape
    delayed = delay_codes(codes, pad_token_id)
    positions = torch.arange(length + num_codebooks - 1, device=codes.device)
    frame = positions[None, :] - torch.arange(num_codebooks, device=codes.device)[:, None]  # [K, L]
    if lengths is None:
        lengths = torch.full((batch,), length, device=codes.device)
    valid = (frame[None] >= 0) & (frame[None] < lengths.to(codes.device)[:, None, None])
    labels = delayed[..., 1:].masked_fill(~valid, pad_token_id)
    return DelayedCodes(inputs=delayed[..., :-1], labels=labels, valid=valid)
