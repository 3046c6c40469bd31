"""Multi-process training on Lightning's strategies (``trainer=ddp`` / ``trainer=fsdp``): the start-up checks
and the one thing a Hydra multirun needs around Lightning's DDP launcher (:func:`distributed_job`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, read_write

# What Lightning's subprocess launcher puts into the launching process's environment. Left there after a job,
# LOCAL_RANK makes the next job of a sweep believe its processes were started externally (it would launch
# none and wait for them forever).
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")

# Hydra overrides that belong to the sweep, not to the job a DDP rank re-runs.
SWEEP_ONLY_OVERRIDES = (
    "hydra.mode",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.run.dir",
    "hydra.job.name",
    "hydra.output_subdir",
)

TEACHER_SHARDING = ("replicate",)

MULTI_PROCESS_STRATEGIES = ("DDPStrategy", "FSDPStrategy")


def is_rank_zero() -> bool:
    """This process is rank 0 (Lightning reads RANK / LOCAL_RANK / SLURM_PROCID, so it is known before the
    Trainer exists): ranks > 0 run the same job and must not write its files a second time."""
    return rank_zero_only.rank == 0


def strategy_name(trainer_cfg: DictConfig | Any) -> str:
    """The class name of ``trainer.strategy``'s ``_target_`` (or the strategy string, e.g. ``ddp``; ``auto``)."""
    strategy = trainer_cfg.get("strategy", "auto") if trainer_cfg is not None else "auto"
    if isinstance(strategy, str):
        return strategy
    return str((strategy or {}).get("_target_", "auto")).rsplit(".", 1)[-1]


def hydra_launcher() -> str:
    """The ``_target_`` of the Hydra launcher running this job ("" outside a Hydra app)."""
    return str(HydraConfig.get().launcher.get("_target_", "")) if HydraConfig.initialized() else ""


def check_distributed(cfg: DictConfig, launcher: str = "") -> str | None:
    """What stops this config's multi-process training before any weights load (None: nothing).

    ``launcher`` is the Hydra launcher that runs the job (``hydra_launcher()`` in train); it is an argument,
    not read here, so a tool that only composes the config (plan_memory) is not judged by whatever Hydra app
    ran last in the process. ``model.teacher_sharding``: only ``replicate`` (every rank holds the frozen
    teacher, outside the module tree); ``shard`` needs FSDP, which Lightning runs on GPUs only, and is not
    offered untested.
    """
    sharding = (cfg.get("model") or {}).get("teacher_sharding", "replicate")
    if sharding not in TEACHER_SHARDING:
        return (
            f"model.teacher_sharding={sharding}: only {TEACHER_SHARDING} is available (every rank holds the frozen "
            "teacher). Sharding the teacher in its own FSDP unit is not implemented: Lightning's FSDP needs GPUs "
            "and it could not be tested here"
        )
    trainer_cfg = cfg.get("trainer")
    name = strategy_name(trainer_cfg)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if name in ("FSDPStrategy", "fsdp") and accelerator not in ("gpu", "cuda"):
        return (
            f"trainer=fsdp with trainer.accelerator={accelerator}: Lightning's FSDPStrategy runs on GPUs only "
            "(set trainer.accelerator=gpu); on CPU use trainer=ddp trainer.accelerator=cpu"
        )
    if name in MULTI_PROCESS_STRATEGIES and "joblib" in launcher.lower():
        return (
            f"trainer.strategy={name} with hydra/launcher=joblib: Lightning starts the other ranks by re-running "
            "the command, which a joblib worker is not. Use the default launcher (jobs one after another, each on "
            "trainer.devices processes) or hydra/launcher=slurm"
        )
    return None


def rerun_overrides(hydra_cfg: DictConfig) -> list[str]:
    """The command-line arguments that re-run this multirun job alone: its overrides, without the sweep's."""
    hydra_overrides = [
        o for o in hydra_cfg.overrides.hydra if not o.lstrip("+~").startswith(SWEEP_ONLY_OVERRIDES)
    ]
    # hydra.mode=RUN: a sweep preset (+sweep=...) in the job's overrides sets MULTIRUN again
    return [*hydra_cfg.overrides.task, *hydra_overrides, "hydra.mode=RUN"]


@contextmanager
def distributed_job() -> Iterator[None]:
    """Around one training job's Trainer calls, so DDP keeps one output directory per multirun job.

    Lightning's subprocess launcher starts ranks > 0 by re-running ``sys.argv`` with
    ``hydra.run.dir=<HydraConfig run.dir>``; in a multirun that re-runs the whole sweep, into the run (not
    the job) directory (lightning-hydra-template #393). Here, in a multirun, ``sys.argv`` becomes this job's
    overrides and ``run.dir`` its output directory, so every rank works in the job's directory. Afterwards
    the process group is destroyed and the launcher's environment variables restored, so the sweep's next
    job launches its own processes.
    """
    saved_argv = sys.argv[:]
    saved_env = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and is_rank_zero():
        hydra_cfg = HydraConfig.get()
        sys.argv = [sys.argv[0], *rerun_overrides(hydra_cfg)]
        with read_write(hydra_cfg):  # Hydra sets this config afresh for every job of the sweep
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank is done with the job's files before the next job starts
    finally:
        sys.argv = saved_argv
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # Lightning leaves it to atexit: the next job would reuse it
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
