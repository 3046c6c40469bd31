"""Distillation loss modules used by the LightningModule, chosen by exact name from ``LOSSES``.

Each loss returns only the KD term (already multiplied by T^2); the module adds ``lambda_ce * CE`` itself,
so that the CE computation lives in one place and "ce" (no teacher) needs no special casing there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tinymusician.config import to_plain
from tinymusician.distill import divergences as div
from tinymusician.distill.schedule import StageScheduler, check_schedule

__all__ = ["LOSSES", "DistillationLoss", "KDTerm", "build_loss"]


@dataclass
class KDTerm:
    """The KD part of the loss for one batch."""

    value: torch.Tensor  # 0-d, KD loss times T^2 (not times lambda_kd)
    per_codebook: torch.Tensor  # [K], same scaling, detached
    logs: dict[str, float] = field(default_factory=dict)  # scheduler state: temperature, kd_weight_fwd, stage


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"loss.{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive(key: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"loss.{key} must be a finite number > 0, got {value!r}")
    return float(value)


def _unit(key: str, value: Any, *, open_right: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (open_right and value == 1.0):
        interval = "[0, 1)" if open_right else "[0, 1]"
        raise ValueError(f"loss.{key} must lie in {interval}, got {value!r}")
    return float(value)


class DistillationLoss(torch.nn.Module):
    """Base class: the KD term between student and teacher logits ``[B, K, T, V]`` at training progress s."""

    requires_teacher: ClassVar[bool] = True
    # > 1: the targets are the teacher's classifier-free-guided distribution at this scale (the module mixes the
    # teacher's conditional and unconditional logits), so the student learns to sample it in one pass.
    guidance_scale: float = 1.0

    def __init__(self, lambda_ce: float = 1.0, lambda_kd: float = 1.0) -> None:
        super().__init__()
        self.lambda_ce = _non_negative("lambda_ce", lambda_ce)
        self.lambda_kd = _non_negative("lambda_kd", lambda_kd)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        valid: torch.Tensor,
        progress: float,
    ) -> KDTerm:
        raise NotImplementedError


class NoDistillation(DistillationLoss):
    """ "ce": the plain fine-tuning baseline; no teacher is loaded and the KD term is 0."""

    requires_teacher: ClassVar[bool] = False

    def __init__(self, lambda_ce: float = 1.0, lambda_kd: float = 0.0) -> None:
        if lambda_kd != 0:
            raise ValueError(f"loss.lambda_kd must be 0 for the 'ce' loss (no teacher), got {lambda_kd!r}")
        super().__init__(lambda_ce=lambda_ce, lambda_kd=0.0)

    def forward(self, student_logits, teacher_logits, valid, progress) -> KDTerm:
        zero = student_logits.new_zeros((), dtype=torch.float32)
        per_codebook = student_logits.new_zeros(student_logits.shape[1], dtype=torch.float32)
        return KDTerm(zero, per_codebook, {"temperature": 1.0, "kd_weight_fwd": 0.0, "stage": 0})


def _kd_term(per_position: torch.Tensor, valid: torch.Tensor, temperature: float, logs) -> KDTerm:
    scale = temperature**2
    value = div.reduce_positions(per_position, valid, "mean") * scale
    per_codebook = div.reduce_positions(per_position.detach(), valid, "codebook") * scale
    return KDTerm(value, per_codebook, logs)


class DivergenceLoss(DistillationLoss):
    """One divergence at a constant temperature."""

    divergence: ClassVar[Callable[..., torch.Tensor]]
    kd_weight_fwd: ClassVar[float]  # 1 for forward-type (mode covering), 0 for reverse-type

    def __init__(self, lambda_ce: float = 1.0, lambda_kd: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__(lambda_ce=lambda_ce, lambda_kd=lambda_kd)
        self.temperature = _positive("temperature", temperature)

    def _params(self) -> dict[str, float]:
        return {}

    def _fwd_weight(self) -> float:
        return self.kd_weight_fwd

    def forward(self, student_logits, teacher_logits, valid, progress) -> KDTerm:
        per_position = type(self).divergence(
            student_logits,
            teacher_logits,
            valid,
            temperature=self.temperature,
            reduction="none",
            **self._params(),
        )
        logs = {"temperature": self.temperature, "kd_weight_fwd": self._fwd_weight(), "stage": 0}
        return _kd_term(per_position, valid, self.temperature, logs)

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self._params().items())
        return f"lambda_ce={self.lambda_ce}, lambda_kd={self.lambda_kd}, temperature={self.temperature}" + (
            f", {params}" if params else ""
        )


class ForwardKLLoss(DivergenceLoss):
    divergence = staticmethod(div.forward_kl)
    kd_weight_fwd = 1.0


class ReverseKLLoss(DivergenceLoss):
    divergence = staticmethod(div.reverse_kl)
    kd_weight_fwd = 0.0


class _SkewedLoss(DivergenceLoss):
    def __init__(self, lambda_ce=1.0, lambda_kd=1.0, temperature=1.0, alpha: float = 0.1) -> None:
        super().__init__(lambda_ce=lambda_ce, lambda_kd=lambda_kd, temperature=temperature)
        # alpha = 1 makes both skewed divergences identically 0: almost certainly a config mistake.
        self.alpha = _unit("alpha", alpha, open_right=True)

    def _params(self) -> dict[str, float]:
        return {"alpha": self.alpha}


class SkewedForwardKLLoss(_SkewedLoss):
    divergence = staticmethod(div.skewed_forward_kl)
    kd_weight_fwd = 1.0


class SkewedReverseKLLoss(_SkewedLoss):
    divergence = staticmethod(div.skewed_reverse_kl)
    kd_weight_fwd = 0.0


class JSDLoss(DivergenceLoss):
    """Generalised JSD; logs beta as the forward weight (the weight of KL(p || m))."""

    divergence = staticmethod(div.jsd)

    def __init__(self, lambda_ce=1.0, lambda_kd=1.0, temperature=1.0, beta: float = 0.5) -> None:
        super().__init__(lambda_ce=lambda_ce, lambda_kd=lambda_kd, temperature=temperature)
        if not (isinstance(beta, int | float) and 0.0 < beta < 1.0):
            raise ValueError(f"loss.beta must lie in (0, 1) (the JSD vanishes at 0 and 1), got {beta!r}")
        self.beta = float(beta)

    def _params(self) -> dict[str, float]:
        return {"beta": self.beta}

    def _fwd_weight(self) -> float:
        return self.beta


class AdaptiveKLLoss(DivergenceLoss):
    """AKL; logs the mean head weight (the FKL share) over valid positions as ``kd_weight_fwd``."""

    divergence = staticmethod(div.adaptive_kl)

    def __init__(self, lambda_ce=1.0, lambda_kd=1.0, temperature=1.0, mu: float = 0.5) -> None:
        super().__init__(lambda_ce=lambda_ce, lambda_kd=lambda_kd, temperature=temperature)
        self.mu = _unit("mu", mu)

    def _params(self) -> dict[str, float]:
        return {"mu": self.mu}

    def forward(self, student_logits, teacher_logits, valid, progress) -> KDTerm:
        per_position, w_head = div.adaptive_kl_with_weights(
            student_logits, teacher_logits, valid, temperature=self.temperature, mu=self.mu, reduction="none"
        )
        w_fwd = float(div.reduce_positions(w_head, valid, "mean"))
        logs = {"temperature": self.temperature, "kd_weight_fwd": w_fwd, "stage": 0}
        return _kd_term(per_position, valid, self.temperature, logs)


_SCHEDULE_KEYS = {"global_until": 0.3, "refine_from": 0.6, "w_min": 0.2}
_TEMPERATURE_KEYS = {"start": 2.0, "end": 1.0, "anneal": "cosine"}


def _nested(key: str, given: Mapping[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    if given is not None and not isinstance(given, Mapping):
        raise ValueError(
            f"loss.{key} must be a mapping with keys {', '.join(defaults)} for this loss, got {given!r}"
        )
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(f'loss.{key}.{k}' for k in unknown)}; "
            f"known: {', '.join(f'loss.{key}.{k}' for k in defaults)}"
        )
    return {**defaults, **given}


class StageMixedLoss(DistillationLoss):
    """The paper's loss: [w(s) SKL_a + (1 - w(s)) SRKL_a] * T(s)^2 with a ``StageScheduler``.

    Forward-skewed KL first learns the teacher's global shape; the weight then moves to the reverse-skewed
    KL, which sharpens the student on the teacher's modes, while the temperature anneals.
    """

    def __init__(
        self,
        lambda_ce: float = 1.0,
        lambda_kd: float = 1.0,
        alpha: float = 0.1,
        schedule: Mapping[str, Any] | None = None,
        temperature: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(lambda_ce=lambda_ce, lambda_kd=lambda_kd)
        self.alpha = _unit("alpha", alpha, open_right=True)
        sched = _nested("schedule", schedule, _SCHEDULE_KEYS)
        temp = _nested("temperature", temperature, _TEMPERATURE_KEYS)
        kwargs = {
            "global_until": sched["global_until"],
            "refine_from": sched["refine_from"],
            "w_min": sched["w_min"],
            "t_max": temp["start"],
            "t_min": temp["end"],
            "anneal": temp["anneal"],
        }
        names = {
            **{k: f"loss.schedule.{k}" for k in _SCHEDULE_KEYS},
            "t_max": "loss.temperature.start",
            "t_min": "loss.temperature.end",
            "anneal": "loss.temperature.anneal",
        }
        check_schedule(**kwargs, names=names)
        self.scheduler = StageScheduler(**kwargs)

    def forward(self, student_logits, teacher_logits, valid, progress) -> KDTerm:
        state = self.scheduler(progress)
        w, t = state.w_fwd, state.temperature
        kwargs = {"temperature": t, "alpha": self.alpha, "reduction": "none"}
        # Outside the transition one term has weight 0: skip it rather than compute and discard it.
        if w == 1.0:
            per_position = div.skewed_forward_kl(student_logits, teacher_logits, valid, **kwargs)
        elif w == 0.0:
            per_position = div.skewed_reverse_kl(student_logits, teacher_logits, valid, **kwargs)
        else:
            per_position, _, _ = div.skewed_kl_mix(student_logits, teacher_logits, valid, w_fwd=w, **kwargs)
        logs = {"temperature": t, "kd_weight_fwd": w, "stage": state.stage}
        return _kd_term(per_position, valid, t, logs)

    def extra_repr(self) -> str:
        return f"lambda_ce={self.lambda_ce}, lambda_kd={self.lambda_kd}, alpha={self.alpha}, {self.scheduler}"


LOSSES: dict[str, type[DistillationLoss]] = {
    "ce": NoDistillation,
    "fkl": ForwardKLLoss,
    "rkl": ReverseKLLoss,
    "skl": SkewedForwardKLLoss,
    "srkl": SkewedReverseKLLoss,
    "jsd": JSDLoss,
    "akl": AdaptiveKLLoss,
    "stage_mixed": StageMixedLoss,
}


def check_guidance_scale(value: Any) -> float:
    """``loss.guidance_scale``: 1 distils the conditional teacher, s > 1 its guided distribution."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 1:
        raise ValueError(
            f"loss.guidance_scale must be a finite number >= 1 (1: the conditional teacher; 3: MusicGen's "
            f"classifier-free guidance), got {value!r}"
        )
    return float(value)


def configured_guidance_scale(loss_cfg: Mapping[str, Any] | None) -> float:
    """A loss config's ``guidance_scale`` (1 when it has none): what the teacher's targets are, for the parts of a
    run that read the config rather than the built loss (the logit cache's key, the memory plan, the summary)."""
    value = (loss_cfg or {}).get("guidance_scale")
    return 1.0 if value is None else float(value)


def build_loss(name: str, guidance_scale: float = 1.0, **params: Any) -> DistillationLoss:
    """Build a loss by exact name; fail loudly (naming ``loss.<key>``) on unknown names or parameters.

    ``guidance_scale`` is every KD loss's: which teacher distribution the divergence is taken against.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    cls = LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(f'loss.{k}' for k in unknown)} for loss {name!r}; "
            f"accepted: {', '.join(f'loss.{k}' for k in [*accepted, 'guidance_scale'])}"
        )
    scale = check_guidance_scale(to_plain(guidance_scale))
    if scale != 1.0 and not cls.requires_teacher:
        raise ValueError(
            f"loss.guidance_scale={guidance_scale} with loss={name!r}: guidance distillation needs a teacher; "
            "pick a KD loss (e.g. loss=fkl) or drop loss.guidance_scale"
        )
    loss = cls(**{k: to_plain(v) for k, v in params.items()})
    loss.guidance_scale = scale
    return loss
