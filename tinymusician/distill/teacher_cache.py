"""The teacher-logit cache: the teacher runs once over the token cache, training then reads its top-k.

Layout: ``{distill.cache.dir}/{key}/`` with one safetensors shard per ``shard_size`` segments of a split
(``indices [n, K, T, k]`` int16, ``log_probs [n, K, T, k]`` fp16, ``tail [n, K, T]`` fp16: the log-mass outside
the top-k) and ``report.json`` once every shard is written. The key hashes everything the stored numbers depend
on: the teacher (source, config, a weight fingerprint, dtype), the data (the token cache's key, the segment
windows, the text tokenizer), k and the cache temperature. Shards are written atomically one by one, so a
killed build keeps them and a re-run computes only the rest. Training looks items up by their segment index
(``batch["index"]``), reading only their rows from the memory-mapped shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from tinymusician.data.segments import CaptionCollator, SegmentDataset
from tinymusician.data.token_cache import cache_key, fsync_file
from tinymusician.distill.sparse import TAILS, SparseTeacher
from tinymusician.models.musicgen import teacher_forcing

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored numbers or layout change
TENSORS = ("indices", "log_probs", "tail")
TEACHER_SOURCES = ("live", "cache")


class TeacherCacheError(ValueError):
    """A teacher-logit cache that is missing, incomplete or does not match this run; says how to fix it."""


@dataclass(frozen=True)
class CacheSettings:
    """``distill.cache.*``: what the cache keeps (k, temperature) and how training reads its tail."""

    dir: str
    k: int = 32
    temperature: float = 1.0
    tail: str = "spread"
    shard_size: int = 64
    batch_size: int = 8

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CacheSettings:
        cfg = dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise TeacherCacheError(
                f"unknown key(s) {', '.join(f'distill.cache.{k}' for k in unknown)}; known: "
                f"{', '.join(f'distill.cache.{k}' for k in sorted(known))}"
            )
        settings = cls(**cfg)
        for name in ("k", "shard_size", "batch_size"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TeacherCacheError(f"distill.cache.{name}={value!r}: must be an integer >= 1")
        if not settings.temperature > 0:
            raise TeacherCacheError(f"distill.cache.temperature={settings.temperature!r}: must be > 0")
        if settings.tail not in TAILS:
            raise TeacherCacheError(f"distill.cache.tail={settings.tail!r}: use one of {', '.join(TAILS)}")
        return settings


def _sampled_digest(path: Path, block: int = 1 << 16) -> str:
    """sha256 of a file's size and three blocks (start, middle, end): other weights almost surely differ there,
    and a multi-GB checkpoint is identified without reading it all."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            handle.seek(offset)
            digest.update(handle.read(block))
    return digest.hexdigest()[:16]


def teacher_identity(source: str, dtype: str) -> dict[str, Any]:
    """What the cached numbers depend on about the teacher, read from its files without loading it (training
    from the cache never loads the teacher): the source, its config.json and weight files, and the dtype."""
    root = Path(source).expanduser()
    identity: dict[str, Any] = {"source": source, "dtype": str(dtype)}
    if root.is_dir():
        config = root / "config.json"
        if config.is_file():
            identity["config"] = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
        weights = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
        identity["weights"] = {p.name: _sampled_digest(p) for p in weights}
    return identity


def data_identity(datamodule: Any, datasets: Mapping[str, SegmentDataset]) -> dict[str, Any]:
    """What the cached numbers depend on about the data: the token cache (corpus + codec), the segment windows
    served and the text tokenizer."""
    tokenizer = datamodule.tokenizer
    return {
        "tokens": datamodule.token_cache(datamodule.model).key,
        "segment_frames": datamodule.segment_frames(),
        "min_segment_frames": datamodule.min_segment_frames(),
        "windows": {split: len(dataset) for split, dataset in datasets.items()},
        "max_text_tokens": datamodule.max_text_tokens,
        "tokenizer": [type(tokenizer).__name__, len(tokenizer) if tokenizer is not None else None],
    }


class TeacherLogitCache:
    """One cache directory: its shards, its report, and lookups of a batch's rows."""

    def __init__(
        self, settings: CacheSettings, key_parts: Mapping[str, Any], guidance_scale: float = 1.0
    ) -> None:
        self.settings = settings
        # > 1: the cache holds the teacher's guided distribution (loss.guidance_scale), a different target
        self.guidance_scale = float(guidance_scale)
        self.key_parts = {
            "cache_version": CACHE_VERSION,
            **key_parts,
            "k": settings.k,
            "temperature": settings.temperature,
            **({"guidance_scale": self.guidance_scale} if self.guidance_scale != 1.0 else {}),
        }
        self.key = cache_key(self.key_parts)
        self.root = Path(settings.dir).expanduser() / self.key
        self.report_path = self.root / "report.json"
        self._handles: dict[Path, Any] = {}

    # --- layout ---------------------------------------------------------------------------------------
    def shard_path(self, split: str, index: int) -> Path:
        return self.root / f"{split}-{index:05d}.safetensors"

    def shard_count(self, windows: int) -> int:
        return -(-windows // self.settings.shard_size)

    def shard_rows(self, index: int, windows: int) -> range:
        size = self.settings.shard_size
        return range(index * size, min(windows, (index + 1) * size))

    def shard_ok(self, path: Path, rows: int) -> bool:
        """A shard is reusable if it opens and holds ``rows`` items of this cache's key (header only)."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                shapes = {name: handle.get_slice(name).get_shape() for name in TENSORS}
        except (SafetensorError, OSError, KeyError, ValueError):
            return False
        return meta.get("key") == self.key and all(shape[0] == rows for shape in shapes.values())

    def read_report(self) -> dict | None:
        try:
            report = json.loads(self.report_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return report if report.get("key") == self.key and report.get("complete") else None

    # --- training-time lookups ------------------------------------------------------------------------
    def open(self, splits: Mapping[str, int]) -> dict:
        """Check the cache is complete for ``splits`` (name -> segment count) and return its report."""
        report = self.read_report()
        if report is None:
            raise TeacherCacheError(
                f"distill.teacher_source=cache: no complete teacher-logit cache at {self.root} for this teacher, "
                f"data and distill.cache (k={self.settings.k}, temperature={self.settings.temperature}, loss.guidance_scale="
                f"{self.guidance_scale:g}); build it "
                "with `python -m tinymusician.cache_teacher <the same overrides as train>`"
            )
        for split, windows in splits.items():
            have = report["splits"].get(split, {}).get("windows")
            if have != windows:
                raise TeacherCacheError(
                    f"teacher-logit cache {self.root}: split {split!r} holds {have} segments, this run serves "
                    f"{windows}; rebuild it with `python -m tinymusician.cache_teacher <the same overrides>`"
                )
        return report

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")  # memory-mapped; rows read on demand
        return self._handles[path]

    def lookup(self, split: str, indices: torch.Tensor, vocab: int) -> SparseTeacher:
        """The cached top-k of segments ``indices [B]`` of ``split``: ``[B, K, T, k]`` as a SparseTeacher."""
        size = self.settings.shard_size
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
        for index in indices.tolist():
            handle = self._handle(self.shard_path(split, index // size))
            row = index % size
            for name in TENSORS:
                parts[name].append(handle.get_slice(name)[row : row + 1])
        stacked = {name: torch.cat(values) for name, values in parts.items()}
        return SparseTeacher(
            stacked["indices"],
            stacked["log_probs"],
            stacked["tail"],
            vocab,
            self.settings.temperature,
            self.settings.tail,
        )

    def __getstate__(self) -> dict:  # DataLoader workers / spawn: handles are reopened where used
        return {**self.__dict__, "_handles": {}}

    # --- building -------------------------------------------------------------------------------------
    def write_shard(self, path: Path, sparse: SparseTeacher, first: int) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tensors = {"indices": sparse.indices, "log_probs": sparse.log_probs, "tail": sparse.tail_log_mass}
        save_file(
            {name: value.contiguous() for name, value in tensors.items()},
            str(tmp),
            metadata={"key": self.key, "first": str(first)},
        )
        fsync_file(tmp)
        tmp.replace(path)  # atomic: a killed build never leaves a half-written shard
        return path.stat().st_size

    def build(
        self,
        teacher: torch.nn.Module,
        datasets: Mapping[str, SegmentDataset],
        collator: CaptionCollator,
        progress: bool = True,
    ) -> dict:
        """Run ``teacher`` over every segment of ``datasets`` not cached yet; write shards and the report."""
        from tqdm.auto import tqdm

        existing = self.read_report()
        if existing is not None and all(
            existing["splits"].get(s, {}).get("windows") == len(d) for s, d in datasets.items()
        ):
            log.info("Teacher-logit cache %s is complete; nothing to do", self.root)
            return {**existing, "reused": True}
        total = sum(len(d) for d in datasets.values())
        splits: dict[str, dict] = {}
        computed_positions, seconds = 0, 0.0
        with tqdm(total=total, desc="teacher top-k", unit="seg", disable=not progress) as bar:
            for split, dataset in datasets.items():
                shards, nbytes = self.shard_count(len(dataset)), 0
                for shard in range(shards):
                    rows = self.shard_rows(shard, len(dataset))
                    path = self.shard_path(split, shard)
                    if not self.shard_ok(path, len(rows)):
                        start = time.perf_counter()
                        sparse, positions = self._compute(teacher, Subset(dataset, rows), collator)
                        self.write_shard(path, sparse, rows.start)
                        seconds += time.perf_counter() - start
                        computed_positions += positions
                    nbytes += path.stat().st_size
                    bar.update(len(rows))
                splits[split] = {"windows": len(dataset), "shards": shards, "bytes": nbytes}
        size = sum(s["bytes"] for s in splits.values())
        report = {
            "key": self.key,
            "dir": str(self.root),
            "complete": True,
            "key_parts": self.key_parts,
            "splits": splits,
            "bytes": size,
            "megabytes": round(size / 2**20, 3),
            "computed_positions": computed_positions,
            "seconds": round(seconds, 2),
            "positions_per_second": round(computed_positions / seconds, 1) if seconds else None,
        }
        self.report_path.write_text(json.dumps(report, indent=2) + "\n")
        return report

    @torch.no_grad()
    def _compute(
        self, teacher: torch.nn.Module, items: Subset, collator: CaptionCollator
    ) -> tuple[SparseTeacher, int]:
        parts: list[SparseTeacher] = []
        positions = 0
        device = next(teacher.parameters()).device
        for batch in DataLoader(
            items, batch_size=self.settings.batch_size, shuffle=False, collate_fn=collator
        ):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = teacher_forcing(teacher, batch).logits(teacher, self.guidance_scale)
            positions += int(logits.shape[:-1].numel())
            sparse = SparseTeacher.from_logits(logits, self.settings.k, self.settings.temperature)
            parts.append(sparse.compact().to("cpu"))
        first = parts[0]
        merged = SparseTeacher(
            torch.cat([p.indices for p in parts]),
            torch.cat([p.log_probs for p in parts]),
            torch.cat([p.tail_log_mass for p in parts]),
            first.vocab,
            first.temperature,
        )
        return merged, positions
