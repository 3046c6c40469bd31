"""Train a student (with or without distillation): ``python -m tinymusician.train +experiment=kd_only``.

``train(cfg)`` checks the config, loads the teacher/student pair, trains with Lightning, saves the student
with ``save_pretrained`` and prints a summary; ``main`` returns ``cfg.optimized_metric`` for sweepers.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tinymusician.callbacks.save_student import SaveStudent
from tinymusician.data.datamodule import CodesDataModule
from tinymusician.distill.losses import DistillationLoss
from tinymusician.distill.module import DistillationModule
from tinymusician.models.pair import check_model_config, load_teacher_student
from tinymusician.quant import check_quant_config

log = logging.getLogger(__name__)

# Frozen T5/EnCodec (and the teacher) stay in eval mode on purpose; Lightning warns about it at every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class ConfigError(ValueError):
    """The composed config cannot run; raised before any model is loaded."""


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
    check_model_config(cfg.model)
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
    return loss, datamodule, post_training


def count_parameters(model: torch.nn.Module | None, trainable: bool = False) -> int:
    if model is None:
        return 0
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one training job; returns (metrics, objects) so tests and sweeps can inspect both."""
    loss, datamodule, post_training = check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=False)

    models = load_teacher_student(cfg.model, cfg.paths.cache_dir)
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    module = DistillationModule(
        student=models.student,
        teacher=models.teacher,
        loss=loss,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        cond_dropout=float(cfg.cond_dropout),
    )
    save_student = SaveStudent(output_dir / "student", models.tokenizer)
    # At fit end SaveStudent runs first, so post-training steps (quantize, evaluate) cannot lose the weights.
    callbacks = [
        save_student,
        *(instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None),
        *post_training,
    ]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    before: dict[str, float] = {}
    if cfg.get("validate_before_fit", True) and cfg.get("ckpt_path") is None:
        before = scalar_metrics(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
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
    }
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
    metrics, _ = train(cfg)
    value = metrics.get(cfg.get("optimized_metric"))
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
