"""The tiny world's MusicGen pair: teacher and student around the trained codec; the teacher trained long.

Like MusicGen-Large, which has heard far more music than any distillation set, the teacher is wider and
deeper than the student and is trained on many more clips (a corpus seed the student's data never uses) for
many more steps; the student ships untrained, sharing the teacher's T5 and codec weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import EncodecModel, MusicgenForConditionalGeneration

from tinymusician.zoo.tiny import TinySpec, build_untrained_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherRecipe:
    clips: int = 8192
    val_clips: int = 64
    seconds: float = 2.0
    corpus_seed: int = 1000  # the student's default data uses seed 0
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    cond_dropout: float = 0.1
    seed: int = 0


def build_pair(codec: EncodecModel, spec: TinySpec | None = None):
    """(teacher, student, tokenizer), both around a copy of ``codec`` with shared T5 weights."""
    return build_untrained_pair(spec or TinySpec(), codec_config=codec.config, codec_state=codec.state_dict())


def train_teacher(
    teacher: MusicgenForConditionalGeneration,
    tokenizer,
    recipe: TeacherRecipe,
    cache_dir: Path,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Cross-entropy training on the teacher's own corpus; returns its curve and final val CE."""
    import lightning as L

    from tinymusician.data.synthetic import SyntheticDataModule
    from tinymusician.distill.losses import build_loss
    from tinymusician.distill.module import DistillationModule
    from tinymusician.distill.optim import warmup_cosine

    data = SyntheticDataModule(
        num_train=recipe.clips,
        num_val=recipe.val_clips,
        seconds=recipe.seconds,
        seed=recipe.corpus_seed,
        batch_size=recipe.batch_size,
        cache_dir=str(cache_dir),
    )
    data.attach(teacher, tokenizer)
    torch.manual_seed(recipe.seed)
    module = DistillationModule(
        student=teacher,
        loss=build_loss("ce"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01),
        scheduler=lambda optimizer, total_steps: warmup_cosine(
            optimizer, total_steps, warmup_steps=recipe.warmup_steps
        ),
        cond_dropout=recipe.cond_dropout,
    )
    curve: list[dict] = []

    class Curve(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            row = {"step": trainer.global_step, "train_ce": float(loss)}
            curve.append(row)
            if on_step is not None:
                on_step(trainer.global_step - 1, row)

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            value = trainer.callback_metrics.get("val/ce")
            if value is not None and curve:
                curve[-1]["val_ce"] = float(value)

    trainer = L.Trainer(
        max_steps=recipe.steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=max(1, recipe.steps // 6),
        accelerator="cpu",
        devices=1,
        gradient_clip_val=1.0,
        callbacks=[Curve()],
    )
    trainer.fit(module, datamodule=data)
    final = trainer.validate(module, datamodule=data, verbose=False)[0]
    teacher.eval()
    return {"val_ce": float(final["val/ce"]), "curve": curve}
