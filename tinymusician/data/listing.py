"""What a dataset lists before any audio is decoded: its clips, rejected rows, and stable hash splits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# Values of a dataset's split column -> the split they feed; "test" rows are held out of training.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "eval": "val",
    "dev": "val",
    "test": None,
}


@dataclass(frozen=True)
class ClipRef:
    """One clip a dataset lists: a unique id, its split and caption, and where its audio is.

    ``stamp`` (file size, mtime) goes into the cache key, so an edited file is encoded again.
    """

    id: str
    split: str
    caption: str | None
    path: Path | None = None
    stamp: tuple[int, int] | None = None


@dataclass
class Listing:
    """What a dataset found before decoding: usable-looking clips, rejected rows/files and notes to print."""

    clips: list[ClipRef]
    bad: list[dict] = field(default_factory=list)  # {"id", "reason"} (+ "split" when known)
    notes: list[str] = field(default_factory=list)
    held_out: int = 0

    def fingerprint(self) -> str:
        rows = [(c.id, c.split, c.caption, str(c.path), c.stamp) for c in self.clips]
        return hashlib.sha256(json.dumps([rows, self.bad], default=str).encode()).hexdigest()[:16]


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def hash_fraction(clip_id: str) -> float:
    """A stable number in [0, 1) per id (not Python's salted ``hash``), for reproducible splits."""
    return int(hashlib.sha256(clip_id.encode()).hexdigest()[:15], 16) / 16**15


def hash_split(clip_id: str, val_fraction: float) -> str:
    return "val" if hash_fraction(clip_id) < val_fraction else "train"
