"""MusicCaps: the official CSV (YouTube id, start/end seconds, caption) + clips you downloaded yourself.

Each row is matched to an audio file in ``data.audio_dir`` (searched recursively, any supported
extension) by the file names in ``data.filename_patterns``; rows without a file are counted and listed.
The official ``is_audioset_eval`` column is the split (True -> val).
``python -m tinymusician.train data=musiccaps data.csv=musiccaps-public.csv data.audio_dir=clips/``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tinymusician.data.audio import is_audio_file
from tinymusician.data.datamodule import CodesDataModule
from tinymusician.data.folder import walk_sorted
from tinymusician.data.listing import ClipRef, Listing, file_stamp

REQUIRED_COLUMNS = ("ytid", "start_s", "end_s", "is_audioset_eval")
# File names (without extension) that common MusicCaps downloaders write; {start}/{end} match both "30"
# and "30.0" style seconds.
DEFAULT_PATTERNS = (
    "{ytid}",
    "{ytid}_{start}",
    "{ytid}_{start}_{end}",
    "{ytid}_{start}-{end}",
    "{ytid}-{start}-{end}",
    "[{ytid}]-[{start}-{end}]",
)
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def seconds_spellings(value: str) -> list[str]:
    """``"30"`` -> ``["30", "30.0", "30.000"]``: how downloaders write a start or end time."""
    try:
        number = float(value)
    except ValueError:
        return [value]
    spellings = [value.strip()]
    if number.is_integer():
        spellings.append(str(int(number)))
    spellings += [f"{number:.1f}", f"{number:.3f}"]
    return list(dict.fromkeys(spellings))


def candidate_stems(ytid: str, start: str, end: str, patterns: tuple[str, ...]) -> list[str]:
    stems: list[str] = []
    for pattern in patterns:
        for s in seconds_spellings(start):
            for e in seconds_spellings(end):
                stems.append(pattern.format(ytid=ytid, start=s, end=e))
    return list(dict.fromkeys(stems))


def index_audio(audio_dir: Path) -> dict[str, Path]:
    """File stem -> path of every supported audio file under ``audio_dir`` (first in sorted order wins)."""
    index: dict[str, Path] = {}
    for directory, files in walk_sorted(audio_dir):
        for name in files:
            path = directory / name
            if is_audio_file(path):
                index.setdefault(path.stem, path)
    return index


class MusicCapsDataModule(CodesDataModule):
    """MusicCaps rows with audio found in ``audio_dir``; ``is_audioset_eval`` rows are the val split."""

    def __init__(
        self,
        csv: str | None = None,
        audio_dir: str | None = None,
        filename_patterns: list[str] | tuple[str, ...] = DEFAULT_PATTERNS,
        caption_column: str = "caption",
        **kwargs,
    ) -> None:
        if csv in (None, ""):
            raise ValueError(
                "data.csv is not set: pass data.csv=/path/to/musiccaps-public.csv (the official MusicCaps CSV)"
            )
        if audio_dir in (None, ""):
            raise ValueError("data.audio_dir is not set: pass data.audio_dir=/path/to/the/downloaded/clips")
        csv_path = Path(str(csv)).expanduser().absolute()
        audio_path = Path(str(audio_dir)).expanduser().absolute()
        if not csv_path.is_file():
            raise ValueError(f"data.csv={csv}: no such file; point it at musiccaps-public.csv")
        if not audio_path.is_dir():
            raise ValueError(f"data.audio_dir={audio_dir}: not a directory; point it at the downloaded clips")
        header = _header(csv_path)
        missing = [c for c in (*REQUIRED_COLUMNS, caption_column) if c not in header]
        if missing:
            raise ValueError(
                f"data.csv={csv}: columns {missing} are missing (it has {header}); use the official "
                "musiccaps-public.csv, or set data.caption_column"
            )
        patterns = tuple(filename_patterns)
        for pattern in patterns:
            if "{ytid}" not in pattern:
                raise ValueError(
                    f"data.filename_patterns: {pattern!r} has no {{ytid}}; every pattern needs it"
                )
            try:
                pattern.format(ytid="x", start="0", end="10")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"data.filename_patterns: {pattern!r} is not a valid pattern ({err}); "
                    "use only {ytid}, {start} and {end}"
                ) from err
        super().__init__(**kwargs)
        self.csv, self.audio_dir = csv_path, audio_path
        self.filename_patterns = patterns
        self.caption_column = caption_column

    def describe(self) -> dict:
        return {
            "kind": "musiccaps",
            "csv": str(self.csv),
            "audio_dir": str(self.audio_dir),
            "filename_patterns": list(self.filename_patterns),
            "caption_column": self.caption_column,
        }

    def list_clips(self) -> Listing:
        index = index_audio(self.audio_dir)
        clips: list[ClipRef] = []
        bad: list[dict] = []
        seen: dict[str, int] = {}  # ytid -> the row that lists it
        rows = no_audio = 0
        with self.csv.open(newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                rows += 1
                ytid = (row.get("ytid") or "").strip()
                if not ytid:
                    bad.append({"id": f"{self.csv.name}:row {rows}", "reason": "row has no ytid"})
                    continue
                if ytid in seen:  # reported as this row: the ytid itself is the kept clip
                    bad.append(
                        {
                            "id": f"{self.csv.name}:row {rows}",
                            "reason": f"duplicate: ytid {ytid} is already listed at row {seen[ytid]} "
                            "(that row is kept)",
                        }
                    )
                    continue
                seen[ytid] = rows
                flag = (row.get("is_audioset_eval") or "").strip().lower()
                if flag not in _TRUE | _FALSE:
                    bad.append({"id": ytid, "reason": f"bad is_audioset_eval: {flag!r} is not True/False"})
                    continue
                split = "val" if flag in _TRUE else "train"
                caption = (row.get(self.caption_column) or "").strip()
                if not caption:
                    bad.append({"id": ytid, "split": split, "reason": "missing caption"})
                    continue
                start, end = (str(row.get(key) or "").strip() for key in ("start_s", "end_s"))
                stems = candidate_stems(ytid, start, end, self.filename_patterns)
                path = next((index[stem] for stem in stems if stem in index), None)
                if path is None:
                    no_audio += 1
                    bad.append(
                        {"id": ytid, "split": split, "reason": "no audio file (data.filename_patterns)"}
                    )
                    continue
                clips.append(ClipRef(ytid, split, caption, path, file_stamp(path)))
        note = f"MusicCaps: {rows} rows, {len(clips)} matched to audio in {self.audio_dir}, {no_audio} without an audio file"
        return Listing(sorted(clips, key=lambda c: c.id), bad, [note])


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return next(csv.reader(handle), [])
