"""The sparse (top-k) teacher: with k = V every divergence equals the dense path, value and gradient; for
smaller k the bucket tail is the coarsened divergence (a lower bound of the dense one) and the error shrinks
with k; the storage format (fp16 / int16) and the teacher's CE from it."""

from __future__ import annotations

import math

import pytest
import torch

from tinymusician.distill import divergences as div
from tinymusician.distill.sparse import SparseTeacher

B, K, T, V = 2, 3, 5, 64
KERNELS = {
    "fkl": lambda s, t, v, **kw: div.forward_kl(s, t, v, **kw),
    "rkl": lambda s, t, v, **kw: div.reverse_kl(s, t, v, **kw),
    "skl": lambda s, t, v, **kw: div.skewed_forward_kl(s, t, v, alpha=0.1, **kw),
    "srkl": lambda s, t, v, **kw: div.skewed_reverse_kl(s, t, v, alpha=0.1, **kw),
    "jsd": lambda s, t, v, **kw: div.jsd(s, t, v, beta=0.5, **kw),
    "akl": lambda s, t, v, **kw: div.adaptive_kl(s, t, v, mu=0.5, **kw),
    "mix": lambda s, t, v, **kw: div.skewed_kl_mix(s, t, v, w_fwd=0.4, alpha=0.1, **kw)[0],
}


def logits_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, K, T, V, generator=gen) * 2
    teacher = torch.randn(B, K, T, V, generator=gen) * 3
    valid = torch.ones(B, K, T, dtype=torch.bool)
    valid[0, 1, -2:] = False
    return student, teacher, valid


def value_and_grad(name, student, teacher, valid, **kw):
    s = student.clone().requires_grad_(True)
    value = KERNELS[name](s, teacher, valid, **kw)
    value.backward()
    return value.detach(), s.grad


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("tail", ["bucket", "spread"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_to_vocab_is_the_dense_path(name, tail, temperature):
    student, teacher, valid = logits_pair()
    sparse = SparseTeacher.from_logits(teacher, k=V, temperature=1.0, tail=tail)
    dense_value, dense_grad = value_and_grad(name, student, teacher, valid, temperature=temperature)
    sparse_value, sparse_grad = value_and_grad(name, student, sparse, valid, temperature=temperature)
    assert torch.allclose(sparse_value, dense_value, rtol=1e-5, atol=1e-6), (sparse_value, dense_value)
    assert torch.allclose(sparse_grad, dense_grad, rtol=1e-4, atol=1e-7)


def test_bucket_tail_is_the_coarsened_divergence_and_error_shrinks_with_k():
    student, teacher, valid = logits_pair(1)
    dense = div.forward_kl(student, teacher, valid, reduction="none")
    errors = []
    for k in (4, 16, 48):
        sparse = SparseTeacher.from_logits(teacher, k=k, tail="bucket")
        value = div.forward_kl(student, sparse, valid, reduction="none")
        # the same KL by hand on k + 1 outcomes: top-k tokens and one bucket for the rest
        log_p, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
        idx = sparse.indices.long()
        p_head, q_head = log_p.gather(-1, idx), log_q.gather(-1, idx)
        p_rest = log_p.scatter(-1, idx, -math.inf).logsumexp(-1)
        q_rest = log_q.scatter(-1, idx, -math.inf).logsumexp(-1)
        by_hand = (p_head.exp() * (p_head - q_head)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
        assert torch.allclose(value[valid], by_hand[valid], atol=1e-5)
        assert bool((value[valid] <= dense[valid] + 1e-5).all())  # coarsening never adds divergence
        errors.append(float((dense - value)[valid].abs().mean()))
    assert errors[0] > errors[1] > errors[2] >= 0, errors


def test_storage_format_and_its_rounding():
    student, teacher, valid = logits_pair(2)
    sparse = SparseTeacher.from_logits(teacher, k=16)
    stored = sparse.compact()
    assert stored.indices.dtype == torch.int16 and stored.log_probs.dtype == torch.float16
    assert stored.tail_log_mass.dtype == torch.float16
    exact = div.forward_kl(student, sparse, valid)
    rounded = div.forward_kl(student, stored, valid)
    assert abs(float(rounded - exact)) < 1e-2 * float(exact)
    full = SparseTeacher.from_logits(teacher, k=V).compact()
    assert bool(torch.isneginf(full.tail_log_mass).all())  # no tail when k = V


def test_label_log_probs_is_the_teachers_ce_from_the_head():
    _, teacher, _ = logits_pair(3)
    labels = teacher.argmax(-1)
    sparse = SparseTeacher.from_logits(teacher, k=8)
    assert torch.allclose(
        sparse.label_log_probs(labels),
        teacher.log_softmax(-1).gather(-1, labels[..., None])[..., 0],
        atol=1e-5,
    )
    worst = teacher.argmin(-1)  # in the tail: an equal share of the tail's mass
    rest = teacher.log_softmax(-1).scatter(-1, sparse.indices.long(), -math.inf).logsumexp(-1)
    assert torch.allclose(sparse.label_log_probs(worst), rest - math.log(V - 8), atol=1e-5)


def test_bad_sparse_teachers_are_named():
    _, teacher, _ = logits_pair()
    with pytest.raises(ValueError, match="distill.cache.k=0"):
        SparseTeacher.from_logits(teacher, k=0)
    with pytest.raises(ValueError, match="distill.cache.tail='flat'"):
        SparseTeacher.from_logits(teacher, k=4, tail="flat")
    student, _, valid = logits_pair()
    short = SparseTeacher.from_logits(teacher[:, :, :-1], k=4)
    with pytest.raises(ValueError, match="differ in shape"):
        div.forward_kl(student, short, valid)


def test_spread_tail_shares_the_tail_mass_evenly():
    student, teacher, valid = logits_pair(4)
    sparse = SparseTeacher.from_logits(teacher, k=8, tail="spread")
    rows = slice(0, 6)
    log_q = student.reshape(-1, V)[rows].log_softmax(-1)
    dense = sparse.dense_log_probs(rows, valid.reshape(-1)[rows], 1.0, log_q)
    head = sparse.indices.reshape(-1, 8)[rows].long()
    tail = dense.scatter(-1, head, float("nan"))
    tail_values = tail[~tail.isnan()].reshape(6, V - 8)
    assert torch.allclose(tail_values, tail_values[:, :1].expand_as(tail_values))  # every tail token alike
    mass = tail_values.exp().sum(-1)
    assert torch.allclose(mass, sparse.tail_log_mass.reshape(-1)[rows].exp(), rtol=1e-4)  # the stored mass
    assert torch.allclose(dense.exp().sum(-1), torch.ones(6), atol=1e-5)
