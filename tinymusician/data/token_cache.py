"""On-disk cache of codec tokens, so the audio codec runs once per corpus and not every step.

A cache is one directory per corpus, named by a hash of everything that determines its tokens (the data
description, its file listing and the codec's weights), so a changed codec or config never reads stale
tokens. Inside, each split is a list of safetensors shards written atomically one by one: an interrupted
preparation keeps its finished shards and a re-run encodes only the rest. ``report.json`` marks the cache
complete and lists the clips that were skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the on-disk layout changes


@dataclass
class TokenSplit:
    """Clips of one split (or shard), stored end to end: clip ``i`` is ``frames[:, offsets[i]:offsets[i+1]]``.

    ``frames [K, F]`` (all clips' codes concatenated on time), ``offsets [N + 1]``, captions and ids ``[N]``;
    ``bad`` lists ``{"id", "reason"}`` of the clips that were skipped while making it.
    """

    frames: torch.Tensor
    offsets: torch.Tensor
    captions: list[str]
    ids: list[str]
    bad: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def lengths(self) -> torch.Tensor:
        """Frame count of every clip ``[N]``."""
        return self.offsets[1:] - self.offsets[:-1]

    def clip(self, index: int) -> torch.Tensor:
        """Codes of clip ``index``: ``[K, T_index]``."""
        return self.frames[:, int(self.offsets[index]) : int(self.offsets[index + 1])]

    @property
    def codes(self) -> torch.Tensor:
        """All clips zero-padded to the longest: ``[N, K, T_max]`` (materialised on each call)."""
        longest = int(self.lengths.max()) if len(self) else 0
        out = torch.zeros(len(self), self.frames.shape[0], longest, dtype=torch.long)
        for i in range(len(self)):
            clip = self.clip(i)
            out[i, :, : clip.shape[-1]] = clip
        return out

    @classmethod
    def from_clips(
        cls, clips: list[torch.Tensor], captions: list[str], ids: list[str], bad: list[dict] | None = None
    ) -> TokenSplit:
        """From per-clip codes ``[K, T_i]`` (at least one, or ``num_codebooks`` is unknown and K is 0)."""
        lengths = [clip.shape[-1] for clip in clips]
        offsets = torch.zeros(len(clips) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        frames = torch.cat(clips, dim=-1) if clips else torch.zeros(0, 0, dtype=torch.long)
        return cls(frames, offsets, list(captions), list(ids), list(bad or []))

    @classmethod
    def concat(cls, parts: list[TokenSplit]) -> TokenSplit:
        clips = [part.clip(i) for part in parts for i in range(len(part))]
        return cls.from_clips(
            clips,
            [c for part in parts for c in part.captions],
            [i for part in parts for i in part.ids],
            [b for part in parts for b in part.bad],
        )


def codec_fingerprint(codec: torch.nn.Module) -> str:
    """A short hash of the codec's config and quantizer codebooks: what the codes depend on."""
    digest = hashlib.sha256(json.dumps(codec.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(codec.state_dict().items()):
        if "quantizer" in name or "encoder" in name:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _storage_dtype(frames: torch.Tensor) -> torch.dtype:
    """int16 halves the cache for any codebook up to 32767 codes (MusicGen's is 2048)."""
    return torch.int16 if frames.numel() == 0 or int(frames.max()) < 2**15 else torch.int32


class ShardedTokenCache:
    """The directory ``{cache_dir}/tokens/{name}-{key}/``: per-split shards plus ``report.json``.

    A shard's file name carries its index and a hash of its clip ids, so a different sharding (another
    ``shard_size``, another listing) never picks up a shard that holds other clips.
    """

    def __init__(self, cache_dir: str | Path, name: str, key_parts: dict) -> None:
        self.key_parts = {"cache_version": CACHE_VERSION, **key_parts}
        self.key = cache_key(self.key_parts)
        self.root = Path(cache_dir).expanduser() / "tokens" / f"{name}-{self.key}"
        self.report_path = self.root / "report.json"

    def shard_path(self, split: str, index: int, ids: list[str]) -> Path:
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:10]
        return self.root / f"{split}-{index:05d}-{digest}.safetensors"

    def write_shard(self, path: Path, shard: TokenSplit) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(
            {
                "frames": shard.frames.to(_storage_dtype(shard.frames)).contiguous(),
                "offsets": shard.offsets.to(torch.int64).contiguous(),
            },
            str(tmp),
            metadata={
                "captions": json.dumps(shard.captions),
                "ids": json.dumps(shard.ids),
                "bad": json.dumps(shard.bad),
            },
        )
        tmp.replace(path)  # atomic: an interrupted run never leaves a half-written shard

    @staticmethod
    def read_shard(path: Path) -> TokenSplit:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        return TokenSplit(
            tensors["frames"],  # kept in its compact dtype; datasets cast per item
            tensors["offsets"].long(),
            json.loads(meta["captions"]),
            json.loads(meta["ids"]),
            json.loads(meta["bad"]),
        )

    def read_report(self) -> dict | None:
        """The report of a complete cache, or None while (or if never) prepared."""
        if not self.report_path.is_file():
            return None
        return json.loads(self.report_path.read_text())

    def write_report(self, report: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, **report}, indent=2, default=str))
        tmp.replace(self.report_path)
