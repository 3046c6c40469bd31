"""The LightningModule: a frozen teacher and a trainable student, loss = lambda_ce * CE + lambda_kd * KD."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from transformers import MusicgenForConditionalGeneration

from tinymusician.distill.divergences import forward_kl, reduce_positions
from tinymusician.distill.losses import DistillationLoss
from tinymusician.distill.sparse import SparseTeacher
from tinymusician.distill.teacher_cache import TeacherLogitCache
from tinymusician.models.musicgen import freeze, set_guidance_distilled, teacher_forcing

# What validation_step logs: train.check_config validates `optimized_metric` and checkpoint monitors against
# these before any model loads (tests/distill/test_module.py checks the logged keys are exactly these).
VALIDATION_METRICS = ("val/ce",)
TEACHER_VALIDATION_METRICS = ("val/kl_to_teacher", "val/teacher_ce")  # only when there is a teacher
PER_CODEBOOK_VALIDATION_METRIC = "val/ce_q{k}"  # k = 0 .. num_codebooks - 1

# The student's frozen parts (shared with the teacher, never trained): left out of Lightning checkpoints when
# ``checkpoint_frozen=False`` and restored from the pretrained source the run starts from.
FROZEN_PREFIXES = ("student.text_encoder.", "student.audio_encoder.")


def validation_metric_keys(num_codebooks: int | None, with_teacher: bool) -> list[str]:
    """The keys :meth:`DistillationModule.validation_step` logs (per-codebook ones only if K is known)."""
    keys = [*VALIDATION_METRICS, *(TEACHER_VALIDATION_METRICS if with_teacher else ())]
    return keys + [PER_CODEBOOK_VALIDATION_METRIC.format(k=k) for k in range(num_codebooks or 0)]


def frozen_fingerprint(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Element count and float64 sum per frozen prefix: cheap, and enough to notice different weights."""
    out: dict[str, float] = {}
    for prefix in FROZEN_PREFIXES:
        tensors = [v for k, v in state.items() if k.startswith(prefix) and v.is_floating_point()]
        out[f"{prefix}numel"] = float(sum(t.numel() for t in tensors))
        out[f"{prefix}sum"] = float(sum(t.double().sum() for t in tensors)) if tensors else 0.0
    return out


def per_codebook_ce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``[K]``: mean over valid positions of each codebook (logits ``[B, K, T, V]``)."""
    vocab = logits.shape[-1]
    labels = labels.masked_fill(~valid, 0)  # pad id may be == V; masked out below anyway
    ce = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), reduction="none")
    ce = ce.reshape(valid.shape) * valid
    return ce.sum(dim=(0, 2)) / valid.sum(dim=(0, 2)).clamp_min(1)


def teacher_ce(
    teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The teacher's CE on the codes (mean of the per-codebook means), from live logits or the cache's top-k."""
    if not isinstance(teacher, SparseTeacher):
        return per_codebook_ce(teacher, labels, valid).mean()
    nll = -teacher.label_log_probs(labels.masked_fill(~valid, 0)) * valid
    return reduce_positions(nll, valid, "codebook").mean()


class DistillationModule(L.LightningModule):
    """Trains ``student``'s decoder against the codes (CE) and the ``teacher``'s distributions (KD).

    The teacher is held outside the module tree on purpose: it is never optimised, never moved by
    accident into the student's checkpoint, and ``state_dict()`` holds the student only. The text encoder and
    audio codec are shared and frozen; T5 runs once per batch and feeds both decoders.
    """

    def __init__(
        self,
        student: MusicgenForConditionalGeneration,
        loss: DistillationLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        teacher: MusicgenForConditionalGeneration | None = None,
        scheduler: Callable[..., Any] | None = None,
        cond_dropout: float = 0.0,
        checkpoint_frozen: bool = True,
        teacher_cache: TeacherLogitCache | None = None,
    ) -> None:
        super().__init__()
        if loss.requires_teacher and teacher is None and teacher_cache is None:
            raise ValueError(f"loss {type(loss).__name__} distils from a teacher, but model.teacher is null")
        self.student = student
        if loss.requires_teacher:
            # what the student learns to sample: the guided teacher (then one pass per step is its default) or not
            set_guidance_distilled(student, loss.guidance_scale if loss.guidance_scale > 1 else None)
        freeze(student.text_encoder)
        freeze(student.audio_encoder)
        object.__setattr__(self, "teacher", freeze(teacher) if teacher is not None else None)
        # distill.teacher_source=cache: the teacher's top-k per position, read from disk; no teacher is loaded
        self.teacher_cache = teacher_cache
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.cond_dropout = cond_dropout
        self.checkpoint_frozen = checkpoint_frozen
        self.num_codebooks = student.config.decoder.num_codebooks
        self.last_train_logs: dict[str, float] = {}  # for the end-of-run summary and tests

    # --- plumbing -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.student.text_encoder.eval()  # frozen parts keep eval mode (no T5 dropout)
        self.student.audio_encoder.eval()
        return self

    def setup(self, stage: str) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode modules and Lightning 2.x keeps whatever mode it is given, so
        # without this the student's decoder would train with dropout off (train() keeps T5/EnCodec in eval).
        self.train()
        self.setup("fit")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_frozen:
            return
        state = checkpoint["state_dict"]
        checkpoint["frozen_weights"] = {
            "prefixes": list(FROZEN_PREFIXES),
            "fingerprint": frozen_fingerprint(state),
            "source": str(getattr(self.student.config, "name_or_path", "")),
        }
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put back frozen weights a checkpoint left out, from the student this run loaded (strict load stays)."""
        frozen = checkpoint.get("frozen_weights")
        if frozen is None:
            return
        current = {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
        mine = frozen_fingerprint(current)
        for key, value in frozen["fingerprint"].items():
            if not torch.isclose(torch.tensor(mine.get(key, float("nan"))), torch.tensor(value), rtol=1e-6):
                raise ValueError(
                    f"the checkpoint left out the frozen text encoder / codec (saved from {frozen['source']!r}), "
                    f"but the student this run loaded ({self.student.config.name_or_path!r}) has different "
                    f"ones ({key}: {mine.get(key)} vs {value}); resume with the model.student it was trained from"
                )
        checkpoint["state_dict"].update(current)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer=optimizer, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def progress(self) -> float:
        """Training progress in [0, 1]; from the global step, so a resumed run resumes the KD schedule."""
        if self._trainer is None:
            return 0.0
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return min(self.global_step / total, 1.0)

    # --- forward --------------------------------------------------------------------------------------
    def forward_batch(
        self, batch: dict[str, torch.Tensor], with_teacher: bool, split: str = "train"
    ) -> dict[str, Any]:
        """Delay the codes, encode the text once, run student (and teacher): logits ``[B, K, T, V]``.

        ``out["teacher"]`` is the live teacher's logits (guided when ``loss.guidance_scale > 1``) or the cache's
        :class:`SparseTeacher` (rows of ``split``); ``out["kd_valid"]`` marks the positions the KD term uses.
        """
        forcing = teacher_forcing(self.student, batch)
        keep = None
        if self.training and self.cond_dropout > 0:
            # Classifier-free guidance needs the null condition: drop whole captions, as MusicGen does.
            mask = forcing.text_mask
            keep = torch.rand(mask.shape[0], device=mask.device) >= self.cond_dropout
            forcing.text_mask = mask * keep[:, None].to(mask.dtype)
        valid = forcing.delayed.valid
        out: dict[str, Any] = {"labels": forcing.delayed.labels, "valid": valid, "kd_valid": valid}
        out["student"] = forcing.logits(self.student)
        if with_teacher and self.teacher is not None:
            with torch.no_grad():
                # loss.guidance_scale > 1: the guided teacher; a dropped caption's row gets its unconditional
                # distribution (cond = uncond there), so the student's null condition still matches the teacher's
                out["teacher"] = forcing.logits(self.teacher, self.loss_fn.guidance_scale)
        elif with_teacher and self.teacher_cache is not None:
            vocab = out["student"].shape[-1]
            out["teacher"] = self.teacher_cache.lookup(split, batch["index"], vocab).to(out["student"].device)
            if keep is not None:
                # the cache holds the teacher given the caption; a dropped caption's row trains on CE only
                out["kd_valid"] = valid & keep[:, None, None]
        return out

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """lambda_ce * CE + lambda_kd * KD on one batch, and what training logs of it (benchmarks time this)."""
        out = self.forward_batch(batch, with_teacher=self.loss_fn.requires_teacher)
        ce_q = per_codebook_ce(out["student"], out["labels"], out["valid"])
        ce = ce_q.mean()
        kd = self.loss_fn(out["student"], out.get("teacher"), out["kd_valid"], self.progress)
        loss = self.loss_fn.lambda_ce * ce + self.loss_fn.lambda_kd * kd.value
        logs = {"train/loss": loss.detach(), "train/ce": ce.detach(), "train/kd": kd.value.detach()}
        logs.update({f"train/ce_q{k}": v for k, v in enumerate(ce_q.detach())})
        logs.update({f"train/kd_q{k}": v for k, v in enumerate(kd.per_codebook.detach())})
        logs.update({f"train/{name}": float(value) for name, value in kd.logs.items()})
        return loss, logs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logs = self.training_loss(batch)
        batch_size = batch["codes"].shape[0]
        self.log_dict(logs, batch_size=batch_size)
        self.last_train_logs = {name: float(value) for name, value in logs.items()}
        self.log("train/loss_step", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.forward_batch(batch, with_teacher=True, split="val")
        ce_q = per_codebook_ce(out["student"], out["labels"], out["valid"])
        batch_size = batch["codes"].shape[0]
        logs = {"val/ce": ce_q.mean()}
        logs.update({f"val/ce_q{k}": v for k, v in enumerate(ce_q)})
        if "teacher" in out:
            # KL(teacher || student) at T=1: how close the student is to the teacher, whatever the loss (to the
            # guided teacher, the student's target, when loss.guidance_scale > 1).
            logs["val/kl_to_teacher"] = forward_kl(out["student"], out["teacher"], out["valid"])
            logs["val/teacher_ce"] = teacher_ce(out["teacher"], out["labels"], out["valid"])
        # sync_dist: under DDP each rank validates its share; the epoch's value is the mean over ranks
        self.log_dict(logs, batch_size=batch_size, prog_bar=False, sync_dist=True)
        self.log(
            "val/ce_bar", logs["val/ce"], prog_bar=True, logger=False, batch_size=batch_size, sync_dist=True
        )
