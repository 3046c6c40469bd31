"""Half precision: bf16-mixed / 16-mixed training, the loss kept in fp32, half-precision teachers (model.teacher_dtype)."""

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open

from tests.conftest import CONF_DIR, compose_train_cfg
from tinymusician.distill.module import per_codebook_ce
from tinymusician.models.musicgen import teacher_forcing
from tinymusician.train import train
from tinymusician.training.checks import ConfigError, check_config
from tinymusician.zoo.pair import load_teacher_student

pytestmark = pytest.mark.usefixtures("single_thread")

LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml") if p.stem != "ce")
SMALL_EVAL = ["eval=default", "eval.num_prompts=4", "eval.seconds=0.5", "eval.batch_size=4"]
# bf16-mixed vs 32-true on the same seed, 6 KD steps of the tiny world: the per-step train/loss differed by at
# most 2e-4 relative on this CPU (the decoder's matmuls in bf16, the loss in fp32); 1e-2 leaves margin.
LOSS_RTOL = 1e-2


def run(tmp_path: Path, precision: str, *overrides: str) -> tuple[dict, dict, list[float]]:
    """A short KD run at ``precision``; returns its metrics, objects and per-step train/loss."""
    cfg = compose_train_cfg(
        ["+experiment=kd_only", f"trainer.precision={precision}", "trainer.accelerator=cpu", *overrides],
        tmp_path,
    )
    metrics, objects = train(cfg)
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    return metrics, objects, losses


def saved_dtypes(student_dir: Path) -> set[torch.dtype]:
    with safe_open(str(student_dir / "model.safetensors"), "pt") as weights:
        return {weights.get_tensor(name).dtype for name in weights.keys()}


def test_bf16_mixed_trains_like_fp32_saves_fp32_and_quantizes_and_evaluates(tmp_path):
    _, _, reference = run(tmp_path / "fp32", "32-true")
    metrics, objects, losses = run(tmp_path / "bf16", "bf16-mixed", "quant=int8", *SMALL_EVAL)
    assert len(losses) == len(reference) == 6
    assert all(math.isfinite(v) for v in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=LOSS_RTOL, atol=0.0)
    assert losses[-1] < losses[0] - 1.0  # it learns: fp32 drops by ~2.5 nats over these steps
    summary = objects["summary"]
    assert summary["precision"] == "bf16-mixed"
    assert saved_dtypes(Path(summary["student_dir"])) == {torch.float32}
    assert {p.dtype for p in objects["models"].student.parameters()} == {torch.float32}
    # post-training jobs run on the fp32 weights as after any run
    assert "quant_error" not in summary
    assert metrics["quant/size_mb"] > 0 and math.isfinite(metrics["quant/top1_agree"])
    for key in ("eval/fad_clap", "eval/fad_encodec", "eval/clap"):
        assert math.isfinite(metrics[key]), key


def test_16_mixed_on_cpu_runs_as_bf16_mixed_and_says_so(tmp_path):
    """Lightning 2.6 has no fp16 AMP on CPU: it warns and runs bf16-mixed; summary.json records that.
    The teacher here is fp16 (model.teacher_dtype) while the student's autocast is bf16."""
    with pytest.warns(UserWarning, match=r"precision='16-mixed'.*not supported on CPU.*bf16-mixed"):
        metrics, objects, losses = run(
            tmp_path,
            "16-mixed",
            "model.teacher_dtype=float16",
            "trainer.max_steps=2",
            "validate_before_fit=false",
        )
    assert objects["summary"]["precision"] == "bf16-mixed"
    assert objects["trainer"].precision == "bf16-mixed"
    assert {p.dtype for p in objects["models"].teacher.decoder.parameters()} == {torch.float16}
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(metrics["val/kl_to_teacher"]) and metrics["train/kd"] > 0


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", "fp8"])
def test_precisions_that_would_train_a_half_student_fail_at_startup(precision, tmp_path):
    cfg = compose_train_cfg([f"trainer.precision={precision}"], tmp_path)
    with pytest.raises(
        ConfigError, match=rf"trainer.precision={precision}: use 32-true, bf16-mixed or 16-mixed"
    ):
        check_config(cfg)


# --- the loss in fp32 under autocast -------------------------------------------------------------------
@pytest.fixture(scope="module")
def logits() -> dict[str, torch.Tensor]:
    """Student logits as autocast leaves them (bf16), a teacher's, and a valid mask with padding."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 4, 12, 256)
    student = (3 * torch.randn(shape, generator=generator)).bfloat16()
    teacher = (3 * torch.randn(shape, generator=generator)).bfloat16()
    valid = torch.ones(shape[:-1], dtype=torch.bool)
    valid[1, :, 9:] = False
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    return {"student": student, "teacher": teacher, "valid": valid, "labels": labels}


def kd_step(loss, logits, autocast: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """KD value, its gradient w.r.t. the student logits, and what autograd saved for the backward pass."""
    student = logits["student"].clone().requires_grad_(True)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        value = loss(student, logits["teacher"], logits["valid"], 0.5).value
    value.backward()
    return value.detach(), student.grad, saved


@pytest.mark.parametrize("name", LOSSES)
def test_kd_is_fp32_under_autocast_and_keeps_an_fp32_gradient(name, logits):
    loss = instantiate(OmegaConf.load(CONF_DIR / "loss" / f"{name}.yaml"))
    value, grad, _ = kd_step(loss, logits, autocast=False)
    mixed, mixed_grad, saved = kd_step(loss, logits, autocast=True)
    assert mixed.dtype == torch.float32
    # the same number as without autocast: nothing inside was rounded to bf16
    assert mixed.item() == pytest.approx(value.item(), rel=1e-6)
    torch.testing.assert_close(mixed_grad, grad, rtol=0.0, atol=0.0)
    vocab = logits["student"].shape[-1]
    saved_gradient = [t for t in saved if t.dim() == 2 and t.shape[-1] == vocab]
    assert saved_gradient and {t.dtype for t in saved_gradient} == {torch.float32}


def test_ce_is_fp32_under_autocast(logits):
    reference = per_codebook_ce(logits["student"], logits["labels"], logits["valid"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = per_codebook_ce(logits["student"], logits["labels"], logits["valid"])
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=0.0)


# --- half-precision teachers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tiny_pair) -> dict[str, object]:
    cfg = {"student": "tiny", "teacher": "tiny"}
    return {
        dtype: load_teacher_student(OmegaConf.create({**cfg, "teacher_dtype": dtype}))
        for dtype in ("float32", "bfloat16", "float16")
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_teacher_is_held_in_teacher_dtype_and_the_student_in_fp32(dtype, pairs):
    models = pairs[dtype]
    assert {p.dtype for p in models.teacher.decoder.parameters()} == {getattr(torch, dtype)}
    assert {p.dtype for p in models.student.parameters()} == {torch.float32}


def kd_of_pair(models, batch, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL(teacher || student) on one batch and its gradient w.r.t. the student's lm heads."""
    from tinymusician.distill.divergences import forward_kl

    student = models.student
    student.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        forcing = teacher_forcing(student, batch)
        student_logits = forcing.logits(student)
        with torch.no_grad():
            teacher_logits = forcing.logits(models.teacher)
        kd = forward_kl(student_logits, teacher_logits, forcing.delayed.valid)
    kd.backward()
    grad = torch.cat([p.grad.flatten() for p in student.decoder.lm_heads.parameters()])
    return kd.detach(), grad


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kd_with_a_half_teacher_matches_the_fp32_teacher(dtype, autocast, pairs, corpus_batch_maker):
    reference_models = pairs["float32"]
    batch = corpus_batch_maker(reference_models.student, reference_models.tokenizer, count=1)[0]
    reference, reference_grad = kd_of_pair(reference_models, batch, autocast=False)
    value, grad = kd_of_pair(pairs[dtype], batch, autocast=autocast)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    # half-precision teacher logits barely move the KL on the tiny world: measured <= 1.1e-4 relative, the
    # gradient's cosine to the fp32 teacher's >= 0.99997 (with or without autocast)
    assert value.item() == pytest.approx(reference.item(), rel=2e-3)
    assert torch.nn.functional.cosine_similarity(grad, reference_grad, dim=0) > 0.9995
