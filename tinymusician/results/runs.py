"""Read a folder of training runs back from their saved files (summary.json, reports, metrics CSV), not a logger.

Each run directory of ``python -m tinymusician.train`` holds ``summary.json`` (also for failed and interrupted
jobs), ``.hydra/overrides.yaml``, ``csv/metrics.csv``, ``quantized/quant_report.json`` and
``eval/final/report.json``. An *arm* is what tells runs apart, seed aside: the experiment plus every
override that differs between the runs read together.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
CURVE_KEYS = ("val/ce", "val/kl_to_teacher")
# Overrides that never make an arm: where files go, how the run is logged or shown.
NOT_AN_ARM = ("seed=", "paths.", "hydra.", "logger=", "logger.", "callbacks.progress_bar", "task_name=")
EXPERIMENT = "+experiment="


# What a report reads from a run: small text files (no checkpoints, weights or audio).
REPORT_FILES = (
    SUMMARY_FILE,
    "config.yaml",
    ".hydra/overrides.yaml",
    "csv/metrics.csv",
    "quantized/quant_report.json",
    "eval/final/report.json",
)


class RunsError(ValueError):
    """A runs directory that holds no run."""


@dataclass
class Run:
    """One run directory: its summary, overrides, reports and validation curves."""

    directory: Path
    summary: dict[str, Any]
    overrides: list[str]
    quant_report: dict[str, Any] | None = None
    eval_report: dict[str, Any] | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    arm: str = ""

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "missing"))

    @property
    def seed(self) -> Any:
        if self.summary.get("seed") is not None:
            return self.summary["seed"]
        # runs written before summary.json carried the seed: the command line's override says it
        return next((o.split("=", 1)[1] for o in self.overrides if o.startswith("seed=")), None)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @cached_property
    def report_metrics(self) -> dict[str, float]:
        """``quant/*`` from ``quant_report.json`` and ``eval/*`` / ``eval_quant/*`` (with ``rtf``) from the final
        evaluation's ``report.json``, converted by the same functions that logged them during the run."""
        from tinymusician.metrics.evaluation import result_metrics
        from tinymusician.quant.job import report_metrics

        metrics = report_metrics(self.quant_report) if self.quant_report else {}
        for model, prefix in (("student", "eval"), ("quantized", "eval_quant")):
            result = (self.eval_report or {}).get(model)
            if result:
                metrics.update(result_metrics(result, prefix))
                if (result.get("generation") or {}).get("rtf") is not None:
                    metrics[f"{prefix}/rtf"] = float(result["generation"]["rtf"])
        return metrics

    def metric(self, key: str) -> float | None:
        """A number of the run: ``quant/*`` / ``eval/*`` / ``eval_quant/*`` from its reports (else summary.json's
        copy), ``val/*`` after training, or a summary field (``steps``, ``student_size_mb``); None if absent."""
        for source in (
            self.report_metrics,
            self.summary.get("post_training") or {},
            self.summary.get("after") or {},
            self.summary,
        ):
            value = source.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        return None

    def metric_keys(self) -> set[str]:
        return set(self.report_metrics) | set(self.summary.get("post_training") or {})

    @property
    def quantization(self) -> str | None:
        """None (the run did not quantize), ``ok``, or ``failed`` (``on_error: warn`` kept the run going)."""
        failed = self.metric("quant/failed")
        if failed is None:
            return "ok" if self.metric("quant/size_mb") is not None else None
        return "failed" if failed else "ok"

    @property
    def quantized(self) -> bool:
        return self.quantization == "ok"

    def deployed(self, key: str) -> float | None:
        """``eval/<key>`` of the model the run ships: the quantized student when it quantized; None when its
        quantization failed (its fp32 numbers are not what the arm ships)."""
        if self.quantization == "failed":
            return None
        return self.metric(f"eval_quant/{key}" if self.quantized else f"eval/{key}")


def job_directories(root: Path) -> list[Path]:
    """Every run directory under ``root``: it has a summary.json or Hydra's ``.hydra`` folder."""
    found = {p.parent for p in root.rglob(SUMMARY_FILE)} | {
        p.parent for p in root.rglob(".hydra") if p.is_dir()
    }
    # a logger's own folders (wandb/, csv/) never hold a run
    runs = [d for d in found if not ({"wandb", "csv", "tensorboard"} & set(d.relative_to(root).parts))]
    return sorted(runs, key=lambda d: natural_key(d.relative_to(root)))


def natural_key(path: Path) -> list[tuple[int, int | str]]:
    """Job directories in the order the sweep ran them: ``2`` before ``10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.parts]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s is unreadable (%s); left out of the report", path, err)
        return None


def read_overrides(directory: Path, summary: dict[str, Any]) -> list[str]:
    if summary.get("overrides") is not None:
        return [str(o) for o in summary["overrides"]]
    path = directory / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path))] if path.is_file() else []


def read_curves(path: Path, keys: tuple[str, ...] = CURVE_KEYS) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return curves
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key in keys:
                if row.get(key):
                    curves.setdefault(key, []).append((int(row["step"]), float(row[key])))
    return curves


def eval_report_of(directory: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The final evaluation's report: inside the run directory (so a moved or copied folder still reads)."""
    local = directory / "eval" / "final" / "report.json"
    if local.is_file():
        return read_json(local)
    path = summary.get("eval_report")
    return read_json(Path(path)) if path else None


def load_run(directory: Path) -> Run:
    summary = read_json(directory / SUMMARY_FILE) or {"status": "missing", "log_dir": str(directory)}
    return Run(
        directory=directory,
        summary=summary,
        overrides=read_overrides(directory, summary),
        quant_report=read_json(directory / "quantized" / "quant_report.json"),
        eval_report=eval_report_of(directory, summary),
        curves=read_curves(directory / "csv" / "metrics.csv"),
    )


def arm_tokens(run: Run) -> list[str]:
    return [o for o in run.overrides if not o.startswith(NOT_AN_ARM)]


def label_arms(runs: list[Run]) -> None:
    """Name each run's arm: its experiment plus the overrides not shared by all runs (the seed never counts)."""
    shared = set.intersection(*(set(arm_tokens(r)) for r in runs)) if runs else set()
    for run in runs:
        tokens = arm_tokens(run)
        experiment = [t[len(EXPERIMENT) :] for t in tokens if t.startswith(EXPERIMENT)]
        rest = [t for t in tokens if t not in shared and not t.startswith(EXPERIMENT)]
        run.arm = " ".join(experiment + rest) or str(run.summary.get("task") or run.directory.name)


def load_runs(root: Path | str) -> list[Run]:
    """Every run under ``root`` (finished, failed, interrupted, or started without a summary), arms labelled."""
    root = Path(root)
    if not root.is_dir():
        raise RunsError(f"{root} is not a directory: give the folder a sweep or runs were written to")
    runs = [load_run(d) for d in job_directories(root)]
    if not runs:
        raise RunsError(
            f"no run under {root} (no summary.json or .hydra/ folder): point at a sweep's directory, e.g. "
            "logs/multiruns/<timestamp>"
        )
    label_arms(runs)
    return runs


def copy_report_files(root: Path | str, dest: Path | str) -> int:
    """Copy every run's :data:`REPORT_FILES` (and the sweep summaries) from ``root`` to ``dest``, keeping the
    layout, so the report can be rebuilt from a commit without the gigabytes of checkpoints. Returns files copied."""
    import shutil

    root, dest = Path(root), Path(dest)
    copied = 0
    for directory in job_directories(root):
        for name in REPORT_FILES:
            source = directory / name
            if source.is_file():
                target = dest / directory.relative_to(root) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
                copied += 1
    for source in root.glob("multirun_summary.*"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / source.name)
        copied += 1
    return copied
