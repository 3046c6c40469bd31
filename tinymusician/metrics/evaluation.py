"""Scoring a model or a folder of clips: prompts -> generated audio -> FAD per embedder and the CLAP score.

The ``evaluate`` CLI and the training callback both use it; :func:`run_evaluation` is the whole CLI job,
callable from a notebook with an already loaded model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tinymusician.metrics.audio import list_audio_files, read_audio, write_wav
from tinymusician.metrics.clap_score import CLAPScore
from tinymusician.metrics.embedders import (
    EMBEDDERS,
    AudioEmbedder,
    ClapEmbedder,
    EmbedderError,
    EncodecEmbedder,
    build_embedder,
)
from tinymusician.metrics.fad import FrechetAudioDistance, save_stats
from tinymusician.shipped import resolve_tiny

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = "data/prompts/default.txt"
METADATA_FILE = "metadata.jsonl"  # {"file_name": ..., "caption": ...} per line, next to the WAVs


class EvaluationError(ValueError):
    """An evaluation that cannot run as configured; the message names the setting."""


# --- prompts and paths --------------------------------------------------------------------------------------
def resolve_path(path: str | Path) -> Path:
    """A user path; relative paths that do not exist from the cwd are tried from the project root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    from_root = PROJECT_ROOT / candidate
    return from_root if from_root.exists() else candidate


def read_prompts(
    prompts: Sequence[str] | None = None, prompts_file: str | Path | None = None, limit: int | None = None
) -> list[str]:
    """Inline prompts, or a file: one prompt per line (blank and ``#`` lines skipped), or a CSV's ``caption``
    column (MusicCaps' ``musiccaps-public.csv``)."""
    if prompts:
        items = [str(p).strip() for p in prompts if str(p).strip()]
    elif prompts_file:
        path = resolve_path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts file {str(prompts_file)!r} does not exist (looked in cwd and {PROJECT_ROOT})"
            )
        if path.suffix.lower() == ".csv":  # e.g. MusicCaps' musiccaps-public.csv: its caption column
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if "caption" not in (reader.fieldnames or []):
                    raise EvaluationError(f"prompts file {str(path)!r}: a CSV needs a 'caption' column")
                items = [row["caption"].strip() for row in reader if (row["caption"] or "").strip()]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            items = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        raise EvaluationError("no prompts: give a prompts file or an inline list of prompts")
    if not items:
        raise EvaluationError(f"no prompts in {prompts_file or 'the inline list'}")
    return items[:limit] if limit else items


# --- generation -------------------------------------------------------------------------------------------
@dataclass
class GeneratedSet:
    """Generated clips (mono float32 ``[samples]``) with the prompts they came from, and the wall time it took."""

    audio: list[torch.Tensor]
    sample_rate: int
    prompts: list[str]
    wall_seconds: float = math.nan
    guidance_scale: float = math.nan  # what generation used (the model's default when not asked)

    @property
    def clip_seconds(self) -> float:
        return sum(a.shape[-1] for a in self.audio) / max(len(self.audio), 1) / self.sample_rate

    @property
    def rtf(self) -> float:
        """Real-time factor: wall seconds of generation per second of audio (below 1: faster than real time)."""
        audio_seconds = sum(a.shape[-1] for a in self.audio) / self.sample_rate
        return self.wall_seconds / audio_seconds if audio_seconds else math.nan


def generate_audio(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    seconds: float,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_text_tokens: int = 64,
    progress: bool = True,
    desc: str = "Generating",
) -> GeneratedSet:
    """Sample audio for each prompt with MusicGen's ``generate`` (sampling + classifier-free guidance; None:
    the model's default scale, one pass for a guidance-distilled student).

    Each clip is ``round(seconds * frame_rate)`` codec frames long (:func:`tinymusician.models.generation.torch_generate`,
    which raises :class:`~tinymusician.models.generation.GenerationError` for a clip too short or too long);
    the global RNG is seeded inside a fork, so training's RNG stream is untouched. The model is put in eval
    mode for the call and restored afterwards.
    """
    from tinymusician.models.generation import torch_generate
    from tinymusician.models.musicgen import resolve_guidance_scale

    if not (seconds > 0 and math.isfinite(seconds)):
        raise EvaluationError(f"seconds={seconds}: clip length must be positive")
    frame_rate = float(model.config.audio_encoder.frame_rate)
    sample_rate = int(model.config.audio_encoder.sampling_rate)
    frames = round(seconds * frame_rate)
    try:
        guidance_scale = resolve_guidance_scale(model, guidance_scale)
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    clips: list[torch.Tensor] = []
    start_time = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            starts = range(0, len(prompts), batch_size)
            for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
                audio, _ = torch_generate(
                    model,
                    tokenizer,
                    list(prompts[start : start + batch_size]),
                    frames,
                    guidance_scale=guidance_scale,
                    max_text_tokens=max_text_tokens,
                )
                clips.extend(torch.from_numpy(clip) for clip in audio)
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start_time
    return GeneratedSet(clips, sample_rate, list(prompts), wall_seconds=wall, guidance_scale=guidance_scale)


def write_clips(directory: Path, generated: GeneratedSet, first_index: int = 0) -> list[dict[str, str]]:
    """WAVs ``NNN.wav`` plus ``metadata.jsonl`` (file -> prompt), so the folder can be re-scored later."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for offset, (clip, prompt) in enumerate(zip(generated.audio, generated.prompts, strict=True)):
        path = write_wav(directory / f"{first_index + offset:03d}.wav", clip, generated.sample_rate)
        rows.append({"file_name": path.name, "caption": prompt})
    with (directory / METADATA_FILE).open("a" if first_index else "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def read_captions(directory: Path, files: Sequence[Path]) -> list[str]:
    """Captions of ``files`` from the folder's ``metadata.jsonl`` (for the CLAP score of a WAV folder)."""
    meta = directory / METADATA_FILE
    if not meta.is_file():
        raise EvaluationError(
            f"the CLAP score needs each clip's prompt: {meta} is missing (one JSON line per clip: "
            '{"file_name": "000.wav", "caption": "..."})'
        )
    captions = {}
    for line in meta.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            captions[row["file_name"]] = row["caption"]
    missing = [f.name for f in files if f.name not in captions]
    if missing:
        raise EvaluationError(f"{meta} has no caption for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return [captions[f.name] for f in files]


def audio_file_batches(
    files: Sequence[Path], batch_size: int, progress: bool = True, desc: str = "Reading audio"
) -> Iterator[tuple[list[torch.Tensor], int, list[Path]]]:
    """Batches of files that share a sample rate: ``(clips [C, S], sample_rate, paths)``."""
    pending: dict[int, list[tuple[torch.Tensor, Path]]] = {}
    for path in tqdm(files, desc=desc, unit="file", disable=not progress):
        clip, rate = read_audio(path)
        pending.setdefault(rate, []).append((clip, path))
        if len(pending[rate]) == batch_size:
            items = pending.pop(rate)
            yield [c for c, _ in items], rate, [p for _, p in items]
    for rate, items in pending.items():
        yield [c for c, _ in items], rate, [p for _, p in items]


# --- scoring ----------------------------------------------------------------------------------------------
class Evaluation:
    """FAD for each embedder (and optionally the CLAP score) against one reference set.

    The reference is embedded once (or read from a statistics file) and kept across :meth:`score` calls,
    so the full-precision and the quantized student are measured against exactly the same statistics.
    """

    def __init__(
        self,
        embedders: Sequence[AudioEmbedder],
        *,
        clap: ClapEmbedder | None = None,
        reference_stats: str | Path | None = None,
        fad_inf: bool = False,
        inf_min_n: int | None = None,
        seed: int = 0,
    ) -> None:
        names = [e.name for e in embedders]
        if len(set(names)) != len(names):
            raise EvaluationError(f"each embedder can be used once per evaluation, got {names}")
        self.embedders = list(embedders)
        self.fads = {
            e.name: FrechetAudioDistance(
                e,
                reference_stats=reference_stats,
                reset_real_features=False,
                fad_inf=fad_inf,
                inf_min_n=inf_min_n,
                seed=seed,
            )
            for e in embedders
        }
        self.clap_embedder = clap
        self.clap = CLAPScore(clap) if clap is not None else None
        self.reference: dict[str, Any] | None = (
            {"kind": "stats", "path": str(reference_stats)} if reference_stats is not None else None
        )

    @property
    def has_reference(self) -> bool:
        return self.reference is not None

    def add_reference(self, audio: Sequence[torch.Tensor], sample_rate: int) -> None:
        for fad in self.fads.values():
            fad.update(list(audio), sample_rate, real=True)

    def set_reference(self, description: dict[str, Any]) -> None:
        self.reference = description

    def score(
        self, generated: GeneratedSet, *, batch_size: int = 16, progress: bool = False
    ) -> dict[str, Any]:
        """FAD per embedder (+ CLAP score) of ``generated``; the reference must be set first."""
        if self.fads and not self.has_reference:
            raise EvaluationError(
                "FAD needs a reference: call add_reference()/set_reference() or give statistics"
            )
        for fad in self.fads.values():
            fad.reset()
        if self.clap is not None:
            self.clap.reset()
        starts = range(0, len(generated.audio), batch_size)
        for start in tqdm(starts, desc="Embedding", unit="batch", disable=not progress):
            clips = generated.audio[start : start + batch_size]
            for fad in self.fads.values():
                fad.update(clips, generated.sample_rate)
            if self.clap is not None:
                self.clap.update(clips, generated.prompts[start : start + batch_size], generated.sample_rate)
        result: dict[str, Any] = {
            "n_clips": len(generated.audio),
            "clip_seconds": round(generated.clip_seconds, 4),
            "sample_rate": generated.sample_rate,
            "reference": self.reference,
            "fad": {name: fad.summary() for name, fad in self.fads.items()},
            "clap": None,
        }
        if self.clap is not None:
            per_clip = self.clap.per_clip()
            result["clap"] = {
                "score": float(self.clap.compute()),
                "per_clip": [round(float(v), 5) for v in per_clip],
                "n_pairs": len(per_clip),
                "embedder": self.clap_embedder.describe(),
                "definition": "mean cosine(CLAP text embedding of the prompt, CLAP audio embedding of its clip)",
            }
        return result

    def reference_stats(self) -> dict[str, Any]:
        """Statistics of the embedded reference set, per embedder (for :func:`save_stats`)."""
        stats = {}
        for name, fad in self.fads.items():
            entry = fad.stats(real=True)
            entry.meta["reference"] = self.reference
            stats[name] = entry
        return stats

    def close(self) -> None:
        """Free every embedding model (they reload lazily if scored again)."""
        for embedder in [*self.embedders, self.clap_embedder]:
            if embedder is not None:
                embedder.unload()


def add_reference_folder(
    evaluation: Evaluation,
    directory: str | Path,
    *,
    max_clips: int | None = None,
    batch_size: int = 8,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[str, Any]:
    """Embed a folder of reference WAVs into ``evaluation`` (this process's ``shard = (rank, world)``)."""
    files = list_audio_files(directory)[:max_clips]
    mine = files[shard[0] :: shard[1]]
    seconds = 0.0
    for clips, rate, _ in audio_file_batches(mine, batch_size, progress, "Reference"):
        evaluation.add_reference(clips, rate)
        seconds += sum(c.shape[-1] / rate for c in clips)
    description = {
        "kind": "folder",
        "path": str(directory),
        "n_clips": len(files),
        "clip_seconds": round(seconds / max(len(mine), 1), 4),
    }
    evaluation.set_reference(description)
    return description


def result_metrics(result: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{prefix}/fad_{embedder}``, ``{prefix}/fad_inf_{embedder}`` and ``{prefix}/clap`` from a result."""
    metrics = {f"{prefix}/fad_{name}": float(entry["fad"]) for name, entry in result["fad"].items()}
    metrics.update(
        {
            f"{prefix}/fad_inf_{name}": float(e["fad_inf"]["fad_inf"])
            for name, e in result["fad"].items()
            if "fad_inf" in e
        }
    )
    if result.get("clap"):
        metrics[f"{prefix}/clap"] = float(result["clap"]["score"])
    return metrics


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per (model, metric), with N, clip length, embedder and reference."""
    lines = [
        f"{'model':<12} {'metric':<18} {'value':>10} {'N clips':>8} {'N frames':>9} {'clip s':>7}  embedder"
    ]
    for model_name, result in results.items():
        if result is None:
            continue
        for name, entry in result["fad"].items():
            source = entry["embedder"].get("source", "")
            row = (
                f"{model_name:<12} {'FAD(' + name + ')':<18} {entry['fad']:>10.4f} {entry['n_clips']:>8} "
                f"{entry['n_frames']:>9} {entry['clip_seconds']:>7.2f}  {name} ({source})"
            )
            lines.append(row)
            if "fad_inf" in entry:
                inf = entry["fad_inf"]
                lines.append(
                    f"{model_name:<12} {'FAD-inf(' + name + ')':<18} {inf['fad_inf']:>10.4f} {entry['n_clips']:>8} "
                    f"{max(inf['n']):>9} {entry['clip_seconds']:>7.2f}  fit over n={min(inf['n'])}..{max(inf['n'])}, "
                    f"R^2={inf['r2']:.3f}"
                )
        if result.get("clap"):
            clap = result["clap"]
            lines.append(
                f"{model_name:<12} {'CLAP':<18} {clap['score']:>10.4f} {clap['n_pairs']:>8} {'':>9} "
                f"{result['clip_seconds']:>7.2f}  clap ({clap['embedder'].get('source', '')})"
            )
    reference = next((r["reference"] for r in results.values() if r is not None and r.get("reference")), None)
    if reference:
        lines.append("reference: " + ", ".join(f"{k}={v}" for k, v in reference.items() if v is not None))
    return "\n".join(lines)


def read_audio_folder(
    directory: str | Path, *, captions: bool, batch_size: int = 8, progress: bool = True
) -> tuple[GeneratedSet, list[Path]]:
    """A folder of clips (one sample rate) as a :class:`GeneratedSet`, mono; its files in order.

    ``captions=True`` takes each clip's prompt from the folder's ``metadata.jsonl`` (the CLAP score needs
    them); otherwise the file names stand in.
    """
    directory = resolve_path(directory)
    files = list_audio_files(directory)
    clips, rates = [], set()
    for batch, rate, _ in audio_file_batches(files, batch_size, progress, "Audio"):
        clips.extend(batch)
        rates.add(rate)
    if len(rates) != 1:
        raise EvaluationError(f"{directory} mixes sample rates {sorted(rates)}; resample them to one rate")
    prompts = read_captions(directory, files) if captions else [f.name for f in files]
    return GeneratedSet([c.mean(dim=0) for c in clips], rates.pop(), prompts), files


# --- embedders --------------------------------------------------------------------------------------------
EMBEDDER_FIRST_ARG = {"vggish": "weights", "clap": "source", "encodec": "source"}


def parse_embedder(spec: str) -> dict[str, Any]:
    """``NAME[:SOURCE]`` -> ``{"name": NAME, <source or weights>: SOURCE}`` (``vggish:/path/file.pth``)."""
    name, _, source = spec.partition(":")
    if name not in EMBEDDERS:
        raise EmbedderError(
            f"unknown embedder {name!r} in --embedder {spec!r}; known embedders: {sorted(EMBEDDERS)}"
        )
    return {"name": name, **({EMBEDDER_FIRST_ARG[name]: source} if source else {})}


def build_embedders(
    specs: Sequence[Mapping[str, Any]],
    *,
    device: str,
    own_codec: Callable[[], EncodecEmbedder] | None = None,
    own_codec_sources: Sequence[str] = ("",),
) -> list[AudioEmbedder]:
    """FAD embedders from ``{"name": ..., **kwargs}`` specs. An ``encodec`` spec whose ``source`` is missing or
    one of ``own_codec_sources`` is the scored model's own codec: ``own_codec()`` builds that embedder (None
    when there is no model, e.g. scoring a folder)."""
    embedders = []
    for spec in specs:
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        if spec["name"] == "encodec" and (kwargs.get("source") or "") in own_codec_sources:
            if own_codec is None:
                raise EmbedderError(
                    "--embedder encodec needs a MusicGen checkpoint when scoring a folder: "
                    "--embedder encodec:facebook/musicgen-small (or a local directory)"
                )
            embedders.append(own_codec())
            continue
        embedders.append(build_embedder(spec["name"], **{"device": device, **kwargs}))
    return embedders


def clap_embedder(
    embedders: Sequence[AudioEmbedder], source: str, *, device: str, **kwargs: Any
) -> ClapEmbedder:
    """The CLAP model of the CLAP score: the FAD embedder of the same source if there is one (loaded once)."""
    source = resolve_tiny(source, "clap")
    shared = next((e for e in embedders if isinstance(e, ClapEmbedder) and e.source == source), None)
    return shared or ClapEmbedder(source, device=device, **kwargs)


# --- the whole job ----------------------------------------------------------------------------------------
@dataclass
class EvaluationRun:
    """What :func:`run_evaluation` did: the reference it embedded, statistics it saved, the report it wrote."""

    reference: dict[str, Any] | None = None  # a folder of reference clips, when one was embedded
    stats_path: Path | None = None
    result: dict[str, Any] | None = None  # Evaluation.score's result; None when nothing was scored
    report: dict[str, Any] | None = None  # the result with what was scored (model or folder), as written
    report_path: Path | None = None


def run_evaluation(
    embedders: Sequence[AudioEmbedder],
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_name: str | None = None,
    audio_dir: str | Path | None = None,
    reference: str | Path | None = None,
    max_reference_clips: int | None = None,
    clap: ClapEmbedder | None = None,
    prompts: Sequence[str] | None = None,
    prompts_file: str | Path | None = None,
    num_prompts: int | None = None,
    seconds: float = 10.0,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 4,
    fad_inf: bool = False,
    inf_min_n: int | None = None,
    output_dir: str | Path = "evaluation",
    save_stats_to: str | Path | None = None,
    progress: bool = True,
) -> EvaluationRun:
    """Score a loaded MusicGen (it generates from the prompts) or a folder of clips against a reference.

    ``reference`` is a folder of WAVs (embedded here; ``save_stats_to`` saves its statistics) or a statistics
    file. Generated clips go to ``output_dir/wavs`` and the report to ``output_dir/report.json``. With neither
    ``model`` nor ``audio_dir`` only the reference is embedded (and its statistics saved).
    """
    reference = resolve_path(reference) if reference is not None else None
    stats_file = reference if reference is not None and reference.is_file() else None
    evaluation = Evaluation(
        embedders,
        clap=clap,
        reference_stats=stats_file,
        fad_inf=fad_inf,
        inf_min_n=inf_min_n,
        seed=seed,
    )
    output_dir = Path(output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    run = EvaluationRun()
    try:
        if reference is not None and reference.is_dir() and embedders:
            run.reference = add_reference_folder(
                evaluation, reference, max_clips=max_reference_clips, batch_size=batch_size, progress=progress
            )
            if save_stats_to:
                run.stats_path = save_stats(save_stats_to, evaluation.reference_stats())
        if model is None and audio_dir is None:
            return run

        if model is not None:
            prompt_list = read_prompts(prompts, prompts_file or DEFAULT_PROMPTS, num_prompts)
            generated = generate_audio(
                model,
                tokenizer,
                prompt_list,
                seconds=seconds,
                guidance_scale=guidance_scale,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
            )
            write_clips(output_dir / "wavs", generated)
            subject: dict[str, Any] = {
                "model": model_name,
                "prompts": prompts_file or ("inline" if prompts else DEFAULT_PROMPTS),
                "generation": {"seconds": seconds, "guidance_scale": generated.guidance_scale, "seed": seed},
            }
        else:
            generated, files = read_audio_folder(
                audio_dir, captions=clap is not None, batch_size=batch_size, progress=progress
            )
            subject = {"audio_dir": str(resolve_path(audio_dir)), "files": [f.name for f in files]}
        run.result = evaluation.score(generated, batch_size=batch_size, progress=progress)
    finally:
        evaluation.close()
    run.report = {**subject, **run.result}
    run.report_path = output_dir / "report.json"
    run.report_path.write_text(json.dumps(run.report, indent=2, default=str))
    return run
