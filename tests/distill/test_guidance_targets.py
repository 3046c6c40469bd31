"""loss.guidance_scale: the KD targets are the teacher's guided distribution, the student is marked one-pass."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train_cfg
from tinymusician.distill.losses import build_loss
from tinymusician.distill.module import DistillationModule
from tinymusician.models.musicgen import (
    default_guidance_scale,
    freeze,
    guidance_distilled_scale,
    load_musicgen,
    teacher_forcing,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def module_for(tiny_pair, loss, cond_dropout: float = 0.0) -> DistillationModule:
    return DistillationModule(
        student=load_musicgen(str(tiny_pair.student)),
        teacher=freeze(load_musicgen(str(tiny_pair.teacher))),
        loss=loss,
        optimizer=torch.optim.AdamW,
        cond_dropout=cond_dropout,
    )


def test_every_kd_loss_takes_a_guidance_scale_and_bad_values_name_the_key():
    for name in ("fkl", "rkl", "skl", "srkl", "jsd", "akl", "stage_mixed"):
        assert (
            build_loss(name).guidance_scale == 1.0
            and build_loss(name, guidance_scale=3).guidance_scale == 3.0
        )
    with pytest.raises(ValueError, match=r"loss.guidance_scale must be a finite number >= 1.*got 0.5"):
        build_loss("fkl", guidance_scale=0.5)
    with pytest.raises(ValueError, match=r"loss.guidance_scale=3.0 with loss='ce'"):
        build_loss("ce", guidance_scale=3.0)


def test_the_teacher_targets_are_the_guided_logits_and_the_student_is_marked(
    tiny_pair, tokenizer, batch_maker
):
    guided_module = module_for(tiny_pair, build_loss("fkl", guidance_scale=3.0))
    plain_module = module_for(tiny_pair, build_loss("fkl"))
    batch = batch_maker(guided_module.student, tokenizer, count=1)[0]
    with torch.no_grad():
        guided = guided_module.forward_batch(batch, with_teacher=True)
        plain = plain_module.forward_batch(batch, with_teacher=True)
        forcing = teacher_forcing(guided_module.teacher, batch)
        expected = forcing.logits(guided_module.teacher, 3.0)
    torch.testing.assert_close(guided["teacher"], expected)
    valid = guided["valid"]
    assert (guided["teacher"] - plain["teacher"])[valid].abs().max() > 0.1  # a different target
    torch.testing.assert_close(guided["student"], plain["student"])  # the student sees the caption only
    assert guidance_distilled_scale(guided_module.student) == 3.0
    assert default_guidance_scale(guided_module.student) == 1.0
    assert guidance_distilled_scale(plain_module.student) is None


def test_a_dropped_caption_row_targets_the_teachers_unconditional_distribution(
    tiny_pair, tokenizer, batch_maker
):
    module = module_for(tiny_pair, build_loss("fkl", guidance_scale=3.0), cond_dropout=0.999)
    module.train()
    batch = batch_maker(module.student, tokenizer, count=1)[0]
    with torch.no_grad():
        out = module.forward_batch(batch, with_teacher=True)
        forcing = teacher_forcing(module.teacher, batch)
        forcing.text_mask = torch.zeros_like(forcing.text_mask)
        unconditional = forcing.logits(module.teacher)
    torch.testing.assert_close(out["teacher"], unconditional.float(), rtol=1e-4, atol=1e-4)  # cond = uncond


def test_kd_guided_experiment_trains_and_saves_a_one_pass_student(tmp_path, tiny_pair, capsys):
    from tinymusician.train import train

    cfg = compose_train_cfg(
        [
            "+experiment=kd_guided",
            "trainer.max_steps=2",
            "eval=default",
            "eval.num_prompts=2",
            "eval.seconds=0.5",
        ],
        tmp_path,
    )
    assert cfg.loss.guidance_scale == 3.0
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/kd"]))
    assert objects["summary"]["guidance_scale"] == 3.0
    assert "guidance 1 (the model's default)" in objects["summary"]["eval_setup"]  # evaluated in one pass
    report = json.loads((tmp_path / "eval" / "final" / "report.json").read_text())
    assert report["student"]["generation"]["guidance_scale"] == 1.0
    assert "on the guided teacher (CFG 3): a one-pass student" in capsys.readouterr().out
    saved = load_musicgen(str(tmp_path / "student"))
    assert guidance_distilled_scale(saved) == 3.0 and saved.generation_config.guidance_scale == 1.0
    assert instantiate(cfg.loss).guidance_scale == 3.0
