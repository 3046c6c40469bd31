"""Loss registry, config files and the stage-mixed loss against an independent float64 computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tinymusician.distill import divergences as div
from tinymusician.distill.losses import LOSSES, DistillationLoss, KDTerm, build_loss

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf" / "loss"
NAMES = ["ce", "fkl", "rkl", "skl", "srkl", "jsd", "akl", "stage_mixed"]
B, K, T, V = 2, 4, 5, 9


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, K, T, V, generator=g) * 2
    teacher = torch.randn(B, K, T, V, generator=g) * 2
    valid = torch.rand(B, K, T, generator=g) > 0.25
    return student, teacher, valid


def test_registry_names():
    assert list(LOSSES) == NAMES
    assert all(issubclass(cls, DistillationLoss) for cls in LOSSES.values())


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="known: ce, fkl, rkl, skl, srkl, jsd, akl, stage_mixed"):
        build_loss("kl")
    with pytest.raises(ValueError, match="unknown loss 'stage'"):  # no substring matching
        build_loss("stage")


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("fkl", {"alpha": 0.1}, "loss.alpha"),
        ("fkl", {"temperature": 0.0}, "loss.temperature"),
        ("fkl", {"lambda_kd": -1.0}, "loss.lambda_kd"),
        ("ce", {"temperature": 2.0}, "loss.temperature"),
        ("ce", {"lambda_kd": 1.0}, "loss.lambda_kd"),
        ("skl", {"alpha": 1.0}, "loss.alpha"),
        ("srkl", {"alpha": -0.5}, "loss.alpha"),
        ("jsd", {"beta": 1.0}, "loss.beta"),
        ("akl", {"mu": 1.5}, "loss.mu"),
        ("stage_mixed", {"temperature": 2.0}, "loss.temperature"),
        ("stage_mixed", {"schedule": {"global_until": 0.9}}, "loss.schedule.global_until"),
        ("stage_mixed", {"schedule": {"until": 0.9}}, "loss.schedule.until"),
        ("stage_mixed", {"schedule": {"w_min": 2.0}}, "loss.schedule.w_min"),
        ("stage_mixed", {"temperature": {"start": 0.5}}, "loss.temperature.start"),
        ("stage_mixed", {"temperature": {"end": 0.0}}, "loss.temperature.end"),
        ("stage_mixed", {"temperature": {"anneal": "step"}}, "loss.temperature.anneal"),
    ],
)
def test_bad_parameters_name_the_config_key(name, params, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_loss(name, **params)


@pytest.mark.parametrize("name", NAMES)
def test_config_files_instantiate(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg._target_ == "tinymusician.distill.losses.build_loss"
    assert cfg.name == name
    loss = instantiate(cfg)
    assert isinstance(loss, LOSSES[name])
    assert loss.requires_teacher is (name != "ce")


def test_stage_mixed_config_overrides():
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "stage_mixed.yaml"),
        OmegaConf.from_dotlist(["alpha=0.2", "schedule.global_until=0.25", "temperature.start=3.0"]),
    )
    loss = instantiate(cfg)  # nested nodes arrive as DictConfig
    assert loss.alpha == 0.2
    assert loss.scheduler.global_until == 0.25 and loss.scheduler.t_max == 3.0
    assert loss.scheduler.refine_from == 0.6  # untouched keys keep the file's values


def test_ce_has_no_kd_term():
    student, _, valid = _inputs()
    loss = build_loss("ce", lambda_ce=1.0, lambda_kd=0.0)
    assert not loss.requires_teacher and loss.lambda_kd == 0.0 and loss.lambda_ce == 1.0
    term = loss(student, None, valid, 0.3)
    assert isinstance(term, KDTerm)
    assert term.value.shape == () and term.value.item() == 0.0
    assert term.per_codebook.shape == (K,) and (term.per_codebook == 0).all()
    assert term.logs == {"temperature": 1.0, "kd_weight_fwd": 0.0, "stage": 0}


SINGLE = [
    ("fkl", div.forward_kl, {}, 1.0),
    ("rkl", div.reverse_kl, {}, 0.0),
    ("skl", div.skewed_forward_kl, {"alpha": 0.2}, 1.0),
    ("srkl", div.skewed_reverse_kl, {"alpha": 0.2}, 0.0),
    ("jsd", div.jsd, {"beta": 0.3}, 0.3),
]


@pytest.mark.parametrize(("name", "fn", "params", "w_fwd"), SINGLE)
def test_single_divergence_losses(name, fn, params, w_fwd):
    student, teacher, valid = _inputs()
    temperature = 2.0
    loss = build_loss(name, lambda_ce=0.5, lambda_kd=0.7, temperature=temperature, **params)
    assert (loss.lambda_ce, loss.lambda_kd) == (0.5, 0.7)
    s = student.clone().requires_grad_()
    term = loss(s, teacher, valid, 0.5)
    expected = fn(student, teacher, valid, temperature=temperature, **params) * temperature**2
    torch.testing.assert_close(term.value, expected)
    per_codebook = fn(student, teacher, valid, temperature=temperature, reduction="codebook", **params)
    torch.testing.assert_close(term.per_codebook, per_codebook * temperature**2)
    assert term.logs == {"temperature": 2.0, "kd_weight_fwd": w_fwd, "stage": 0}
    term.value.backward()
    assert torch.isfinite(s.grad).all()


def test_akl_loss_logs_mean_head_weight():
    student, teacher, valid = _inputs()
    term = build_loss("akl", temperature=1.5, mu=0.4)(student, teacher, valid, 0.0)
    torch.testing.assert_close(
        term.value, div.adaptive_kl(student, teacher, valid, temperature=1.5, mu=0.4) * 1.5**2
    )
    w_head, _ = div.adaptive_kl_weights(student, teacher, valid, temperature=1.5, mu=0.4)
    assert term.logs["kd_weight_fwd"] == pytest.approx(w_head[valid].mean().item())
    assert term.logs["temperature"] == 1.5 and term.logs["stage"] == 0


def _reference_stage_mixed(student, teacher, valid, progress, alpha, gu, rf, w_min, t_max, t_min):
    """Independent float64 computation, schedule formulas included; returns (value, w, T, stage)."""
    if progress < gu:
        w, stage = 1.0, 0
    elif progress < rf:
        w, stage = w_min + (1 - w_min) * 0.5 * (1 + math.cos(math.pi * (progress - gu) / (rf - gu))), 1
    else:
        w, stage = w_min, 2
    temp = t_min + (t_max - t_min) * 0.5 * (1 + math.cos(math.pi * progress))
    log_q = torch.log_softmax(student.double() / temp, -1)
    log_p = torch.log_softmax(teacher.double() / temp, -1)
    q, p = log_q.exp(), log_p.exp()
    skl = (p * (log_p - torch.log(alpha * p + (1 - alpha) * q))).sum(-1)
    srkl = (q * (log_q - torch.log((1 - alpha) * p + alpha * q))).sum(-1)
    per_position = (w * skl + (1 - w) * srkl) * valid
    return per_position.sum() / valid.sum() * temp**2, per_position, w, temp, stage


@pytest.mark.parametrize("progress", [0.0, 0.2, 0.3, 0.45, 0.59, 0.6, 0.85, 1.0])
def test_stage_mixed_matches_independent_formula(progress):
    student, teacher, valid = _inputs()
    params = {"alpha": 0.15, "gu": 0.3, "rf": 0.6, "w_min": 0.2, "t_max": 2.5, "t_min": 1.0}
    loss = build_loss(
        "stage_mixed",
        alpha=0.15,
        schedule={"global_until": 0.3, "refine_from": 0.6, "w_min": 0.2},
        temperature={"start": 2.5, "end": 1.0, "anneal": "cosine"},
    )
    s = student.clone().requires_grad_()
    term = loss(s, teacher, valid, progress)
    term.value.backward()

    s64 = student.double().requires_grad_()
    expected, per_position, w, temp, stage = _reference_stage_mixed(s64, teacher, valid, progress, **params)
    expected.backward()
    torch.testing.assert_close(term.value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    per_codebook = per_position.detach().sum((0, 2)) / valid.sum((0, 2)) * temp**2
    torch.testing.assert_close(term.per_codebook.double(), per_codebook, rtol=1e-5, atol=1e-6)
    assert term.logs["kd_weight_fwd"] == pytest.approx(w)
    assert term.logs["temperature"] == pytest.approx(temp)
    assert term.logs["stage"] == stage


def test_half_precision_logits():
    student, teacher, valid = _inputs()
    loss = build_loss("stage_mixed")
    s = student.to(torch.bfloat16).requires_grad_()
    term = loss(s, teacher.to(torch.bfloat16), valid, 0.45)
    term.value.backward()
    assert term.value.dtype == torch.float32 and torch.isfinite(term.value)
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
