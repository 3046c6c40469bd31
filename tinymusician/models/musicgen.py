"""Loading MusicGen (hub id or local dir, real or tiny) and running it in the ``[B, K, T]`` layout.

This is the one place that converts to and from Hugging Face's ``(B*K, T)`` decoder layout.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoTokenizer, MusicgenForConditionalGeneration, PreTrainedTokenizerBase

from tinymusician.models.delay import DelayedCodes, delay_pattern

if TYPE_CHECKING:
    from transformers import EncodecConfig, MusicgenConfig

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def encodec_32khz_config(**overrides: Any) -> EncodecConfig:
    """facebook/encodec_32khz's architecture (MusicGen's codec); ``overrides`` change single fields."""
    from transformers import EncodecConfig

    fields = {
        "sampling_rate": 32000,
        "audio_channels": 1,
        "num_filters": 64,
        "hidden_size": 128,
        "upsampling_ratios": [8, 5, 4, 4],
        "codebook_size": 2048,
        "target_bandwidths": [2.2],
        "num_lstm_layers": 2,
        "normalize": False,
    }
    return EncodecConfig(**{**fields, **overrides})


def musicgen_small_config() -> MusicgenConfig:
    """facebook/musicgen-small's architecture (REFERENCES.md), for random-weight stand-ins offline.

    Benchmarks and the paper-preset test build it instead of downloading the checkpoint.
    """
    from transformers import MusicgenConfig, MusicgenDecoderConfig, T5Config

    text = T5Config(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_heads=12,
        feed_forward_proj="relu",
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048,
        num_codebooks=4,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        ffn_dim=4096,
        max_position_embeddings=2048,
        pad_token_id=2048,
        bos_token_id=2048,
    )
    codec = encodec_32khz_config(use_causal_conv=False, compress=2)
    return MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder)


class ModelSourceError(RuntimeError):
    """A model id or directory that cannot be used; the message says how to fix it."""


def looks_like_path(name_or_path: str) -> bool:
    """Local directories are written as paths; anything else is a hub id like ``facebook/musicgen-small``."""
    return (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or Path(name_or_path).expanduser().exists()
    )


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def describe_source(source: str | Path) -> str:
    """The ``source`` a bundle records (what it was made from), for messages that point back to it."""
    for name, key in (("manifest.json", "source"), ("quant_report.json", "student_dir")):
        try:
            found = json.loads((Path(source) / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if found:
            return f" (made from {found})"
    return ""


def check_model_source(name_or_path: str, key: str) -> None:
    """Fail fast (before any weights load) when ``name_or_path`` is neither a model dir nor a reachable hub id.

    Only ``config.json`` is fetched, so this is cheap online and instant offline. Directories that hold something
    else (an ONNX bundle, a quantized bundle, a config without weights) and plain files are named as such.
    """
    path = Path(name_or_path).expanduser()
    expected = (
        f"Point {key} at a directory written by `save_pretrained` (config.json + model.safetensors, e.g. a run's "
        "student/), a hub id, `tiny`, or a training checkpoint (.ckpt)"
    )
    if looks_like_path(name_or_path):
        if path.is_file():
            raise ModelSourceError(
                f"{key}={name_or_path!r}: is a file, not a model directory. {expected}"
                + (f"; for this file, its directory {path.parent}" if path.name in WEIGHT_FILES else "")
            )
        if not path.is_dir():
            raise ModelSourceError(
                f"{key}={name_or_path!r}: local model directory does not exist. {expected}."
            )
        if (path / "manifest.json").is_file():
            raise ModelSourceError(
                f"{key}={name_or_path!r}: is an ONNX bundle{describe_source(path)}, not a PyTorch model: generate "
                f"from it with `python -m tinymusician.generate PROMPT --model {name_or_path}`. {expected}."
            )
        if (path / "quant_plan.json").is_file():
            raise ModelSourceError(
                f"{key}={name_or_path!r}: is a quantized bundle{describe_source(path)}, which cannot be quantized or "
                f"exported again. {expected}: the full-precision student the bundle was made from."
            )
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{key}={name_or_path!r}: directory has no config.json, so it is not a saved model. "
                "Save one with `model.save_pretrained(dir)`."
            )
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise ModelSourceError(
                f"{key}={name_or_path!r}: has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}). "
                f"{expected}."
            )
        return
    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ModelSourceError(
            f"{key}={name_or_path!r}: cannot load this model from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' (no network or unknown id)'}. To run offline, download "
            f"it once on a machine with internet (`hf download {name_or_path}`) into HF_HOME, or save it to a "
            f"directory and pass {key}=/path/to/dir; or use the embedded default `model=tiny`. Cause: {err}"
        ) from err


def first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def load_musicgen(
    name_or_path: str, *, dtype: str | torch.dtype | None = None
) -> MusicgenForConditionalGeneration:
    """Load a MusicGen model (hub id or ``save_pretrained`` dir) with real attention masks.

    Built from the saved ``MusicgenConfig`` (never from sub-model instances), so the decoder gets a real
    causal mask and padded text is masked (REFERENCES.md pitfall; tests/models check both). A directory that
    does not hold a loadable MusicGen raises :class:`ModelSourceError` naming it.
    """
    from safetensors import SafetensorError

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    try:
        return MusicgenForConditionalGeneration.from_pretrained(
            str(Path(name_or_path).expanduser()) if looks_like_path(name_or_path) else name_or_path,
            dtype=torch_dtype or torch.float32,
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise ModelSourceError(
            f"{name_or_path}: cannot be loaded as a MusicGen model ({type(err).__name__}: {first_line(err)}). "
            "Expected a `save_pretrained` directory of MusicgenForConditionalGeneration (config.json with "
            "model_type musicgen + model.safetensors); if it was copied, copy it again"
        ) from err


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The text tokenizer saved beside a MusicGen model (T5's for the hub models)."""
    try:
        return AutoTokenizer.from_pretrained(
            str(Path(name_or_path).expanduser()) if looks_like_path(name_or_path) else name_or_path
        )
    except Exception as err:  # tokenizers raises a bare Exception (serde's message) for a damaged file
        files = [
            n
            for n in ("tokenizer.json", "tokenizer_config.json", "spiece.model")
            if (Path(name_or_path) / n).exists()
        ]
        raise ModelSourceError(
            f"{name_or_path}: its tokenizer cannot be loaded ({type(err).__name__}: {first_line(err)}; files: "
            f"{files or 'none'}). Copy tokenizer.json / tokenizer_config.json again from the model it was saved "
            "with (`tokenizer.save_pretrained(dir)`)"
        ) from err


def save_musicgen(
    model: MusicgenForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> Path:
    """``save_pretrained`` model (safetensors) and tokenizer into one directory, as on the hub."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: for the teacher and for the student's frozen text encoder / codec."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def encode_text(
    model: MusicgenForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Raw T5 hidden states ``[B, S, D_text]`` (padding zeroed); shared by teacher and student."""
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden * attention_mask[..., None].to(hidden.dtype)


def decoder_logits(
    model: MusicgenForConditionalGeneration,
    text_hidden: torch.Tensor,
    text_mask: torch.Tensor,
    inputs: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced logits ``[B, K, T, V]`` for delayed ``inputs [B, K, T]`` given raw T5 states.

    The projection input is cast to the decoder's dtype so an fp16/bf16 decoder accepts fp32 T5 states.
    """
    batch, num_codebooks, length = inputs.shape
    proj = getattr(model, "enc_to_dec_proj", None)
    dtype = model.decoder.dtype
    # A half-precision model (a bf16/fp16 teacher) runs in its own dtype: autocast to another half dtype would
    # mix the two (CPU LayerNorm rejects bf16 activations with fp16 weights). fp32 models follow autocast.
    with nullcontext() if dtype == torch.float32 else torch.autocast(inputs.device.type, enabled=False):
        hidden = text_hidden.to(dtype)
        if proj is not None:
            hidden = proj(hidden.to(proj.weight.dtype)).to(dtype)
        hidden = hidden * text_mask[..., None].to(hidden.dtype)
        out = model.decoder(
            input_ids=inputs.reshape(batch * num_codebooks, length),
            encoder_hidden_states=hidden,
            encoder_attention_mask=text_mask,
            use_cache=False,
        )
    return out.logits.reshape(batch, num_codebooks, length, -1)


# Classifier-free guidance, as transformers' MusicGen does it: the unconditional pass sees zero text states
# under an all-zero mask, and the next-token logits are mixed in logit space before temperature and top-k.
DEFAULT_GUIDANCE_SCALE = 3.0  # MusicGen's released generation_config
# config.json attribute of a student distilled on the guided teacher (loss.guidance_scale > 1): the scale it
# learnt; one pass per step (no unconditional batch) is then its default.
GUIDANCE_DISTILLED = "guidance_distilled_scale"


def guided(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``uncond + s * (cond - uncond)`` in fp32 (transformers' ClassifierFreeGuidanceLogitsProcessor)."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + (cond - uncond) * guidance_scale


def with_unconditional(
    text_hidden: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch doubled for guidance: conditional rows first, then the null condition (zero states, zero mask)."""
    return (
        torch.cat([text_hidden, torch.zeros_like(text_hidden)]),
        torch.cat([text_mask, torch.zeros_like(text_mask)]),
    )


def guidance_distilled_scale(model_or_config: Any) -> float | None:
    """The guidance scale a student was distilled on (None: an ordinary model that needs CFG)."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, GUIDANCE_DISTILLED, None)
    return float(value) if value is not None else None


def default_guidance_scale(model: Any) -> float:
    """The scale generation uses unless told: 1 (one pass) for a guidance-distilled student, else the model's
    ``generation_config.guidance_scale`` (3 for MusicGen's checkpoints)."""
    if guidance_distilled_scale(model) is not None:
        return 1.0
    scale = getattr(getattr(model, "generation_config", None), "guidance_scale", None)
    return float(scale) if scale is not None else DEFAULT_GUIDANCE_SCALE


def resolve_guidance_scale(model: Any, guidance_scale: float | None) -> float:
    """``guidance_scale``, or the model's default when None; below 1 is an error (1 = one pass, no guidance)."""
    scale = default_guidance_scale(model) if guidance_scale is None else float(guidance_scale)
    if not scale >= 1.0:
        raise ValueError(
            f"guidance_scale={guidance_scale}: must be >= 1 (1 = no guidance, one pass per step)"
        )
    return scale


def set_guidance_distilled(model: MusicgenForConditionalGeneration, guidance_scale: float | None) -> None:
    """Record on ``model`` (config.json and generation_config.json once saved) that it learnt the guided
    distribution at ``guidance_scale``: its default generation is then one conditional pass per step (also
    transformers' own ``generate``). None: an ordinary student again (a marked one distilled without guidance)."""
    if guidance_scale is not None:
        setattr(model.config, GUIDANCE_DISTILLED, float(guidance_scale))
        model.generation_config.guidance_scale = 1.0
    elif guidance_distilled_scale(model) is not None:
        delattr(model.config, GUIDANCE_DISTILLED)
        model.generation_config.guidance_scale = DEFAULT_GUIDANCE_SCALE


@dataclass
class TeacherForcing:
    """One batch ready for teacher forcing: the delayed codes and the raw T5 states, computed once and shared by
    every model scored on it (student and teacher in training; full precision and quantized in fidelity)."""

    delayed: DelayedCodes
    text_hidden: torch.Tensor  # [B, S, D_text], padding zeroed
    text_mask: torch.Tensor  # [B, S]

    def logits(self, model: MusicgenForConditionalGeneration, guidance_scale: float = 1.0) -> torch.Tensor:
        """``model``'s teacher-forced logits ``[B, K, T + K - 1, V]`` on this batch.

        ``guidance_scale > 1``: the guided logits (fp32), from the conditional and the unconditional pass run
        as one doubled batch, exactly what MusicGen's ``generate`` samples from at each step.
        """
        if guidance_scale == 1.0:
            return decoder_logits(model, self.text_hidden, self.text_mask, self.delayed.inputs)
        hidden, mask = with_unconditional(self.text_hidden, self.text_mask)
        inputs = torch.cat([self.delayed.inputs, self.delayed.inputs])
        cond, uncond = decoder_logits(model, hidden, mask, inputs).chunk(2)
        return guided(cond, uncond, guidance_scale)


def teacher_forcing(
    model: MusicgenForConditionalGeneration, batch: dict[str, torch.Tensor]
) -> TeacherForcing:
    """Delay ``batch["codes"] [B, K, T]`` (true lengths ``batch["lengths"]`` if given) and encode its captions
    with ``model``'s frozen T5 (``input_ids``, ``attention_mask``)."""
    delayed = delay_pattern(batch["codes"], model.config.decoder.pad_token_id, batch.get("lengths"))
    with torch.no_grad():
        hidden = encode_text(model, batch["input_ids"], batch["attention_mask"])
    return TeacherForcing(delayed, hidden, batch["attention_mask"])


def codec_encode(model: MusicgenForConditionalGeneration, audio: torch.Tensor) -> torch.Tensor:
    """Mono audio ``[B, samples]`` at the codec's rate -> codes ``[B, K, T]``."""
    codes = model.audio_encoder.encode(audio[:, None, :]).audio_codes  # [frames=1, B, K, T]
    return codes[0]


def codec_decode(model: MusicgenForConditionalGeneration, codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[B, K, T]`` -> audio ``[B, samples]``."""
    audio = model.audio_encoder.decode(codes[None], [None]).audio_values
    return audio[:, 0]


def codec_hop(config: EncodecConfig) -> int:
    """Audio samples per codec frame (320 for the tiny codec at 16 kHz, 640 for EnCodec 32 kHz)."""
    return math.prod(int(r) for r in config.upsampling_ratios)


def min_frames(model: MusicgenForConditionalGeneration) -> int:
    """Shortest clip, in codec frames, that every backend generates: the delay pattern needs K frames, and the
    exported codec decoder's first convolution reflect-pads ``kernel_size - 1`` frames (7 at 50 Hz = 0.14 s)."""
    return max(model.decoder.config.num_codebooks, int(model.config.audio_encoder.kernel_size))


def max_frames(model: MusicgenForConditionalGeneration) -> int:
    """Longest clip in codec frames: the delayed sequence (frames + K - 1 steps) must fit the position table,
    a fixed table in the exported graph too (manifest.json's max_frames), so every backend has this limit."""
    decoder = model.decoder.config
    return int(decoder.max_position_embeddings - decoder.num_codebooks + 1)
