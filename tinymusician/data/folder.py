"""A folder of your own music: audio files (any depth) captioned by ``metadata.jsonl`` or ``metadata.csv``.

The Hugging Face *audiofolder* convention: each metadata row has ``file_name`` (relative to the metadata
file's directory) and ``text`` (the caption); an optional ``split`` column (train / validation / test)
chooses the split, otherwise a stable hash of the file's path sends ``data.val_fraction`` of clips to val.
``python -m tinymusician.train data=folder data.root=/path/to/music``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from tinymusician.data.audio import is_audio_file
from tinymusician.data.datamodule import CodesDataModule
from tinymusician.data.listing import SPLIT_NAMES, ClipRef, Listing, file_stamp, hash_fraction, hash_split

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_LAYOUT_HINT = (
    'a folder of audio files with a metadata.jsonl (one {"file_name": ..., "text": ...} per line) '
    "or a metadata.csv (columns file_name,text[,split])"
)


def walk_sorted(root: Path):
    """os.walk in sorted order, skipping hidden directories (.git, caches)."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        yield Path(directory), sorted(files)


def find_metadata(root: Path) -> list[Path]:
    """Every metadata.jsonl / metadata.csv under ``root``; a directory may hold only one of the two."""
    found = []
    for directory, files in walk_sorted(root):
        present = [name for name in METADATA_NAMES if name in files]
        if len(present) > 1:
            raise ValueError(
                f"data.root={root}: {directory} has both metadata.jsonl and metadata.csv; keep one of them"
            )
        found += [directory / name for name in present]
    return found


def read_metadata(path: Path) -> list[tuple[int, dict | None, str]]:
    """Rows of one metadata file as (line number, row or None, error) in file order.

    A malformed JSON line is a row with its error, so it is skipped and counted, never fatal; a file that
    is not UTF-8 text raises ValueError naming it.
    """
    rows: list[tuple[int, dict | None, str]] = []
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                for row in reader:
                    rows.append((reader.line_num, dict(row), ""))
            return rows
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    rows.append((number, None, f"malformed metadata line ({err.msg})"))
                    continue
                if not isinstance(row, dict):
                    rows.append((number, None, "metadata line is not a JSON object"))
                    continue
                rows.append((number, row, ""))
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from err
    return rows


def metadata_columns(path: Path, rows: list[tuple[int, dict | None, str]]) -> list[str]:
    """Column names of a metadata file: the CSV header, or every key of its valid JSON lines.

    Only valid lines count, so one malformed line (the first, say) is skipped like any other bad row
    instead of hiding every column.
    """
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return [name for name in next(csv.reader(handle), []) if name]
    return list(dict.fromkeys(key for _, row, _ in rows if row is not None for key in row))


class FolderDataModule(CodesDataModule):
    """Audio files under ``root`` with captions from metadata.jsonl / metadata.csv (audiofolder layout)."""

    def __init__(
        self,
        root: str | None = None,
        val_fraction: float = 0.1,
        file_column: str = "file_name",
        caption_column: str = "text",
        split_column: str = "split",
        **kwargs,
    ) -> None:
        if root in (None, ""):
            raise ValueError(f"data.root is not set: pass data.root=/path/to/music, {_LAYOUT_HINT}")
        path = Path(str(root)).expanduser().absolute()  # ids and cache key independent of the cwd
        if not path.exists():
            raise ValueError(f"data.root={root}: no such directory; point it at {_LAYOUT_HINT}")
        if not path.is_dir():
            raise ValueError(f"data.root={root}: is a file, not a directory; point it at {_LAYOUT_HINT}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        self.metadata_files = find_metadata(path)
        if not self.metadata_files:
            raise ValueError(
                f"data.root={root}: no metadata.jsonl or metadata.csv found (searched recursively); "
                f"add one: {_LAYOUT_HINT}"
            )
        for metadata in self.metadata_files:
            rows = read_metadata(metadata)
            if not any(row is not None for _, row, _ in rows):
                malformed = f" ({len(rows)} malformed lines, the first at line {rows[0][0]})" if rows else ""
                raise ValueError(
                    f"data.root={root}: {metadata} has no valid rows{malformed}; add rows to it "
                    f"or delete it: {_LAYOUT_HINT}"
                )
            columns = metadata_columns(metadata, rows)
            for key, column in (("file_column", file_column), ("caption_column", caption_column)):
                if column not in columns:
                    raise ValueError(
                        f"data.{key}={column!r}: {metadata} has no such column (it has {columns}); "
                        f"rename the column or set data.{key}"
                    )
        super().__init__(**kwargs)
        self.root = path
        self.val_fraction = val_fraction
        self.file_column = file_column
        self.caption_column = caption_column
        self.split_column = split_column

    def describe(self) -> dict:
        return {
            "kind": "folder",
            "root": str(self.root),
            "val_fraction": self.val_fraction,
            "file_column": self.file_column,
            "caption_column": self.caption_column,
            "split_column": self.split_column,
        }

    def clip_id(self, path: Path) -> str:
        """The file's path relative to ``root`` (absolute if outside it): unique per file."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def list_clips(self) -> Listing:
        clips: list[ClipRef] = []
        bad: list[dict] = []
        held_out = 0
        listed_at: dict[str, str] = {}
        hashed: list[int] = []  # clips split by hash, not by a split column
        for metadata in self.metadata_files:
            where = self.clip_id(metadata)
            for line, row, error in read_metadata(metadata):
                if row is None:
                    bad.append({"id": f"{where}:{line}", "reason": error})
                    continue
                file_name = str(row.get(self.file_column) or "").strip()
                if not file_name:
                    bad.append({"id": f"{where}:{line}", "reason": f"row has no {self.file_column!r}"})
                    continue
                path = Path(os.path.normpath(metadata.parent / file_name))
                clip_id = self.clip_id(path)
                if clip_id in listed_at:  # reported as this row, so the kept clip is not listed as skipped
                    bad.append(
                        {
                            "id": f"{where}:{line}",
                            "reason": f"duplicate: {clip_id} is already listed at {listed_at[clip_id]} "
                            "(that row is kept)",
                        }
                    )
                    continue
                listed_at[clip_id] = f"{where}:{line}"
                caption = row.get(self.caption_column)
                caption = str(caption).strip() if caption is not None else ""
                if not caption:
                    bad.append(
                        {"id": clip_id, "reason": f"missing caption ({self.caption_column!r} is empty)"}
                    )
                    continue
                if not path.is_file():
                    bad.append({"id": clip_id, "reason": "file is listed but absent"})
                    continue
                value = str(row.get(self.split_column) or "").strip().lower()
                if value and value not in SPLIT_NAMES:
                    bad.append(
                        {"id": clip_id, "reason": f"unknown split: {value!r} (use train, validation or test)"}
                    )
                    continue
                if value and SPLIT_NAMES[value] is None:
                    held_out += 1
                    continue
                if not value:
                    hashed.append(len(clips))
                split = SPLIT_NAMES[value] if value else hash_split(clip_id, self.val_fraction)
                clips.append(ClipRef(clip_id, split, caption, path, file_stamp(path)))
        for directory, files in walk_sorted(self.root):
            for name in files:
                path = directory / name
                if is_audio_file(path) and self.clip_id(path) not in listed_at:
                    bad.append(
                        {
                            "id": self.clip_id(path),
                            "reason": "missing caption: not listed in any metadata file",
                        }
                    )
        clips = self._at_least_one_val(clips, hashed)
        notes = [f"Folder {self.root}: {len(clips)} captioned audio files listed, {len(bad)} rejected"]
        return Listing(sorted(clips, key=lambda c: c.id), bad, notes, held_out)

    def _at_least_one_val(self, clips: list[ClipRef], hashed: list[int]) -> list[ClipRef]:
        """A small hash-split folder can draw no val clip at all; then the lowest-hash clip goes to val."""
        if self.val_fraction <= 0 or any(c.split == "val" for c in clips) or len(hashed) < 2:
            return clips
        pick = min(hashed, key=lambda i: hash_fraction(clips[i].id))
        moved = clips[pick]
        clips[pick] = ClipRef(moved.id, "val", moved.caption, moved.path, moved.stamp)
        return clips
