"""CodesDataModule: the synthetic default through shards, cache keys, repairs of damaged caches, reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tinymusician.data import datamodule as datamodule_module
from tinymusician.data.datamodule import skipped_by_reason
from tinymusician.data.synthetic import SyntheticDataModule, synthesize_corpus
from tinymusician.models.musicgen import codec_encode, load_musicgen


def synthetic(tmp_path, **kwargs) -> SyntheticDataModule:
    values = {"num_train": 5, "num_val": 3, "seconds": 1.0, "shard_size": 2, "cache_dir": str(tmp_path)}
    return SyntheticDataModule(**{**values, **kwargs})


def opened(tmp_path, student, tokenizer, **kwargs) -> SyntheticDataModule:
    """The synthetic datamodule set up over the cache in ``tmp_path`` (encoding what is missing or damaged)."""
    data = synthetic(tmp_path, **kwargs)
    data.attach(student, tokenizer)
    data.setup()
    return data


def test_synthetic_default_goes_through_shards_and_matches_the_codec(tmp_path, student, tokenizer, capsys):
    data = synthetic(tmp_path)
    data.attach(student, tokenizer)
    data.setup("fit")
    assert (
        "Usable clips (SyntheticDataModule): train 5 clips -> 5 segments, val 3 clips"
        in capsys.readouterr().out
    )
    root = tmp_path / "tokens"
    (cache,) = list(root.iterdir())
    shards = sorted(p.name.rsplit("-", 1)[0] for p in cache.glob("*.safetensors"))
    assert shards == ["train-00000", "train-00001", "train-00002", "val-00000", "val-00001"]
    report = json.loads((cache / "report.json").read_text())
    assert report["usable"] == 8 and report["skipped"] == 0
    # the cached codes are the codec's codes of the synthetic clips, in order
    clips = synthesize_corpus(5, seed=0, seconds=1.0, sample_rate=student.audio_encoder.config.sampling_rate)
    with torch.no_grad():
        direct = codec_encode(student, torch.stack([torch.from_numpy(c.audio) for c in clips]))
    torch.testing.assert_close(data.splits["train"].codes, direct.long())
    assert data.splits["train"].captions == [c.caption for c in clips]
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"codes", "lengths", "input_ids", "attention_mask", "captions", "index"}
    assert batch["index"].tolist() == list(range(len(batch["captions"])))  # validation in order: segment ids
    assert batch["codes"].shape == (3, direct.shape[1], direct.shape[2])


def test_complete_cache_is_read_without_encoding(tmp_path, student, tokenizer, monkeypatch):
    first = synthetic(tmp_path)
    first.attach(student, tokenizer)
    first.setup()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the codec ran although the cache is complete")

    monkeypatch.setattr(datamodule_module, "encode_audio", no_encoding)
    again = opened(tmp_path, student, tokenizer, batch_size=2, segment_seconds=0.5)  # serving: not in the key
    torch.testing.assert_close(again.splits["val"].frames, first.splits["val"].frames)


def test_changed_config_or_codec_gets_a_new_cache(tmp_path, student, tokenizer):
    base = synthetic(tmp_path).token_cache(student).root
    assert synthetic(tmp_path, seconds=1.5).token_cache(student).root != base
    assert synthetic(tmp_path, min_seconds=0.5).token_cache(student).root != base
    assert synthetic(tmp_path, segment_offsets="fixed", batch_size=3).token_cache(student).root == base
    changed = load_musicgen(str(student.name_or_path))
    with torch.no_grad():
        changed.audio_encoder.quantizer.layers[0].codebook.embed[0] += 1.0
    assert synthetic(tmp_path).token_cache(changed).root != base


# Damaged caches (issue 11, D9): found when opened, named, and only the damaged file is made again -------


def prepared(tmp_path, student, tokenizer) -> tuple[SyntheticDataModule, dict[str, float]]:
    """A complete synthetic cache (3 train + 2 val shards) and each shard file's mtime."""
    data = opened(tmp_path, student, tokenizer)
    return data, {p.name: p.stat().st_mtime_ns for p in Path(data.report["cache_dir"]).glob("*.safetensors")}


def record_encoding(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    original = SyntheticDataModule.encode_shard

    def encode_shard(self, model, split, clips, progress):
        calls.append([clip.id for clip in clips])
        return original(self, model, split, clips, progress)

    monkeypatch.setattr(SyntheticDataModule, "encode_shard", encode_shard)
    return calls


def test_truncated_shard_is_reencoded_alone_when_training_opens_the_cache(
    tmp_path, student, tokenizer, monkeypatch, caplog
):
    first, mtimes = prepared(tmp_path, student, tokenizer)
    damaged = Path(first.report["cache_dir"]) / first.report["splits"]["train"]["shards"][1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    calls = record_encoding(monkeypatch)
    again = synthetic(tmp_path)
    again.attach(student, tokenizer)
    with caplog.at_level(logging.WARNING, logger="tinymusician.data.datamodule"):
        again.setup()  # was: SafetensorError: invalid header length
    assert calls == [["000002", "000003"]]  # only the damaged shard's clips
    assert f"token cache shard {damaged} is damaged (truncated" in caplog.text
    assert [r["file"] for r in again.report["repaired"]] == [damaged.name]
    assert again.report["repaired"][0]["action"] == "re-encoded 2 clips"
    for name, mtime in mtimes.items():  # every other shard is kept as it was
        assert (Path(again.report["cache_dir"]) / name).stat().st_mtime_ns == mtime or name == damaged.name
    for split in ("train", "val"):
        torch.testing.assert_close(again.splits[split].frames, first.splits[split].frames)
    # the repaired cache is complete again: the next run reads it without encoding or repairing
    calls.clear()
    third = synthetic(tmp_path)
    third.attach(student, tokenizer)
    third.setup()
    assert calls == [] and third.report["repaired"] == []


def test_overwritten_shard_content_is_reencoded_when_read(tmp_path, student, tokenizer, monkeypatch):
    first, _ = prepared(tmp_path, student, tokenizer)
    damaged = Path(first.report["cache_dir"]) / first.report["splits"]["val"]["shards"][0]
    data = damaged.read_bytes()
    base = 8 + int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:base])["offsets"]["data_offsets"]
    damaged.write_bytes(data[: base + start] + b"\xff" * (end - start) + data[base + end :])  # same size
    calls = record_encoding(monkeypatch)
    again = opened(tmp_path, student, tokenizer)
    assert calls == [["000005", "000006"]]
    assert again.report["repaired"][0]["problem"] == "damaged content (clip offsets or codes out of range)"
    torch.testing.assert_close(again.splits["val"].frames, first.splits["val"].frames)


def test_corrupt_report_is_rebuilt_from_the_shards_without_encoding(
    tmp_path, student, tokenizer, monkeypatch
):
    first, mtimes = prepared(tmp_path, student, tokenizer)
    report_path = Path(first.report["cache_dir"]) / "report.json"
    written = json.loads(report_path.read_text())
    report_path.write_text(report_path.read_text()[:50])  # was: JSONDecodeError "Expecting value"

    def no_encoding(*args, **kwargs):
        raise AssertionError("the codec ran although every shard is sound")

    monkeypatch.setattr(datamodule_module, "encode_audio", no_encoding)
    again = opened(tmp_path, student, tokenizer)
    assert again.report["repaired"] == [
        {
            "file": "report.json",
            "problem": again.report["repaired"][0]["problem"],
            "action": "rebuilt from the shards",
        }
    ]
    assert again.report["repaired"][0]["problem"].startswith("not valid JSON")
    rebuilt = json.loads(report_path.read_text())
    assert {k: v for k, v in rebuilt.items() if k != "repaired"} == {
        k: v for k, v in written.items() if k != "repaired"
    }
    assert {p.name: p.stat().st_mtime_ns for p in report_path.parent.glob("*.safetensors")} == mtimes


def test_damaged_shard_of_an_unfinished_cache_is_reencoded_on_resume(
    tmp_path, student, tokenizer, monkeypatch
):
    first, _ = prepared(tmp_path, student, tokenizer)
    root = Path(first.report["cache_dir"])
    (root / "report.json").unlink()  # as if interrupted before the end
    damaged = root / first.report["splits"]["train"]["shards"][0]
    damaged.write_bytes(b"")
    calls = record_encoding(monkeypatch)
    again = opened(tmp_path, student, tokenizer)
    assert calls == [["000000", "000001"]]
    assert again.report["repaired"][0]["problem"] == "truncated: 0 bytes, shorter than a safetensors header"


def test_reason_kinds_keep_values_and_counts_out_of_the_key():
    bad = [
        {"reason": "non-finite samples: 100 NaN/inf samples"},
        {"reason": "contains 7 NaN/inf samples"},  # as caches written before issue 11 say it
        {"reason": "unknown split: 'holdout' (use train, validation or test)"},
        {"reason": "duplicate: a.wav is already listed at metadata.jsonl:1 (that row is kept)"},
        {"reason": "too short: 0.200 s < 0.500 s (data.min_seconds)"},
    ]
    assert skipped_by_reason(bad) == {
        "non-finite samples": 2,
        "unknown split": 1,
        "duplicate": 1,
        "too short": 1,
    }
