"""Train a student (with or without distillation): ``python -m tinymusician.train +experiment=kd_only``.

``train(cfg)`` checks the config, loads the teacher/student pair, trains with Lightning, saves the student
with ``save_pretrained`` and prints a summary; ``main`` returns ``cfg.optimized_metric`` for sweepers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from tinymusician.callbacks.interrupt import CheckpointOnInterrupt
from tinymusician.callbacks.save_student import SaveStudent
from tinymusician.config import to_plain
from tinymusician.data.audio import BadSampleError
from tinymusician.data.datamodule import CodesDataModule, EmptySplitError
from tinymusician.distill.losses import DistillationLoss
from tinymusician.distill.module import (
    PER_CODEBOOK_VALIDATION_METRIC,
    DistillationModule,
    validation_metric_keys,
)
from tinymusician.models.musicgen import ModelSourceError
from tinymusician.quant import check_quant_config
from tinymusician.zoo.pair import check_model_config, load_teacher_student
from tinymusician.zoo.source import read_training_checkpoint

log = logging.getLogger(__name__)

# Frozen T5/EnCodec (and the teacher) stay in eval mode on purpose; Lightning warns about it at every fit.
# DistillationModule.on_fit_start puts the trainable student back in train mode (tests/distill check it).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

CONFIG_EXIT_CODE = 2  # like a command-line usage error
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process killed by it


class ConfigError(ValueError):
    """The composed config cannot run; raised before any model is loaded."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM stopped training; a checkpoint to resume from was written (its path is in the message)."""


# Errors of the user's config or data, caught in `main` and printed as one `error: ...` line (no traceback).
START_UP_ERRORS = (ConfigError, ModelSourceError, EmptySplitError, BadSampleError)


def check_resume_checkpoint(ckpt_path: str) -> None:
    """``ckpt_path`` must be a training checkpoint that loads as data; checked before any model loads.

    Read as data by :func:`tinymusician.zoo.source.read_training_checkpoint` (never unpickles code).
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no such file; point it at a run's checkpoints/last.ckpt "
            "(or checkpoints/interrupted.ckpt), or drop ckpt_path to start a new run"
        )
    try:
        checkpoint = read_training_checkpoint(path)
    except ModelSourceError as err:
        raise ConfigError(f"ckpt_path={ckpt_path}: not resumed: {err}") from err
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise ConfigError(
            f"ckpt_path={ckpt_path}: a weights-only checkpoint (no optimizer/loop state) cannot resume training. "
            "Start a new run from its weights instead: `python -m tinymusician.quantize/export` take the .ckpt"
        )


def metric_pattern(key: str) -> re.Pattern[str]:
    """A declared key (``val/ce_q{k}`` style placeholders allowed) as a regex."""
    return re.compile("".join(r"\d+" if p == "{k}" else re.escape(p) for p in re.split(r"(\{k\})", key)))


def check_metrics(cfg: DictConfig, post_training: list[L.Callback]) -> None:
    """``optimized_metric`` and every checkpoint ``monitor`` must be keys the run will report.

    The best checkpoint is chosen during training, so a monitor must be a validation key; the value returned
    to sweepers is read after the post-training callbacks, so ``optimized_metric`` may also be one of their
    ``quant/*`` / ``eval/*`` keys (then the checkpoint monitor must be set apart from it).
    """
    with_teacher = cfg.model.get("teacher") is not None
    fit_keys = [*validation_metric_keys(None, with_teacher), PER_CODEBOOK_VALIDATION_METRIC]
    after_keys = [key for c in post_training for key in getattr(c, "metric_keys", list)()]

    def known(key: str, keys: list[str]) -> bool:
        return any(metric_pattern(k).fullmatch(key) for k in keys)

    metric = cfg.get("optimized_metric")
    if metric is not None and not known(str(metric), fit_keys + after_keys):
        raise ConfigError(
            f"optimized_metric={metric}: this run never reports it. Known keys: {fit_keys + after_keys}"
            + ("" if with_teacher else " (val/kl_to_teacher and val/teacher_ce need a model.teacher)")
            + ("" if after_keys else "; quant/* and eval/* keys need quant=... / eval=...")
        )
    for name, callback in (cfg.get("callbacks") or {}).items():
        monitor = (
            (callback or {}).get("monitor")
            if "ModelCheckpoint" in str((callback or {}).get("_target_"))
            else None
        )
        if monitor is not None and not known(str(monitor), fit_keys):
            via = " (from optimized_metric)" if monitor == metric else ""
            raise ConfigError(
                f"callbacks.{name}.monitor={monitor}{via}: checkpoints are chosen during training, from "
                f"validation metrics ({fit_keys}). Add callbacks.{name}.monitor=val/ce (optimized_metric can "
                f"stay a post-training key), or callbacks.{name}.monitor=null"
            )


def check_config(cfg: DictConfig) -> tuple[DistillationLoss, CodesDataModule, list[L.Callback]]:
    """Validate everything that does not need weights; return the cheap objects it built.

    Those are the loss, the datamodule and the post-training callbacks (quantize, then evaluate), which
    validate their own options when constructed.
    """
    for key in ("model", "data", "loss", "optim", "trainer"):
        if key not in cfg:
            raise ConfigError(f"config group {key!r} is missing; compose from conf/train.yaml")
    try:
        loss: DistillationLoss = instantiate(cfg.loss)
    except Exception as err:  # Hydra wraps the registry's ValueError; surface its message
        raise ConfigError(f"loss: {err.__cause__ or err}") from err
    if loss.requires_teacher and cfg.model.get("teacher") is None:
        raise ConfigError(f"loss={cfg.loss.get('name')} distils from a teacher but model.teacher is null")
    try:
        datamodule: CodesDataModule = instantiate(cfg.data)
    except Exception as err:
        raise ConfigError(f"data: {err.__cause__ or err}") from err
    max_steps = cfg.trainer.get("max_steps", -1)
    if (max_steps is None or max_steps < 0) and cfg.trainer.get("max_epochs", -1) in (None, -1):
        raise ConfigError("trainer.max_steps (or trainer.max_epochs) must be set; 0 skips training")
    if not 0.0 <= float(cfg.get("cond_dropout", 0.0)) < 1.0:
        raise ConfigError(f"cond_dropout={cfg.cond_dropout}: must be in [0, 1)")
    try:
        check_model_config(cfg.model)
    except ModelSourceError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cfg.get("ckpt_path") is not None:
        check_resume_checkpoint(str(cfg.ckpt_path))
    try:
        check_quant_config(cfg.get("quant"))
    except Exception as err:
        raise ConfigError(f"quant: {err}") from err
    post_training = []
    for group in ("quant", "eval"):
        if cfg.get(group) and "_target_" in cfg[group]:
            try:
                post_training.append(instantiate(cfg[group]))
            except Exception as err:
                raise ConfigError(f"{group}: {err.__cause__ or err}") from err
    check_metrics(cfg, post_training)
    return loss, datamodule, post_training


def count_parameters(model: torch.nn.Module | None, trainable: bool = False) -> int:
    if model is None:
        return 0
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a Lightning metrics dict (tensors included) as floats, for the run's summary."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one training job; returns (metrics, objects) so tests and sweeps can inspect both."""
    loss, datamodule, post_training = check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=False)

    models = load_teacher_student(cfg.model, cfg.paths.cache_dir)
    metric = cfg.get("optimized_metric")
    num_codebooks = models.student.config.decoder.num_codebooks
    codebook = re.fullmatch(r"val/ce_q(\d+)", str(metric))
    if codebook and int(codebook.group(1)) >= num_codebooks:  # K is known only now; still before training
        raise ConfigError(
            f"optimized_metric={metric}: the student has {num_codebooks} codebooks (q0..q{num_codebooks - 1})"
        )
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    module = DistillationModule(
        student=models.student,
        teacher=models.teacher,
        loss=loss,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        cond_dropout=float(cfg.cond_dropout),
        checkpoint_frozen=bool(cfg.get("checkpoint_frozen", True)),
    )
    save_student = SaveStudent(output_dir / "student", models.tokenizer)
    on_interrupt = CheckpointOnInterrupt(output_dir / "checkpoints")
    # At fit end SaveStudent runs first, so post-training steps (quantize, evaluate) cannot lose the weights.
    callbacks = [
        save_student,
        on_interrupt,
        *(instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None),
        *post_training,
    ]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(to_plain(cfg))

    before: dict[str, float] = {}
    start = time.perf_counter()
    try:
        if cfg.get("validate_before_fit", True) and cfg.get("ckpt_path") is None:
            before = scalar_metrics(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
        start = time.perf_counter()
        # weights_only=True: resume checkpoints load as data even if TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except SIGTERMException as err:  # Lightning's graceful stop is a SystemExit with code 0: make it loud
        raise interrupted(cfg, output_dir, trainer, on_interrupt.saved_path) from err
    seconds = time.perf_counter() - start
    after = scalar_metrics(trainer.validate(module, datamodule=datamodule, verbose=False)[0])

    student_dir = save_student.saved_dir
    checkpoint = next((c for c in callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint)), None)
    summary = {
        "task": cfg.task_name,
        "loss": cfg.loss.get("name"),
        "student": models.student_source,
        "teacher": models.teacher_source,
        "student_trainable_params": count_parameters(models.student, trainable=True),
        "teacher_params": count_parameters(models.teacher),
        "steps": int(trainer.global_step),
        "train_seconds": round(seconds, 1),
        "before": before,
        "after": after,
        "student_dir": str(student_dir),
        "best_checkpoint": checkpoint.best_model_path if checkpoint else None,
        "last_checkpoint": checkpoint.last_model_path if checkpoint else None,
        "log_dir": str(output_dir),
        "status": "finished",
    }
    for callback in post_training:  # a failed (on_error: warn) quantization is said so in the summary
        report = getattr(callback, "report", None)
        if isinstance(report, dict) and report.get("status") != "ok":
            summary["quant_error"] = report.get("error")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    metrics = {**{f"before/{k}": v for k, v in before.items()}, **module.last_train_logs, **after}
    for callback in post_training:  # quant/* and eval/* results, so sweeps can optimise them too
        metrics.update(scalar_metrics(getattr(callback, "last_metrics", None) or {}))
    return metrics, {
        "cfg": cfg,
        "module": module,
        "trainer": trainer,
        "datamodule": datamodule,
        "models": models,
        "summary": summary,
    }


def interrupted(
    cfg: DictConfig, output_dir: Path, trainer: L.Trainer, checkpoint: Path | None
) -> TrainingInterrupted:
    """Write an ``interrupted`` summary.json and say how to resume (or that nothing was trained yet)."""
    steps = int(trainer.global_step)
    summary = {"task": cfg.task_name, "status": "interrupted", "steps": steps, "log_dir": str(output_dir)}
    summary["interrupted_checkpoint"] = str(checkpoint) if checkpoint else None
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if checkpoint is None:
        return TrainingInterrupted(
            f"training interrupted by SIGTERM at step {steps}, before any step to save"
        )
    return TrainingInterrupted(
        f"training interrupted by SIGTERM at step {steps}; checkpoint saved to {checkpoint}. Resume with the "
        f"same overrides plus ckpt_path={checkpoint}"
    )


def leave_no_empty_run_dir(output_dir: Path, job_name: str) -> None:
    """Remove a run directory holding nothing but what Hydra (and train's config.yaml) wrote at start-up."""
    start_up_files = {".hydra", f"{job_name}.log", "config.yaml"}
    if output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= start_up_files:
        shutil.rmtree(output_dir, ignore_errors=True)


def print_summary(summary: dict[str, Any]) -> None:
    before, after = summary["before"], summary["after"]

    def change(key: str) -> str:
        if key not in after:
            return "n/a"
        return f"{before[key]:.3f} -> {after[key]:.3f}" if key in before else f"{after[key]:.3f}"

    lines = [
        f"TinyMusician run '{summary['task']}' finished: {summary['steps']} steps in {summary['train_seconds']} s",
        f"  loss                 {summary['loss']}",
        f"  student              {summary['student']} ({summary['student_trainable_params']:,} trainable params)",
        f"  teacher              {summary['teacher']} ({summary['teacher_params']:,} params, frozen)",
        f"  val/ce               {change('val/ce')}   (teacher {after.get('val/teacher_ce', math.nan):.3f})",
        f"  val/kl_to_teacher    {change('val/kl_to_teacher')}",
        f"  student saved to     {summary['student_dir']}   (save_pretrained: loads with from_pretrained)",
        f"  best checkpoint      {summary['best_checkpoint']}",
        f"  logs                 {summary['log_dir']}",
    ]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One clear ``error: ...`` line for config/data errors (exit 2) and SIGTERM (exit 143), no traceback."""
    try:
        metrics, _ = train(cfg)
    except START_UP_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweep stops and Hydra reports the failed job, as sweepers expect
        leave_no_empty_run_dir(Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.name)
        raise SystemExit(CONFIG_EXIT_CODE) from None
    except TrainingInterrupted as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    value = metrics.get(cfg.get("optimized_metric"))
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
