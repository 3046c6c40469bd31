"""The clip listing: hash splits are stable and close to the requested fraction."""

from __future__ import annotations

from tinymusician.data.listing import hash_split


def test_hash_split_is_stable_and_close_to_the_fraction(tmp_path):
    ids = [f"album{i // 10}/track{i}.flac" for i in range(2000)]
    splits = [hash_split(clip_id, 0.1) for clip_id in ids]
    assert splits == [hash_split(clip_id, 0.1) for clip_id in ids]
    assert 0.08 < splits.count("val") / len(ids) < 0.12
    # growing the dataset never moves an existing clip between splits
    assert [hash_split(clip_id, 0.1) for clip_id in ids[:500]] == splits[:500]
