"""Score generated music with FAD and the CLAP score: checkpoint (or WAV folder) -> audio -> report.

    python -m tinymusician.evaluate --model DIR_OR_HUB_ID --reference REF_WAV_DIR_OR_STATS
    python -m tinymusician.evaluate --audio-dir WAVS --reference REF --embedder vggish:/path/vggish-10086976.pth
    python -m tinymusician.evaluate --reference REF_WAV_DIR --embedder vggish:/path/... --save-stats ref.safetensors

The same code runs inside training (:class:`tinymusician.callbacks.evaluate.EvaluateCallback`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
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
from tinymusician.zoo.source import add_base_argument

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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
    """Generated clips (mono float32 ``[samples]``) with the prompts they came from."""

    audio: list[torch.Tensor]
    sample_rate: int
    prompts: list[str]

    @property
    def clip_seconds(self) -> float:
        return sum(a.shape[-1] for a in self.audio) / max(len(self.audio), 1) / self.sample_rate


def generate_audio(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    seconds: float,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 8,
    max_text_tokens: int = 64,
    progress: bool = True,
    desc: str = "Generating",
) -> GeneratedSet:
    """Sample audio for each prompt with MusicGen's ``generate`` (sampling + classifier-free guidance).

    Each clip is ``round(seconds * frame_rate)`` codec frames long (:func:`tinymusician.models.generation.torch_generate`);
    the global RNG is seeded inside a fork, so training's RNG stream is untouched. The model is put in eval
    mode for the call and restored afterwards.
    """
    from tinymusician.models.generation import torch_generate
    from tinymusician.models.musicgen import min_frames

    if seconds <= 0:
        raise EvaluationError(f"seconds={seconds}: clip length must be positive")
    frame_rate = float(model.config.audio_encoder.frame_rate)
    sample_rate = int(model.config.audio_encoder.sampling_rate)
    frames = round(seconds * frame_rate)
    if frames < min_frames(model):
        raise EvaluationError(
            f"seconds={seconds}: {frames} codec frames; generation needs at least {min_frames(model)} "
            f"({min_frames(model) / frame_rate:.2f} s): raise the clip length"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    clips: list[torch.Tensor] = []
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
    return GeneratedSet(clips, sample_rate, list(prompts))


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


def scalar_metrics(result: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
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


# --- CLI --------------------------------------------------------------------------------------------------
EMBEDDER_FIRST_ARG = {"vggish": "weights", "clap": "source", "encodec": "source"}


def parse_embedder(spec: str) -> dict[str, Any]:
    """``NAME[:SOURCE]`` -> ``{"name": NAME, <source or weights>: SOURCE}`` (``vggish:/path/file.pth``)."""
    name, _, source = spec.partition(":")
    if name not in EMBEDDERS:
        raise EmbedderError(
            f"unknown embedder {name!r} in --embedder {spec!r}; known embedders: {sorted(EMBEDDERS)}"
        )
    return {"name": name, **({EMBEDDER_FIRST_ARG[name]: source} if source else {})}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinymusician.evaluate",
        description="FAD and CLAP score of a MusicGen checkpoint (generates from prompts) or of a folder of WAVs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--model",
        help="MusicGen to generate with: save_pretrained dir, hub id, `tiny`, a training .ckpt, or a quantized bundle",
    )
    what.add_argument("--audio-dir", help="folder of WAVs to score (CLAP needs its metadata.jsonl captions)")
    add_base_argument(parser, "a .ckpt --model")
    parser.add_argument(
        "--reference", help="reference: folder of WAVs, or a statistics file from --save-stats"
    )
    parser.add_argument(
        "--max-reference-clips", type=int, default=None, help="use only the first N reference files"
    )
    parser.add_argument(
        "--embedder",
        action="append",
        default=None,
        metavar="NAME[:SOURCE]",
        help="FAD embedder, repeatable: encodec[:musicgen id/dir] (default: the --model's own codec), "
        "vggish:/path/vggish-10086976.pth, clap[:hub id/dir]",
    )
    parser.add_argument(
        "--clap", metavar="SOURCE", help="CLAP model for the CLAP score, e.g. laion/larger_clap_music"
    )
    parser.add_argument(
        "--fad-inf", action="store_true", help="also report FAD-infinity (fit over 1/N, intercept)"
    )
    parser.add_argument("--inf-min-n", type=int, default=None, help="smallest FAD-inf subset (frames)")
    parser.add_argument(
        "--prompts-file", default=None, help=f"one prompt per line (default with --model: {DEFAULT_PROMPTS})"
    )
    parser.add_argument("--prompt", action="append", default=None, help="inline prompt, repeatable")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seconds", type=float, default=10.0, help="generated clip length")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="generation and embedding batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default="evaluation", help="report.json (and generated WAVs) go here")
    parser.add_argument(
        "--save-stats", metavar="FILE", help="write the reference's statistics (safetensors) here"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def build_embedders(
    specs: Sequence[dict[str, Any]], model: Any, model_source: str | None, device: str
) -> list[AudioEmbedder]:
    embedders = []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        if name == "encodec" and not spec.get("source"):
            if model is None:
                raise EmbedderError(
                    "--embedder encodec needs a MusicGen checkpoint when scoring a folder: "
                    "--embedder encodec:facebook/musicgen-small (or a local directory)"
                )
            embedders.append(EncodecEmbedder(model_source, codec=model.audio_encoder, device=device))
            continue
        embedders.append(build_embedder(name, device=device, **spec))
    return embedders


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0; 2 with ``error: ...`` on stderr for a setting, file or model that cannot work."""
    from tinymusician.models.musicgen import ModelSourceError
    from tinymusician.quant.bundle import BundleError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (EvaluationError, EmbedderError, ModelSourceError, BundleError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.model is None and args.audio_dir is None and not args.save_stats:
        raise EvaluationError("give --model or --audio-dir to score, or --reference with --save-stats")
    if args.save_stats and not args.reference:
        raise EvaluationError("--save-stats needs --reference: the folder of WAVs whose statistics to save")
    reference = resolve_path(args.reference) if args.reference else None
    if reference is not None and not reference.exists():
        raise EvaluationError(f"--reference {args.reference!r} does not exist")
    if args.save_stats and reference is not None and not reference.is_dir():
        raise EvaluationError("--save-stats embeds a folder of WAVs: --reference must be a directory")
    specs = [parse_embedder(s) for s in (args.embedder or (["encodec"] if args.model else []))]
    if reference is not None and not specs:
        raise EvaluationError(
            "FAD needs an embedder: --embedder vggish:/path/vggish-10086976.pth (or encodec:..., clap)"
        )
    if not specs and not args.clap:
        raise EvaluationError(
            "nothing to compute: give --reference (+ --embedder) for FAD and/or --clap for the CLAP score"
        )
    if specs and reference is None:
        raise EvaluationError("FAD needs --reference (a folder of WAVs or a statistics file)")
    if args.audio_dir is not None and not resolve_path(args.audio_dir).is_dir():
        raise EvaluationError(f"--audio-dir {args.audio_dir!r}: not a directory of audio files")

    model = tokenizer = None
    if args.model:
        from tinymusician.quant.ptq import PLAN_ATTRIBUTE
        from tinymusician.zoo.source import load_named_model

        model, tokenizer, description = load_named_model(args.model, args.base, key="--model", quantized=True)
        log.info("evaluating %s", description)
        model = model.to(args.device)
        own_codec = [s for s in specs if s["name"] == "encodec" and not s.get("source")]
        if own_codec and getattr(model, PLAN_ATTRIBUTE, None) is not None:
            raise EvaluationError(
                f"--model {args.model} is a quantized bundle: it keeps no EnCodec encoder, so it cannot be its "
                "own FAD embedder. Give --embedder encodec:<the student directory it was quantized from> "
                "(the same embedder as the student's score)"
            )
    embedders = build_embedders(specs, model, args.model, args.device)
    clap = None
    if args.clap:
        clap = next((e for e in embedders if isinstance(e, ClapEmbedder) and e.source == args.clap), None)
        clap = clap or ClapEmbedder(args.clap, device=args.device)
    stats_file = reference if reference is not None and reference.is_file() else None
    evaluation = Evaluation(
        embedders,
        clap=clap,
        reference_stats=stats_file,
        fad_inf=args.fad_inf,
        inf_min_n=args.inf_min_n,
        seed=args.seed,
    )
    output_dir = Path(args.output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        if reference is not None and reference.is_dir() and specs:
            described = add_reference_folder(
                evaluation,
                reference,
                max_clips=args.max_reference_clips,
                batch_size=args.batch_size,
                progress=progress,
            )
            if args.save_stats:
                path = save_stats(args.save_stats, evaluation.reference_stats())
                names = ", ".join(evaluation.fads)
                print(f"Saved reference statistics of {described['n_clips']} clips ({names}) to {path}")
        if model is None and args.audio_dir is None:
            return 0

        if model is not None:
            prompts = read_prompts(args.prompt, args.prompts_file or DEFAULT_PROMPTS, args.num_prompts)
            generated = generate_audio(
                model,
                tokenizer,
                prompts,
                seconds=args.seconds,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                batch_size=args.batch_size,
                progress=progress,
            )
            write_clips(output_dir / "wavs", generated)
            subject = {
                "model": args.model,
                "prompts": args.prompts_file or ("inline" if args.prompt else DEFAULT_PROMPTS),
            }
            subject["generation"] = {
                "seconds": args.seconds,
                "guidance_scale": args.guidance_scale,
                "seed": args.seed,
            }
        else:
            audio_dir = resolve_path(args.audio_dir)
            files = list_audio_files(audio_dir)
            clips, rates = [], set()
            for batch, rate, _ in audio_file_batches(files, args.batch_size, progress, "Audio"):
                clips.extend(batch)
                rates.add(rate)
            if len(rates) != 1:
                raise EvaluationError(
                    f"{audio_dir} mixes sample rates {sorted(rates)}; resample them to one rate"
                )
            captions = read_captions(audio_dir, files) if clap is not None else [f.name for f in files]
            generated = GeneratedSet([c.mean(dim=0) for c in clips], rates.pop(), captions)
            subject = {"audio_dir": str(audio_dir), "files": [f.name for f in files]}
        result = evaluation.score(generated, batch_size=args.batch_size, progress=progress)
    finally:
        evaluation.close()
    report = {**subject, **result}
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_table({"model" if model is not None else "audio": result}))
    print(f"Report: {output_dir / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
