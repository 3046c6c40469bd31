"""`data=musiccaps`: CSV rows matched to downloaded files by common names, eval column as split, missing rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import compose_train_cfg
from tinymusician.data.audio import AUDIO_EXTENSIONS, BadSampleError
from tinymusician.data.musiccaps import MusicCapsDataModule, candidate_stems
from tinymusician.models.musicgen import load_musicgen, load_tokenizer
from tinymusician.training.checks import ConfigError, check_config

HEADER = "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval"
LOSSY = "mp3" if "mp3" in AUDIO_EXTENSIONS else "ogg"
# (ytid, start, eval, caption, file written for it or None). Ids start with "-" and hold "_" as real ones do.
ROWS = [
    ("-0Gj8-vB1q4", 30, "False", "The low quality recording features a ballad", "{ytid}.wav"),
    ("_0kX3QV2e0M", 0, "True", 'A mellow piano solo, "soft" and slow', "sub/{ytid}_{start}.flac"),
    (
        "0bRUkLsttto",
        120,
        "False",
        "An upbeat rock song with distorted guitars",
        "[{ytid}]-[{start}-{end}]." + LOSSY,
    ),
    ("1aFhl2XWnz8", 30, "True", "A choir sings in a large hall", "{ytid}_{start}.0-{end}.0.ogg"),
    ("2unse6chkMU", 10, "False", "A jazz trio with brushed drums", None),  # never downloaded
    ("3vQ5eqUx1ns", 40, "True", "Solo violin, expressive", None),
    ("4acE2kc4zWk", 60, "False", "", "{ytid}.wav"),  # empty caption
    ("-0Gj8-vB1q4", 30, "False", "duplicate row", None),
]


def write_musiccaps(tmp_path: Path, rows=ROWS) -> tuple[Path, Path]:
    audio_dir = tmp_path / "clips"
    lines = [HEADER]
    for i, (ytid, start, is_eval, caption, pattern) in enumerate(rows):
        end = start + 10
        quoted = '"' + caption.replace('"', '""') + '"'
        lines.append(f"{ytid},{start},{end},/m/04rlf,\"['a']\",{quoted},{i},True,{is_eval}")
        if pattern is not None and not (audio_dir / pattern.format(ytid=ytid, start=start, end=end)).exists():
            path = audio_dir / pattern.format(ytid=ytid, start=start, end=end)
            path.parent.mkdir(parents=True, exist_ok=True)
            t = np.arange(22050 * 2) / 22050
            sf.write(path, np.stack([0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t)] * 2, axis=1), 22050)
    csv_path = tmp_path / "musiccaps-public.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path, audio_dir


def musiccaps(tmp_path: Path, **kwargs) -> MusicCapsDataModule:
    csv_path, audio_dir = write_musiccaps(tmp_path)
    return MusicCapsDataModule(
        csv=str(csv_path),
        audio_dir=str(audio_dir),
        cache_dir=str(tmp_path / "cache"),
        segment_seconds=1.0,
        **kwargs,
    )


def test_rows_are_matched_by_common_file_names_and_split_by_the_eval_column(tmp_path, capsys):
    listing = musiccaps(tmp_path).listing
    clips = {clip.id: clip for clip in listing.clips}
    assert {ytid: clip.split for ytid, clip in clips.items()} == {
        "-0Gj8-vB1q4": "train",
        "_0kX3QV2e0M": "val",
        "0bRUkLsttto": "train",
        "1aFhl2XWnz8": "val",
    }
    assert clips["_0kX3QV2e0M"].caption == 'A mellow piano solo, "soft" and slow'
    assert clips["0bRUkLsttto"].path.name == f"[0bRUkLsttto]-[120-130].{LOSSY}"
    reasons = {bad["id"]: bad["reason"] for bad in listing.bad}
    assert reasons["2unse6chkMU"].startswith("no audio file") and reasons["3vQ5eqUx1ns"].startswith(
        "no audio file"
    )
    assert reasons["4acE2kc4zWk"] == "missing caption"
    # the dropped duplicate row is reported, not the kept (and usable) -0Gj8-vB1q4
    assert "-0Gj8-vB1q4" not in reasons
    assert reasons["musiccaps-public.csv:row 8"] == (
        "duplicate: ytid -0Gj8-vB1q4 is already listed at row 1 (that row is kept)"
    )
    assert "MusicCaps: 8 rows, 4 matched to audio in" in capsys.readouterr().out
    assert listing.notes[0].endswith("2 without an audio file")


def test_candidate_names_cover_integer_and_float_seconds():
    stems = candidate_stems("abc", "30", "40", ("{ytid}", "{ytid}_{start}", "[{ytid}]-[{start}-{end}]"))
    assert {"abc", "abc_30", "abc_30.0", "[abc]-[30-40]", "[abc]-[30.000-40.000]"} <= set(stems)


def test_prepared_musiccaps_reports_rows_without_audio(tmp_path, tiny_pair):
    data = musiccaps(tmp_path)
    data.attach(load_musicgen(str(tiny_pair.student)), load_tokenizer(str(tiny_pair.student)))
    data.setup()
    assert {split: len(tokens) for split, tokens in data.splits.items()} == {"train": 2, "val": 2}
    assert data.report["skipped_by_reason"] == {"no audio file": 2, "missing caption": 1, "duplicate": 1}
    val = data.splits["val"]
    assert val.captions[val.ids.index("_0kX3QV2e0M")] == 'A mellow piano solo, "soft" and slow'


def test_raise_mode_names_the_first_row_without_audio(tmp_path):
    data = musiccaps(tmp_path, on_bad_sample="raise")
    with pytest.raises(BadSampleError, match="^2unse6chkMU: no audio file"):
        data.prepare_tokens(model=None)  # listing problems stop before any model is needed


@pytest.mark.parametrize(
    "change,message",
    [
        ("no_csv", "data.csv is not set: pass data.csv="),
        ("missing_csv", "data.csv=.*: no such file"),
        ("no_audio_dir", "data.audio_dir is not set"),
        ("bad_header", r"columns \['is_audioset_eval'\] are missing"),
        ("bad_pattern", "data.filename_patterns: '{ytid}_{begin}' is not a valid pattern"),
        ("bad_mode", "data.on_bad_sample='sometimes'"),
    ],
)
def test_config_errors_fail_at_startup(tmp_path, change, message):
    csv_path, audio_dir = write_musiccaps(tmp_path, ROWS[:2])
    values = {"data.csv": csv_path, "data.audio_dir": audio_dir}
    extra = []
    if change == "no_csv":
        del values["data.csv"]
    elif change == "missing_csv":
        values["data.csv"] = tmp_path / "nope.csv"
    elif change == "no_audio_dir":
        del values["data.audio_dir"]
    elif change == "bad_header":
        csv_path.write_text(csv_path.read_text().replace(",is_audioset_eval", ",eval"))
    elif change == "bad_pattern":
        extra = ["data.filename_patterns=['{ytid}_{begin}']"]
    elif change == "bad_mode":
        extra = ["data.on_bad_sample=sometimes"]
    overrides = ["data=musiccaps", *(f"{k}={v}" for k, v in values.items()), *extra]
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train_cfg(overrides, tmp_path / "out", fast=False))
