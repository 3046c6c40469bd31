"""The sharded token cache: the ragged split, storage round trip, keys, damaged shards and reports named."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from tinymusician.data.token_cache import CorruptCacheError, ShardedTokenCache, TokenSplit, shard_problem


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
    with pytest.raises(CorruptCacheError, match=f"{path}: truncated.*tinymusician.prepare"):
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
