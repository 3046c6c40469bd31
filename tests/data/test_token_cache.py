"""The sharded token cache: storage round trip, keys, and the synthetic default going through shards."""

from __future__ import annotations

import json

import torch

from tinymusician.data import datamodule as datamodule_module
from tinymusician.data.datamodule import SegmentDataset, SyntheticDataModule, encode_audio
from tinymusician.data.synthetic import synthesize_corpus
from tinymusician.data.token_cache import ShardedTokenCache, TokenSplit
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
