"""Train a student (with or without distillation): ``python -m tinymusician.train +experiment=kd_only``.

``train(cfg)`` checks the config, loads the teacher/student pair, trains with Lightning, saves the student
with ``save_pretrained`` and prints a summary; ``main`` returns ``cfg.optimized_metric`` for sweepers.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from tinymusician.callbacks.interrupt import CheckpointOnInterrupt
from tinymusician.callbacks.save_student import SaveStudent
from tinymusician.config import CONF_DIR, to_plain
from tinymusician.distill.module import DistillationModule
from tinymusician.machine import machine
from tinymusician.quant.size import component_sizes
from tinymusician.training.checks import START_UP_ERRORS, ConfigError, check_config
from tinymusician.training.distributed import distributed_job, is_rank_zero
from tinymusician.training.loggers import finish_loggers, log_run_end
from tinymusician.training.summary import (
    count_parameters,
    print_summary,
    run_identity,
    scalar_metrics,
    write_summary,
)
from tinymusician.training.teacher_logits import check_cacheable, open_for_run, teacher_source
from tinymusician.zoo.pair import load_teacher_student
from tinymusician.zoo.student_init import PROVENANCE

log = logging.getLogger(__name__)

# Frozen T5/EnCodec (and the teacher) stay in eval mode on purpose; Lightning warns about it at every fit.
# DistillationModule.on_fit_start puts the trainable student back in train mode (tests/distill check it).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

CONFIG_EXIT_CODE = 2  # like a command-line usage error
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process killed by it


class TrainingInterrupted(RuntimeError):
    """SIGTERM stopped training; a checkpoint to resume from was written (its path is in the message)."""


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one training job; returns (metrics, objects) so tests and sweeps can inspect both."""
    loss, datamodule, post_training = check_config(cfg)
    kd_source = teacher_source(cfg)
    if kd_source == "cache":
        check_cacheable(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():  # DDP ranks > 0 run this same job: its files are written once
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=False)
    loggers = instantiate_loggers(cfg)  # a logger's config error stops here, before any weights load

    models = load_teacher_student(cfg.model, load_teacher=kd_source == "live")
    metric = cfg.get("optimized_metric")
    num_codebooks = models.student.config.decoder.num_codebooks
    codebook = re.fullmatch(r"val/ce_q(\d+)", str(metric))
    if codebook and int(codebook.group(1)) >= num_codebooks:  # K is known only now; still before training
        raise ConfigError(
            f"optimized_metric={metric}: the student has {num_codebooks} codebooks (q0..q{num_codebooks - 1})"
        )
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    # Seeded again now that the weights are in: loading a teacher (or not, from the cache) consumes the global
    # RNG, and a run's data order and dropout must not depend on where its KD targets come from.
    L.seed_everything(cfg.seed, workers=True)
    teacher_cache, cache_report = open_for_run(cfg, datamodule) if kd_source == "cache" else (None, None)
    module = DistillationModule(
        student=models.student,
        teacher=models.teacher,
        loss=loss,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        cond_dropout=float(cfg.cond_dropout),
        checkpoint_frozen=bool(cfg.get("checkpoint_frozen", True)),
        teacher_cache=teacher_cache,
    )
    if cache_report is not None:
        log.info(
            "KD targets from the teacher-logit cache %s (%.1f MB)",
            teacher_cache.root,
            cache_report["megabytes"],
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
    try:
        with distributed_job():  # DDP in a multirun: ranks > 0 re-run this job, in its directory
            metrics, objects = fit_and_report(
                cfg,
                models=models,
                module=module,
                datamodule=datamodule,
                callbacks=callbacks,
                post_training=post_training,
                loggers=loggers,
                save_student=save_student,
                on_interrupt=on_interrupt,
            )
    except BaseException:
        finish_loggers(loggers, failed=True)  # one finished wandb run per job, also after a crash or SIGTERM
        raise
    finish_loggers(loggers)
    return metrics, objects


def instantiate_loggers(cfg: DictConfig) -> list[Any]:
    """``cfg.logger``'s loggers; a logger's own config error (say wandb online without an API key) comes out
    as that error, not wrapped in Hydra's InstantiationException, so `main` prints it as one line."""
    try:
        return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    except InstantiationException as err:
        if isinstance(err.__cause__, START_UP_ERRORS):
            raise err.__cause__ from None
        raise


def fit_and_report(
    cfg: DictConfig,
    *,
    models: Any,
    module: DistillationModule,
    datamodule: Any,
    callbacks: list[L.Callback],
    post_training: list[L.Callback],
    loggers: list[Any],
    save_student: SaveStudent,
    on_interrupt: CheckpointOnInterrupt,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Validate, fit (post-training callbacks run at fit end), validate again; write, print and log the summary."""
    output_dir = Path(cfg.paths.output_dir)
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
    student_size_mb = component_sizes(models.student)["total"]  # fp32 as trained, before any quantization
    summary = {
        **run_identity(cfg, output_dir, status="finished"),
        "student": models.student_source,
        # model.student_init: which of the source's decoder layers it kept, pretrained or random (else None)
        "student_init": getattr(models.student.config.decoder, PROVENANCE, None),
        "teacher": models.teacher_source,
        "student_trainable_params": count_parameters(models.student, trainable=True),
        "teacher_params": count_parameters(models.teacher),
        "teacher_source": teacher_logits_summary(module),
        "student_size_mb": student_size_mb,
        "steps": int(trainer.global_step),
        "precision": str(trainer.precision),  # as run: on CPU Lightning turns 16-mixed into bf16-mixed
        "train_seconds": round(seconds, 1),
        "before": before,
        "after": after,
        "student_dir": str(student_dir),
        "best_checkpoint": checkpoint.best_model_path if checkpoint else None,
        "last_checkpoint": checkpoint.last_model_path if checkpoint else None,
        "machine": machine(),
    }
    post_metrics: dict[str, float] = {}
    for callback in post_training:  # quant/* and eval/* results, so sweeps can optimise them too
        post_metrics.update(scalar_metrics(getattr(callback, "last_metrics", None) or {}))
        report = getattr(callback, "report", None)
        if isinstance(report, dict) and report.get("status") != "ok":  # a failed on_error: warn quantization
            summary["quant_error"] = report.get("error")
        if getattr(callback, "report_path", None) is not None:
            summary["quant_report"] = str(callback.report_path)
        if getattr(callback, "last_report_path", None) is not None:
            summary["eval_report"] = str(callback.last_report_path)
            summary["eval_setup"] = callback.describe()
    summary["post_training"] = post_metrics
    if trainer.is_global_zero:  # DDP: one summary.json, one printout, one upload per job
        write_summary(output_dir, summary)
        print_summary(summary)
        try:  # the run is trained and summarised: a logger's trouble must not turn it into a failed one
            log_run_end(loggers, summary, output_dir, scheduler=getattr(module.loss_fn, "scheduler", None))
        except Exception:
            log.exception("Logging the end-of-run reports failed; summary.json and the files are complete")
    metrics = {
        **{f"before/{k}": v for k, v in before.items()},
        **module.last_train_logs,
        **after,
        **post_metrics,
    }
    return metrics, {
        "cfg": cfg,
        "module": module,
        "trainer": trainer,
        "datamodule": datamodule,
        "models": models,
        "summary": summary,
    }


def teacher_logits_summary(module: DistillationModule) -> dict[str, Any]:
    """Where the KD targets came from: the live teacher, or the cache (its directory, k, temperature, tail)."""
    cache = module.teacher_cache
    if cache is None:
        return {"kind": "live" if module.teacher is not None else "none"}
    settings = cache.settings
    return {
        "kind": "cache",
        "dir": str(cache.root),
        "k": settings.k,
        "temperature": settings.temperature,
        "tail": settings.tail,
    }


def interrupted(
    cfg: DictConfig, output_dir: Path, trainer: L.Trainer, checkpoint: Path | None
) -> TrainingInterrupted:
    """Write an ``interrupted`` summary.json and say how to resume (or that nothing was trained yet)."""
    steps = int(trainer.global_step)
    summary = {**run_identity(cfg, output_dir, status="interrupted"), "steps": steps}
    summary["interrupted_checkpoint"] = str(checkpoint) if checkpoint else None
    if trainer.is_global_zero:
        write_summary(output_dir, summary)
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


def failed(cfg: DictConfig, err: BaseException, expected: bool = False) -> None:
    """A multirun job that raised: its error (and traceback) into summary.json and the log, None to the sweeper.

    The other jobs go on; the sweep's summary (:class:`tinymusician.results.multirun.MultirunSummary`) lists
    the failure and the sweep exits non-zero. The Optuna sweeper marks a trial that returned None failed and
    carries on (a NaN would end its study: optuna 2.10 with hydra-optuna-sweeper 1.3).
    """
    output_dir = Path(cfg.paths.output_dir)
    summary = {
        **run_identity(cfg, output_dir, status="failed"),
        "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(),
    }
    write_summary(output_dir, summary)
    # a config/data error is the user's and needs no traceback in the log; anything else does
    log.error("Job failed (the sweep goes on): %s", summary["error"], exc_info=None if expected else err)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One clear ``error: ...`` line for config/data errors (exit 2) and SIGTERM (exit 143), no traceback.

    In a multirun every failure stays inside its job (:func:`failed`), so one bad arm never stops a sweep.
    """
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics, _ = train(cfg)
    except START_UP_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        if multirun:
            failed(cfg, err, expected=True)
            return None
        hydra_cfg = HydraConfig.get()
        leave_no_empty_run_dir(Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.name)
        raise SystemExit(CONFIG_EXIT_CODE) from None
    except TrainingInterrupted as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    except Exception as err:
        if multirun:
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            failed(cfg, err)
            return None
        raise
    value = metrics.get(cfg.get("optimized_metric"))
    # a diverged run's NaN would end an Optuna study; None marks just this trial failed
    return None if value is None or not math.isfinite(float(value)) else float(value)


if __name__ == "__main__":
    main()
