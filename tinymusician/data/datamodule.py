"""LightningDataModules that serve tokenised audio with captions: ``codes [B, K, T]`` + T5 inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import MusicgenForConditionalGeneration, PreTrainedTokenizerBase

from tinymusician.data.synthetic import synthesize_corpus
from tinymusician.data.token_cache import TokenSplit, cached_split, codec_fingerprint
from tinymusician.models.musicgen import codec_encode

log = logging.getLogger(__name__)


class EmptySplitError(ValueError):
    """A split without a single usable clip: training cannot start."""


class CodesDataset(Dataset):
    """Clips of one split: item = ``{"codes": [K, T], "length": int, "caption": str}``."""

    def __init__(self, split: TokenSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return {
            "codes": self.split.codes[index],
            "length": int(self.split.lengths[index]),
            "caption": self.split.captions[index],
        }


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
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "captions": [item["caption"] for item in items],
        }


class CodesDataModule(L.LightningDataModule):
    """Base: subclasses say how to produce audio+captions per split; this tokenises, caches and serves them.

    Call :meth:`attach` with the student (its codec tokenises the audio) and the text tokenizer before use.
    """

    split_names = ("train", "val")

    def __init__(
        self,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/tinymusician",
        encode_batch: int = 32,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser()
        self.encode_batch = encode_batch
        self.model: MusicgenForConditionalGeneration | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: dict[str, TokenSplit] = {}

    def attach(self, model: MusicgenForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer

    # Subclasses --------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Everything that determines the clips (goes into the cache key)."""
        raise NotImplementedError

    def load_audio(self, split: str, sample_rate: int) -> tuple[list[np.ndarray], list[str]]:
        """Mono float32 audio at ``sample_rate`` and captions of ``split``."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, audio: list[np.ndarray], captions: list[str], split: str) -> TokenSplit:
        """Run the codec over all clips once (equal-length batches), with a progress bar."""
        assert self.model is not None
        codec = self.model.audio_encoder
        chunks, lengths = [], []
        for start in tqdm(
            range(0, len(audio), self.encode_batch), desc=f"Encoding {split} clips", unit="batch"
        ):
            batch = audio[start : start + self.encode_batch]
            longest = max(len(clip) for clip in batch)
            padded = torch.zeros(len(batch), longest)
            for i, clip in enumerate(batch):
                padded[i, : len(clip)] = torch.from_numpy(clip)
            codes = codec_encode(self.model, padded.to(codec.dtype))
            chunks.append(codes)
            hop = int(np.prod(codec.config.upsampling_ratios))
            lengths.extend(min(-(-len(clip) // hop), codes.shape[-1]) for clip in batch)
        longest = max(chunk.shape[-1] for chunk in chunks)
        codes = torch.cat([torch.nn.functional.pad(c, (0, longest - c.shape[-1])) for c in chunks])
        return TokenSplit(codes.cpu().long(), torch.tensor(lengths), list(captions))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(
                "call datamodule.attach(model, tokenizer) before setup(): the codec tokenises audio"
            )
        codec = self.model.audio_encoder
        sample_rate = codec.config.sampling_rate
        for split in self.split_names:
            key = {"data": self.describe(), "split": split, "codec": codec_fingerprint(codec)}

            def compute(split: str = split) -> TokenSplit:
                audio, captions = self.load_audio(split, sample_rate)
                if not audio:
                    raise EmptySplitError(self.empty_message(split))
                return self.encode(audio, captions, split)

            self.splits[split] = cached_split(self.cache_dir, type(self).__name__, key, compute)
            if len(self.splits[split]) == 0:
                raise EmptySplitError(self.empty_message(split))
        log.info("Usable clips: %s", {name: len(split) for name, split in self.splits.items()})

    def empty_message(self, split: str) -> str:
        return f"data: the {split!r} split has no usable clips ({self.describe()}); give it at least one clip"

    def dataloader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self.tokenizer is not None
        return DataLoader(
            CodesDataset(self.splits[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=CaptionCollator(self.tokenizer),
            drop_last=shuffle and len(self.splits[split]) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val", shuffle=False)


class SyntheticDataModule(CodesDataModule):
    """The embedded default: seeded synthetic melodies with captions that describe them (no download)."""

    def __init__(
        self, num_train: int = 512, num_val: int = 64, seconds: float = 2.0, seed: int = 0, **kwargs
    ) -> None:
        for key, value in {"num_train": num_train, "num_val": num_val}.items():
            if value < 1:
                raise EmptySplitError(f"data.{key}={value}: the split would be empty; set data.{key} >= 1")
        if seconds <= 0:
            raise ValueError(f"data.seconds={seconds}: clip length must be positive")
        super().__init__(**kwargs)
        self.num_train, self.num_val, self.seconds, self.seed = num_train, num_val, seconds, seed

    def describe(self) -> dict:
        return {
            "kind": "synthetic",
            "num_train": self.num_train,
            "num_val": self.num_val,
            "seconds": self.seconds,
            "seed": self.seed,
        }

    def load_audio(self, split: str, sample_rate: int) -> tuple[list[np.ndarray], list[str]]:
        start, count = (0, self.num_train) if split == "train" else (self.num_train, self.num_val)
        clips = synthesize_corpus(
            count, seed=self.seed, seconds=self.seconds, sample_rate=sample_rate, start=start
        )
        return [clip.audio for clip in clips], [clip.caption for clip in clips]
