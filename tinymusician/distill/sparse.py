"""A teacher known only by its top-k tokens per position: what the teacher-logit cache stores and serves.

Every divergence accepts a :class:`SparseTeacher` where it takes dense teacher logits: the fused kernels
rebuild the teacher's full log-probabilities chunk by chunk (``dense_log_probs``), so no ``[B, K, T, V]``
teacher tensor is ever held, and with ``k == V`` the result equals the dense path.

What the cache keeps per position: the k largest log-probabilities at the cache temperature T_c and the log of
the mass left over (the tail), so the tail mass is exact at T_c. Two ways to treat the V - k tail tokens:

- ``spread`` (default): the tail mass is spread evenly over the tail tokens (the maximum-entropy guess), so the
  loss also pulls the student's tail towards flat.
- ``bucket``: the tail mass is kept as one bucket, spread over the tail tokens in the student's own proportions.
  For every f-divergence (FKL, RKL, SKL, SRKL, JSD) this is exactly the divergence between the two distributions
  coarsened to k + 1 outcomes (top-k and "the rest"), value and gradient: a lower bound of the dense value that
  says nothing about the tail's shape.

Measured on the tiny world (benchmarks/bench_teacher_cache.py, a trained student, V = 256): at k = 32 and 128
``spread`` is as close to the dense loss as ``bucket`` or closer, value and gradient, for every divergence (RKL-
type losses, which weigh the student's own tail, most: RKL's value error 4.7% against 26% at k = 32);
``bucket`` is closer only at k = 8.

At a loss temperature T != T_c the head is exact up to normalisation (log p_T = (T_c / T) log p_c + const);
the tail's tempered mass assumes its tokens are equally likely (exact at T = T_c and when k = V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["TAILS", "SparseTeacher"]

TAILS = ("bucket", "spread")
_LOG_FLOOR = -1.0e4  # as divergences._LOGIT_FLOOR: exp underflows to 0, 0 * log stays 0 instead of NaN


def index_dtype(vocab: int) -> torch.dtype:
    """int16 for every vocabulary up to 32767 tokens (MusicGen's 2048), else int32."""
    return torch.int16 if vocab <= 2**15 - 1 else torch.int32


@dataclass
class SparseTeacher:
    """Top-k teacher log-probabilities ``[..., k]`` with their token ids and the tail's log-mass ``[...]``.

    ``...`` is ``[B, K, T]`` in training. ``log_probs`` are at ``temperature`` (the cache's T_c); any float dtype
    (the cache stores fp16); ``indices`` any integer dtype (the cache stores int16).
    """

    indices: torch.Tensor
    log_probs: torch.Tensor
    tail_log_mass: torch.Tensor
    vocab: int
    temperature: float = 1.0
    tail: str = "spread"

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"distill.cache.tail={self.tail!r}: use one of {', '.join(TAILS)}")
        if self.indices.shape != self.log_probs.shape or self.indices.shape[:-1] != self.tail_log_mass.shape:
            raise ValueError(
                f"sparse teacher parts disagree: indices {tuple(self.indices.shape)}, log_probs "
                f"{tuple(self.log_probs.shape)}, tail_log_mass {tuple(self.tail_log_mass.shape)}"
            )
        if not 0 < self.k <= self.vocab:
            raise ValueError(f"top-k of {self.k} tokens from a vocabulary of {self.vocab}")

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The dense logits' shape this stands for: ``[..., V]``."""
        return torch.Size((*self.indices.shape[:-1], self.vocab))

    @property
    def device(self) -> torch.device:
        return self.log_probs.device

    def to(self, device: torch.device | str) -> SparseTeacher:
        return replace(
            self,
            indices=self.indices.to(device),
            log_probs=self.log_probs.to(device),
            tail_log_mass=self.tail_log_mass.to(device),
        )

    @classmethod
    @torch.no_grad()
    def from_logits(
        cls, logits: torch.Tensor, k: int, temperature: float = 1.0, tail: str = "spread"
    ) -> SparseTeacher:
        """Keep the top-k of ``log_softmax(logits / temperature)`` and the exact log-mass of the rest."""
        vocab = logits.shape[-1]
        if not 0 < k <= vocab:
            raise ValueError(f"distill.cache.k={k}: must lie in 1..{vocab} (the codebook size)")
        log_p = torch.log_softmax(logits.float().div(temperature).clamp_(min=_LOG_FLOOR), dim=-1)
        top = log_p.topk(k, dim=-1)
        # The tail's log-mass as a logsumexp of its own entries: exact even when the head holds almost all the
        # mass (1 - sum(head) would cancel catastrophically), and -inf when k == V.
        rest = log_p.scatter_(-1, top.indices, float("-inf")).logsumexp(-1)
        return cls(top.indices, top.values, rest, vocab, float(temperature), tail)

    def compact(self) -> SparseTeacher:
        """The storage format: int16 ids, fp16 log-probabilities (floored so fp16 holds them)."""
        return SparseTeacher(
            self.indices.to(index_dtype(self.vocab)),
            self.log_probs.clamp(min=_LOG_FLOOR).half(),
            self.tail_log_mass.clamp(min=_LOG_FLOOR)
            .where(torch.isfinite(self.tail_log_mass), -math.inf)
            .half(),
            self.vocab,
            self.temperature,
            self.tail,
        )

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened views ``[N, k]``, ``[N, k]``, ``[N]`` (N = positions), for the fused kernels."""
        k = self.k
        return self.indices.reshape(-1, k), self.log_probs.reshape(-1, k), self.tail_log_mass.reshape(-1)

    def _head_and_tail(
        self, log_probs: torch.Tensor, tail_log_mass: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(head log p ``[n, k]``, per-tail-token log p ``[n, 1]``, tail log-mass ``[n, 1]``) at ``temperature``."""
        scale = self.temperature / temperature
        head = log_probs.float() * scale
        tail_tokens = self.vocab - self.k
        if tail_tokens == 0:
            return head - head.logsumexp(-1, keepdim=True), None, None
        log_m = math.log(tail_tokens)
        per_token = (tail_log_mass.float().unsqueeze(-1) - log_m) * scale  # equally likely tail tokens
        total = per_token + log_m
        norm = torch.logaddexp(head.logsumexp(-1, keepdim=True), total)
        return head - norm, per_token - norm, total - norm

    def dense_log_probs(
        self,
        rows: slice,
        valid: torch.Tensor,
        temperature: float,
        student_log_probs: torch.Tensor,
    ) -> torch.Tensor:
        """The teacher's full log-probabilities ``[n, V]`` fp32 at ``temperature`` for positions ``rows``.

        ``valid [n]`` marks real positions (the rest become uniform, like the dense path's); the bucket tail
        follows ``student_log_probs`` ``[n, V]`` (a constant target: the student's shape, no gradient).
        """
        all_indices, all_log_probs, all_tail = self.rows()
        indices = all_indices[rows].long()
        head, per_token, total = self._head_and_tail(all_log_probs[rows], all_tail[rows], temperature)
        if per_token is None:
            out = torch.empty_like(student_log_probs)
        elif self.tail == "spread":
            out = per_token.expand_as(student_log_probs).clone()
        else:
            student_tail = student_log_probs.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
            out = student_log_probs - student_tail + total
        out.scatter_(-1, indices, head).clamp_(min=_LOG_FLOOR)
        out[~valid] = -math.log(self.vocab)
        return out

    @torch.no_grad()
    def label_log_probs(self, labels: torch.Tensor) -> torch.Tensor:
        """log p_teacher(label) at T = 1 ``[...]``: from the head if the label is there, else an equal share of the
        tail (the tail's tokens are not told apart); for the teacher's CE in validation."""
        head, per_token, _ = self._head_and_tail(self.log_probs, self.tail_log_mass, 1.0)
        hit = self.indices.long() == labels.unsqueeze(-1)
        from_head = head.masked_fill(~hit, float("-inf")).logsumexp(-1)
        if per_token is None:
            return from_head
        return torch.where(hit.any(-1), from_head, per_token.squeeze(-1))
