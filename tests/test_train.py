"""The train entry point: config composition, start-up errors, whole runs, resume, sweeps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

from tests.conftest import CONF_DIR, FAST_OVERRIDES, compose_train_cfg
from tinymusician.models.musicgen import ModelSourceError
from tinymusician.train import train
from tinymusician.training.checks import ConfigError, check_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_passes_startup_checks(experiment, tmp_path, cache_dir):
    cfg = compose_train_cfg([f"+experiment={experiment}"], tmp_path, fast=False)
    assert cfg.task_name == experiment
    loss, datamodule, _ = check_config(cfg)
    assert loss.requires_teacher == (cfg.loss.name != "ce")


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_option_builds(loss, tmp_path, cache_dir):
    cfg = compose_train_cfg(["+experiment=kd_only", f"loss={loss}"], tmp_path)
    built, _, _ = check_config(cfg)
    assert built.lambda_ce >= 0 and built.lambda_kd >= 0


def test_unknown_group_option_fails_listing_the_options(tmp_path):
    with pytest.raises(MissingConfigException, match="fkl"):
        compose_train_cfg(["loss=nonexistent"], tmp_path)


def test_missing_local_model_dir_fails_before_loading(tmp_path, cache_dir):
    cfg = compose_train_cfg([f"model.student={tmp_path / 'missing'}"], tmp_path)
    with pytest.raises(ModelSourceError, match="model.student.*does not exist"):
        train(cfg)


def test_paper_scale_offline_names_the_model(tmp_path, cache_dir):
    cfg = compose_train_cfg(["+experiment=kd_only", "model=musicgen"], tmp_path, fast=False)
    with pytest.raises(ModelSourceError, match="facebook/musicgen-(large|small)"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override", ["data.num_val=0", "data.num_train=0"])
def test_empty_split_fails_clearly(override, tmp_path, cache_dir):
    cfg = compose_train_cfg([override], tmp_path)
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        train(cfg)


def test_distillation_without_teacher_fails_at_startup(tmp_path, cache_dir):
    cfg = compose_train_cfg(["+experiment=kd_only", "model.teacher=null"], tmp_path)
    with pytest.raises(ConfigError, match="model.teacher is null"):
        check_config(cfg)


def test_kd_only_run_learns_from_the_teacher(tmp_path, tiny_pair):
    cfg = compose_train_cfg(
        ["+experiment=kd_only", "trainer.max_steps=24", "trainer.val_check_interval=8"], tmp_path
    )
    metrics, objects = train(cfg)
    summary = objects["summary"]
    assert summary["steps"] == 24
    assert metrics["val/kl_to_teacher"] < metrics["before/val/kl_to_teacher"]
    assert metrics["val/ce"] < metrics["before/val/ce"]
    # teacher frozen, untouched and outside the checkpoint; only the student decoder trained
    module = objects["module"]
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert all(not p.requires_grad for p in module.student.text_encoder.parameters())
    assert all(not p.requires_grad for p in module.student.audio_encoder.parameters())
    ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(key.startswith("student.") for key in ckpt["state_dict"])
    # the saved student loads back through the public path
    from tinymusician.models.musicgen import load_musicgen

    reloaded = load_musicgen(summary["student_dir"])
    for name, tensor in module.student.decoder.state_dict().items():
        torch.testing.assert_close(reloaded.decoder.state_dict()[name], tensor)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 24
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_baseline_trains_without_kd(tmp_path, tiny_pair):
    cfg = compose_train_cfg(["+experiment=baseline"], tmp_path)
    metrics, objects = train(cfg)
    assert metrics["train/kd"] == 0.0
    assert metrics["val/ce"] < metrics["before/val/ce"]


def test_gradients_reach_only_the_student_decoder(tmp_path, tiny_pair):
    cfg = compose_train_cfg(["+experiment=kd_only", "trainer.max_steps=1"], tmp_path)
    _, objects = train(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    module.train()
    module.zero_grad()
    batch = next(iter(datamodule.train_dataloader()))
    out = module.forward_batch(batch, with_teacher=True)
    assert not out["teacher"].requires_grad
    from tinymusician.distill.module import per_codebook_ce

    loss = per_codebook_ce(out["student"], out["labels"], out["valid"]).mean()
    loss = loss + module.loss_fn(out["student"], out["teacher"], out["valid"], 0.0).value
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.decoder.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is None for p in module.student.text_encoder.parameters())


def test_resume_from_checkpoint_continues_the_step_count(tmp_path, tiny_pair):
    first = compose_train_cfg(["+experiment=kd_only", "trainer.max_steps=4"], tmp_path / "a")
    _, objects = train(first)
    last = objects["summary"]["last_checkpoint"]
    resumed = compose_train_cfg(
        ["+experiment=kd_only", "trainer.max_steps=8", f"ckpt_path={last}"], tmp_path / "b"
    )
    _, objects = train(resumed)
    assert objects["summary"]["steps"] == 8
    assert objects["module"].progress == pytest.approx(1.0)


def test_cli_multirun_sweep(tmp_path, tiny_pair, cache_dir):
    overrides = [o for o in FAST_OVERRIDES if "progress_bar" not in o]
    cmd = [
        sys.executable,
        "-m",
        "tinymusician.train",
        "-m",
        "+experiment=kd_only",
        "loss=fkl,rkl",
        "trainer.max_steps=2",
        f"paths.log_dir={tmp_path}",
        *overrides,
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "TINYMUSICIAN_CACHE": str(cache_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(Path(tmp_path).rglob("summary.json"))
    assert [json.loads(p.read_text())["loss"] for p in summaries] == ["fkl", "rkl"]


def test_checkpoint_without_frozen_weights_is_smaller_and_resumes(tmp_path, tiny_pair):
    from tinymusician.distill.module import FROZEN_PREFIXES

    first = compose_train_cfg(
        ["+experiment=kd_only", "trainer.max_steps=4", "checkpoint_frozen=false"], tmp_path / "a"
    )
    _, objects = train(first)
    last = objects["summary"]["last_checkpoint"]
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith(FROZEN_PREFIXES) for k in ckpt["state_dict"])
    assert any(k.startswith("student.decoder.") for k in ckpt["state_dict"])
    assert ckpt["frozen_weights"]["prefixes"] == list(FROZEN_PREFIXES)
    frozen = {
        k: v.clone() for k, v in objects["module"].state_dict().items() if k.startswith(FROZEN_PREFIXES)
    }
    resumed = compose_train_cfg(
        ["+experiment=kd_only", "trainer.max_steps=6", f"ckpt_path={last}"], tmp_path / "b"
    )
    _, objects = train(resumed)  # strict loading: the frozen parts come from model.student
    assert objects["summary"]["steps"] == 6
    state = objects["module"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    # quantize / export / generate read such a checkpoint too: the frozen parts come from its student/ dir
    from tinymusician.zoo.source import load_named_model

    student, _, described = load_named_model(str(last))
    trained = objects["module"].student.state_dict()
    loaded = student.state_dict()
    assert "architecture and tokenizer from" in described
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded if k.startswith("text_encoder."))
