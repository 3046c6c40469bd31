"""Faults of the train entry point: SIGTERM, unsafe/missing resume checkpoints, bad metric names, config errors
printed without a traceback, an unusable quantization output path. CLI behaviour runs in a subprocess."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import FAST_OVERRIDES, compose_train_cfg
from tinymusician.train import CONFIG_EXIT_CODE, SIGTERM_EXIT_CODE, train
from tinymusician.training.checks import ConfigError, check_config

REPO = Path(__file__).resolve().parents[1]
CLI_OVERRIDES = [o for o in FAST_OVERRIDES if "progress_bar" not in o]  # as test_cli_multirun_sweep


class StepMarker(L.Callback):
    """Test probe (loaded by the subprocess through Hydra): writes the global step after every batch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, *args) -> None:
        self.path.write_text(str(trainer.global_step))


def run_cli(args: list[str], log_dir: Path, cache_dir: Path, env: dict | None = None, **kwargs):
    cmd = [sys.executable, "-m", "tinymusician.train", *args, f"paths.log_dir={log_dir}"]
    environment = {**os.environ, "TINYMUSICIAN_CACHE": str(cache_dir), **(env or {})}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=environment, **kwargs
    )


def run_dirs(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.glob("*/runs/*") if p.is_dir())


# --- D1: SIGTERM -----------------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_exits_nonzero_and_resumes(tmp_path, tiny_pair, cache_dir):
    marker = tmp_path / "step.txt"
    log_dir = tmp_path / "logs"
    args = [
        "+experiment=kd_only",
        *CLI_OVERRIDES,
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "validate_before_fit=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.step_marker._target_=tests.test_train_faults.StepMarker",
        f"+callbacks.step_marker.path={marker}",
    ]
    cmd = [sys.executable, "-m", "tinymusician.train", *args, f"paths.log_dir={log_dir}"]
    env = {**os.environ, "TINYMUSICIAN_CACHE": str(cache_dir)}
    err_file = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as out, open(err_file, "w") as err:  # files: a full pipe blocks
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not (marker.is_file() and marker.read_text() not in ("", "0", "1")):
                assert proc.poll() is None, err_file.read_text()[-3000:]
                assert time.monotonic() < deadline, "training never reached step 2"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_file.read_text()
    assert proc.returncode == SIGTERM_EXIT_CODE, stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    assert checkpoint.is_file()
    assert f"ckpt_path={checkpoint}" in stderr and "Traceback" not in stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_checkpoint"] == str(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    step = state["global_step"]
    assert step >= 2 and "optimizer_states" in state
    resumed = compose_train_cfg(
        ["+experiment=kd_only", f"trainer.max_steps={step + 2}", f"ckpt_path={checkpoint}"], tmp_path / "b"
    )
    _, objects = train(resumed)
    assert objects["summary"]["steps"] == step + 2


# --- D3 and the missing checkpoint: resume checkpoints are data, checked before any model loads --------------
class Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))  # creates a file when unpickled: "code ran"


def test_crafted_checkpoint_is_refused_even_with_force_no_weights_only(tmp_path, cache_dir):
    ran = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"student.x": torch.zeros(1)}, "payload": Payload(ran)}, evil, pickle_module=pickle
    )
    log_dir = tmp_path / "logs"
    result = run_cli(
        [*CLI_OVERRIDES, f"ckpt_path={evil}"], log_dir, cache_dir, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    )
    assert result.returncode == CONFIG_EXIT_CODE, result.stderr[-3000:]
    assert not ran.exists()
    assert f"error: ckpt_path={evil}" in result.stderr and "weights_only=True" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_dirs(log_dir) == []  # D12: the failed start leaves no empty run directory


def test_missing_checkpoint_fails_at_startup(tmp_path):
    cfg = compose_train_cfg([f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path)
    with pytest.raises(ConfigError, match="ckpt_path=.*nope.ckpt: no such file"):
        check_config(cfg)


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"student.decoder.w": torch.zeros(1)}, "global_step": 3}, path)
    cfg = compose_train_cfg([f"ckpt_path={path}"], tmp_path)
    with pytest.raises(ConfigError, match="weights-only checkpoint"):
        check_config(cfg)


def test_fit_loads_the_resume_checkpoint_with_weights_only(tmp_path, tiny_pair, monkeypatch):
    """The second guard: even past the start-up check, Lightning is asked for weights_only=True."""
    seen = {}
    original = L.Trainer.fit

    def fit(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    train(compose_train_cfg(["trainer.max_steps=1", "validate_before_fit=false"], tmp_path))
    assert seen["weights_only"] is True


# --- D11: optimized_metric / monitor validated at start-up --------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=val/nosuch"], r"optimized_metric=val/nosuch: this run never reports it.*val/ce"),
        (["optimized_metric=quant/size_mb"], r"quant/\* and eval/\* keys need quant="),
        (
            ["+experiment=baseline", "model.teacher=null", "optimized_metric=val/kl_to_teacher"],
            r"need a model.teacher",
        ),
        (
            ["quant=int8", "optimized_metric=quant/size_mb"],
            r"callbacks.model_checkpoint.monitor=quant/size_mb",
        ),
    ],
)
def test_unknown_or_late_metric_fails_at_startup(overrides, message, tmp_path):
    cfg = compose_train_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimized_metric=val/ce_q3"],
        ["+experiment=kd_only", "optimized_metric=val/kl_to_teacher"],
        ["quant=int8", "optimized_metric=quant/top1_agree_q0", "callbacks.model_checkpoint.monitor=val/ce"],
        ["eval=default", "optimized_metric=eval/fad_encodec", "callbacks.model_checkpoint.monitor=val/ce"],
    ],
)
def test_known_metrics_pass_startup(overrides, tmp_path):
    check_config(compose_train_cfg(overrides, tmp_path))


def test_codebook_metric_beyond_the_students_codebooks_fails_before_training(tmp_path, tiny_pair):
    cfg = compose_train_cfg(["optimized_metric=val/ce_q9"], tmp_path)
    with pytest.raises(ConfigError, match="has 4 codebooks"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_declared_quant_keys_cover_the_reported_ones():
    from tinymusician.callbacks.quantize import QuantizeCallback
    from tinymusician.quant.job import report_metrics
    from tinymusician.training.checks import metric_pattern

    sizes = {"text_encoder": 1.0, "decoder": 1.0, "codec": 1.0, "total": 3.0}
    report = {
        "status": "ok",
        "size": {"after_mb": sizes, "before_mb": sizes, "reduction": {"total": 0.1, "deployed": 0.1}},
        "fidelity": {
            "top1_agree": 1.0,
            "top1_agree_per_codebook": [1.0] * 4,
            "kl": 0.0,
            "max_logit_diff": 0.0,
        },
    }
    declared = QuantizeCallback(plan="int8").metric_keys()
    for key in report_metrics(report):
        assert any(metric_pattern(d).fullmatch(key) for d in declared), key


# --- D12: one clear line, exit 2, no empty run directory; multirun still reports --------------------------------
def test_config_error_prints_one_line_and_leaves_no_run_dir(tmp_path, cache_dir):
    log_dir = tmp_path / "logs"
    result = run_cli([*CLI_OVERRIDES, "optimized_metric=val/nosuch"], log_dir, cache_dir)
    assert result.returncode == CONFIG_EXIT_CODE
    assert "error: optimized_metric=val/nosuch: this run never reports it" in result.stderr
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert run_dirs(log_dir) == []


def test_config_error_keeps_a_run_dir_that_holds_other_files(tmp_path, cache_dir):
    run_dir = tmp_path / "existing"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    result = run_cli([*CLI_OVERRIDES, "cond_dropout=2", f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    assert result.returncode == CONFIG_EXIT_CODE and "error: cond_dropout=2" in result.stderr
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_multirun_config_error_is_reported_and_the_sweep_exits_nonzero(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        ["-m", *CLI_OVERRIDES, "cond_dropout=2", f"hydra.sweep.dir={sweep_dir}"], tmp_path, cache_dir
    )
    assert result.returncode == 1
    assert "error: cond_dropout=2" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("ConfigError: cond_dropout=2")
    assert json.loads((sweep_dir / "multirun_summary.json").read_text())["status"] == {"failed": 1}


# --- D2: quantization output path is a file -------------------------------------------------------------------
def test_quantized_path_is_a_file_warns_and_the_run_finishes(tmp_path, tiny_pair):
    (tmp_path / "quantized").write_text("not a directory")
    cfg = compose_train_cfg(
        ["+experiment=kd_quant", "eval=none", "trainer.max_steps=2", "validate_before_fit=false"], tmp_path
    )
    metrics, objects = train(cfg)
    assert metrics["quant/failed"] == 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and "is not a directory" in summary["quant_error"]
    assert "quant.output_dir" in summary["quant_error"]
    assert (tmp_path / "student" / "config.json").is_file()
    assert (tmp_path / "quantized").read_text() == "not a directory"
