"""Quantized bundles on disk: data only, never pickled code.

A bundle directory holds ``config.json`` + ``generation_config.json`` (MusicGen's, as ``save_pretrained``
writes them), the tokenizer files, ``quant_plan.json`` (the :class:`PrecisionPlan`) and
``quantized_state.pt`` (a state dict of tensors, int8 ones included). Loading rebuilds the architecture
from the config, applies the same plan, then loads the state dict with ``torch.load(weights_only=True)``:
torch.ao's quantized modules cannot go through safetensors / ``save_pretrained``, and a full pickle would
run whatever code the file names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    MusicgenConfig,
    MusicgenForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from tinymusician.quant.plan import PrecisionPlan
from tinymusician.quant.ptq import PLAN_ATTRIBUTE, apply_plan, quiet_torch_ao

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
PLAN_FILE = "quant_plan.json"
STATE_FILE = "quantized_state.pt"


class BundleError(RuntimeError):
    """A directory that is not a (compatible) quantized bundle."""


def is_bundle(directory: str | Path) -> bool:
    return (Path(directory) / PLAN_FILE).is_file()


def save_quantized(
    model: MusicgenForConditionalGeneration,
    directory: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write a model quantized by :func:`~tinymusician.quant.ptq.apply_plan` as a bundle; returns the dir."""
    plan: PrecisionPlan | None = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise BundleError(
            "this model was not quantized with tinymusician.quant (it carries no precision plan)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    with quiet_torch_ao():
        state = model.state_dict()
    torch.save(state, directory / STATE_FILE)
    meta = {
        "format": BUNDLE_FORMAT,
        "plan": plan.to_dict(),
        "description": plan.describe(),
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "codec_encoder": "not included: generation only decodes codes",
    }
    (directory / PLAN_FILE).write_text(json.dumps(meta, indent=2))
    return directory


REQUANTIZE = "quantize the student again: `python -m tinymusician.quantize STUDENT quant=... --out DIR`"


def read_plan(directory: str | Path) -> PrecisionPlan:
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise BundleError(
            f"{directory}: no {PLAN_FILE}, so not a quantized bundle (write one with save_quantized)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err}); {REQUANTIZE}") from err
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BundleError(
            f"{path}: bundle format {found!r}, this version reads {BUNDLE_FORMAT}; {REQUANTIZE}"
        )
    try:
        return PrecisionPlan.from_dict(meta["plan"])
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{path}: 'plan' is not a precision plan ({err}); {REQUANTIZE}") from err


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The bundle's state dict, as data only (``weights_only=True``: a crafted pickle is refused, not run)."""
    import pickle

    if not path.is_file():
        raise BundleError(f"{path}: missing, so the bundle has no weights; {REQUANTIZE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        cause = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise BundleError(
            f"{path}: not a state dict of tensors written by save_quantized ({cause[:200]}); {REQUANTIZE}"
        ) from err
    if not isinstance(state, dict):
        raise BundleError(f"{path}: holds a {type(state).__name__}, not a state dict; {REQUANTIZE}")
    return state


def load_quantized(directory: str | Path) -> MusicgenForConditionalGeneration:
    """Load a bundle: ready for ``model.generate(**tokenizer(...), guidance_scale=3, max_new_tokens=N)``.

    The tokenizer is in the same directory (``tinymusician.models.musicgen.load_tokenizer(directory)``).
    """
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    plan = read_plan(directory)
    try:
        config = MusicgenConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BundleError(
            f"{directory / 'config.json'}: not a MusicGen config ({err}); {REQUANTIZE}"
        ) from err
    with no_init_weights():  # every weight comes from the state dict; skip the random init
        model = MusicgenForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():  # uninitialised memory may hold NaN, which int8 observers reject
            param.zero_()
    apply_plan(model, plan)
    state = read_state(directory / STATE_FILE)
    with quiet_torch_ao():
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            details = "; ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
            raise BundleError(
                f"{directory / STATE_FILE}: does not fit {directory / 'config.json'} and {PLAN_FILE} "
                f"({details[:300]}); {REQUANTIZE}"
            ) from err
    model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()
