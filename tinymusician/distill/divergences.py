"""Per-position divergences between teacher and student codebook distributions for distillation.

Every function takes logits ``[B, K, T, V]`` (K codebooks) and a boolean ``valid [B, K, T]`` and compares
p = softmax(teacher / T) with q = softmax(student / T). Values are true divergences (entropy terms
included) so that numbers are comparable across losses; they are *not* multiplied by T^2 (the loss
modules do that).

Implementation: each divergence runs as one fused autograd function. The forward pass computes the
per-position value together with its analytic gradient w.r.t. the student logits, chunk by chunk over
positions, and keeps only that gradient (one fp32 ``[B, K, T, V]`` tensor, even for the stage-mixed pair)
instead of autograd's chain of log-softmax / exp / logaddexp intermediates; the backward pass just scales
it. The teacher is dense logits or a :class:`~tinymusician.distill.sparse.SparseTeacher` (top-k log-probabilities
from the teacher-logit cache), rebuilt per chunk. Consequences: the teacher is a constant target (no gradient flows to it) and there is no double
backward. Where the student puts -inf on a token the teacher gives mass (a truly infinite KL), the logit
floor below makes the value large (~1e4 * p) but finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from tinymusician.distill.sparse import SparseTeacher

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "adaptive_kl",
    "adaptive_kl_weights",
    "adaptive_kl_with_weights",
    "chunk_elements",
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

# Rows of [N, V] are processed in chunks of about this many elements (per device type): the temporaries
# of a chunk are small and recycled by the allocator, so a kernel's many elementwise steps cost no extra
# [B, K, T, V] buffers (and on CPU no page faults); much smaller chunks pay per-op thread-pool overhead.
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_DEFAULT = 1 << 24  # accelerators: fewer, larger kernels


def chunk_elements(device_type: str) -> int:
    """Elements of one chunk of ``[N, V]`` rows on ``device_type``: what the memory plan counts per chunk."""
    return _CHUNK_ELEMENTS.get(device_type, _CHUNK_ELEMENTS_DEFAULT)


_AKL_TOPK = 64
_MIX_CLAMP = 60.0  # |log(p / q)| bound in the stage-mixed kernel (see _mix_kernel)

# A kernel maps (log_q, log_p, grad_out, **params) of one chunk ([n, V] fp32) to per-row values
# (value, *extras), each [n]; only the value is differentiable, extras are logged quantities. When grad_out
# ([n, V]) is given, the kernel writes d(value)/du into it, u = student / T the scaled student logits.
Kernel = Callable[..., tuple[torch.Tensor, ...]]


def _log_probs(logits: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of ``logits / T`` ([n, V]) with invalid rows set to a uniform distribution.

    Invalid positions may hold anything (padding garbage, NaN, all -inf rows); replacing them before the
    softmax keeps NaN out of both the value and the gradient.
    """
    if temperature != 1.0 or logits.dtype != torch.float32:
        x = logits.float().div_(temperature) if logits.dtype != torch.float32 else logits / temperature
        x.clamp_(min=_LOGIT_FLOOR)
    else:
        x = logits.clamp(min=_LOGIT_FLOOR)
    if x.device.type == "cpu":
        x[~valid] = 0.0  # touches the (few) invalid rows only
    else:
        x.masked_fill_(~valid.unsqueeze(-1), 0.0)  # no host sync on accelerators
    return torch.log_softmax(x, dim=-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a * b per row, without a product temporary."""
    return torch.linalg.vecdot(a, b)


def _centre(qg: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """Softmax Jacobian: dF/du = q*g - q * sum(q*g), from qg = q * dF/dq, written into ``out``."""
    torch.addcmul(qg, q, qg.sum(-1, keepdim=True), value=-1.0, out=out)


def _log_mix(x: torch.Tensor, w: float) -> torch.Tensor:
    """log(w e^x + (1 - w)) for 0 < w < 1: how mixtures of p and q enter, relative to one side.

    This is logaddexp(log w + x, log(1-w)) = log(1-w) + softplus(x + log(w / (1-w))) (softplus(t) is
    logaddexp(0, t)): in log space it is finite even where both probabilities underflow to 0, unlike
    log(w p + (1-w) q).
    """
    return torch.nn.functional.softplus(x + math.log(w / (1.0 - w))).add_(math.log1p(-w))


def _fkl_kernel(log_q, log_p, grad_out):
    p = log_p.exp()
    value = _dot(p, log_p - log_q)
    if grad_out is not None:
        torch.sub(log_q.exp(), p, out=grad_out)
    return (value,)


def _rkl_kernel(log_q, log_p, grad_out):
    q = log_q.exp()
    qr = (log_q - log_p).mul_(q)
    value = qr.sum(-1)
    if grad_out is not None:
        _centre(qr, q, grad_out)
    return (value,)


def _zero_kernel(log_q, log_p, grad_out):
    """A skewed divergence at a = 1 (or a JSD at b in {0, 1}) compares a distribution with itself."""
    if grad_out is not None:
        grad_out.zero_()
    return (log_q.new_zeros(log_q.shape[:-1]),)


# Skewed KLs, 0 < a < 1, with d = log p - log q and k = log((1-a) / a). In log space, the mixtures are
#   log(m1 / p) = log(a + (1-a) e^-d) = log a - log sigmoid(d - k),   m1 = a p + (1-a) q   (SKL_a)
#   log(m2 / q) = log(a + (1-a) e^d)  = log a - log sigmoid(-d - k),  m2 = (1-a) p + a q   (SRKL_a)
# (logaddexp(log a + log p, log(1-a) + log q) rewritten). log sigmoid is finite everywhere, its exp gives the
# ratios the gradients need (a p / m1 and a q / m2), and nothing takes the log of a probability-space sum.
# Gradients are built as q * dF/dq up to a constant per row: the centring (softmax Jacobian) removes any
# c * q term, so additive constants such as -log a are left out of them.


def _skl_parts(d, p, q, alpha, need_grad):
    """SKL value and q * dSKL/dq up to the factor -(1-a)/a: q * (a p / m1) (uncentred)."""
    log_ratio = torch.nn.functional.logsigmoid(d - math.log((1.0 - alpha) / alpha))  # log(a p / m1)
    ratio = log_ratio.exp() if need_grad else None
    value = _dot(p, log_ratio.sub_(math.log(alpha)))  # sum p log(p / m1)
    return value, ratio.mul_(q) if need_grad else None


def _srkl_parts(d, q, alpha, need_grad):
    """SRKL value and q * dSRKL/dq = q (log(q / m2) - a q / m2) (uncentred, constants left out)."""
    log_ratio = torch.nn.functional.logsigmoid(torch.rsub(d, -math.log((1.0 - alpha) / alpha)))  # log(a q/m2)
    ratio = log_ratio.exp() if need_grad else None
    log_qm = log_ratio.sub_(math.log(alpha))
    value = _dot(q, log_qm)
    return value, log_qm.sub_(ratio).mul_(q) if need_grad else None


def _skl_kernel(log_q, log_p, grad_out, alpha):
    if alpha == 0.0:
        return _fkl_kernel(log_q, log_p, grad_out)
    if alpha == 1.0:
        return _zero_kernel(log_q, log_p, grad_out)
    q, p = log_q.exp(), log_p.exp()
    value, qg = _skl_parts(log_p - log_q, p, q, alpha, grad_out is not None)
    if grad_out is not None:
        _centre(qg.mul_(-(1.0 - alpha) / alpha), q, grad_out)
    return (value,)


def _srkl_kernel(log_q, log_p, grad_out, alpha):
    if alpha == 0.0:
        return _rkl_kernel(log_q, log_p, grad_out)
    if alpha == 1.0:
        return _zero_kernel(log_q, log_p, grad_out)
    q = log_q.exp()
    value, qg = _srkl_parts(log_p - log_q, q, alpha, grad_out is not None)
    if grad_out is not None:
        _centre(qg, q, grad_out)
    return (value,)


def _mix_kernel(log_q, log_p, grad_out, alpha, w_fwd):
    """w SKL_a + (1-w) SRKL_a with both terms as extras, from one softmax pair and one centring."""
    if alpha == 0.0:
        skl, srkl = _fkl_kernel(log_q, log_p, None)[0], _rkl_kernel(log_q, log_p, None)[0]
        if grad_out is not None:  # q - p and q (r - RKL), r = log q - log p
            q, p = log_q.exp(), log_p.exp()
            qg = (log_q - log_p).mul_(q).mul_(1.0 - w_fwd).sub_(p, alpha=w_fwd)
            _centre(qg, q, grad_out)  # the centring of -w p is -w p + w q: exactly FKL's gradient
    else:
        # Both skews from one exp: with e = p / q and k = (1-a)/a, a p / m1 = 1 / (1 + k / e) and
        # a q / m2 = 1 / (1 + k e). log1p keeps the logs accurate at both ends. |log(p/q)| is clamped at 60:
        # beyond it the affected term is weighted by the smaller probability (< e^-60 of the other), so the
        # values and gradients move by less than fp32 resolution.
        k, log_a = (1.0 - alpha) / alpha, math.log(alpha)
        q, p = log_q.exp(), log_p.exp()
        ratio = (log_p - log_q).clamp_(-_MIX_CLAMP, _MIX_CLAMP).exp_()  # p / q
        k_p_q = ratio * k
        k_q_p = ratio.reciprocal_().mul_(k)
        skl = _dot(p, torch.log1p(k_q_p).add_(log_a).neg_())  # sum p log(p / m1)
        log_qm = torch.log1p(k_p_q).add_(log_a).neg_()  # log(q / m2)
        srkl = _dot(q, log_qm)
        if grad_out is not None:
            # q dF/dq, constants left out (the centring removes them): SRKL q (log(q/m2) - a q/m2), SKL -k q a p/m1
            r2 = k_p_q.add_(1.0).reciprocal_()
            r1 = k_q_p.add_(1.0).reciprocal_()
            qg = log_qm.sub_(r2).mul_(1.0 - w_fwd).add_(r1, alpha=-w_fwd * k).mul_(q)
            _centre(qg, q, grad_out)
    value = skl * w_fwd + srkl * (1.0 - w_fwd)
    return value, skl, srkl


def _jsd_kernel(log_q, log_p, grad_out, beta):
    if beta in (0.0, 1.0):  # the mixture equals one side: both terms vanish
        return _zero_kernel(log_q, log_p, grad_out)
    q, p = log_q.exp(), log_p.exp()
    d = log_p - log_q
    # Express m = b p + (1-b) q relative to the side it is closer to: the log-ratio to that side is then
    # small and accurate, instead of a small difference of O(1) fp32 numbers when b is near 0 or 1.
    if beta <= 0.5:
        log_qm = _log_mix(d, beta).neg_()  # log(q / m)
        log_pm = d + log_qm
    else:
        log_pm = _log_mix(d.neg(), 1.0 - beta).neg_()  # log(p / m)
        log_qm = log_pm - d
    value = _dot(p, log_pm).mul_(beta)
    # dJSD/dq = (1-b) log(q / m): the mixture's own terms cancel exactly.
    qh = log_qm.mul_(q).mul_(1.0 - beta)
    value.add_(qh.sum(-1))
    if grad_out is not None:
        _centre(qh, q, grad_out)
    return (value,)


def _akl_threshold(p: torch.Tensor, mu: float) -> torch.Tensor:
    """Smallest teacher probability in the head, per row ([n, 1]); the head is every token with p >= it.

    A full sort of V entries per position is the cost of AKL, so look in the top 64 first: the head ends
    there whenever those tokens hold more than mu of the mass (a peaked teacher); only flatter rows get
    sorted in full.
    """

    def threshold(sorted_p: torch.Tensor) -> torch.Tensor:
        n_head = (sorted_p.cumsum(-1) <= mu).sum(-1, keepdim=True).clamp_(min=1)  # top-1 always in the head
        return sorted_p.gather(-1, n_head - 1)

    top = p.topk(min(_AKL_TOPK, p.shape[-1]), dim=-1).values
    result = threshold(top)
    flat = (top.sum(-1) <= mu).nonzero().squeeze(-1)
    if flat.numel():
        result[flat] = threshold(p[flat].sort(dim=-1, descending=True).values)
    return result


def _akl_head_weight(q: torch.Tensor, p: torch.Tensor, mu: float) -> torch.Tensor:
    """w_head of AKL; tokens tied with the last head token all join the head."""
    gap = (p - q).abs_()
    total = gap.sum(-1)
    g_head = gap.masked_fill_(p < _akl_threshold(p, mu), 0.0).sum(-1)
    # Identical distributions have no gap at all: split evenly (both divergences are 0 there anyway).
    return torch.where(total > 0, g_head / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)


def _akl_kernel(log_q, log_p, grad_out, mu):
    q, p = log_q.exp(), log_p.exp()
    w_head = _akl_head_weight(q, p, mu)
    w_tail = 1.0 - w_head
    fkl = _dot(p, log_p - log_q)
    qr = (log_q - log_p).mul_(q)
    rkl = qr.sum(-1)
    if grad_out is not None:  # the weights use q detached, so they are constants for the gradient
        qg = qr.mul_(w_tail.unsqueeze(-1)).sub_(p * w_head.unsqueeze(-1))
        _centre(qg, q, grad_out)  # centring -w_head p gives w_head (q - p), FKL's gradient
    return w_head * fkl + w_tail * rkl, w_head


class _FusedDivergence(torch.autograd.Function):
    """Runs a kernel chunk by chunk; keeps only d(value)/d(student logits) for the backward pass."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, valid, temperature, kernel, params):
        need_grad = ctx.needs_input_grad[0]
        vocab = student_logits.shape[-1]
        student = student_logits.detach().reshape(-1, vocab)
        sparse = isinstance(teacher_logits, SparseTeacher)
        teacher = teacher_logits if sparse else teacher_logits.detach().reshape(-1, vocab)
        rows_valid = valid.reshape(-1)
        n = student.shape[0]
        grad = student.new_empty((n, vocab), dtype=torch.float32) if need_grad else None
        values: list[torch.Tensor] = []
        chunk = chunk_elements(student.device.type)
        step = max(1, chunk // max(vocab, 1))
        for start in range(0, max(n, 1), step):
            rows = slice(start, min(n, start + step))
            ok = rows_valid[rows]
            log_q = _log_probs(student[rows], ok, temperature)
            if sparse:
                log_p = teacher.dense_log_probs(rows, ok, temperature, log_q)
            else:
                log_p = _log_probs(teacher[rows], ok, temperature)
            chunk_values = kernel(log_q, log_p, grad[rows] if need_grad else None, **params)
            if not values:
                values = [student.new_zeros(n, dtype=torch.float32) for _ in chunk_values]
            for out, value in zip(values, chunk_values, strict=True):
                out[rows] = value
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


Teacher = torch.Tensor | SparseTeacher  # dense logits [B, K, T, V] or the cache's top-k


def _check(student_logits: torch.Tensor, teacher_logits: Teacher, valid: torch.Tensor, temperature):
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
    teacher_logits: Teacher,
    valid: torch.Tensor,
    temperature: float,
    reduction: str,
    **params: float,
) -> Sequence[torch.Tensor]:
    _check(student_logits, teacher_logits, valid, temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")
    # Autocast (trainer.precision=bf16-mixed / 16-mixed) would round the kernels' dot products (vecdot) to
    # half precision: values and gradients stay fp32 whatever precision the models ran in.
    with torch.autocast(student_logits.device.type, enabled=False):
        values = _FusedDivergence.apply(
            student_logits, teacher_logits, valid, float(temperature), kernel, params
        )
        return [reduce_positions(v, valid, reduction) for v in values]


def _unit_interval(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
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
    teacher_logits: Teacher,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(q || p): mode seeking, sharpens the student on the teacher's main modes."""
    return _run(_rkl_kernel, student_logits, teacher_logits, valid, temperature, reduction)[0]


def skewed_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
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
    teacher_logits: Teacher,
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
    teacher_logits: Teacher,
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
    teacher_logits: Teacher,
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
    teacher_logits: Teacher,
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
    teacher_logits: Teacher,
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
    teacher_logits: Teacher,
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
