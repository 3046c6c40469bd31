"""Resolve what a user names as a model: a ``save_pretrained`` dir, a hub id, ``tiny`` or a training ``.ckpt``.

Shared by the quantize, export and generate command lines, so every entry point accepts the same sources.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinymusician.config import CONF_DIR

if TYPE_CHECKING:  # torch and Hydra load on use: the generate CLI shares --base without importing torch
    import torch
    from omegaconf import DictConfig


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """conf/train.yaml with ``overrides``, as the train entry point composes it (for CLIs that take the same
    overrides as training; ``output_dir`` replaces ``paths.output_dir``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra])


def add_base_argument(parser: argparse.ArgumentParser, what: str = "a .ckpt") -> None:
    """``--base``: where the architecture and tokenizer of a training checkpoint come from (every CLI that
    takes a model accepts it the same way)."""
    parser.add_argument(
        "--base", default=None, help=f"architecture/tokenizer for {what} (default: <run>/student)"
    )


def add_guidance_argument(parser: argparse.ArgumentParser) -> None:
    """``--guidance-scale``: None (the default) lets each model choose, as ``default_guidance_scale`` says."""
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance (1: off, one pass per step); default: the model's, 1 for a "
        "guidance-distilled student, else 3",
    )


def run_dir_of(checkpoint: Path) -> Path:
    """``<run>/checkpoints/x.ckpt`` -> ``<run>``."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


STUDENT_PREFIX = "student."
CHECKPOINT = "a Lightning checkpoint written by `python -m tinymusician.train` (<run>/checkpoints/last.ckpt)"


def read_training_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """A training checkpoint holding ``student.*`` weights, read as data: ``torch.load(weights_only=True)``
    refuses anything that is not tensors and containers, so a crafted pickle never runs (an explicit
    ``weights_only`` holds even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set); ``mmap`` keeps a multi-GB check cheap.
    Shared by the model sources below and ``train``'s resume check."""
    import pickle
    import warnings

    import torch

    from tinymusician.models.musicgen import ModelSourceError, first_line

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4": the error below says more
            try:
                data = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not a zip file (legacy format, or not PyTorch): the plain load says which
                data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        cause = str(err).partition("WeightsUnpickler error:")[2].strip().splitlines() or [first_line(err)]
        raise ModelSourceError(
            f"{checkpoint}: not loaded: it is not a TinyMusician checkpoint (a pickle holding more than tensors, or "
            f"not a PyTorch file at all: {cause[0]}); loading it as a full pickle could run code it carries, so "
            f"it is only read with torch.load(weights_only=True). Expected {CHECKPOINT}, a save_pretrained "
            "directory, a hub id or `tiny`"
        ) from err
    except Exception as err:  # damaged bytes reach the unpickler as IndexError, KeyError, ...
        raise ModelSourceError(
            f"{checkpoint}: not a readable PyTorch checkpoint ({first_line(err)}; truncated or damaged?). "
            f"Expected {CHECKPOINT}"
        ) from err
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict):
        found = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise ModelSourceError(
            f"{checkpoint}: has no 'state_dict' (found {found}), so it is not a Lightning checkpoint. Expected "
            f"{CHECKPOINT}; for a save_pretrained directory pass the directory"
        )
    if not any(str(key).startswith(STUDENT_PREFIX) for key in state):
        prefixes = sorted({str(k).split(".")[0] for k in state})[:6]
        raise ModelSourceError(
            f"{checkpoint}: no 'student.*' weights (its state_dict has {prefixes or 'nothing'}); is it a "
            f"TinyMusician training checkpoint? Expected {CHECKPOINT}"
        )
    return data


def read_student_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The ``student.*`` weights of a training checkpoint (:func:`read_training_checkpoint`), prefix removed."""
    state = read_training_checkpoint(checkpoint)["state_dict"]
    return {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def load_source(
    source: str, cfg: DictConfig, base: str | None, key: str = "SOURCE", *, quantized: bool = False
) -> tuple[Any, Any, str]:
    """(fp32 student, tokenizer, description) for a model dir, hub id, ``tiny`` or Lightning checkpoint.

    ``quantized=True`` also accepts a quantized bundle (returned quantized) for callers that only generate.
    Anything else raises :class:`~tinymusician.models.musicgen.ModelSourceError` naming the path and what
    was expected, before any weights load when possible.
    """

    from tinymusician.models.musicgen import (
        ModelSourceError,
        check_model_source,
        load_musicgen,
        load_tokenizer,
    )
    from tinymusician.shipped import TINY, resolve_tiny
    from tinymusician.zoo.pair import quiet_transformers

    if quantized and source != TINY:
        from tinymusician.quant.bundle import is_bundle, load_quantized

        if is_bundle(Path(source).expanduser()):
            directory = str(Path(source).expanduser())
            return load_quantized(directory), load_tokenizer(directory), f"{source} (quantized bundle)"
    checkpoint = Path(source).expanduser() if source.endswith(".ckpt") else None
    student_state = None
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
        student_state = read_student_state(checkpoint)  # before the architecture: a wrong file fails first
        architecture = base or str(run_dir_of(checkpoint) / "student")
        if base is None and not Path(architecture, "config.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint}: cannot tell the architecture ({architecture} has no config.json). Pass "
                "--base with the save_pretrained directory (or hub id) the run trained from"
            )
    else:
        architecture = source
    architecture = resolve_tiny(architecture, "student")
    check_model_source(architecture, "--base" if checkpoint is not None else key)
    with quiet_transformers():
        student = load_musicgen(architecture)
        tokenizer = load_tokenizer(architecture)
    if student_state is not None:
        try:
            # A run with checkpoint_frozen=false leaves the frozen T5 / EnCodec out of its checkpoints: they are
            # the architecture's own, so take them from it; every other weight must match exactly.
            frozen = ("text_encoder.", "audio_encoder.")
            if not any(key.startswith(frozen) for key in student_state):
                kept = {k: v for k, v in student.state_dict().items() if k.startswith(frozen)}
                student_state = {**kept, **student_state}
            student.load_state_dict(student_state, strict=True)
        except RuntimeError as err:
            details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
            raise ModelSourceError(
                f"{checkpoint}: its student weights do not fit the architecture of {architecture} "
                f"({'; '.join(details)[:300]}). Pass --base with the save_pretrained directory (or hub id) "
                "the run trained from"
            ) from err
        return student, tokenizer, f"{checkpoint} (architecture and tokenizer from {architecture})"
    return student, tokenizer, architecture


def load_named_model(
    source: str,
    base: str | None = None,
    overrides: list[str] | None = None,
    key: str = "SOURCE",
    *,
    quantized: bool = False,
) -> tuple[Any, Any, str]:
    """:func:`load_source` with the default config (what ``tiny`` means comes from ``conf/model``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_config(list(overrides or []), Path(scratch))
    return load_source(source, cfg, base, key, quantized=quantized)
