"""Per-position divergences between teacher and student codebook distributions for distillation.

Every function takes logits ``[B, K, T, V]`` (K codebooks) and a boolean ``valid [B, K, T]`` and compares
p = softmax(teacher / T) with q = softmax(student / T). Values are true divergences (entropy terms
included) so that numbers are comparable across losses; they are *not* multiplied by T^2 (the loss
modules do that).

Implementation: each divergence runs as one fused autograd function. The forward pass computes the
per-position value together with its analytic gradient w.r.t. the student logits and keeps only that
gradient (one fp32 ``[B, K, T, V]`` tensor per divergence term) instead of autograd's chain of
log-softmax / exp / logaddexp intermediates. The teacher is a constant target: no gradient flows to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "adaptive_kl",
    "adaptive_kl_weights",
    "adaptive_kl_with_weights",
    "forward_kl",
    "get_divergence",
    "jsd",
    "reduce_positions",
    "reverse_kl",
    "skewed_forward_kl",
    "skewed_kl_mix",
    "skewed_reverse_kl",
]

REDUCTIONS = ("mean", "none", "codebook")

# Scaled logits are clamped here before the softmax: far below any real logit (exp underflows to exactly 0
# in fp32 for any gap > ~104), but finite, so -inf / finfo.min masks give finite log-probabilities and
# every 0 * log(0) term is an honest 0 instead of NaN.
_LOGIT_FLOOR = -1.0e4

# Rows of [N, V] are processed in chunks of about this many elements: the temporaries of a chunk stay in
# cache and are recycled by the allocator, so a kernel's many elementwise steps cost no extra
# [B, K, T, V] buffers (and no page faults on CPU).
_CHUNK_ELEMENTS = 1 << 20

# A kernel maps (log_q, log_p, need_grad, **params) of one chunk ([n, V] fp32) to
# ((value, *extras), grad): per-row values [n] (only the first is differentiable; extras are logged
# quantities) and the gradient of the value w.r.t. the scaled student logits u = student / T
# ([n, V], None when need_grad is False).
Kernel = Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]


def _log_probs(logits: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of ``logits / T`` ([n, V]) with invalid rows set to a uniform distribution.

    Invalid positions may hold anything (padding garbage, NaN, all -inf rows); replacing them before the
    softmax keeps NaN out of both the value and the gradient.
    """
    x = (
        logits.float() / temperature
        if temperature != 1.0 or logits.dtype != torch.float32
        else logits.clone()
    )
    x.clamp_(min=_LOGIT_FLOOR)
    x.masked_fill_(~valid.unsqueeze(-1), 0.0)
    return torch.log_softmax(x, dim=-1)


def _rowsum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1)


def _centre(qg: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Softmax Jacobian: from q * dF/dq to dF/du = q*g - q * sum(q*g) (in place on ``qg``)."""
    return qg.sub_(q * qg.sum(-1, keepdim=True))


class _LogRatio:
    """d = log p - log q with z = exp(-|d|), shared by every mixture of p and q at one position.

    For a mixture m_w = w p + (1-w) q with 0 < w < 1, m_w / q = exp(relu(d)) * den_w where
    den_w = w s_p + (1-w) s_q, (s_p, s_q) = (1, z) if d > 0 else (z, 1). This is logaddexp written out:
    den_w >= min(w, 1-w) > 0, so log m_w is finite even where p and q both underflow to 0, and one exp
    serves every mixture weight (stage_mixed needs two). p / m_w = s_p / den_w and q / m_w = s_q / den_w
    follow without another exp and are bounded by 1 / w and 1 / (1-w).
    """

    def __init__(self, log_q: torch.Tensor, log_p: torch.Tensor) -> None:
        self.d = log_p - log_q
        self.pos = self.d > 0
        z = self.d.abs().neg_().exp_()
        self.s_p = torch.where(self.pos, 1.0, z)
        self.s_q = torch.where(self.pos, z, 1.0)
        self.relu_d = self.d.clamp(min=0.0)

    def mixture(self, w: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log(m_w / q), den_w) for 0 < w < 1."""
        den = self.s_p * w
        den.add_(self.s_q, alpha=1.0 - w)
        return den.log().add_(self.relu_d), den


def _fkl(log_q, log_p, q, p, need_grad):
    value = _rowsum((log_p - log_q).mul_(p))
    return value, (q - p if need_grad else None)


def _rkl(log_q, log_p, q, need_grad):
    qr = (log_q - log_p).mul_(q)
    value = _rowsum(qr)
    return value, (_centre(qr, q) if need_grad else None)


def _skl(ratio: _LogRatio, q, p, alpha, need_grad):
    """SKL_a = KL(p || a p + (1-a) q) = sum p (d - log(m/q)); dSKL/dq = -(1-a) p / m."""
    log_mq, den = ratio.mixture(alpha)
    value = _rowsum((ratio.d - log_mq).mul_(p))
    qg = ratio.s_p.div(den).mul_(q).mul_(-(1.0 - alpha)) if need_grad else None
    return value, qg


def _srkl(ratio: _LogRatio, q, alpha, need_grad):
    """SRKL_a = KL(q || (1-a) p + a q) = -sum q log(m/q); dSRKL/dq = log(q/m) + 1 - a q / m."""
    log_mq, den = ratio.mixture(1.0 - alpha)
    qh = log_mq.mul_(q).neg_()
    value = _rowsum(qh)
    if need_grad:  # the +1 cancels in the softmax Jacobian
        qh.sub_(ratio.s_q.div(den).mul_(q).mul_(alpha))
    return value, (qh if need_grad else None)


def _fkl_kernel(log_q, log_p, need_grad):
    value, grad = _fkl(log_q, log_p, log_q.exp(), log_p.exp(), need_grad)
    return (value,), grad


def _rkl_kernel(log_q, log_p, need_grad):
    value, grad = _rkl(log_q, log_p, log_q.exp(), need_grad)
    return (value,), grad


def _zero_kernel(log_q, log_p, need_grad):
    """A skewed divergence at a = 1 compares a distribution with itself."""
    return (log_q.new_zeros(log_q.shape[:-1]),), (torch.zeros_like(log_q) if need_grad else None)


def _skl_kernel(log_q, log_p, need_grad, alpha):
    if alpha == 0.0:
        return _fkl_kernel(log_q, log_p, need_grad)
    if alpha == 1.0:
        return _zero_kernel(log_q, log_p, need_grad)
    q = log_q.exp()
    value, qg = _skl(_LogRatio(log_q, log_p), q, log_p.exp(), alpha, need_grad)
    return (value,), (_centre(qg, q) if need_grad else None)


def _srkl_kernel(log_q, log_p, need_grad, alpha):
    if alpha == 0.0:
        return _rkl_kernel(log_q, log_p, need_grad)
    if alpha == 1.0:
        return _zero_kernel(log_q, log_p, need_grad)
    q = log_q.exp()
    value, qg = _srkl(_LogRatio(log_q, log_p), q, alpha, need_grad)
    return (value,), (_centre(qg, q) if need_grad else None)


def _mix_kernel(log_q, log_p, need_grad, alpha, w_fwd):
    """w SKL_a + (1-w) SRKL_a, plus both terms as extras, from one softmax pair and one exp(-|d|)."""
    q, p = log_q.exp(), log_p.exp()
    if alpha == 0.0:
        (skl, g_skl), (srkl, g_srkl) = _fkl(log_q, log_p, q, p, need_grad), _rkl(log_q, log_p, q, need_grad)
    else:
        ratio = _LogRatio(log_q, log_p)
        (skl, g_skl), (srkl, g_srkl) = _skl(ratio, q, p, alpha, need_grad), _srkl(ratio, q, alpha, need_grad)
        if need_grad:  # both are still q * dF/dq here: centre their sum once
            g_srkl = _centre(g_srkl.mul_(1.0 - w_fwd).add_(g_skl, alpha=w_fwd), q)
            g_skl = None
    value = skl * w_fwd + srkl * (1.0 - w_fwd)
    grad = None
    if need_grad:
        grad = g_srkl if g_skl is None else g_skl.mul_(w_fwd).add_(g_srkl, alpha=1.0 - w_fwd)
    return (value, skl, srkl), grad


def _jsd_kernel(log_q, log_p, need_grad, beta):
    if beta in (0.0, 1.0):  # the mixture equals one side: both terms vanish
        return _zero_kernel(log_q, log_p, need_grad)
    q, p = log_q.exp(), log_p.exp()
    ratio = _LogRatio(log_q, log_p)
    log_mq, _ = ratio.mixture(beta)
    value = _rowsum((ratio.d - log_mq).mul_(p)).mul_(beta)
    # dJSD/dq = (1-b) log(q/m): the mixture's own terms cancel exactly.
    qh = log_mq.mul_(q).mul_(-(1.0 - beta))
    value.add_(_rowsum(qh))
    return (value,), (_centre(qh, q) if need_grad else None)


def _akl_head_weight(q: torch.Tensor, p: torch.Tensor, mu: float) -> torch.Tensor:
    """w_head of AKL; tokens tied with the last head token all join the head."""
    sorted_p = p.sort(dim=-1, descending=True).values
    n_head = (sorted_p.cumsum(-1) <= mu).sum(-1, keepdim=True).clamp_(min=1)  # top-1 always in the head
    threshold = sorted_p.gather(-1, n_head - 1)
    del sorted_p
    gap = (p - q).abs_()
    total = _rowsum(gap)
    g_head = _rowsum(gap.masked_fill_(p < threshold, 0.0))
    # Identical distributions have no gap at all: split evenly (both divergences are 0 there anyway).
    return torch.where(total > 0, g_head / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)


def _akl_kernel(log_q, log_p, need_grad, mu):
    q, p = log_q.exp(), log_p.exp()
    w_head = _akl_head_weight(q, p, mu)
    fkl, g_fkl = _fkl(log_q, log_p, q, p, need_grad)
    rkl, g_rkl = _rkl(log_q, log_p, q, need_grad)
    value = w_head * fkl + (1.0 - w_head) * rkl
    grad = None
    if need_grad:  # the weights use q detached, so they are constants for the gradient
        grad = g_fkl.mul_(w_head.unsqueeze(-1)).add_(g_rkl.mul_((1.0 - w_head).unsqueeze(-1)))
    return (value, w_head), grad


class _FusedDivergence(torch.autograd.Function):
    """Runs a kernel chunk by chunk; keeps only d(value)/d(student logits) for the backward pass."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, valid, temperature, kernel, params):
        need_grad = ctx.needs_input_grad[0]
        vocab = student_logits.shape[-1]
        student = student_logits.detach().reshape(-1, vocab)
        teacher = teacher_logits.detach().reshape(-1, vocab)
        rows_valid = valid.reshape(-1)
        n = student.shape[0]
        grad = student.new_empty((n, vocab), dtype=torch.float32) if need_grad else None
        values: list[torch.Tensor] = []
        step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
        for start in range(0, max(n, 1), step):
            rows = slice(start, min(n, start + step))
            ok = rows_valid[rows]
            log_q = _log_probs(student[rows], ok, temperature)
            log_p = _log_probs(teacher[rows], ok, temperature)
            chunk_values, chunk_grad = kernel(log_q, log_p, need_grad, **params)
            if not values:
                values = [student.new_zeros(n, dtype=torch.float32) for _ in chunk_values]
            for out, value in zip(values, chunk_values, strict=True):
                out[rows] = value
            if need_grad:
                grad[rows] = chunk_grad
        outputs = tuple(v.masked_fill_(~rows_valid, 0.0).view(valid.shape) for v in values)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.temperature = temperature
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        if need_grad:
            ctx.save_for_backward(valid, grad)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value, *_):
        valid, grad = ctx.saved_tensors
        scale = (grad_value.float() / ctx.temperature).masked_fill_(~valid, 0.0).reshape(-1, 1)
        # In place: the saved gradient has no other reader (a second backward fails loudly on its version).
        grad_student = grad.mul_(scale).view(ctx.shape).to(ctx.dtype)
        return grad_student, None, None, None, None, None


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor, temperature):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)} (expected [B, K, T, V] for both)"
        )
    if valid.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"valid has shape {tuple(valid.shape)}, expected {tuple(student_logits.shape[:-1])} ([B, K, T])"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def reduce_positions(values: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-position values ``[B, K, T]`` (zeros where invalid) the way every divergence does.

    "mean": 0-d mean over valid positions; "codebook": ``[K]`` mean per codebook (0 if it has none valid);
    "none": unchanged.
    """
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.sum() / valid.sum().clamp(min=1)
    if reduction == "codebook":
        return values.sum(dim=(0, 2)) / valid.sum(dim=(0, 2)).clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")


def _run(
    kernel: Kernel,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    reduction: str,
    **params: float,
) -> Sequence[torch.Tensor]:
    _check(student_logits, teacher_logits, valid, temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")
    values = _FusedDivergence.apply(student_logits, teacher_logits, valid, float(temperature), kernel, params)
    return [reduce_positions(v, valid, reduction) for v in values]


def _unit_interval(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p || q): mode covering, teaches the student the teacher's global shape.

    Returns a 0-d tensor ("mean" over valid positions), ``[B, K, T]`` ("none", zeros where invalid) or
    ``[K]`` ("codebook", mean over each codebook's valid positions).
    """
    return _run(_fkl_kernel, student_logits, teacher_logits, valid, temperature, reduction)[0]


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(q || p): mode seeking, sharpens the student on the teacher's main modes."""
    return _run(_rkl_kernel, student_logits, teacher_logits, valid, temperature, reduction)[0]


def skewed_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """SKL_a = KL(p || a p + (1-a) q): forward KL that stays bounded where q underestimates p."""
    alpha = _unit_interval("alpha", alpha)
    return _run(_skl_kernel, student_logits, teacher_logits, valid, temperature, reduction, alpha=alpha)[0]


def skewed_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """SRKL_a = KL(q || (1-a) p + a q): reverse KL that stays bounded where p is (near) zero."""
    alpha = _unit_interval("alpha", alpha)
    return _run(_srkl_kernel, student_logits, teacher_logits, valid, temperature, reduction, alpha=alpha)[0]


def skewed_kl_mix(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    w_fwd: float,
    temperature: float = 1.0,
    alpha: float = 0.1,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w SKL_a + (1-w) SRKL_a, SKL_a, SRKL_a) in one pass, for the stage-mixed loss.

    Only the mixture is differentiable (the two terms are for logging); both share one softmax pair and
    one exp, and the backward pass keeps a single gradient tensor, so this costs far less than two calls.
    """
    alpha = _unit_interval("alpha", alpha)
    w_fwd = _unit_interval("w_fwd", w_fwd)
    mixed, skl, srkl = _run(
        _mix_kernel, student_logits, teacher_logits, valid, temperature, reduction, alpha=alpha, w_fwd=w_fwd
    )
    return mixed, skl, srkl


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalised JSD_b = b KL(p || m) + (1-b) KL(q || m), m = b p + (1-b) q; b = 0.5 is symmetric.

    Tends to b * FKL as b -> 0 and to (1-b) * RKL as b -> 1.
    """
    beta = _unit_interval("beta", beta)
    return _run(_jsd_kernel, student_logits, teacher_logits, valid, temperature, reduction, beta=beta)[0]


def adaptive_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    mu: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """AKL = w_head FKL + w_tail RKL, weights from where (head/tail of p) the student's error lies.

    The head holds the teacher's most likely tokens up to cumulative probability ``mu`` (top-1 always).
    """
    return adaptive_kl_with_weights(
        student_logits, teacher_logits, valid, temperature=temperature, mu=mu, reduction=reduction
    )[0]


def adaptive_kl_with_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    mu: float = 0.5,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(AKL, w_head) in one pass; w_head (not differentiable) is reduced like the value, for logging."""
    mu = _unit_interval("mu", mu)
    akl, w_head = _run(_akl_kernel, student_logits, teacher_logits, valid, temperature, reduction, mu=mu)
    return akl, w_head


@torch.no_grad()
def adaptive_kl_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    mu: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL's (w_head, w_tail), each ``[B, K, T]``, summing to 1 at valid positions; for logging and tests."""
    _, w_head = adaptive_kl_with_weights(
        student_logits, teacher_logits, valid, temperature=temperature, mu=mu, reduction="none"
    )
    return w_head, torch.where(valid, 1.0 - w_head, 0.0)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "skl": skewed_forward_kl,
    "srkl": skewed_reverse_kl,
    "jsd": jsd,
    "akl": adaptive_kl,
}


def get_divergence(name: str) -> Callable[..., torch.Tensor]:
    """Look a divergence up by exact name; unknown names list the known ones."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))}") from None
