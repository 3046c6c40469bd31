"""Lightning callback: after training (and optionally every N epochs) generate audio and report FAD / CLAP.

Runs after ``SaveStudent`` and the quantize callback, so it also scores the quantized student when one
exists. The embedding models live in this callback's :class:`~tinymusician.metrics.evaluation.Evaluation`, never in
the LightningModule, so they never reach a checkpoint; they load lazily and are freed after each evaluation.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from tinymusician.config import to_plain
from tinymusician.data.synthetic import heldout_clips
from tinymusician.metrics.embedders import EMBEDDERS, EncodecEmbedder
from tinymusician.metrics.evaluation import (
    Evaluation,
    EvaluationError,
    GeneratedSet,
    add_reference_folder,
    build_embedders,
    clap_embedder,
    generate_audio,
    read_prompts,
    resolve_path,
    result_metrics,
    write_clips,
)

log = logging.getLogger(__name__)

STUDENT_CODEC = "student"  # encodec source meaning "the student's own codec" (works offline)
HELDOUT = "heldout"  # reference (and prompts): the synthetic corpus's held-out clips, rendered directly
HELDOUT_DEFAULT_CLIPS = 64


def find_quantized_model(trainer: L.Trainer) -> tuple[Any, str] | tuple[None, None]:
    """The quantized student a quantize callback exposes as ``quantized_model`` (None if quantization did not run)."""
    for callback in trainer.callbacks:
        model = getattr(callback, "quantized_model", None)
        if model is not None:
            return model, type(callback).__name__
    return None, None


class EvaluateCallback(L.Callback):
    """Generate clips for a prompt set with the student (and the quantized student), then FAD and CLAP score.

    Args:
        prompts / prompts_file: inline prompts or a file with one prompt per line; ``num_prompts`` keeps the
            first N. ``prompts: heldout`` = the captions of the held-out clips (``reference: heldout``'s).
        seconds, guidance_scale, seed, batch_size: generation (each clip ``round(seconds * frame_rate)`` codec frames;
            ``guidance_scale=None``: each model's default, one pass for a guidance-distilled student, else 3).
        embedders: FAD embedders: names or ``{name: ..., **kwargs}``; ``{name: encodec, source: student}``
            uses the student's own codec (offline).
        reference: ``heldout`` (the synthetic corpus's held-out clips, never trained on by the world or a default
            split, rendered directly: ``num_prompts`` of them, 64 by default), ``val`` (the validation clips
            decoded from their codes with the codec), a folder of WAVs, or a statistics file written by
            ``python -m tinymusician.evaluate --save-stats``.
        clap_model: hub id / directory of a CLAP model for the CLAP score (``tiny``: the tiny world's); None
            skips it.
        fad_inf: also report FAD-infinity. every_n_epochs: evaluate during training too.
        log_audio: how many clips per model (and of a heldout/val reference, once) to log to loggers that take
            audio: wandb (``eval/samples``: a prompt, audio, model table) and TensorBoard.
        output_dir: WAVs and ``report.json`` go to ``output_dir/<final|epochNNN>/``.
    """

    def __init__(
        self,
        prompts: Sequence[str] | str | None = None,
        prompts_file: str | None = None,
        num_prompts: int | None = None,
        seconds: float = 2.0,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        embedders: Sequence[str | Mapping[str, Any]] = ({"name": "encodec", "source": STUDENT_CODEC},),
        reference: str = "val",
        reference_max_clips: int | None = None,
        clap_model: str | None = None,
        fad_inf: bool = False,
        inf_min_n: int | None = None,
        every_n_epochs: int | None = None,
        log_audio: int = 4,
        output_dir: str | None = None,
        device: str | None = None,
    ) -> None:
        # Everything checkable without weights fails here, before training starts.
        self.heldout_clips = num_prompts or HELDOUT_DEFAULT_CLIPS  # reference: heldout's N
        if prompts == HELDOUT:  # captions do not depend on the clip length: render 0.1 s to read them
            self.prompts = [clip.caption for clip in heldout_clips(self.heldout_clips, seconds=0.1)]
            self.prompts_source = f"captions of {self.heldout_clips} held-out synthetic clips"
        elif isinstance(prompts, str):
            raise EvaluationError(f"eval.prompts={prompts!r}: give a list of prompts, or `{HELDOUT}`")
        else:
            self.prompts = read_prompts(to_plain(prompts), prompts_file, num_prompts)
            self.prompts_source = prompts_file if not prompts else "inline"
        if seconds <= 0 or not math.isfinite(seconds):
            raise EvaluationError(f"eval.seconds={seconds}: must be positive")
        if guidance_scale is not None and not guidance_scale >= 1.0:
            raise EvaluationError(f"eval.guidance_scale={guidance_scale}: must be >= 1 (1 = no guidance)")
        if batch_size < 1:
            raise EvaluationError(f"eval.batch_size={batch_size}: must be >= 1")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise EvaluationError(f"eval.every_n_epochs={every_n_epochs}: must be >= 1 or null")
        self.embedder_specs = [
            {"name": spec} if isinstance(spec, str) else dict(spec) for spec in (to_plain(embedders) or [])
        ]
        for spec in self.embedder_specs:
            if spec.get("name") not in EMBEDDERS:
                raise EvaluationError(
                    f"eval.embedders: unknown embedder {spec.get('name')!r}; known embedders: {sorted(EMBEDDERS)}"
                )
        if not self.embedder_specs and not clap_model:
            raise EvaluationError("eval: no embedders and no clap_model, so there is nothing to compute")
        if reference not in ("val", HELDOUT):
            path = resolve_path(reference)
            if not path.exists():
                raise FileNotFoundError(
                    f"eval.reference={reference!r} does not exist; use `{HELDOUT}`, `val`, a folder of WAVs or a "
                    "stats file"
                )
            reference = str(path)
        self.seconds, self.guidance_scale = seconds, guidance_scale
        self.used_guidance: dict[str, float] = {}  # model name -> the scale its last generation used
        self.seed, self.batch_size = seed, batch_size
        self.reference, self.reference_max_clips = reference, reference_max_clips
        self.clap_model, self.fad_inf, self.inf_min_n = clap_model, fad_inf, inf_min_n
        self.every_n_epochs, self.log_audio = every_n_epochs, log_audio
        self.output_dir = Path(output_dir) if output_dir else None
        self.device = device
        self.evaluation: Evaluation | None = None
        self.reports: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_report_path: Path | None = None
        self._samples: dict[str, GeneratedSet] = {}  # this evaluation's logged clips, per metric prefix
        self._reference_samples: GeneratedSet | None = None  # the first reference clips, logged once

    def metric_keys(self) -> list[str]:
        """The ``eval/*`` (and ``eval_quant/*``, when a quantized student exists) keys a run can report."""
        names = [spec["name"] for spec in self.embedder_specs]
        keys = [f"fad_{name}" for name in names]
        keys += [f"fad_inf_{name}" for name in names] if self.fad_inf else []
        keys += ["clap"] if self.clap_model else []
        keys += ["rtf"]
        return [f"{prefix}/{key}" for prefix in ("eval", "eval_quant") for key in keys]

    def describe(self) -> str:
        """What the eval/* numbers are: N, clip length, embedders, reference, CLAP model."""
        embedders = ", ".join(
            spec["name"] + (f" ({spec['source']})" if spec.get("source") else "")
            for spec in self.embedder_specs
        )
        reference = self.reference if self.reference in ("val", HELDOUT) else Path(self.reference).name
        if self.guidance_scale is not None:
            guidance = f"guidance {self.guidance_scale:g}"
        elif self.used_guidance:  # the models' defaults: 1 (one pass) for a guidance-distilled student
            guidance = "guidance " + ", ".join(f"{s:g}" for s in dict.fromkeys(self.used_guidance.values()))
            guidance += " (the model's default)"
        else:
            guidance = "guidance: the model's default"
        return (
            f"N={len(self.prompts)} prompts ({self.prompts_source}), {self.seconds:g} s, {guidance}, FAD embedders "
            f"[{embedders}], reference {reference}, CLAP {self.clap_model or 'none'}"
        )

    # --- hooks --------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module, tag=f"epoch{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, tag="final")

    # --- evaluation ---------------------------------------------------------------------------------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[str, Any]:
        """Generate, score, log and write one evaluation; returns its report."""
        student = pl_module.student
        rank, world = trainer.global_rank, trainer.world_size
        output = (self.output_dir or Path(trainer.default_root_dir) / "eval") / tag
        evaluation = self._evaluation(trainer, pl_module)
        tokenizer = self._tokenizer(trainer)
        prompts = self.prompts[rank::world]  # each process generates its share; the metrics sync
        models = {"student": student}
        quantized, quantizer = find_quantized_model(trainer)
        if quantized is not None:
            models["quantized"] = quantized
        report: dict[str, Any] = {
            "tag": tag,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "prompts": self.prompts_source,
            "generation": {
                "n_prompts": len(self.prompts),
                "seconds": self.seconds,
                "guidance_scale": self.guidance_scale,
                "seed": self.seed,
            },
            "quantized_by": quantizer,
        }
        metrics: dict[str, float] = {}
        try:
            for name, model in models.items():
                generated = generate_audio(
                    model,
                    tokenizer,
                    prompts,
                    seconds=self.seconds,
                    guidance_scale=self.guidance_scale,
                    seed=self.seed + rank,
                    batch_size=self.batch_size,
                    progress=False,
                    desc=f"Generating ({name})",
                )
                self.used_guidance[name] = generated.guidance_scale
                rows = self._write(output / name, generated, rank, world)
                result = evaluation.score(generated, batch_size=self.batch_size)
                result["wavs"] = [str(Path(name) / row["file_name"]) for row in rows]
                result["generation"] = {
                    "guidance_scale": generated.guidance_scale,
                    "wall_seconds": round(generated.wall_seconds, 3),
                    "rtf": generated.rtf,
                    "definition": "wall seconds of generation per second of audio (batch_size clips at once)",
                    "batch_size": self.batch_size,
                    "threads": torch.get_num_threads(),
                    "device": str(next(model.parameters()).device),
                }
                report[name] = result
                prefix = "eval" if name == "student" else "eval_quant"
                metrics.update(result_metrics(result, prefix))
                metrics[f"{prefix}/rtf"] = generated.rtf
                self._log_audio(trainer, generated, prefix)
        finally:
            evaluation.close()  # free the embedding models; the reference statistics stay
        self._log_samples(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        if trainer.is_global_zero:
            output.mkdir(parents=True, exist_ok=True)
            self.last_report_path = output / "report.json"
            self.last_report_path.write_text(json.dumps(report, indent=2, default=str))
            log.info("Evaluation %s: %s (report %s)", tag, metrics, self.last_report_path)
        self.last_metrics = metrics
        self.reports.append(report)
        return report

    def _tokenizer(self, trainer: L.Trainer) -> Any:
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        tokenizer = tokenizer or next(
            (getattr(c, "tokenizer", None) for c in trainer.callbacks if getattr(c, "tokenizer", None)), None
        )
        if tokenizer is None:
            raise EvaluationError("EvaluateCallback needs the text tokenizer: attach it to the datamodule")
        return tokenizer

    def _evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Evaluation:
        """Built on first use and kept: the reference is embedded once for all evaluations of this run."""
        if self.evaluation is not None:
            return self.evaluation
        student = pl_module.student
        device = self.device or str(pl_module.device)
        source = getattr(student.config, "name_or_path", "") or "student"
        embedders = build_embedders(
            self.embedder_specs,
            device=device,
            own_codec=lambda: EncodecEmbedder(f"student codec ({source})", codec=student.audio_encoder),
            own_codec_sources=("", STUDENT_CODEC),
        )
        clap = None
        if self.clap_model:
            clap = clap_embedder(embedders, self.clap_model, device=device, batch_size=self.batch_size)
        is_stats = self.reference not in ("val", HELDOUT) and Path(self.reference).is_file()
        evaluation = Evaluation(
            embedders,
            clap=clap,
            reference_stats=self.reference if is_stats else None,
            fad_inf=self.fad_inf,
            inf_min_n=self.inf_min_n,
            seed=self.seed,
        )
        if embedders and not is_stats:
            if self.reference == "val":
                self._add_val_reference(evaluation, trainer, pl_module)
            elif self.reference == HELDOUT:
                self._add_heldout_reference(evaluation, trainer, pl_module)
            else:
                self._add_folder_reference(evaluation, trainer)
        self.evaluation = evaluation
        return evaluation

    @torch.inference_mode()
    def _add_val_reference(
        self, evaluation: Evaluation, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> None:
        """The validation clips' audio, decoded from their codes with the student's (frozen, shared) codec."""
        from tinymusician.models.musicgen import codec_decode, codec_hop

        splits = getattr(getattr(trainer, "datamodule", None), "splits", None) or {}
        if "val" not in splits:
            raise EvaluationError(
                "eval.reference=val needs trainer.datamodule.splits['val'] (a CodesDataModule); "
                "give a folder of WAVs or a stats file instead"
            )
        split = splits["val"]
        student = pl_module.student
        codec = student.audio_encoder
        hop = codec_hop(codec.config)
        count = min(len(split), self.reference_max_clips or len(split))
        indices = list(range(trainer.global_rank, count, trainer.world_size))
        seconds = 0.0
        for start in range(0, len(indices), self.batch_size):
            ids = indices[start : start + self.batch_size]
            codes = split.codes[ids].to(next(codec.parameters()).device)
            audio = codec_decode(student, codes).float().cpu()
            clips = [clip[: int(split.lengths[i]) * hop] for clip, i in zip(audio, ids, strict=True)]
            evaluation.add_reference(clips, int(codec.config.sampling_rate))
            if start == 0:  # to listen to next to the generated clips
                captions = [split.captions[i] for i in ids]
                self._keep_reference(clips, int(codec.config.sampling_rate), captions)
            seconds += sum(c.shape[-1] for c in clips) / codec.config.sampling_rate
        evaluation.set_reference(
            {
                "kind": "val",
                "description": "validation clips decoded from their codes with the student's codec",
                "n_clips": count,
                "clip_seconds": round(seconds / max(len(indices), 1), 4),
            }
        )

    def _add_heldout_reference(
        self, evaluation: Evaluation, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> None:
        """The held-out synthetic clips themselves (not codec reconstructions), at the codec's sample rate."""
        rate = int(pl_module.student.config.audio_encoder.sampling_rate)
        count = self.reference_max_clips or self.heldout_clips
        clips = heldout_clips(count, seconds=self.seconds, sample_rate=rate)
        mine = [torch.from_numpy(c.audio) for c in clips[trainer.global_rank :: trainer.world_size]]
        self._keep_reference(
            mine, rate, [c.caption for c in clips[trainer.global_rank :: trainer.world_size]]
        )
        for start in range(0, len(mine), self.batch_size):
            evaluation.add_reference(mine[start : start + self.batch_size], rate)
        evaluation.set_reference(
            {
                "kind": HELDOUT,
                "description": "held-out synthetic clips (data.synthetic.heldout_clips), rendered directly",
                "n_clips": count,
                "clip_seconds": self.seconds,
            }
        )

    def _add_folder_reference(self, evaluation: Evaluation, trainer: L.Trainer) -> None:
        add_reference_folder(
            evaluation,
            self.reference,
            max_clips=self.reference_max_clips,
            batch_size=self.batch_size,
            shard=(trainer.global_rank, trainer.world_size),
            progress=False,
        )

    def _write(self, directory: Path, generated: GeneratedSet, rank: int, world: int) -> list[dict[str, str]]:
        """WAVs + metadata.jsonl; with several processes each writes its own share under ``rank{r}/``."""
        if world == 1:
            return write_clips(directory, generated)
        rows = write_clips(directory / f"rank{rank}", generated)
        return [{**row, "file_name": f"rank{rank}/{row['file_name']}"} for row in rows]

    def _log_audio(self, trainer: L.Trainer, generated: GeneratedSet, prefix: str) -> None:
        """The first ``log_audio`` clips to loggers that take audio (wandb: ``{prefix}/audio``; TensorBoard:
        ``{prefix}/audio_{i}`` and ``{prefix}/prompts``), kept for :meth:`_log_samples`' table."""
        count = min(self.log_audio, len(generated.audio))
        if count <= 0:
            return
        clips = GeneratedSet(generated.audio[:count], generated.sample_rate, generated.prompts[:count])
        self._samples[prefix] = clips
        log_clips(trainer.loggers, prefix, clips, trainer.global_step)

    def _keep_reference(
        self, clips: Sequence[torch.Tensor], sample_rate: int, captions: Sequence[str]
    ) -> None:
        if self.log_audio > 0 and self._reference_samples is None:
            count = min(self.log_audio, len(clips))
            self._reference_samples = GeneratedSet(list(clips[:count]), sample_rate, list(captions[:count]))

    def _log_samples(self, trainer: L.Trainer) -> None:
        """After an evaluation: wandb's ``eval/samples`` table (prompt, audio, model: student | quantized), and
        once per run the reference clips (``reference/*``; heldout and val references, which are audio)."""
        step = trainer.global_step
        if self._reference_samples is not None:
            log_clips(trainer.loggers, REFERENCE_KEY, self._reference_samples, step)
            log_sample_table(
                trainer.loggers, f"{REFERENCE_KEY}/samples", {"reference": self._reference_samples}, step
            )
            self._reference_samples = None  # the reference is built once per run: never kept again
        if self._samples:
            models = {SAMPLE_MODELS.get(prefix, prefix): clips for prefix, clips in self._samples.items()}
            log_sample_table(trainer.loggers, "eval/samples", models, step)
        self._samples = {}


REFERENCE_KEY = "reference"
SAMPLE_MODELS = {"eval": "student", "eval_quant": "quantized"}  # metric prefix -> the model column


def _numpy(clip: Any) -> Any:
    return torch.as_tensor(clip).detach().float().cpu().numpy()


def log_clips(loggers: Sequence[Any], key: str, clips: GeneratedSet, step: int) -> None:
    """Clips with their prompts: a wandb media panel (``key/audio``, prompts as captions); TensorBoard
    ``key/audio_{i}`` and the prompts as text (``key/prompts``). Loggers that take no audio are skipped."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            samples = [
                wandb.Audio(_numpy(clip), sample_rate=clips.sample_rate, caption=prompt)
                for clip, prompt in zip(clips.audio, clips.prompts, strict=True)
            ]
            logger.experiment.log({f"{key}/audio": samples, "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            for index, clip in enumerate(clips.audio):
                writer.add_audio(f"{key}/audio_{index}", torch.as_tensor(clip)[None], step, clips.sample_rate)
            prompts = "\n".join(f"{index}. {prompt}" for index, prompt in enumerate(clips.prompts))
            writer.add_text(f"{key}/prompts", prompts, step)


def log_sample_table(loggers: Sequence[Any], key: str, models: Mapping[str, GeneratedSet], step: int) -> None:
    """A wandb.Table ``key`` with columns prompt, audio, model: every model's clips side by side."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        rows = [
            [prompt, wandb.Audio(_numpy(clip), sample_rate=clips.sample_rate, caption=prompt), model]
            for model, clips in models.items()
            for clip, prompt in zip(clips.audio, clips.prompts, strict=True)
        ]
        table = wandb.Table(columns=["prompt", "audio", "model"], data=rows)
        logger.experiment.log({key: table, "trainer/global_step": step})
