"""The sharded token cache: storage round trip, keys, the synthetic default going through shards, repairs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinymusician.data import datamodule as datamodule_module
from tinymusician.data.datamodule import SegmentDataset, SyntheticDataModule, encode_audio
from tinymusician.data.synthetic import synthesize_corpus
from tinymusician.data.token_cache import CorruptCacheError, ShardedTokenCache, TokenSplit, shard_problem
from tinymusician.models.musicgen import codec_encode, load_musicgen


def ragged_split() -> TokenSplit:
    generator = torch.Generator().manual_seed(0)
    clips = [torch.randint(0, 2048, (4, length), generator=generator) for length in (5, 0, 9, 3)]
    return TokenSplit.from_clips(
        clips, ["a", "b", "c", "d"], ["0", "1", "2", "3"], [{"id": "x", "reason": "r"}]
    )


def test_token_split_is_ragged_and_pads_on_demand():
    split = ragged_split()
    assert len(split) == 4 and split.lengths.tolist() == [5, 0, 9, 3]
    assert split.frames.shape == (4, 17) and split.clip(1).shape == (4, 0)
    padded = split.codes
    assert padded.shape == (4, 4, 9)
    torch.testing.assert_close(padded[2], split.clip(2))
    assert not padded[0, :, 5:].any() and not padded[3, :, 3:].any()
    both = TokenSplit.concat([split, split])
    assert len(both) == 8 and both.ids[4:] == split.ids and len(both.bad) == 2
    torch.testing.assert_close(both.clip(6), split.clip(2))


def test_shard_round_trip_is_exact_compact_and_atomic(tmp_path):
    cache = ShardedTokenCache(tmp_path, "Test", {"data": {"a": 1}})
    split = ragged_split()
    path = cache.shard_path("train", 0, split.ids)
    cache.write_shard(path, split)
    back = ShardedTokenCache.read_shard(path)
    assert back.frames.dtype == torch.int16  # codebooks of 2048 fit: half the size of int32
    torch.testing.assert_close(back.frames.long(), split.frames)
    torch.testing.assert_close(back.offsets, split.offsets)
    assert (back.captions, back.ids, back.bad) == (split.captions, split.ids, split.bad)
    assert sorted(p.name for p in cache.root.iterdir()) == [path.name]  # no temporary file left behind
    empty = TokenSplit.from_clips([], [], [], [{"id": "y", "reason": "silent"}])
    cache.write_shard(cache.shard_path("val", 0, []), empty)
    assert len(ShardedTokenCache.read_shard(cache.shard_path("val", 0, [])).bad) == 1


def test_keys_and_shard_names_depend_on_what_they_hold(tmp_path):
    a = ShardedTokenCache(tmp_path, "Test", {"data": {"seconds": 2.0}, "codec": "abc"})
    assert a.root == ShardedTokenCache(tmp_path, "Test", {"codec": "abc", "data": {"seconds": 2.0}}).root
    assert a.root != ShardedTokenCache(tmp_path, "Test", {"data": {"seconds": 3.0}, "codec": "abc"}).root
    assert a.root != ShardedTokenCache(tmp_path, "Test", {"data": {"seconds": 2.0}, "codec": "abd"}).root
    assert a.shard_path("train", 0, ["x", "y"]) != a.shard_path("train", 0, ["x", "z"])


def synthetic(tmp_path, **kwargs) -> SyntheticDataModule:
    values = {"num_train": 5, "num_val": 3, "seconds": 1.0, "shard_size": 2, "cache_dir": str(tmp_path)}
    return SyntheticDataModule(**{**values, **kwargs})


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
    assert set(batch) == {"codes", "lengths", "input_ids", "attention_mask", "captions"}
    assert batch["codes"].shape == (3, direct.shape[1], direct.shape[2])


def test_complete_cache_is_read_without_encoding(tmp_path, student, tokenizer, monkeypatch):
    first = synthetic(tmp_path)
    first.attach(student, tokenizer)
    first.setup()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the codec ran although the cache is complete")

    monkeypatch.setattr(datamodule_module, "encode_audio", no_encoding)
    again = synthetic(tmp_path, batch_size=2, segment_seconds=0.5)  # serving options are not in the key
    again.attach(student, tokenizer)
    again.setup()
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


def test_long_clips_are_encoded_in_pieces_with_the_same_frame_count(student):
    rate = student.audio_encoder.config.sampling_rate
    clip = synthesize_corpus(1, seed=3, seconds=3.0, sample_rate=rate)[0].audio
    whole = encode_audio(student, [clip, clip[:12345]])
    pieces = encode_audio(student, [clip, clip[:12345]], chunk_samples=rate)
    assert [c.shape[-1] for c in whole] == [c.shape[-1] for c in pieces] == [150, 39]
    # pieces only differ near their joins (the encoder's receptive field); most codes agree
    assert (whole[0] == pieces[0]).float().mean() > 0.7


def test_segments_fixed_random_and_padding():
    clips = [torch.arange(25).repeat(2, 1), torch.arange(7).repeat(2, 1) + 100]
    split = TokenSplit.from_clips(clips, ["long", "short"], ["a", "b"])
    fixed = SegmentDataset(split, segment_frames=10, min_frames=5)
    assert fixed.windows == [(0, 0), (0, 10), (0, 20), (1, 0)]
    assert fixed[1]["codes"][0].tolist() == list(range(10, 20)) and fixed[1]["length"] == 10
    assert fixed[2]["length"] == 5 and fixed[2]["codes"][0, 5:].eq(0).all()
    assert fixed[3]["length"] == 7 and fixed[3]["caption"] == "short"
    assert len(SegmentDataset(split, segment_frames=10, min_frames=6)) == 3  # 5-frame tail dropped
    torch.manual_seed(0)
    random = SegmentDataset(split, segment_frames=10, min_frames=5, random_offsets=True)
    starts = {int(random[0]["codes"][0, 0]) for _ in range(50)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 15
    for item in (random[0] for _ in range(10)):  # a window is contiguous and full length
        assert item["codes"][0].tolist() == list(
            range(int(item["codes"][0, 0]), int(item["codes"][0, 0]) + 10)
        )
    assert random[3]["codes"][0, :7].tolist() == list(range(100, 107))  # shorter than a segment: from 0
    whole = SegmentDataset(split)
    assert len(whole) == 2 and whole[1]["codes"].shape == (2, 25) and whole[1]["length"] == 7


# Damaged caches (issue 11, D9): found when opened, named, and only the damaged file is made again -------


def written_shard(tmp_path):
    cache = ShardedTokenCache(tmp_path, "Test", {"data": {"a": 1}})
    path = cache.shard_path("train", 0, ragged_split().ids)
    cache.write_shard(path, ragged_split())
    return cache, path


def test_shard_problem_finds_truncated_padded_and_foreign_files(tmp_path):
    cache, path = written_shard(tmp_path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert shard_problem(path) is None and shard_problem(path, len(data)) is None
    assert shard_problem(path, len(data) + 10) == (
        f"{len(data)} bytes but {len(data) + 10} when written (overwritten)"
    )
    assert shard_problem(tmp_path / "absent.safetensors") == "missing"
    for cut in (0, 5, 20, header_end - 3, header_end + 4, len(data) - 1):
        path.write_bytes(data[:cut])
        assert shard_problem(path).startswith("truncated"), cut
    path.write_bytes(data + b"\0\0")
    assert shard_problem(path).startswith("truncated: its header describes")
    path.write_bytes(b"\x10" + b"\0" * 7 + b"0123456789abcdef")
    assert shard_problem(path) == "not a safetensors file (its header is not JSON)"
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(other))
    assert shard_problem(other) == "not a token shard (no frames, offsets, captions, ids, bad)"


def test_reading_a_damaged_shard_names_it_and_the_fix(tmp_path):
    cache, path = written_shard(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # was: SafetensorError "invalid header length" / "incomplete"
    with pytest.raises(CorruptCacheError, match=f"{path}: truncated.*tinymusician.data.prepare"):
        ShardedTokenCache.read_shard(path)
    # header intact, data bytes overwritten: caught by the offsets check, not left to fail mid-epoch
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    start, end = header["offsets"]["data_offsets"]
    base = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[: base + start] + b"\xff" * (end - start) + data[base + end :])
    assert shard_problem(path) is None
    with pytest.raises(CorruptCacheError, match="damaged content"):
        ShardedTokenCache.read_shard(path)


@pytest.mark.parametrize(
    "text,problem",
    [
        ('{"key": "abc", "splits": {', "not valid JSON (Expecting"),
        ("", "not valid JSON (Expecting value"),
        ("[1, 2]", "not a token-cache report"),
    ],
)
def test_a_corrupt_report_is_named_with_the_fix(tmp_path, text, problem):
    cache = ShardedTokenCache(tmp_path, "Test", {"data": {"a": 1}})
    cache.root.mkdir(parents=True)
    cache.report_path.write_text(text)
    with pytest.raises(CorruptCacheError, match=f"{cache.report_path}: {re.escape(problem)}.*rebuilt"):
        cache.read_report()


def prepared(tmp_path, student, tokenizer) -> tuple[SyntheticDataModule, dict[str, float]]:
    """A complete synthetic cache (3 train + 2 val shards) and each shard file's mtime."""
    data = synthetic(tmp_path)
    data.attach(student, tokenizer)
    data.setup()
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
    again = synthetic(tmp_path)
    again.attach(student, tokenizer)
    again.setup()
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
    again = synthetic(tmp_path)
    again.attach(student, tokenizer)
    again.setup()
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
    again = synthetic(tmp_path)
    again.attach(student, tokenizer)
    again.setup()
    assert calls == [["000000", "000001"]]
    assert again.report["repaired"][0]["problem"] == "truncated: 0 bytes, shorter than a safetensors header"
