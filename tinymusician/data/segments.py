"""Serving cached codes for training: fixed or randomly offset segments, and the batch collator."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from tinymusician.data.token_cache import TokenSplit


class SegmentDataset(Dataset):
    """Training items cut from a split's clips: item = ``{"codes": [K, S], "length", "caption", "index"}``.

    Every clip gives its fixed windows ``0, S, 2S, ...`` (a last, shorter window only if it has at least
    ``min_segment_frames``); with ``random_offsets`` each of those items instead starts at a fresh random
    frame every time it is read. ``segment_frames=None`` serves whole clips, padded to the longest. Padding
    is code 0 and ``length`` says how many frames are real; ``index`` is the item's position in the dataset (the
    teacher-logit cache's key for its row).
    """

    def __init__(
        self,
        split: TokenSplit,
        segment_frames: int | None = None,
        min_segment_frames: int = 1,
        random_offsets: bool = False,
    ) -> None:
        self.split = split
        lengths = split.lengths.tolist()
        self.size = segment_frames or max(lengths, default=0)
        self.random_offsets = random_offsets
        self.windows: list[tuple[int, int]] = []
        for clip, length in enumerate(lengths):
            starts = [s for s in range(0, length, self.size) if s == 0 or length - s >= min_segment_frames]
            self.windows += [(clip, start) for start in starts]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        clip, start = self.windows[index]
        length = int(self.split.lengths[clip])
        if self.random_offsets and length > self.size:
            start = int(torch.randint(0, length - self.size + 1, ()))
        codes = self.split.clip(clip)[:, start : start + self.size].long()
        valid = codes.shape[-1]
        if valid < self.size:
            codes = torch.nn.functional.pad(codes, (0, self.size - valid))
        return {"codes": codes, "length": valid, "caption": self.split.captions[clip], "index": index}


class CaptionCollator:
    """Stacks codes and tokenises captions; a top-level class so DataLoader workers can pickle it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_text_tokens: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        text = self.tokenizer(
            [item["caption"] for item in items],
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        return {
            "codes": torch.stack([item["codes"] for item in items]),
            "lengths": torch.tensor([item["length"] for item in items]),
            "index": torch.tensor([item.get("index", -1) for item in items]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "captions": [item["caption"] for item in items],
        }
