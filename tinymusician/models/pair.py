"""Load the teacher/student pair a config names (tiny, hub id or local dir) through one code path."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import MusicgenForConditionalGeneration, PreTrainedTokenizerBase

from tinymusician.models.musicgen import check_model_source, freeze, load_musicgen, load_tokenizer
from tinymusician.models.tiny import TinySpec, ensure_tiny_pair

log = logging.getLogger(__name__)

TINY = "tiny"


@dataclass
class TeacherStudent:
    student: MusicgenForConditionalGeneration
    teacher: MusicgenForConditionalGeneration | None
    tokenizer: PreTrainedTokenizerBase
    student_source: str
    teacher_source: str | None


def check_model_config(model_cfg: DictConfig) -> None:
    """Start-up checks of ``model.*`` that load no weights (only config.json for hub ids)."""
    if model_cfg.get("student") in (None, ""):
        raise ValueError("model.student is required: `tiny`, a hub id or a save_pretrained directory")
    for role in ("student", "teacher"):
        source = model_cfg.get(role)
        if source is None:
            continue
        if source == TINY:
            TinySpec.from_dict(OmegaConf.to_container(model_cfg.get("tiny") or {}, resolve=True))
        else:
            check_model_source(str(source), f"model.{role}")


def resolve_sources(model_cfg: DictConfig, cache_dir: str) -> tuple[str, str | None]:
    """Replace ``tiny`` by the cached tiny pair's directories, building it on first use."""
    student, teacher = model_cfg.student, model_cfg.get("teacher")
    if TINY in (student, teacher):
        spec = TinySpec.from_dict(OmegaConf.to_container(model_cfg.get("tiny") or {}, resolve=True))
        pair = ensure_tiny_pair(cache_dir, spec)
        student = str(pair.student) if student == TINY else student
        teacher = str(pair.teacher) if teacher == TINY else teacher
    return str(student), (str(teacher) if teacher is not None else None)


def check_compatible(
    student: MusicgenForConditionalGeneration, teacher: MusicgenForConditionalGeneration
) -> None:
    """Distillation compares logits position by position: codebooks and vocabularies must match."""
    s, t = student.config.decoder, teacher.config.decoder
    for name in ("num_codebooks", "vocab_size", "audio_channels"):
        if getattr(s, name) != getattr(t, name):
            raise ValueError(
                f"teacher and student disagree on decoder.{name} ({getattr(t, name)} vs {getattr(s, name)}): "
                "their logits cannot be compared; pick models that share the audio codec"
            )
    if student.config.text_encoder.to_dict() != teacher.config.text_encoder.to_dict():
        raise ValueError("teacher and student have different text encoders; both must use the same T5")
    for (name, a), b in zip(
        student.text_encoder.state_dict().items(), teacher.text_encoder.state_dict().values(), strict=True
    ):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3):  # bf16 ok
            raise ValueError(
                f"teacher and student text encoders differ at {name}: T5 is encoded once for both"
            )


def load_teacher_student(model_cfg: DictConfig, cache_dir: str) -> TeacherStudent:
    """Student in fp32 (it trains), teacher frozen in ``model.teacher_dtype``; tokenizer from the student."""
    student_source, teacher_source = resolve_sources(model_cfg, cache_dir)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # MusicGen's pad id == vocab size is by design, not a warning
    try:
        student = load_musicgen(student_source)
        teacher = None
        if teacher_source is not None:
            teacher = freeze(load_musicgen(teacher_source, dtype=model_cfg.get("teacher_dtype", "float32")))
            check_compatible(student, teacher)
        tokenizer = load_tokenizer(student_source)
    finally:
        transformers.logging.set_verbosity(verbosity)
    log.info("Student %s (%s); teacher %s", student_source, Path(student_source).name, teacher_source)
    return TeacherStudent(student, teacher, tokenizer, student_source, teacher_source)
