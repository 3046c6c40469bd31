"""Teacher-forced fidelity of a quantized model against its full-precision reference.

Both models read the same captions and the same delayed codes; at every valid position we compare their
next-token distributions: top-1 agreement (per codebook and overall), KL(reference || quantized), the
relative logit error (the error's size relative to the logits' own spread: the same definition as the ONNX
export check, :func:`tinymusician.onnx.check.relative_logit_error`) and the largest absolute logit difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import MusicgenForConditionalGeneration

from tinymusician.distill.divergences import forward_kl
from tinymusician.models.musicgen import teacher_forcing

Batch = dict[str, torch.Tensor]


@dataclass
class Fidelity:
    top1_agree: float
    top1_agree_per_codebook: list[float]
    kl: float
    kl_per_codebook: list[float]
    max_logit_diff: float
    positions: int
    batches: int
    # ||d - mean_V d|| / ||r - mean_V r|| over valid positions (d = candidate - reference logits, r = reference):
    # 0 is identical, 0.1 is an error a tenth the size of the logits' variation; robust where top-1 is not
    # (near-tied logits of a random model flip on tiny errors).
    relative_error: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)

    def meets(
        self,
        min_top1_agree: float | None = None,
        max_kl: float | None = None,
        max_relative_error: float | None = None,
    ) -> bool:
        return (
            (min_top1_agree is None or self.top1_agree >= min_top1_agree)
            and (max_kl is None or self.kl <= max_kl)
            and (max_relative_error is None or self.relative_error <= max_relative_error)
        )


@torch.no_grad()
def teacher_forced_logits(
    model: MusicgenForConditionalGeneration, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits ``[B, K, T, V]`` and ``valid [B, K, T]`` for one batch (``codes``, ``input_ids``, ...)."""
    forcing = teacher_forcing(model, batch)
    return forcing.logits(model).float(), forcing.delayed.valid


class ReferenceLogits:
    """The full-precision model's logits on fixed batches, computed once and compared many times."""

    def __init__(self, model: MusicgenForConditionalGeneration, batches: Iterable[Batch]) -> None:
        self.batches: list[Batch] = list(batches)
        if not self.batches:
            raise ValueError("fidelity needs at least one batch; the data module gave none")
        model.eval()
        self.outputs = [teacher_forced_logits(model, batch) for batch in self.batches]

    @torch.no_grad()
    def compare(self, candidate: MusicgenForConditionalGeneration) -> Fidelity:
        candidate.eval()
        agree = kl = count = None
        max_diff, error_sq, spread_sq = 0.0, 0.0, 0.0
        for batch, (reference, valid) in zip(self.batches, self.outputs, strict=True):
            logits, _ = teacher_forced_logits(candidate, batch)
            same = (logits.argmax(-1) == reference.argmax(-1)) & valid
            per_position_kl = forward_kl(logits, reference, valid, reduction="none")
            batch_agree, batch_kl = same.sum(dim=(0, 2)).double(), per_position_kl.sum(dim=(0, 2)).double()
            batch_count = valid.sum(dim=(0, 2)).double()
            agree = batch_agree if agree is None else agree + batch_agree
            kl = batch_kl if kl is None else kl + batch_kl
            count = batch_count if count is None else count + batch_count
            if valid.any():
                diff = (logits - reference)[valid].double()
                max_diff = max(max_diff, float(diff.abs().nan_to_num(nan=float("inf")).max()))
                spread = reference[valid].double()
                error_sq += float((diff - diff.mean(-1, keepdim=True)).square().sum())
                spread_sq += float((spread - spread.mean(-1, keepdim=True)).square().sum())
        assert agree is not None and kl is not None and count is not None
        total = count.sum().clamp(min=1)
        return Fidelity(
            top1_agree=float(agree.sum() / total),
            top1_agree_per_codebook=_ratios(agree, count),
            kl=float(kl.sum() / total),
            kl_per_codebook=_ratios(kl, count),
            max_logit_diff=max_diff,
            positions=int(count.sum()),
            batches=len(self.batches),
            relative_error=(error_sq / spread_sq) ** 0.5 if spread_sq > 0 else float("nan"),
        )


def _ratios(values: torch.Tensor, counts: torch.Tensor) -> list[float]:
    return [float(v / c) if c > 0 else float("nan") for v, c in zip(values, counts, strict=True)]


def take_batches(loader: Iterable[Batch], limit: int | None) -> list[Batch]:
    """The first ``limit`` batches of a loader (all of them for ``None``)."""
    out: list[Batch] = []
    for batch in loader:
        if limit is not None and len(out) >= limit:
            break
        out.append(batch)
    return out


def compare_models(
    reference: MusicgenForConditionalGeneration,
    candidate: MusicgenForConditionalGeneration,
    batches: Sequence[Batch],
) -> Fidelity:
    return ReferenceLogits(reference, batches).compare(candidate)
