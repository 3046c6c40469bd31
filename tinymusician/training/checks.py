"""Start-up checks of a training run's composed config: everything that can fail without weights fails here,
before any model is loaded, with the key, the value and how to fix it."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from tinymusician.data.audio import BadSampleError
from tinymusician.data.datamodule import CodesDataModule, EmptySplitError
from tinymusician.distill.losses import DistillationLoss
from tinymusician.distill.module import PER_CODEBOOK_VALIDATION_METRIC, validation_metric_keys
from tinymusician.distill.teacher_cache import TeacherCacheError
from tinymusician.models.musicgen import ModelSourceError
from tinymusician.quant import check_quant_config
from tinymusician.training.distributed import check_distributed, hydra_launcher
from tinymusician.zoo.pair import check_model_config
from tinymusician.zoo.source import read_training_checkpoint


class ConfigError(ValueError):
    """The composed config cannot run; raised before any model is loaded."""


# Errors of the user's config or data: the CLIs print them as one `error: ...` line (no traceback), exit 2.
START_UP_ERRORS = (ConfigError, ModelSourceError, EmptySplitError, BadSampleError, TeacherCacheError)


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


# trainer.precision: fp32 or autocast mixed precision over fp32 weights (the saved student stays fp32; CE and
# KD are computed in fp32 either way). On CPU Lightning 2.6 runs 16-mixed as bf16-mixed, with a warning;
# summary.json's `precision` is the one used. "*-true" half precisions would train and save a half student.
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")


def check_precision(trainer_cfg: DictConfig) -> None:
    """``trainer.precision`` must be one of :data:`PRECISIONS`."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision}: use 32-true, bf16-mixed or 16-mixed (autocast over fp32 weights, so "
            "the student trains and is saved in fp32). For a half-precision teacher set "
            "model.teacher_dtype=bfloat16 (or float16)"
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
    check_precision(cfg.trainer)
    problem = check_distributed(cfg, hydra_launcher())  # trainer=ddp / fsdp, model.teacher_sharding
    if problem is not None:
        raise ConfigError(problem)
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
