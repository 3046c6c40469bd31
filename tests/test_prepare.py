"""`python -m tinymusician.prepare`: encodes once, resumes after an interruption, reports bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file

from tinymusician.data.datamodule import CodesDataModule
from tinymusician.prepare import main

REPO = Path(__file__).resolve().parents[2]


def run_prepare(*argv: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (the shipped tiny pair; token caches in the session's TINYMUSICIAN_CACHE)."""
    return subprocess.run(
        [sys.executable, "-m", "tinymusician.prepare", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )


class Interrupted(Exception):
    """Stands in for Ctrl-C / a killed job in the middle of preparation."""


def music_folder(root: Path, count: int = 8) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i in range(count):
        t = np.arange(8000) / 16000
        sf.write(root / f"clip{i}.wav", 0.3 * np.sin(2 * np.pi * (150 + 25 * i) * t), 16000)
        rows.append(
            {"file_name": f"clip{i}.wav", "text": f"tone {i}", "split": "validation" if i < 2 else "train"}
        )
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def args(root: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "data=folder",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        "data.shard_size=2",
        "data.min_seconds=0.2",
        *extra,
        "--no-progress",
    ]


def record_shards(monkeypatch, fail_at: int | None = None) -> list[list[str]]:
    """Wrap the shard encoder: log each call's clip ids, and raise at call ``fail_at`` (0-based)."""
    calls: list[list[str]] = []
    original = CodesDataModule.encode_shard

    def encode_shard(self, model, split, clips, progress):
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupted(f"stopped while encoding shard {fail_at}")
        calls.append([clip.id for clip in clips])
        return original(self, model, split, clips, progress)

    monkeypatch.setattr(CodesDataModule, "encode_shard", encode_shard)
    return calls


def cache_contents(cache: Path) -> dict[str, object]:
    (root,) = (cache / "tokens").iterdir()
    contents: dict[str, object] = {}
    for path in sorted(root.iterdir()):
        if path.suffix == ".safetensors":
            contents[path.name] = {k: v.tolist() for k, v in load_file(str(path)).items()}
        else:
            report = json.loads(path.read_text())
            report.pop("cache_dir")
            contents[path.name] = report
    return contents


def test_interrupted_preparation_resumes_and_equals_an_uninterrupted_run(tmp_path, tiny_pair, monkeypatch):
    root = music_folder(tmp_path / "music")
    assert main(args(root, tmp_path / "reference")) == 0
    reference = cache_contents(tmp_path / "reference")
    # plan: val (2 clips) = 1 shard, train (6 clips) = 3 shards; stop while encoding the third shard
    record_shards(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        main(args(root, tmp_path / "resumed"))
    (cache,) = (tmp_path / "resumed" / "tokens").iterdir()
    done = sorted(p.name for p in cache.iterdir())
    assert [name.rsplit("-", 1)[0] for name in done] == ["train-00000", "train-00001"]  # no report, no .tmp
    monkeypatch.undo()
    calls = record_shards(monkeypatch)
    assert main(args(root, tmp_path / "resumed")) == 0
    assert calls == [["clip6.wav", "clip7.wav"], ["clip0.wav", "clip1.wav"]]  # only the shards not yet done
    assert cache_contents(tmp_path / "resumed") == reference
    # a complete cache is not encoded again
    monkeypatch.undo()
    calls = record_shards(monkeypatch)
    assert main(args(root, tmp_path / "resumed")) == 0 and calls == []


def test_report_lists_bad_files_and_is_written_beside_the_cache(tmp_path, tiny_pair, capsys):
    root = music_folder(tmp_path / "music")
    (root / "clip3.wav").write_bytes(b"not a wav file at all")
    sf.write(root / "clip4.wav", np.zeros(8000), 16000)
    assert main(args(root, tmp_path / "cache")) == 0
    out = capsys.readouterr().out
    assert "usable: train 4 clips" in out and "skipped 2 of 8: cannot decode 1, silent 1" in out
    assert "clip3.wav: cannot decode" in out and "clip4.wav: silent" in out
    (report_path,) = (tmp_path / "cache").rglob("report.json")
    report = json.loads(report_path.read_text())
    assert report["usable"] == 6 and [b["id"] for b in report["bad"]] == ["clip3.wav", "clip4.wav"]


def test_raise_mode_exits_naming_the_file_and_reason(tmp_path, tiny_pair, capsys):
    root = music_folder(tmp_path / "music")
    sf.write(root / "clip5.wav", np.zeros(8000), 16000)
    assert main(args(root, tmp_path / "cache", "data.on_bad_sample=raise")) == 1
    assert "error: clip5.wav: silent" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data=folder"], "data.root is not set"),
        (["data=folder", "data.root=/nonexistent/music"], "data.root=/nonexistent/music: no such directory"),
        (["data=nosuchdata"], "Could not find 'data/nosuchdata'"),
    ],
)
def test_config_errors_exit_before_loading_a_model(overrides, message, capsys):
    assert main([*overrides, "--no-progress"]) == 1
    assert message in capsys.readouterr().err


def test_empty_split_exits_with_a_clear_error(tmp_path, tiny_pair, capsys):
    root = music_folder(tmp_path / "music", count=3)
    for name in ("clip0.wav", "clip1.wav"):  # the only val clips
        (root / name).write_bytes(b"")
    assert main(args(root, tmp_path / "cache")) == 1
    assert "the 'val' split has no usable clips" in capsys.readouterr().err


# Damaged caches (issue 11, D9) ---------------------------------------------------------------------------


def without_repairs(contents: dict[str, object]) -> dict[str, object]:
    report = dict(contents["report.json"])
    report.pop("repaired")
    return {**contents, "report.json": report}


def test_truncated_shard_is_reported_and_reencoded_alone(tmp_path, tiny_pair):
    root = music_folder(tmp_path / "music")
    assert main(args(root, tmp_path / "cache")) == 0
    reference = without_repairs(cache_contents(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache" / "tokens").iterdir()
    damaged = next(cache.glob("train-00001-*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:-7])  # was: prepare OK, training SafetensorError
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors") if p != damaged}
    result = run_prepare(*args(root, tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert f"token cache shard {damaged} is damaged (truncated" in result.stderr  # the warning
    assert "repaired 1 damaged cache file(s):" in result.stdout  # and the report, not a plain OK
    assert f"{damaged.name}: truncated: its header describes" in result.stdout
    assert "-> re-encoded 2 clips" in result.stdout
    assert {name: (cache / name).stat().st_mtime_ns for name in kept} == kept  # nothing else re-made
    assert without_repairs(cache_contents(tmp_path / "cache")) == reference
    assert [r["file"] for r in json.loads((cache / "report.json").read_text())["repaired"]] == [damaged.name]


def test_corrupt_report_is_rebuilt_from_the_shards(tmp_path, tiny_pair):
    root = music_folder(tmp_path / "music")
    assert main(args(root, tmp_path / "cache")) == 0
    reference = without_repairs(cache_contents(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache" / "tokens").iterdir()
    (cache / "report.json").write_text("")  # was: JSONDecodeError "Expecting value"
    shards = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    result = run_prepare(*args(root, tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert f"token cache file {cache / 'report.json'}: not valid JSON (Expecting value" in result.stderr
    assert "report.json: not valid JSON" in result.stdout and "-> rebuilt from the shards" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == shards  # none encoded
    assert without_repairs(cache_contents(tmp_path / "cache")) == reference


# Malformed metadata (issue 11, D10) ----------------------------------------------------------------------


def test_bad_first_metadata_line_is_skipped_and_counted(tmp_path, tiny_pair):
    root = music_folder(tmp_path / "music")
    metadata = root / "metadata.jsonl"
    metadata.write_text('{"file_name": "clip0.wav", "text": \n' + metadata.read_text())
    result = run_prepare(*args(root, tmp_path / "cache"))
    assert result.returncode == 0, result.stderr  # was: "has no such column (it has [])"
    assert "usable: train 6 clips" in result.stdout
    assert "skipped 1 of 9: malformed metadata line 1" in result.stdout
    assert "metadata.jsonl:1: malformed metadata line (Expecting value)" in result.stdout
    (report,) = (tmp_path / "cache").rglob("report.json")
    assert json.loads(report.read_text())["skipped_by_reason"] == {"malformed metadata line": 1}


def test_empty_metadata_file_is_a_clear_error(tmp_path):
    root = music_folder(tmp_path / "music", count=1)
    (root / "metadata.jsonl").write_text("")
    result = run_prepare("data=folder", f"data.root={root}", "--no-progress")
    assert result.returncode == 1
    assert f"{root / 'metadata.jsonl'} has no valid rows" in result.stderr
    assert "Traceback" not in result.stderr and "has no such column" not in result.stderr


def test_old_module_name_still_runs_the_prepare_cli():
    """`python -m tinymusician.data.prepare` (the command's old home) is a shim over `tinymusician.prepare`."""
    old = subprocess.run(
        [sys.executable, "-m", "tinymusician.data.prepare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert old.returncode == 0, old.stderr
    assert "python -m tinymusician.prepare" in old.stdout and "overrides" in old.stdout
    import tinymusician.data.prepare as shim  # importing the shim runs nothing and imports no CLI

    assert not hasattr(shim, "main")
