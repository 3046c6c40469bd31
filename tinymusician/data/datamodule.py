"""The cache and report orchestration: a LightningDataModule that serves tokenised audio with captions.

A subclass lists its clips (:meth:`CodesDataModule.list_clips`) and says how to get one clip's audio;
the base class validates the audio, encodes every clip once into a sharded, resumable token cache
(``python -m tinymusician.prepare`` or the first ``setup``), skips or stops on bad samples, reports
what it kept and skipped (:func:`format_report`), and serves segments cut from the cached codes.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import EncodecModel, MusicgenForConditionalGeneration, PreTrainedTokenizerBase

from tinymusician.data.audio import BadSampleError, load_audio
from tinymusician.data.codec_tokens import encode_audio
from tinymusician.data.listing import ClipRef, Listing
from tinymusician.data.segments import CaptionCollator, SegmentDataset
from tinymusician.data.token_cache import (
    CorruptCacheError,
    ShardedTokenCache,
    TokenSplit,
    codec_fingerprint,
    shard_problem,
)
from tinymusician.models.musicgen import codec_hop, max_frames

log = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("skip", "raise")
SEGMENT_OFFSETS = ("random", "fixed")
_RAISE_HINT = (
    "(data.on_bad_sample=raise; data.on_bad_sample=skip skips such clips and lists them in the report)"
)


class EmptySplitError(ValueError):
    """A split without a single usable clip: training cannot start."""


class CodesDataModule(L.LightningDataModule):
    """Base: subclasses list clips and load their audio; this validates, tokenises, caches and serves them.

    Call :meth:`attach` with the student (its codec tokenises the audio) and the text tokenizer before use.
    Arguments are checked here, so ``instantiate(cfg.data)`` fails at start-up on a bad value.
    """

    split_names = ("train", "val")

    def __init__(
        self,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/tinymusician",
        encode_batch: int = 8,
        segment_seconds: float | None = None,
        segment_offsets: str = "random",
        min_seconds: float = 0.0,
        silence_db: float | None = -60.0,
        on_bad_sample: str = "skip",
        shard_size: int = 256,
        encode_chunk_seconds: float | None = 10.0,
        max_text_tokens: int = 64,
    ) -> None:
        super().__init__()
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(
                f"data.on_bad_sample={on_bad_sample!r}: use 'skip' (skip bad clips, list them in the "
                "report) or 'raise' (stop at the first bad clip, naming it)"
            )
        if segment_offsets not in SEGMENT_OFFSETS:
            raise ValueError(f"data.segment_offsets={segment_offsets!r}: use 'random' or 'fixed'")
        if segment_seconds is not None and segment_seconds <= 0:
            raise ValueError(f"data.segment_seconds={segment_seconds}: must be > 0, or null for whole clips")
        if min_seconds < 0:
            raise ValueError(f"data.min_seconds={min_seconds}: must be >= 0")
        if segment_seconds is not None and min_seconds > segment_seconds:
            raise ValueError(
                f"data.min_seconds={min_seconds} > data.segment_seconds={segment_seconds}: "
                "no segment could be long enough; lower data.min_seconds"
            )
        for key, value in {
            "batch_size": batch_size,
            "encode_batch": encode_batch,
            "shard_size": shard_size,
        }.items():
            if value < 1:
                raise ValueError(f"data.{key}={value}: must be >= 1")
        if encode_chunk_seconds is not None and encode_chunk_seconds <= 0:
            raise ValueError(f"data.encode_chunk_seconds={encode_chunk_seconds}: must be > 0, or null")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.encode_batch = encode_batch
        self.segment_seconds = segment_seconds
        self.segment_offsets = segment_offsets
        self.min_seconds = min_seconds
        self.silence_db = silence_db
        self.on_bad_sample = on_bad_sample
        self.shard_size = shard_size
        self.encode_chunk_seconds = encode_chunk_seconds
        self.max_text_tokens = max_text_tokens
        self.model: MusicgenForConditionalGeneration | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: dict[str, TokenSplit] = {}
        self.report: dict | None = None
        self._listing: Listing | None = None

    def attach(self, model: MusicgenForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer

    # Subclasses --------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Everything in the config that determines the clips (goes into the cache key)."""
        raise NotImplementedError

    def list_clips(self) -> Listing:
        """Every clip of every split, and the rows/files rejected before decoding."""
        raise NotImplementedError

    def load_clip(self, clip: ClipRef, sample_rate: int, min_samples: int) -> tuple[np.ndarray, str]:
        """Mono float32 audio at ``sample_rate`` and the caption; raises :class:`BadSampleError`."""
        assert clip.path is not None and clip.caption is not None
        audio = load_audio(clip.path, sample_rate, min_samples=min_samples, silence_db=self.silence_db)
        return audio, clip.caption

    # Listing and cache -------------------------------------------------------------------------------
    @property
    def listing(self) -> Listing:
        if self._listing is None:
            self._listing = self.list_clips()
            for note in self._listing.notes:
                print(note, flush=True)
        return self._listing

    def token_cache(self, model: MusicgenForConditionalGeneration) -> ShardedTokenCache:
        """The cache for this data and this codec (nothing is read or written here)."""
        decode = {
            "min_seconds": self.min_seconds,
            "silence_db": self.silence_db,
            "encode_chunk_seconds": self.encode_chunk_seconds,
        }
        key = {
            "data": self.describe(),
            "listing": self.listing.fingerprint(),
            "decode": decode,
            "codec": codec_fingerprint(model.audio_encoder),
        }
        return ShardedTokenCache(self.cache_dir, type(self).__name__, key)

    def shard_plan(
        self, cache: ShardedTokenCache, shard_size: int | None = None
    ) -> list[tuple[str, Path, list[ClipRef]]]:
        """(split, shard file, clips) in encoding order; the same listing always gives the same plan.

        ``shard_size`` (default ``data.shard_size``) is given to re-plan a cache written with another one.
        """
        size = shard_size or self.shard_size
        plan = []
        for split in self.split_names:
            clips = [clip for clip in self.listing.clips if clip.split == split]
            for index, start in enumerate(range(0, len(clips), size)):
                chunk = clips[start : start + size]
                plan.append((split, cache.shard_path(split, index, [c.id for c in chunk]), chunk))
        return plan

    def min_samples(self, model: MusicgenForConditionalGeneration) -> int:
        """Shortest usable clip: ``data.min_seconds``, and never less than one code frame."""
        codec = model.audio_encoder
        return max(codec_hop(codec.config), math.ceil(self.min_seconds * codec.config.sampling_rate))

    def encode_shard(
        self, model: MusicgenForConditionalGeneration, split: str, clips: list[ClipRef], progress: tqdm
    ) -> TokenSplit:
        """Decode, check and encode one shard's clips; bad ones are skipped (listed) or raised."""
        sample_rate = model.audio_encoder.config.sampling_rate
        min_samples = self.min_samples(model)
        audio, captions, ids, bad = [], [], [], []
        for clip in clips:
            try:
                samples, caption = self.load_clip(clip, sample_rate, min_samples)
            except BadSampleError as err:
                if self.on_bad_sample == "raise":
                    raise BadSampleError(clip.id, f"{err.reason} {_RAISE_HINT}") from err
                bad.append({"id": clip.id, "split": split, "reason": err.reason})
                continue
            finally:
                progress.update(1)
            audio.append(samples)
            captions.append(caption)
            ids.append(clip.id)
        chunk = None
        if self.encode_chunk_seconds is not None:
            chunk = int(self.encode_chunk_seconds * sample_rate)
        codes = encode_audio(model, audio, self.encode_batch, chunk) if audio else []
        return TokenSplit.from_clips(codes, captions, ids, bad)

    def prepare_tokens(
        self, model: MusicgenForConditionalGeneration, progress: bool = True, print_report: bool = True
    ) -> dict:
        """Encode every clip not cached yet (resuming shard by shard) and return the cache's report.

        The report (also ``report.json`` beside the shards) counts the usable clips per split and lists
        every skipped clip with its reason. With ``on_bad_sample=raise`` the first bad clip stops it.
        Opening a cache checks every shard's header and size: a damaged shard is encoded again (only that
        one) and an unreadable report rebuilt from the shards; ``report["repaired"]`` lists what was done.
        """
        return self._prepare(model, progress, print_report, suspect={})

    def _prepare(
        self,
        model: MusicgenForConditionalGeneration,
        progress: bool,
        print_report: bool,
        suspect: dict[Path, str],
    ) -> dict:
        """:meth:`prepare_tokens`; ``suspect`` maps shards found damaged while reading to the problem."""
        listing = self.listing
        if self.on_bad_sample == "raise" and listing.bad:
            first = listing.bad[0]
            raise BadSampleError(first["id"], f"{first['reason']} {_RAISE_HINT}")
        cache = self.token_cache(model)
        repairs: list[dict] = []
        try:
            report = cache.read_report()
        except CorruptCacheError as err:
            log.warning("%s", err)
            repairs.append(
                {"file": err.path.name, "problem": err.problem, "action": "rebuilt from the shards"}
            )
            report = None
        shard_size = (report or {}).get("shard_size") or self.shard_size  # the one the cache was written with
        plan = self.shard_plan(cache, shard_size)
        damaged = self._damaged_shards(cache, plan, report, suspect)
        if report is not None and not damaged:
            self._raise_on_bad(report)
            # counted again: reports written before the reason kinds were fixed
            self.report = {**report, "skipped_by_reason": skipped_by_reason(report["bad"]), "repaired": []}
            return self.report
        if report is not None and damaged.keys() - {path for _, path, _ in plan}:
            # an older report (no shard_size recorded) of another data.shard_size: its shards cannot be
            # mapped back to clips, so the current plan is encoded wherever it has no sound shard
            log.warning("token cache %s: re-planning with data.shard_size=%d", cache.root, self.shard_size)
            shard_size = self.shard_size
            plan = self.shard_plan(cache, shard_size)
            damaged = self._damaged_shards(cache, plan, None, suspect)
        todo = [(split, path, clips) for split, path, clips in plan if path in damaged or not path.is_file()]
        for _, path, clips in todo:
            if path in damaged:
                log.warning(
                    "token cache shard %s is damaged (%s): encoding its %d clips again",
                    path,
                    damaged[path],
                    len(clips),
                )
                repairs.append(
                    {"file": path.name, "problem": damaged[path], "action": f"re-encoded {len(clips)} clips"}
                )
        done = len(listing.clips) - sum(len(clips) for _, _, clips in todo)
        if done and todo and report is None:
            log.info("Resuming the token cache %s: %d clips already encoded", cache.root, done)
        bar = tqdm(
            total=len(listing.clips),
            initial=done,
            desc=f"Encoding {type(self).__name__} clips",
            unit="clip",
            disable=not progress or not todo,
        )
        model.audio_encoder.eval()
        with bar:
            for split, path, clips in todo:
                cache.write_shard(path, self.encode_shard(model, split, clips, bar))
        report = {**self._build_report(cache, plan, listing, model, shard_size), "repaired": repairs}
        cache.write_report(report)
        if print_report:
            print(format_report(report), flush=True)
        self._raise_on_bad(report)  # a cache written while skipping, read with on_bad_sample=raise
        self.report = report
        return report

    def _raise_on_bad(self, report: dict) -> None:
        if self.on_bad_sample == "raise" and report["bad"]:
            first = report["bad"][0]
            raise BadSampleError(first["id"], f"{first['reason']} {_RAISE_HINT}")

    def _damaged_shards(
        self, cache: ShardedTokenCache, plan: list, report: dict | None, suspect: dict[Path, str]
    ) -> dict[Path, str]:
        """Damaged shard -> what is wrong with it (:func:`shard_problem`: the header and size, not the data).

        With a report, every shard it lists must be there and as big as it recorded; without one (not
        complete yet) only shards already on disk are checked, as absent ones are simply not encoded yet.
        """
        if report is None:
            paths = [path for _, path, _ in plan if path.is_file() or path in suspect]
        else:
            paths = [cache.root / name for info in report["splits"].values() for name in info["shards"]]
        recorded = (report or {}).get("shard_bytes") or {}
        problems = {path: suspect.get(path) or shard_problem(path, recorded.get(path.name)) for path in paths}
        return {path: problem for path, problem in problems.items() if problem}

    def _build_report(
        self,
        cache: ShardedTokenCache,
        plan: list,
        listing: Listing,
        model: MusicgenForConditionalGeneration,
        shard_size: int,
    ) -> dict:
        frame_rate = _frame_rate(model.audio_encoder)
        splits: dict[str, dict] = {
            name: {"clips": 0, "seconds": 0.0, "shards": []} for name in self.split_names
        }
        bad = list(listing.bad)
        shard_bytes = {}
        for split, path, _ in plan:
            shard = cache.read_shard(path)
            splits[split]["clips"] += len(shard)
            splits[split]["seconds"] += float(shard.lengths.sum()) / frame_rate
            splits[split]["shards"].append(path.name)
            shard_bytes[path.name] = path.stat().st_size
            bad += shard.bad
        return {
            "dataset": type(self).__name__,
            "data": self.describe(),
            "cache_dir": str(cache.root),
            "splits": splits,
            "listed": len(listing.clips) + len(listing.bad),
            "usable": sum(s["clips"] for s in splits.values()),
            "held_out": listing.held_out,
            "skipped": len(bad),
            "skipped_by_reason": skipped_by_reason(bad),
            "bad": bad,
            "notes": listing.notes,
            "shard_size": shard_size,  # with the listing, re-creates the plan to re-encode a damaged shard
            "shard_bytes": shard_bytes,  # what each shard weighed when written: a truncated one is found
        }

    def load_splits(self, model: MusicgenForConditionalGeneration) -> dict[str, TokenSplit]:
        """Prepare (if needed) and read every split from the token cache.

        A shard whose header is sound but whose content is not (overwritten bytes) is found here, when it
        is read: it is encoded again, once, and the splits read anew.
        """
        report = self.prepare_tokens(model)
        try:
            return self._read_splits(report)
        except CorruptCacheError as err:
            log.warning("%s", err)
            report = self._prepare(model, progress=True, print_report=True, suspect={err.path: err.problem})
            return self._read_splits(report)

    @staticmethod
    def _read_splits(report: dict) -> dict[str, TokenSplit]:
        root = Path(report["cache_dir"])
        return {
            split: TokenSplit.concat([ShardedTokenCache.read_shard(root / name) for name in info["shards"]])
            for split, info in report["splits"].items()
        }

    # Lightning ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(
                "call datamodule.attach(model, tokenizer) before setup(): the codec tokenises audio"
            )
        splits = self.load_splits(self.model)
        for split in self.split_names:
            if len(splits[split]) == 0:
                raise EmptySplitError(self.empty_message(split))
        self.splits = splits
        datasets = {split: self.dataset(split) for split in self.split_names}
        self.check_positions(max(d.size for d in datasets.values()))
        print(self.usable_summary(datasets), flush=True)

    def segment_frames(self) -> int | None:
        """Frames per training segment (``data.segment_seconds``); None serves whole clips."""
        if self.segment_seconds is None or self.model is None:
            return None
        return max(1, round(self._in_frames(self.segment_seconds)))

    def min_segment_frames(self) -> int:
        """Shortest segment served (``data.min_seconds``): a shorter last window of a clip is dropped."""
        if self.model is None:
            return 1
        return max(1, math.ceil(self._in_frames(self.min_seconds)))

    def _in_frames(self, seconds: float) -> float:
        assert self.model is not None
        codec = self.model.audio_encoder
        return seconds * codec.config.sampling_rate / codec_hop(codec.config)

    def dataset(self, split: str) -> SegmentDataset:
        """Validation always uses fixed windows, so its numbers are comparable between evaluations."""
        return SegmentDataset(
            self.splits[split],
            self.segment_frames(),
            self.min_segment_frames(),
            random_offsets=split == "train" and self.segment_offsets == "random",
        )

    def check_positions(self, frames: int) -> None:
        """Segments must fit the decoder's positions (delay pattern adds K - 1), or training would crash."""
        assert self.model is not None
        decoder = self.model.config.decoder
        needed = frames + decoder.num_codebooks - 1
        if needed > decoder.max_position_embeddings:
            longest = max_frames(self.model) / _frame_rate(self.model.audio_encoder)
            raise ValueError(
                f"data.segment_seconds={self.segment_seconds}: items of {frames} frames need {needed} decoder "
                f"positions but the student has max_position_embeddings={decoder.max_position_embeddings}; "
                f"set data.segment_seconds <= {longest:.2f}"
            )

    def usable_summary(self, datasets: dict[str, SegmentDataset]) -> str:
        assert self.report is not None
        parts = [
            f"{split} {len(self.splits[split])} clips -> {len(datasets[split])} segments"
            for split in self.split_names
        ]
        skipped = self.report["skipped"]
        tail = f"; {skipped} skipped (see {self.report['cache_dir']}/report.json)" if skipped else ""
        return f"Usable clips ({type(self).__name__}): {', '.join(parts)}{tail}"

    def empty_message(self, split: str) -> str:
        message = f"data: the {split!r} split has no usable clips ({self.describe()})"
        if self.report is not None:
            skipped = [b for b in self.report["bad"] if b.get("split") == split]
            if skipped:
                kinds = skipped_by_reason(skipped)
                message += f"; {len(skipped)} of its clips were skipped ({', '.join(f'{k} {n}' for k, n in kinds.items())})"
            message += f"; every skipped clip and why: {self.report['cache_dir']}/report.json"
        return message + "; give it at least one usable clip"

    def dataloader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self.tokenizer is not None
        dataset = self.dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=CaptionCollator(self.tokenizer, self.max_text_tokens),
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val", shuffle=False)


def _frame_rate(codec: EncodecModel) -> float:
    """Codec frames per second of audio (50 for both the tiny codec and EnCodec 32 kHz)."""
    return codec.config.sampling_rate / codec_hop(codec.config)


def _reason_kind(reason: str) -> str:
    """The kind of a bad-sample reason ("too short: 0.2 s < 1 s" -> "too short") for the report's counts.

    Reasons are written "kind: details" or "kind (details)", so values and counts stay out of the kind.
    """
    if reason.startswith("contains ") and reason.endswith("NaN/inf samples"):  # caches written before
        return "non-finite samples"
    return reason.split(":")[0].split(" (")[0].strip()


def skipped_by_reason(bad: list[dict]) -> dict[str, int]:
    """Skipped clips counted by the kind of their reason, most frequent first (report["skipped_by_reason"])."""
    return dict(Counter(_reason_kind(b["reason"]) for b in bad).most_common())


def format_report(report: dict, max_listed: int = 20) -> str:
    """The preparation report as text: usable clips per split, skipped clips by reason, the first few."""
    splits = ", ".join(
        f"{name} {info['clips']} clips ({info['seconds'] / 60:.1f} min)"
        for name, info in report["splits"].items()
    )
    lines = [f"Token cache {report['cache_dir']}", f"  usable: {splits}"]
    lines += [f"  {note}" for note in report.get("notes", [])]
    if report.get("held_out"):
        lines.append(f"  held out (split 'test'): {report['held_out']}")
    if report["skipped"]:
        kinds = ", ".join(f"{kind} {count}" for kind, count in report["skipped_by_reason"].items())
        lines.append(f"  skipped {report['skipped']} of {report['listed']}: {kinds}")
        lines += [f"    {bad['id']}: {bad['reason']}" for bad in report["bad"][:max_listed]]
        if report["skipped"] > max_listed:
            lines.append(f"    ... {report['skipped'] - max_listed} more")
        lines.append(f"  full list: {report['cache_dir']}/report.json")
    if report.get("repaired"):
        lines.append(f"  repaired {len(report['repaired'])} damaged cache file(s):")
        lines += [f"    {r['file']}: {r['problem']} -> {r['action']}" for r in report["repaired"]]
    return "\n".join(lines)
