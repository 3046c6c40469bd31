"""Resolve what a user names as a model: a ``save_pretrained`` dir, a hub id, ``tiny`` or a training ``.ckpt``.

Shared by the quantize, export and generate command lines, so every entry point accepts the same sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def run_dir_of(checkpoint: Path) -> Path:
    """``<run>/checkpoints/x.ckpt`` -> ``<run>``."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_source(source: str, cfg: DictConfig, base: str | None, key: str = "SOURCE") -> tuple[Any, Any, str]:
    """(fp32 student, tokenizer, description) for a model dir, hub id, ``tiny`` or Lightning checkpoint."""
    import transformers

    from tinymusician.models.musicgen import check_model_source, load_musicgen, load_tokenizer
    from tinymusician.models.pair import TINY, resolve_sources

    checkpoint = Path(source).expanduser() if source.endswith(".ckpt") else None
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
        architecture = base or str(run_dir_of(checkpoint) / "student")
        if base is None and not Path(architecture, "config.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint}: cannot tell the architecture ({architecture} has no config.json). Pass "
                "--base with the save_pretrained directory (or hub id) the run trained from"
            )
    else:
        architecture = source
    if architecture == TINY:
        with_tiny = cfg.model.copy()
        with_tiny.student, with_tiny.teacher = TINY, None
        architecture, _ = resolve_sources(with_tiny, cfg.paths.cache_dir)
    check_model_source(architecture, "--base" if checkpoint is not None else key)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # MusicGen's pad id == vocab size is by design
    try:
        student = load_musicgen(architecture)
        tokenizer = load_tokenizer(architecture)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        prefix = "student."
        student_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not student_state:
            raise ValueError(
                f"{checkpoint}: no 'student.*' weights; is it a TinyMusician training checkpoint?"
            )
        student.load_state_dict(student_state, strict=True)
        return student, tokenizer, f"{checkpoint} (architecture and tokenizer from {architecture})"
    return student, tokenizer, architecture


def load_named_model(
    source: str, base: str | None = None, overrides: list[str] | None = None, key: str = "SOURCE"
) -> tuple[Any, Any, str]:
    """:func:`load_source` with the default config (what ``tiny`` means comes from ``conf/model``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_config(list(overrides or []), Path(scratch))
    return load_source(source, cfg, base, key)
