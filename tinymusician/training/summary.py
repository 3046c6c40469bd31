"""What a finished training run reports: parameter counts, float metrics and the printed summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tinymusician.distill.losses import configured_guidance_scale


def count_parameters(model: torch.nn.Module | None, trainable: bool = False) -> int:
    if model is None:
        return 0
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a Lightning metrics dict (tensors included) as floats, for the run's summary."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


# Post-training numbers the summary prints (summary.json and the loggers keep every one).
QUANT_HEADLINE = ("quant/size_mb", "quant/reduction", "quant/top1_agree")


def headline(key: str) -> bool:
    return key in QUANT_HEADLINE or key.startswith(("eval/", "eval_quant/"))


def print_summary(summary: dict[str, Any]) -> None:
    before, after = summary["before"], summary["after"]

    def change(key: str) -> str:
        if key not in after:
            return "n/a"
        return f"{before[key]:.3f} -> {after[key]:.3f}" if key in before else f"{after[key]:.3f}"

    source = summary.get("teacher_source") or {}
    teacher = f"{summary['teacher']} ({summary['teacher_params']:,} params, frozen)"
    if source.get("kind") == "cache":  # the teacher was never loaded: its top-k came from disk
        teacher = f"{summary['teacher']} via its logit cache (k={source['k']}, tail {source['tail']}: {source['dir']})"
    lines = [
        f"TinyMusician run '{summary['task']}' finished: {summary['steps']} steps in {summary['train_seconds']} s",
        f"  loss                 {summary['loss']}"
        + (
            f" on the guided teacher (CFG {summary['guidance_scale']:g}): a one-pass student"
            if (summary.get("guidance_scale") or 1) > 1
            else ""
        ),
        f"  student              {summary['student']} ({summary['student_trainable_params']:,} trainable params)"
        + (
            f", its decoder layers {init['layers']} kept, {init['weights']} weights"
            if (init := summary.get("student_init"))
            else ""
        ),
        f"  teacher              {teacher}",
        f"  val/ce               {change('val/ce')}   (teacher {after.get('val/teacher_ce', math.nan):.3f})",
        f"  val/kl_to_teacher    {change('val/kl_to_teacher')}",
        *[
            f"  {key:<20} {value:.4f}"
            for key, value in summary.get("post_training", {}).items()
            if headline(key)
        ],
        *([f"  eval setup           {summary['eval_setup']}"] if summary.get("eval_setup") else []),
        *([f"  eval report          {summary['eval_report']}"] if summary.get("eval_report") else []),
        f"  student saved to     {summary['student_dir']}   (save_pretrained: loads with from_pretrained)",
        f"  best checkpoint      {summary['best_checkpoint']}",
        f"  logs                 {summary['log_dir']}",
    ]
    print("\n".join(lines), flush=True)


def run_identity(cfg: DictConfig, output_dir: Path, status: str) -> dict[str, Any]:
    """What run this is (task, loss, seed, the command line's overrides, directory) and how it ended."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    return {
        "task": cfg.get("task_name"),
        "loss": (cfg.get("loss") or {}).get("name"),
        "guidance_scale": configured_guidance_scale(cfg.get("loss")),  # > 1: guidance-distilled
        "seed": cfg.get("seed"),
        "overrides": overrides,
        "log_dir": str(output_dir),
        "status": status,
    }


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path
