"""`data=folder`: start-up errors, listing (metadata, splits, bad rows), bad audio, segments, a training run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import FAST_OVERRIDES, compose_train_cfg
from tinymusician.data.audio import AUDIO_EXTENSIONS, BadSampleError
from tinymusician.data.datamodule import EmptySplitError
from tinymusician.data.folder import FolderDataModule
from tinymusician.data.listing import hash_split
from tinymusician.train import train
from tinymusician.training.checks import ConfigError, check_config

# FAST_OVERRIDES without the synthetic corpus's keys, which data=folder does not have.
FAST_FOLDER = [o for o in FAST_OVERRIDES if not o.startswith(("data.num_train", "data.num_val"))]


def write_tone(path: Path, seconds: float, rate: int = 22050, channels: int = 1, freq: float = 330.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.4 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.repeat(mono[:, None], channels, 1) if channels > 1 else mono, rate)
    return path


def write_metadata(directory: Path, rows: list[dict], kind: str = "jsonl") -> None:
    if kind == "jsonl":
        (directory / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        columns = sorted({key for row in rows for key in row})
        lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
        (directory / "metadata.csv").write_text("\n".join(lines) + "\n")


def good_folder(root: Path, count: int = 6, seconds: float = 2.0) -> Path:
    """``count`` captioned tones in several formats, rates and channel layouts, half in a subfolder."""
    formats = [ext for ext in ("wav", "flac", "ogg", "mp3") if ext in AUDIO_EXTENSIONS]
    rows = []
    for i in range(count):
        name = f"{'deep/er/' if i % 2 else ''}tone{i}.{formats[i % len(formats)]}"
        write_tone(
            root / name, seconds, rate=(22050, 44100, 48000)[i % 3], channels=1 + i % 2, freq=200 + 40 * i
        )
        rows.append({"file_name": name, "text": f"a tone number {i}"})
    write_metadata(root, rows)
    return root


def folder(root: Path, cache: Path, **kwargs) -> FolderDataModule:
    return FolderDataModule(root=str(root), cache_dir=str(cache), **{"segment_seconds": 1.0, **kwargs})


# Start-up errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup,override,message",
    [
        ("none", None, "data.root is not set: pass data.root="),
        ("none", "data.root={tmp}/missing", "data.root=.*missing: no such directory"),
        ("file", "data.root={tmp}/file.wav", "data.root=.*file.wav: is a file, not a directory"),
        ("empty", "data.root={tmp}", "no metadata.jsonl or metadata.csv found"),
        ("good", "data.on_bad_sample=ignore", "data.on_bad_sample='ignore': use 'skip'.*or 'raise'"),
        ("good", "data.segment_offsets=middle", "data.segment_offsets='middle'"),
        ("good", "data.val_fraction=1.5", r"data.val_fraction=1.5: must be in \[0, 1\)"),
        ("good", "data.caption_column=caption", "data.caption_column='caption'.*has no such column"),
        ("both", "data.root={tmp}", "both metadata.jsonl and metadata.csv; keep one"),
        ("good", "data.min_seconds=20", "data.min_seconds=20.* > data.segment_seconds"),
    ],
)
def test_config_errors_fail_at_startup_naming_the_key(tmp_path, setup, override, message):
    if setup == "file":
        write_tone(tmp_path / "file.wav", 0.5)
    elif setup == "good":
        good_folder(tmp_path, count=2, seconds=0.5)
    elif setup == "both":
        write_metadata(tmp_path, [{"file_name": "a.wav", "text": "x"}])
        write_metadata(tmp_path, [{"file_name": "a.wav", "text": "x"}], kind="csv")
    overrides = ["data=folder"]
    if setup in ("good",):
        overrides.append(f"data.root={tmp_path}")
    if override:
        overrides.append(override.format(tmp=tmp_path))
    cfg = compose_train_cfg(overrides, tmp_path / "out", fast=False)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)  # before any model is loaded


# Listing ------------------------------------------------------------------------------------------------


def test_listing_reads_nested_metadata_splits_and_rejects_bad_rows(tmp_path):
    root = tmp_path / "music"
    for name in ("a.wav", "b.wav", "c.wav", "d.wav", "e.wav", "sub/f.flac", "sub/g.flac", "stray.wav"):
        write_tone(root / name, 0.3)
    (root / "notes.txt").write_text("not audio, ignored")
    rows = [
        {"file_name": "a.wav", "text": "first", "split": "train"},
        {"file_name": "b.wav", "text": "second", "split": "validation"},
        {"file_name": "c.wav", "text": "third", "split": "test"},
        {"file_name": "d.wav", "text": "", "split": "train"},
        {"file_name": "a.wav", "text": "first again", "split": "train"},
        {"file_name": "gone.wav", "text": "absent", "split": "train"},
        {"file_name": "e.wav", "text": "odd split", "split": "holdout"},
    ]
    write_metadata(root, rows)
    with (root / "metadata.jsonl").open("a") as handle:
        handle.write("{not json\n")
    write_metadata(
        root / "sub",
        [{"file_name": "f.flac", "text": "in a subfolder"}, {"file_name": "g.flac", "text": "g"}],
        "csv",
    )
    listing = FolderDataModule(root=str(root), cache_dir=str(tmp_path / "c"), val_fraction=0.5).listing
    ids = {clip.id: clip for clip in listing.clips}
    assert set(ids) == {"a.wav", "b.wav", "sub/f.flac", "sub/g.flac"}
    assert (ids["a.wav"].split, ids["b.wav"].split) == ("train", "val")
    assert ids["sub/f.flac"].caption == "in a subfolder" and ids["sub/f.flac"].path == root / "sub" / "f.flac"
    for clip_id in ("sub/f.flac", "sub/g.flac"):  # no split column: the stable hash decides
        assert ids[clip_id].split == hash_split(clip_id, 0.5)
    reasons = {bad["id"]: bad["reason"] for bad in listing.bad}
    assert reasons["d.wav"].startswith("missing caption")
    # the duplicate is reported as the dropped row (line 5), not as a.wav, which is kept and usable
    assert (
        reasons["metadata.jsonl:5"]
        == "duplicate: a.wav is already listed at metadata.jsonl:1 (that row is kept)"
    )
    assert "a.wav" not in reasons
    assert reasons["gone.wav"] == "file is listed but absent"
    assert reasons["e.wav"] == "unknown split: 'holdout' (use train, validation or test)"
    assert reasons["metadata.jsonl:8"].startswith("malformed metadata line")
    assert reasons["stray.wav"] == "missing caption: not listed in any metadata file"
    assert listing.held_out == 1 and "c.wav" not in reasons


def test_a_malformed_first_line_is_skipped_not_fatal(tmp_path):
    good_folder(tmp_path, count=3, seconds=0.3)
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text("{not json\n" + metadata.read_text())  # was: "has no such column (it has [])"
    listing = FolderDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c")).listing
    assert len(listing.clips) == 3
    assert listing.bad == [{"id": "metadata.jsonl:1", "reason": listing.bad[0]["reason"]}]
    assert listing.bad[0]["reason"].startswith("malformed metadata line")


@pytest.mark.parametrize(
    "text,detail",
    [
        ("", ""),
        ("\n  \n", ""),
        ('{broken\n[1, 2]\n"text"\n', " (3 malformed lines, the first at line 1)"),
    ],
)
def test_metadata_without_valid_rows_names_the_file(tmp_path, text, detail):
    (tmp_path / "metadata.jsonl").write_text(text)
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'metadata.jsonl'} has no valid rows{detail}; ")
    ):
        FolderDataModule(root=str(tmp_path))


def test_columns_come_from_the_valid_lines_and_the_csv_header(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{oops\n{"file_name": "a.wav", "caption": "x"}\n')
    with pytest.raises(
        ValueError,
        match=r"data.caption_column='text': .* has no such column \(it has \['file_name', 'caption'\]\)",
    ):
        FolderDataModule(root=str(tmp_path))
    assert FolderDataModule(root=str(tmp_path), caption_column="caption").caption_column == "caption"
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(ValueError, match="metadata.csv has no valid rows"):
        FolderDataModule(root=str(tmp_path))
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\na.wav,caf\xe9\n")
    with pytest.raises(ValueError, match="metadata.csv is not UTF-8 text .*save it as UTF-8"):
        FolderDataModule(root=str(tmp_path))


def test_small_folder_still_gets_one_val_clip(tmp_path):
    good_folder(tmp_path, count=3, seconds=0.3)
    listing = FolderDataModule(root=str(tmp_path), val_fraction=0.01, cache_dir=str(tmp_path / "c")).listing
    assert [c.split for c in listing.clips].count("val") == 1


# Preparation: bad audio skipped and reported, or raised -------------------------------------------------


def broken_folder(root: Path) -> Path:
    good_folder(root, count=4)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt this is not audio")
    (root / "empty.flac").write_bytes(b"")
    write_tone(root / "short.wav", 0.2)
    nan = 0.3 * np.ones(8000, dtype=np.float32)
    nan[5] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows += [
        {"file_name": n, "text": f"broken {n}"}
        for n in ("corrupt.wav", "empty.flac", "short.wav", "nan.wav", "silent.wav")
    ]
    rows += [{"file_name": "tone0.wav", "text": "duplicate"}, {"file_name": "missing.ogg", "text": "gone"}]
    write_metadata(root, rows)
    write_tone(root / "uncaptioned.wav", 1.0)
    return root


EXPECTED_REASONS = {
    "corrupt.wav": "cannot decode",
    "empty.flac": "empty file",
    "short.wav": "too short",
    "nan.wav": "NaN/inf samples",
    "silent.wav": "silent",
    "metadata.jsonl:10": "duplicate: tone0.wav is already listed at metadata.jsonl:1",
    "missing.ogg": "file is listed but absent",
    "uncaptioned.wav": "missing caption",
}


def test_bad_files_are_skipped_counted_and_reported(tmp_path, student, tokenizer, capsys):
    root = broken_folder(tmp_path / "music")
    data = folder(root, tmp_path / "cache", min_seconds=0.5, val_fraction=0.3)
    data.attach(student, tokenizer)
    data.setup("fit")
    out = capsys.readouterr().out
    report = data.report
    assert report["usable"] == 4 and report["skipped"] == len(EXPECTED_REASONS)
    assert {b["id"]: b["reason"] for b in report["bad"]}.keys() == EXPECTED_REASONS.keys()
    for bad in report["bad"]:
        assert EXPECTED_REASONS[bad["id"]] in bad["reason"]
    assert json.loads((Path(report["cache_dir"]) / "report.json").read_text())["bad"] == report["bad"]
    # the kind of each reason is the key; counts and values stay out of it (they are in "bad")
    assert report["skipped_by_reason"] == {
        kind: 1
        for kind in (
            "cannot decode",
            "empty file",
            "too short",
            "non-finite samples",
            "silent",
            "duplicate",
            "file is listed but absent",
            "missing caption",
        )
    }
    assert "skipped 8 of 12" in out and "corrupt.wav: cannot decode" in out
    assert "Usable clips (FolderDataModule): train" in out
    assert sum(len(s) for s in data.splits.values()) == 4
    assert sorted(i for s in data.splits.values() for i in s.ids) == [
        "deep/er/tone1.flac",
        "deep/er/tone3.mp3" if "mp3" in AUDIO_EXTENSIONS else "deep/er/tone3.wav",
        "tone0.wav",
        "tone2.ogg",
    ]
    # every item is a full 1 s (50 frame) window of valid codes: nothing left to fail mid-epoch
    codebook_size = student.config.decoder.vocab_size
    for split in ("train", "val"):
        for item in data.dataset(split):
            assert item["codes"].shape == (4, 50) and 0 <= int(item["codes"].min())
            assert int(item["codes"].max()) < codebook_size and item["length"] == 50


@pytest.mark.parametrize("name", ["nan.wav", "missing.ogg", "uncaptioned.wav"])
def test_raise_mode_stops_with_the_file_and_reason(tmp_path, student, tokenizer, name):
    root = good_folder(tmp_path / "music", count=3)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    if name == "nan.wav":
        sf.write(root / name, np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    if name == "uncaptioned.wav":
        write_tone(root / name, 1.0)
    else:
        write_metadata(root, rows + [{"file_name": name, "text": "the bad one"}])
    data = folder(root, tmp_path / "cache", on_bad_sample="raise", val_fraction=0.5)
    data.attach(student, tokenizer)
    with pytest.raises(BadSampleError, match=f"^{name}: .*{EXPECTED_REASONS[name]}.*on_bad_sample=skip"):
        data.setup()


def test_raise_mode_also_reads_a_cache_written_while_skipping(tmp_path, student, tokenizer):
    root = broken_folder(tmp_path / "music")
    skipping = folder(root, tmp_path / "cache")
    skipping.attach(student, tokenizer)
    skipping.setup()
    strict = folder(root, tmp_path / "cache", on_bad_sample="raise")
    strict.attach(student, tokenizer)
    with pytest.raises(BadSampleError, match="on_bad_sample=raise"):
        strict.setup()


def test_dataset_with_no_usable_clip_stops_clearly(tmp_path, student, tokenizer):
    root = tmp_path / "music"
    root.mkdir()
    sf.write(root / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (root / "bad.wav").write_bytes(b"garbage")
    write_metadata(
        root, [{"file_name": "silent.wav", "text": "quiet"}, {"file_name": "bad.wav", "text": "x"}]
    )
    data = folder(root, tmp_path / "cache", val_fraction=0.0)
    data.attach(student, tokenizer)
    message = "'train' split has no usable clips.*2 of its clips were skipped .cannot decode 1, silent 1.*report.json"
    with pytest.raises(EmptySplitError, match=message):
        data.setup()


def test_segments_longer_than_the_decoder_fail_before_training(tmp_path, student, tokenizer):
    good_folder(tmp_path / "music", count=3, seconds=0.5)
    data = folder(
        tmp_path / "music", tmp_path / "cache", segment_seconds=60.0, min_seconds=0.1, val_fraction=0.01
    )
    data.attach(student, tokenizer)
    with pytest.raises(ValueError, match=r"data.segment_seconds=60.0: .*set data.segment_seconds <= \d"):
        data.setup()


def test_random_offsets_vary_per_epoch_and_val_is_fixed(tmp_path, student, tokenizer):
    good_folder(tmp_path / "music", count=4, seconds=3.0)
    data = folder(tmp_path / "music", tmp_path / "cache", segment_seconds=1.0, val_fraction=0.3)
    data.attach(student, tokenizer)
    data.setup()
    train, val = data.dataset("train"), data.dataset("val")
    assert len(train) == 3 * len(data.splits["train"]) and len(val) == 3 * len(data.splits["val"])
    first = torch.stack([train[i]["codes"] for i in range(len(train))])
    assert not torch.equal(first, torch.stack([train[i]["codes"] for i in range(len(train))]))
    assert torch.equal(val[1]["codes"], data.splits["val"].clip(0)[:, 50:100])


# A whole training run -----------------------------------------------------------------------------------


def test_training_runs_on_a_folder_dataset(tmp_path, tiny_pair, capsys):
    root = broken_folder(tmp_path / "music")
    overrides = [
        *FAST_FOLDER,
        "+experiment=kd_only",
        "data=folder",
        f"data.root={root}",
        "data.segment_seconds=1.0",
        "data.min_seconds=0.5",
        "data.val_fraction=0.3",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
    ]
    metrics, objects = train(compose_train_cfg(overrides, tmp_path / "run", fast=False))
    out = capsys.readouterr().out
    assert isinstance(objects["datamodule"], FolderDataModule)
    assert out.index("Usable clips (FolderDataModule)") < out.index("finished: 4 steps")
    assert objects["summary"]["steps"] == 4
    assert np.isfinite(metrics["val/ce"]) and np.isfinite(metrics["train/loss"])
