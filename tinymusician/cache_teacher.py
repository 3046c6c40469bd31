"""Fill the teacher-logit cache: ``python -m tinymusician.cache_teacher <the same overrides as train>``.

The teacher runs once over every training and validation segment and its top-k log-probabilities per position
and codebook are stored (``distill.cache.*``: k, temperature, directory); then
``python -m tinymusician.train <the same overrides> distill.teacher_source=cache`` trains without loading it.
A killed build resumes from its finished shards.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from tinymusician.config import CONF_DIR
from tinymusician.training.checks import START_UP_ERRORS, check_config
from tinymusician.training.teacher_logits import build_for_run, check_cacheable
from tinymusician.zoo.pair import load_teacher_student

CONFIG_EXIT_CODE = 2


def cache_teacher(cfg: DictConfig, progress: bool = True) -> dict:
    """Build (or complete) the cache for ``cfg``; returns its report."""
    _, datamodule, _ = check_config(cfg)
    check_cacheable(cfg)
    models = load_teacher_student(cfg.model)
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    cache, report = build_for_run(cfg, models.teacher, datamodule, progress=progress)
    splits = ", ".join(f"{name} {info['windows']} segments" for name, info in report["splits"].items())
    speed = report.get("positions_per_second")
    print(
        f"Teacher-logit cache {cache.root}: {splits}; k={cache.settings.k}, T={cache.settings.temperature}; "
        f"{report['megabytes']:.2f} MB on disk"
        + (
            f"; {speed:,.0f} positions/s (teacher {models.teacher_source})"
            if speed
            else " (reused: complete)"
        )
        + "\nTrain from it with the same overrides plus distill.teacher_source=cache",
        flush=True,
    )
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        cache_teacher(cfg, progress=sys.stderr.isatty())
    except START_UP_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_EXIT_CODE) from None


if __name__ == "__main__":
    main()
