"""Segments served from cached codes: fixed windows, random offsets, padding, whole clips."""

from __future__ import annotations

import torch

from tinymusician.data.segments import SegmentDataset
from tinymusician.data.token_cache import TokenSplit


def test_segments_fixed_random_and_padding():
    clips = [torch.arange(25).repeat(2, 1), torch.arange(7).repeat(2, 1) + 100]
    split = TokenSplit.from_clips(clips, ["long", "short"], ["a", "b"])
    fixed = SegmentDataset(split, segment_frames=10, min_segment_frames=5)
    assert fixed.windows == [(0, 0), (0, 10), (0, 20), (1, 0)]
    assert fixed[1]["codes"][0].tolist() == list(range(10, 20)) and fixed[1]["length"] == 10
    assert fixed[2]["length"] == 5 and fixed[2]["codes"][0, 5:].eq(0).all()
    assert fixed[3]["length"] == 7 and fixed[3]["caption"] == "short"
    assert len(SegmentDataset(split, segment_frames=10, min_segment_frames=6)) == 3  # 5-frame tail dropped
    torch.manual_seed(0)
    random = SegmentDataset(split, segment_frames=10, min_segment_frames=5, random_offsets=True)
    starts = {int(random[0]["codes"][0, 0]) for _ in range(50)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 15
    for item in (random[0] for _ in range(10)):  # a window is contiguous and full length
        assert item["codes"][0].tolist() == list(
            range(int(item["codes"][0, 0]), int(item["codes"][0, 0]) + 10)
        )
    assert random[3]["codes"][0, :7].tolist() == list(range(100, 107))  # shorter than a segment: from 0
    whole = SegmentDataset(split)
    assert len(whole) == 2 and whole[1]["codes"].shape == (2, 25) and whole[1]["length"] == 7
