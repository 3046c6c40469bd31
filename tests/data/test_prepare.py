"""`python -m tinymusician.data.prepare`: encodes once, resumes after an interruption, reports bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file

from tests.conftest import FAST_TINY
from tinymusician.data.datamodule import CodesDataModule
from tinymusician.data.prepare import main

MODEL = [f"model.tiny.{key}={value}" for key, value in FAST_TINY.items()]


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
        *MODEL,
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
