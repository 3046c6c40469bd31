"""On-disk cache of codec tokens, so the audio codec runs once per corpus and not every step.

A cache is one directory per corpus, named by a hash of everything that determines its tokens (the data
description, its file listing and the codec's weights), so a changed codec or config never reads stale
tokens. Inside, each split is a list of safetensors shards written atomically one by one: an interrupted
preparation keeps its finished shards and a re-run encodes only the rest. ``report.json`` marks the cache
complete, lists the clips that were skipped and records every shard's size, so a shard damaged later
(truncated by a full disk or an interrupted copy) is found by :func:`shard_problem` when the cache is
opened and only that shard is encoded again; ``report.json`` itself is derived from the shards and rebuilt
if it does not parse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the on-disk layout changes
SHARD_METADATA = ("captions", "ids", "bad")
REPORT_KEYS = ("key", "cache_dir", "splits", "listed", "usable", "skipped", "skipped_by_reason", "bad")
_REENCODE_FIX = (
    "delete it and run `python -m tinymusician.prepare` (or training) again with the same "
    "overrides: only this shard is encoded again"
)


class CorruptCacheError(ValueError):
    """A token-cache file that cannot be used as it is; names the file, what is wrong and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = _REENCODE_FIX) -> None:
        super().__init__(f"token cache file {path}: {problem}; {fix}")
        self.path = Path(path)
        self.problem = problem


def fsync_file(path: Path) -> None:
    """Flush a file before it is renamed into place: else a crash can leave a renamed but empty shard."""
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def shard_problem(path: Path, expected_bytes: int | None = None) -> str | None:
    """Why the shard at ``path`` is unusable (absent, truncated, not a token shard), or None if it is sound.

    Reads only the safetensors header, so it is cheap enough to run on every shard each time a cache is
    opened. ``expected_bytes`` is the size the cache's report recorded when the shard was written.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"truncated: {size} bytes, shorter than a safetensors header"
            header_bytes = int.from_bytes(prefix, "little")
            if 8 + header_bytes > size:
                return f"truncated: the header needs {8 + header_bytes} bytes, the file has {size}"
            header = json.loads(handle.read(header_bytes))
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    meta = header.get("__metadata__") or {}
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    missing = [name for name in ("frames", "offsets") if name not in tensors]
    missing += [name for name in SHARD_METADATA if name not in meta]
    if missing:
        return f"not a token shard (no {', '.join(missing)})"
    try:
        end = max(int(info["data_offsets"][1]) for info in tensors.values())
        clips = int(tensors["offsets"]["shape"][0]) - 1
        counts = {name: len(json.loads(meta[name])) for name in ("captions", "ids")}
    except (KeyError, IndexError, TypeError, ValueError):
        return "not a token shard (malformed header)"
    if 8 + header_bytes + end != size:
        return f"truncated: its header describes {8 + header_bytes + end} bytes, the file has {size}"
    if any(count != clips for count in counts.values()):
        return f"inconsistent: {clips} clips but {counts['captions']} captions and {counts['ids']} ids"
    if expected_bytes is not None and size != expected_bytes:  # a sound file, but not the one written
        return f"{size} bytes but {expected_bytes} when written (overwritten)"
    return None


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
        fsync_file(tmp)
        tmp.replace(path)  # atomic: an interrupted run never leaves a half-written shard

    @staticmethod
    def read_shard(path: Path) -> TokenSplit:
        """One shard; a damaged one raises :class:`CorruptCacheError` naming it, not a SafetensorError."""
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata()
            split = TokenSplit(
                tensors["frames"],  # kept in its compact dtype; datasets cast per item
                tensors["offsets"].long(),
                json.loads(meta["captions"]),
                json.loads(meta["ids"]),
                json.loads(meta["bad"]),
            )
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
            raise CorruptCacheError(path, shard_problem(path) or f"cannot be read ({err})") from err
        offsets = split.offsets
        # the header check cannot see overwritten data bytes; offsets that do not fit the frames would
        # only fail later, mid-epoch
        if (
            len(offsets) != len(split) + 1
            or len(split.ids) != len(split)
            or (len(offsets) and (int(offsets[0]) != 0 or int(offsets[-1]) != split.frames.shape[-1]))
            or bool((offsets[1:] < offsets[:-1]).any())
            or (split.frames.numel() and int(split.frames.min()) < 0)
        ):
            raise CorruptCacheError(path, "damaged content (clip offsets or codes out of range)")
        return split

    def read_report(self) -> dict | None:
        """The report of a complete cache, or None while (or if never) prepared.

        Raises :class:`CorruptCacheError` if the file exists but is not a report of this cache; it is
        derived from the shards, so the caller can rebuild it without encoding anything.
        """
        if not self.report_path.is_file():
            return None
        fix = "it is rebuilt from the shards (nothing is encoded again)"
        try:
            report = json.loads(self.report_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCacheError(self.report_path, f"not valid JSON ({err})", fix) from err
        if not isinstance(report, dict) or any(key not in report for key in REPORT_KEYS):
            missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
            raise CorruptCacheError(self.report_path, f"not a token-cache report (no {missing})", fix)
        if report["key"] != self.key:
            raise CorruptCacheError(
                self.report_path, f"belongs to cache key {report['key']!r}, not {self.key!r}", fix
            )
        splits = report["splits"]
        if not isinstance(splits, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("shards"), list) for info in splits.values()
        ):
            raise CorruptCacheError(self.report_path, "its 'splits' do not list shards", fix)
        return report

    def write_report(self, report: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, **report}, indent=2, default=str))
        fsync_file(tmp)
        tmp.replace(self.report_path)
