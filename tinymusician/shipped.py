"""Where the shipped tiny world lives (codec-bearing teacher and student, tiny CLAP) and what ``tiny`` means.

``tiny`` as a model source (``model.teacher``, ``model.student``, ``eval.clap_model``, a CLAP embedder's
``source``) is the matching part of the world trained by ``python -m tinymusician.world build`` and shipped
in ``tinymusician/assets/world/``: plain ``save_pretrained`` directories, loaded through the same
``from_pretrained`` path as hub checkpoints.
"""

from __future__ import annotations

from pathlib import Path

TINY = "tiny"
WORLD_DIR = Path(__file__).resolve().parent / "assets" / "world"
WORLD_PARTS = ("teacher", "student", "clap")


def world_part(part: str, root: Path = WORLD_DIR) -> Path:
    """The directory of one shipped part; a clear error when it is missing (e.g. a clone without LFS)."""
    if part not in WORLD_PARTS:
        raise ValueError(f"unknown tiny-world part {part!r}; known: {list(WORLD_PARTS)}")
    path = root / part
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the tiny world's {part} is missing ({path}/config.json); rebuild it with "
            "`python -m tinymusician.world build` (about 35 min on 2 CPU cores) or restore tinymusician/assets/"
        )
    return path


def resolve_tiny(source: str | None, part: str) -> str | None:
    """``tiny`` -> the shipped part's directory; any other source (hub id, directory) unchanged."""
    return str(world_part(part)) if source == TINY else source
