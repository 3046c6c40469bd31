"""Divergences against an independent float64 reference, plus their math properties and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from tinymusician.distill import divergences as div

B, K, T, V = 2, 3, 6, 11


pytestmark = pytest.mark.usefixtures("single_thread")


# name -> (function, parameter name, parameter values tested)
CASES = {
    "fkl": (div.forward_kl, None, [None]),
    "rkl": (div.reverse_kl, None, [None]),
    "skl": (div.skewed_forward_kl, "alpha", [0.1, 0.5, 0.9]),
    "srkl": (div.skewed_reverse_kl, "alpha", [0.1, 0.5, 0.9]),
    "jsd": (div.jsd, "beta", [0.1, 0.5, 0.8]),
    "akl": (div.adaptive_kl, "mu", [0.2, 0.5, 0.9]),
}
PARAMS = [(name, value) for name, (_, _, values) in CASES.items() for value in values]


def _call(name, student, teacher, valid, value=None, **kwargs):
    fn, key, _ = CASES[name]
    if key is not None and value is not None:
        kwargs[key] = value
    return fn(student, teacher, valid, **kwargs)


def _kl(a, log_a, log_b):
    return (a * (log_a - log_b)).sum(-1)


def reference(name, student, teacher, temperature=1.0, value=None):
    """Per-position divergence [B, K, T] in float64, straight from the textbook definitions."""
    log_q = torch.log_softmax(student.double() / temperature, -1)
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if name == "fkl":
        return _kl(p, log_p, log_q)
    if name == "rkl":
        return _kl(q, log_q, log_p)
    if name == "skl":
        return _kl(p, log_p, torch.log(value * p + (1 - value) * q))
    if name == "srkl":
        return _kl(q, log_q, torch.log((1 - value) * p + value * q))
    if name == "jsd":
        log_m = torch.log(value * p + (1 - value) * q)
        return value * _kl(p, log_p, log_m) + (1 - value) * _kl(q, log_q, log_m)
    if name == "akl":
        w_head = reference_head_weight(p, q, value)
        return w_head * _kl(p, log_p, log_q) + (1 - w_head) * _kl(q, log_q, log_p)
    raise KeyError(name)


def reference_head_weight(p, q, mu):
    sorted_p, order = p.sort(-1, descending=True)
    head_sorted = sorted_p.cumsum(-1) <= mu
    head_sorted[..., 0] = True
    head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
    gap = (p - q).abs().detach()
    g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
    return g_head / (g_head + g_tail)


def _inputs(seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, K, T, V, generator=g) * scale).to(dtype)
    teacher = (torch.randn(B, K, T, V, generator=g) * scale).to(dtype)
    valid = torch.rand(B, K, T, generator=g) > 0.3
    valid[0, 0, 0] = True
    return student, teacher, valid


@pytest.fixture(params=[True, False], ids=["chunked", "whole"])
def chunking(request, monkeypatch):
    """Run each test with tiny chunks (many per call) and with one chunk: results must not depend on it."""
    if request.param:
        monkeypatch.setitem(div._CHUNK_ELEMENTS, "cpu", 4 * V)
    return request.param


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize(("name", "value"), PARAMS)
def test_matches_float64_reference_value_and_gradient(name, value, temperature, chunking):
    student, teacher, valid = _inputs()
    s = student.clone().requires_grad_()
    out = _call(name, s, teacher, valid, value, temperature=temperature)
    out.backward()

    s64 = student.double().requires_grad_()
    per_position = reference(name, s64, teacher, temperature, value)
    expected = (per_position * valid).sum() / valid.sum()
    expected.backward()

    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "value"), PARAMS)
def test_non_negative_and_zero_on_identical_logits(name, value):
    student, teacher, valid = _inputs(scale=4.0)
    per_position = _call(name, student, teacher, valid, value, reduction="none")
    assert (per_position >= -1e-6).all()
    assert (per_position[valid] > 0).all()

    same = _call(name, teacher, teacher.clone(), valid, value, reduction="none")
    assert same.abs().max() < 1e-6


@pytest.mark.parametrize(("name", "value"), PARAMS)
def test_invalid_positions_change_nothing(name, value):
    student, teacher, valid = _inputs()
    s1 = student.clone().requires_grad_()
    out1 = _call(name, s1, teacher, valid, value, reduction="none")
    out1.sum().backward()

    # Padding garbage at invalid positions, including NaN and rows that are entirely -inf.
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[~valid] = torch.randn_like(garbage_s[~valid]) * 50
    garbage_t[~valid] = float("nan")
    first_invalid = (~valid).nonzero()[0].tolist()
    garbage_s[tuple(first_invalid)] = float("-inf")
    s2 = garbage_s.requires_grad_()
    out2 = _call(name, s2, garbage_t, valid, value, reduction="none")
    out2.sum().backward()

    assert torch.equal(out1, out2)
    assert (out2[~valid] == 0).all()
    assert torch.equal(s1.grad, s2.grad)
    assert (s2.grad[~valid] == 0).all()


@pytest.mark.parametrize(("name", "value"), PARAMS)
def test_codebook_reduction_is_per_codebook_mean(name, value):
    student, teacher, valid = _inputs()
    valid[:, 2] = False  # a codebook without any valid position reduces to 0
    per_position = _call(name, student, teacher, valid, value, reduction="none")
    per_codebook = _call(name, student, teacher, valid, value, reduction="codebook")
    mean = _call(name, student, teacher, valid, value, reduction="mean")

    assert per_position.shape == (B, K, T) and per_codebook.shape == (K,)
    for k in range(K):
        positions = per_position[:, k][valid[:, k]]
        expected = positions.mean() if positions.numel() else torch.tensor(0.0)
        torch.testing.assert_close(per_codebook[k], expected)
    torch.testing.assert_close(mean, per_position[valid].mean())


def test_no_valid_position_gives_zero_and_zero_gradient():
    student, teacher, valid = _inputs()
    s = student.clone().requires_grad_()
    out = div.forward_kl(s, teacher, torch.zeros_like(valid))
    out.backward()
    assert out.item() == 0.0
    assert (s.grad == 0).all()


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_skew_zero_is_plain_kl(temperature):
    student, teacher, valid = _inputs()
    kwargs = {"temperature": temperature, "reduction": "none"}
    fkl = div.forward_kl(student, teacher, valid, **kwargs)
    rkl = div.reverse_kl(student, teacher, valid, **kwargs)
    torch.testing.assert_close(div.skewed_forward_kl(student, teacher, valid, alpha=0.0, **kwargs), fkl)
    torch.testing.assert_close(div.skewed_reverse_kl(student, teacher, valid, alpha=0.0, **kwargs), rkl)
    # Tiny skews are still accurate (they differ from plain KL where q << a p, so compare with float64).
    for fn, name in ((div.skewed_forward_kl, "skl"), (div.skewed_reverse_kl, "srkl")):
        expected = reference(name, student, teacher, temperature, 1e-4) * valid
        torch.testing.assert_close(
            fn(student, teacher, valid, alpha=1e-4, **kwargs).double(), expected, rtol=1e-5, atol=1e-6
        )
    # alpha = 1 compares a distribution with itself.
    assert div.skewed_forward_kl(student, teacher, valid, alpha=1.0, **kwargs).abs().max() == 0


def test_skew_bounds_the_divergence():
    # SKL_a <= log(1/a) for any p, q (m >= a p): it stays finite where the student misses teacher mass.
    student, teacher, valid = _inputs(scale=30.0)
    for alpha in (0.1, 0.5):
        skl = div.skewed_forward_kl(student, teacher, valid, alpha=alpha, reduction="none")
        srkl = div.skewed_reverse_kl(student, teacher, valid, alpha=alpha, reduction="none")
        assert skl.max() <= math.log(1 / alpha) + 1e-5
        assert srkl.max() <= math.log(1 / alpha) + 1e-5


@pytest.mark.parametrize(("alpha", "w"), [(0.1, 0.0), (0.1, 0.35), (0.1, 1.0), (0.0, 0.6), (0.4, 0.8)])
def test_skewed_kl_mix_combines_both_terms(alpha, w):
    student, teacher, valid = _inputs()
    kwargs = {"temperature": 1.7, "alpha": alpha, "reduction": "none"}
    skl = div.skewed_forward_kl(student, teacher, valid, **kwargs)
    srkl = div.skewed_reverse_kl(student, teacher, valid, **kwargs)
    s = student.clone().requires_grad_()
    mixed, mix_skl, mix_srkl = div.skewed_kl_mix(s, teacher, valid, w_fwd=w, **kwargs)
    torch.testing.assert_close(mix_skl, skl)
    torch.testing.assert_close(mix_srkl, srkl)
    torch.testing.assert_close(mixed, w * skl + (1 - w) * srkl)
    assert not mix_skl.requires_grad and not mix_srkl.requires_grad

    mixed.sum().backward()
    s_ref = student.clone().requires_grad_()
    (
        w * div.skewed_forward_kl(s_ref, teacher, valid, **kwargs).sum()
        + (1 - w) * div.skewed_reverse_kl(s_ref, teacher, valid, **kwargs).sum()
    ).backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-6)


def test_jsd_limits():
    student, teacher, valid = _inputs()
    kwargs = {"reduction": "none"}
    fkl = div.forward_kl(student, teacher, valid, **kwargs)
    rkl = div.reverse_kl(student, teacher, valid, **kwargs)
    # b -> 0: m -> q, JSD_b = b FKL + O(b^2); b -> 1: JSD_b = (1-b) RKL + O((1-b)^2).
    b = 1e-5
    torch.testing.assert_close(
        div.jsd(student, teacher, valid, beta=b, **kwargs) / b, fkl, rtol=1e-2, atol=1e-4
    )
    torch.testing.assert_close(
        div.jsd(student, teacher, valid, beta=1 - b, **kwargs) / b, rkl, rtol=1e-2, atol=1e-4
    )
    assert div.jsd(student, teacher, valid, beta=0.0, **kwargs).abs().max() == 0
    assert div.jsd(student, teacher, valid, beta=1.0, **kwargs).abs().max() == 0


def test_symmetric_jsd_is_symmetric_and_at_most_ln2():
    student, teacher, valid = _inputs(scale=40.0)  # nearly disjoint one-hot distributions
    forward = div.jsd(student, teacher, valid, beta=0.5, reduction="none")
    backward = div.jsd(teacher, student, valid, beta=0.5, reduction="none")
    torch.testing.assert_close(forward, backward)
    assert forward.max() <= math.log(2) + 1e-6
    assert forward.max() > 0.5 * math.log(2)


def test_adaptive_kl_weights_and_bounds():
    student, teacher, valid = _inputs(scale=3.0)
    w_head, w_tail = div.adaptive_kl_weights(student, teacher, valid, mu=0.5)
    torch.testing.assert_close((w_head + w_tail)[valid], torch.ones(int(valid.sum())))
    assert ((w_head >= 0) & (w_head <= 1)).all()

    akl = div.adaptive_kl(student, teacher, valid, mu=0.5, reduction="none")
    fkl = div.forward_kl(student, teacher, valid, reduction="none")
    rkl = div.reverse_kl(student, teacher, valid, reduction="none")
    assert (akl >= torch.minimum(fkl, rkl) - 1e-6).all()
    assert (akl <= torch.maximum(fkl, rkl) + 1e-6).all()
    torch.testing.assert_close(akl, w_head * fkl + w_tail * rkl)

    # Identical distributions: no gap anywhere, an even split (and a zero divergence).
    w_head, w_tail = div.adaptive_kl_weights(teacher, teacher.clone(), valid)
    assert torch.equal(w_head[valid], torch.full_like(w_head[valid], 0.5))


@pytest.mark.parametrize("mu", [0.05, 0.5, 0.95])
def test_adaptive_kl_head_search_does_not_depend_on_the_top_k_shortcut(mu, monkeypatch):
    student, teacher, valid = _inputs(scale=1.0)  # flat teacher: many rows need the full sort
    expected = div.adaptive_kl_weights(student, teacher, valid, mu=mu)
    for top_k in (1, 3, V):
        monkeypatch.setattr(div, "_AKL_TOPK", top_k)
        got = div.adaptive_kl_weights(student, teacher, valid, mu=mu)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    log_p = torch.log_softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    torch.testing.assert_close(
        expected[0].double()[valid], reference_head_weight(log_p.exp(), q, mu)[valid], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "value"), [(name, values[0]) for name, (_, _, values) in CASES.items()])
def test_half_precision_inputs_are_upcast(name, value, dtype):
    student, teacher, valid = _inputs(dtype=dtype)
    s = student.clone().requires_grad_()
    out = _call(name, s, teacher, valid, value, temperature=2.0)
    out.backward()
    assert out.dtype == torch.float32
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    # Same numbers as fp32 on the (exactly representable) upcast inputs: no half-precision arithmetic.
    s32 = student.float().requires_grad_()
    ref = _call(name, s32, teacher.float(), valid, value, temperature=2.0)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s.grad.float(), s32.grad.to(dtype).float())


def _mask_tokens(student: torch.Tensor, teacher: torch.Tensor, where: str) -> torch.Tensor:
    """Set vocabulary entries 1, 4, 7 to -inf on the side(s) ``where`` names (in place); returns the mask."""
    masked = torch.zeros(V, dtype=torch.bool)
    masked[[1, 4, 7]] = True
    if where in ("both", "student"):
        student[..., masked] = float("-inf")
    if where in ("both", "teacher"):
        teacher[..., masked] = float("-inf")
    return masked


@pytest.mark.parametrize(("name", "value"), PARAMS)
@pytest.mark.parametrize("where", ["both", "teacher", "student"])
def test_minus_inf_logits_give_finite_values_and_gradients(name, value, where):
    student, teacher, valid = _inputs(scale=3.0)
    masked = _mask_tokens(student, teacher, where)
    teacher[0, 1, 1, 1] = torch.finfo(torch.float32).min  # Hugging Face style mask value
    s = student.clone().requires_grad_()
    out = _call(name, s, teacher, valid, value, reduction="none")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    if where == "both":  # masked on both sides = the same divergence over the remaining vocabulary
        expected = reference(name, student[..., ~masked], teacher[..., ~masked], 1.0, value) * valid
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "value"), PARAMS)
def test_underflowing_probabilities_stay_finite(name, value):
    student, teacher, valid = _inputs(scale=300.0)  # most probabilities are exactly 0 in fp32
    s = student.clone().requires_grad_()
    out = _call(name, s, teacher, valid, value, temperature=0.5)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("scale", [3.0, 300.0])
@pytest.mark.parametrize("where", ["none", "both", "teacher", "student"])
def test_skewed_kl_mix_matches_its_parts_at_the_extremes(scale, where):
    """The stage-mixed kernel computes both skews from one clamped exp: check it where that matters."""
    student, teacher, valid = _inputs(scale=scale)  # scale 300: most probabilities underflow to 0
    _mask_tokens(student, teacher, where)
    kwargs = {"alpha": 0.1, "reduction": "none"}
    s = student.clone().requires_grad_()
    mixed, mix_skl, mix_srkl = div.skewed_kl_mix(s, teacher, valid, w_fwd=0.3, **kwargs)
    mixed.sum().backward()
    assert torch.isfinite(mixed).all() and torch.isfinite(s.grad).all()
    s_ref = student.clone().requires_grad_()
    skl = div.skewed_forward_kl(s_ref, teacher, valid, **kwargs)
    srkl = div.skewed_reverse_kl(s_ref, teacher, valid, **kwargs)
    (0.3 * skl.sum() + 0.7 * srkl.sum()).backward()
    torch.testing.assert_close(mix_skl, skl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mix_srkl, srkl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-6)


def test_teacher_with_grad_is_a_constant_target():
    student, teacher, valid = _inputs()
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    for fn in div.DIVERGENCES.values():
        fn(s, t, valid).backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all()


def test_no_grad_needed_for_evaluation():
    student, teacher, valid = _inputs()
    with torch.no_grad():
        out = div.skewed_reverse_kl(student, teacher, valid)
    assert not out.requires_grad and torch.isfinite(out)


def test_registry_and_errors():
    assert set(div.DIVERGENCES) == {"fkl", "rkl", "skl", "srkl", "jsd", "akl"}
    assert div.get_divergence("jsd") is div.jsd
    with pytest.raises(ValueError, match="known: akl, fkl, jsd, rkl, skl, srkl"):
        div.get_divergence("kl")
    student, teacher, valid = _inputs()
    with pytest.raises(ValueError, match="differ in shape"):
        div.forward_kl(student, teacher[..., :-1], valid)
    with pytest.raises(ValueError, match="valid has shape"):
        div.forward_kl(student, teacher, valid[:, :, :-1])
    with pytest.raises(ValueError, match="bool"):
        div.forward_kl(student, teacher, valid.float())
    with pytest.raises(ValueError, match="reduction"):
        div.forward_kl(student, teacher, valid, reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        div.forward_kl(student, teacher, valid, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        div.skewed_forward_kl(student, teacher, valid, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        div.jsd(student, teacher, valid, beta=-0.1)
