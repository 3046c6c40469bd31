"""Encode a dataset to codec tokens once, before training: ``python -m tinymusician.prepare data=...``.

The arguments are the same Hydra overrides as ``python -m tinymusician.train`` (composed from
conf/train.yaml), so the cache written here is exactly the one training reads. Interrupt it and run it
again to continue where it stopped; bad clips are skipped and listed (``data.on_bad_sample=skip``) or stop
it (``raise``). Example::

    python -m tinymusician.prepare data=folder data.root=/data/my-music
    python -m tinymusician.prepare data=musiccaps data.csv=musiccaps-public.csv data.audio_dir=clips
"""

from __future__ import annotations

import argparse
import logging
import sys

from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from tinymusician.data.datamodule import CodesDataModule, EmptySplitError, format_report
from tinymusician.models.musicgen import ModelSourceError, load_musicgen
from tinymusician.zoo.pair import check_model_config, resolve_sources
from tinymusician.zoo.source import compose_config

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> CodesDataModule:
    """``instantiate(cfg.data)`` with the DataModule's own message on a bad value (it names the key)."""
    try:
        return instantiate(cfg.data)
    except Exception as err:  # Hydra wraps the constructor's ValueError; surface its message
        raise ValueError(f"data: {err.__cause__ or err}") from err


def prepare(cfg: DictConfig, progress: bool = True) -> dict:
    """Encode every clip of ``cfg.data`` with the student's codec; return the cache's report.

    (``python -m tinymusician.data.prepare``, this command's old name, still works.)"""
    datamodule = build_datamodule(cfg)
    check_model_config(cfg.model)
    student, _ = resolve_sources(cfg.model)
    model = load_musicgen(student)
    report = datamodule.prepare_tokens(model, progress=progress, print_report=False)
    print(format_report(report, max_listed=50), flush=True)
    for split, info in report["splits"].items():
        if info["clips"] == 0:
            raise EmptySplitError(datamodule.empty_message(split))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinymusician.prepare",
        description="Encode a dataset to codec tokens once (sharded, resumable cache).",
        epilog="Example: python -m tinymusician.prepare data=folder data.root=/data/my-music",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of conf/train.yaml (data=..., model=...)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepare(compose_config(args.overrides), progress=not args.no_progress)
    except (
        HydraException,
        OmegaConfBaseException,
        ValueError,
        ModelSourceError,
    ) as err:  # BadSampleError, EmptySplitError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
