"""The run's teacher-logit cache from its config: the same overrides build it and train from it.

``cache_for_run`` keys the cache from files only (the teacher is never loaded when training from it);
``build_for_run`` loads the teacher and fills the cache.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tinymusician.config import to_plain
from tinymusician.data.datamodule import CodesDataModule
from tinymusician.data.segments import CaptionCollator, SegmentDataset
from tinymusician.distill.losses import configured_guidance_scale
from tinymusician.distill.teacher_cache import (
    TEACHER_SOURCES,
    CacheSettings,
    TeacherCacheError,
    TeacherLogitCache,
    data_identity,
    teacher_identity,
)
from tinymusician.zoo.pair import resolve_sources


def teacher_source(cfg: DictConfig) -> str:
    """``distill.teacher_source`` (live when the config has no distill block)."""
    source = str((cfg.get("distill") or {}).get("teacher_source", "live"))
    if source not in TEACHER_SOURCES:
        raise TeacherCacheError(f"distill.teacher_source={source!r}: use one of {', '.join(TEACHER_SOURCES)}")
    return source


def cache_settings(cfg: DictConfig) -> CacheSettings:
    return CacheSettings.from_config(to_plain((cfg.get("distill") or {}).get("cache") or {}))


def check_cacheable(cfg: DictConfig) -> None:
    """Start-up checks for a cache run: a teacher to cache and fixed segment windows."""
    if cfg.model.get("teacher") is None:
        raise TeacherCacheError(
            "distill.teacher_source=cache needs model.teacher (the teacher whose logits it holds)"
        )
    if cfg.data.get("segment_seconds") is not None and cfg.data.get("segment_offsets", "random") == "random":
        raise TeacherCacheError(
            f"distill.teacher_source=cache with data.segment_seconds={cfg.data.segment_seconds} and "
            "data.segment_offsets=random: the cache holds the teacher on fixed windows; set "
            "data.segment_offsets=fixed"
        )
    cache_settings(cfg)


def run_datasets(datamodule: CodesDataModule) -> dict[str, SegmentDataset]:
    """The segments training serves, per split (the datamodule must be set up)."""
    return {split: datamodule.dataset(split) for split in datamodule.split_names}


def cache_for_run(cfg: DictConfig, datamodule: CodesDataModule) -> TeacherLogitCache:
    """The cache this run's overrides point at (set-up datamodule; nothing is loaded or computed)."""
    _, teacher = resolve_sources(cfg.model)
    assert teacher is not None  # check_cacheable
    key = {
        "teacher": teacher_identity(teacher, str(cfg.model.get("teacher_dtype", "float32"))),
        "data": data_identity(datamodule, run_datasets(datamodule)),
    }
    return TeacherLogitCache(cache_settings(cfg), key, configured_guidance_scale(cfg.get("loss")))


def open_for_run(cfg: DictConfig, datamodule: CodesDataModule) -> tuple[TeacherLogitCache, dict[str, Any]]:
    """The complete cache for this run and its report; a clear error with the command that builds it if not."""
    cache = cache_for_run(cfg, datamodule)
    report = cache.open({split: len(d) for split, d in run_datasets(datamodule).items()})
    return cache, report


def build_for_run(
    cfg: DictConfig, teacher: Any, datamodule: CodesDataModule, progress: bool = True
) -> tuple[TeacherLogitCache, dict[str, Any]]:
    """Fill this run's cache with ``teacher`` (resumes from the shards already written)."""
    cache = cache_for_run(cfg, datamodule)
    collator = CaptionCollator(datamodule.tokenizer, datamodule.max_text_tokens)
    report = cache.build(teacher, run_datasets(datamodule), collator, progress=progress)
    return cache, report
