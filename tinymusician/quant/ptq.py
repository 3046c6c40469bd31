"""Post-training quantization of a MusicGen model by a :class:`PrecisionPlan` (PyTorch, CPU).

:func:`apply_plan` changes a model in place; :func:`quantize_model` does it on a copy, so the full-precision
model is never touched. The same function rebuilds the architecture when a bundle is loaded back
(:mod:`tinymusician.quant.bundle`), so the quantized state dict always meets the modules that made it.

Mixed precisions need casts where activations cross from one dtype to another. They are installed as
forward hooks, so they also hold inside ``generate``, which does not go through our ``decoder_logits``:
T5 (any dtype) -> ``enc_to_dec_proj`` (its own dtype) -> decoder (its dtype) -> logits (fp32), and into and
out of every decoder block whose precision differs from the rest of the decoder.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import MusicgenForConditionalGeneration

from tinymusician.quant.plan import COMPUTE_DTYPES, PlanError, PrecisionPlan

log = logging.getLogger(__name__)

PLAN_ATTRIBUTE = "precision_plan"  # set on quantized models: the plan they were built with


class CodecEncoderRemoved(nn.Module):
    """Stands in for EnCodec's encoder in quantized models: generation only decodes codes.

    Encoding audio (audio prompts, building a token cache) needs the full-precision student.
    """

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "this quantized MusicGen has no EnCodec encoder (bundles keep only what text-to-music generation "
            "needs); encode audio with the full-precision student instead"
        )


def decoder_blocks(model: MusicgenForConditionalGeneration) -> nn.ModuleList:
    """The decoder's transformer blocks (``MusicgenDecoderLayer``)."""
    return model.decoder.model.decoder.layers


def _cast_floats(value, dtype: torch.dtype):
    """Cast floating tensors (also inside tuples/lists) to ``dtype``, clamped to its range.

    The clamp keeps additive masks finite: fp32's most negative value would become -inf in fp16, and a fully
    masked row (CFG's null condition) would then give NaN attention weights.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dtype == dtype:
            return value
        if torch.finfo(dtype).max < torch.finfo(value.dtype).max:
            info = torch.finfo(dtype)
            value = value.clamp(info.min, info.max)
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


class CastInputs:
    """Forward pre-hook: floating tensor inputs (positional and keyword) -> ``dtype``."""

    def __init__(self, dtype: torch.dtype, keys: tuple[str, ...] | None = None) -> None:
        self.dtype, self.keys = dtype, keys

    def __call__(self, module, args, kwargs):
        if self.keys is None:
            args = _cast_floats(args, self.dtype)
            kwargs = {k: _cast_floats(v, self.dtype) for k, v in kwargs.items()}
        else:
            kwargs = {k: _cast_floats(v, self.dtype) if k in self.keys else v for k, v in kwargs.items()}
        return args, kwargs


class CastOutput:
    """Forward hook: a tensor output -> ``dtype``; for model outputs, only the field named ``key``."""

    def __init__(self, dtype: torch.dtype, key: str | None = None) -> None:
        self.dtype, self.key = dtype, key

    def __call__(self, module, args, output):
        if self.key is None:
            return _cast_floats(output, self.dtype)
        if getattr(output, self.key, None) is not None:
            setattr(output, self.key, getattr(output, self.key).to(self.dtype))
            if isinstance(output, dict):
                output[self.key] = getattr(output, self.key)
        return output


@contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """torch.ao's eager quantization warns that it is deprecated (in favour of torchao) on every call,
    and loading quantized tensors goes through torch's deprecated TypedStorage."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        yield


def quantize_linears(module: nn.Module, names: list[str]) -> None:
    """Dynamic int8 (per-output-channel weight scales) on the named ``nn.Linear`` children, in place.

    Accurate on every CPU with torch's default engine, so no engine is forced here. On x86 (``x86`` /
    ``fbgemm``) uint8 activations meet int8 weights in VPMADDUBSW, whose pairwise 16-bit sums saturate on AVX2
    without VNNI (what breaks ONNX Runtime's U8S8 kernel, see :mod:`tinymusician.onnx.export`); torch.ao's
    dynamic Linear quantizes activations to 7 bits there (``reduce_range=True``), which keeps every pair below
    2**15, so the product is exact. qnnpack (ARM's default) computes 8-bit activations exactly and ignores
    ``reduce_range``. Measured on the tiny models (teacher-forced relative logit error, this AVX2 CPU): fbgemm
    0.012, qnnpack 0.008-0.009, both matching a float emulation of the exact integer product.
    tests/quant/test_quant_ptq.py checks both engines with worst-case operands.
    """
    if not names:
        return
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with quiet_torch_ao():
        quantize_dynamic(
            module, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True
        )


def _linear_names(module: nn.Module, prefix: str = "") -> list[str]:
    return [f"{prefix}{name}" for name, child in module.named_modules() if type(child) is nn.Linear and name]


def _set_precision(module: nn.Module, precision: str) -> None:
    """Cast a whole sub-model to a float precision, or int8-quantize its Linear layers (rest stays fp32)."""
    if precision == "int8":
        quantize_linears(module, _linear_names(module))
    elif precision != "fp32":
        module.to(COMPUTE_DTYPES[precision])


def apply_plan(
    model: MusicgenForConditionalGeneration, plan: PrecisionPlan
) -> MusicgenForConditionalGeneration:
    """Quantize ``model`` in place by ``plan`` (fp32 input expected); drops EnCodec's encoder; returns it."""
    if getattr(model, PLAN_ATTRIBUTE, None) is not None:
        raise PlanError(f"this model is already quantized ({getattr(model, PLAN_ATTRIBUTE).describe()})")
    blocks = decoder_blocks(model)
    out_of_range = [index for index in plan.decoder_blocks if index >= len(blocks)]
    if out_of_range:
        raise PlanError(
            f"plan overrides decoder blocks {out_of_range}, but the decoder has {len(blocks)} blocks "
            f"(0-{len(blocks) - 1})"
        )
    model.eval()
    model.audio_encoder.encoder = CodecEncoderRemoved()

    _set_precision(model.text_encoder, plan.text_encoder)
    _set_precision(model.audio_encoder, plan.codec)

    # Decoder: each part is cast on its own (never the decoder as a whole), so an fp32 block shared with the
    # original model by quantize_model(share_unchanged=True) is never converted in place.
    base = COMPUTE_DTYPES[plan.decoder]
    proj = getattr(model, "enc_to_dec_proj", None)
    if base != torch.float32:
        for part in decoder_outer_parts(model):
            part.to(base)
    int8_names: list[str] = []
    for index, block in enumerate(blocks):
        precision = plan.block_precision(index)
        block_dtype = COMPUTE_DTYPES[precision]
        if block_dtype != torch.float32:
            block.to(block_dtype)
        if block_dtype != base:
            block.register_forward_pre_hook(CastInputs(block_dtype), with_kwargs=True)
            block.register_forward_hook(CastOutput(base))
        if precision == "int8":
            int8_names += _linear_names(block, prefix=f"model.decoder.layers.{index}.")
    if plan.decoder == "int8":
        # Everything outside the blocks: the LM heads. enc_to_dec_proj stays float (it is tiny, and our
        # decoder_logits reads its weight dtype).
        int8_names += [
            name for name in _linear_names(model.decoder) if not name.startswith("model.decoder.layers.")
        ]
    quantize_linears(model.decoder, int8_names)

    # Boundaries that exist in generate() as well as in decoder_logits().
    if proj is not None:
        proj.register_forward_pre_hook(CastInputs(base), with_kwargs=True)
    model.decoder.register_forward_pre_hook(
        CastInputs(base, keys=("encoder_hidden_states",)), with_kwargs=True
    )
    model.decoder.register_forward_hook(CastOutput(torch.float32, key="logits"))
    setattr(model, PLAN_ATTRIBUTE, plan)
    return model


def quantize_model(
    model: MusicgenForConditionalGeneration,
    plan: PrecisionPlan,
    share_unchanged: bool = False,
) -> MusicgenForConditionalGeneration:
    """A quantized copy of ``model``; the original is left exactly as it was.

    ``share_unchanged`` lets the copy reuse the original's tensors in the parts the plan keeps in fp32
    (cheap copies for a sensitivity search). Those tensors are then shared: do not train either model.
    """
    memo: dict[int, object] = {}
    if share_unchanged:
        for module in unchanged_parts(model, plan):
            for tensor in [*module.parameters(), *module.buffers()]:
                memo[id(tensor)] = tensor
    quantized = copy.deepcopy(model, memo)
    return apply_plan(quantized, plan)


def decoder_outer_parts(model: MusicgenForConditionalGeneration) -> list[nn.Module]:
    """The decoder's parts outside its blocks: embeddings, final norm, LM heads, ``enc_to_dec_proj``."""
    inner = model.decoder.model.decoder
    parts = [module for name, module in inner.named_children() if name != "layers"]
    parts.append(model.decoder.lm_heads)
    if getattr(model, "enc_to_dec_proj", None) is not None:
        parts.append(model.enc_to_dec_proj)
    return parts


def unchanged_parts(model: MusicgenForConditionalGeneration, plan: PrecisionPlan) -> list[nn.Module]:
    """Sub-modules that ``plan`` leaves in fp32 untouched (safe to share between a model and its copy)."""
    parts: list[nn.Module] = []
    if plan.text_encoder == "fp32":
        parts.append(model.text_encoder)
    if plan.codec == "fp32":
        parts.append(model.audio_encoder)
    if plan.decoder == "fp32":
        parts += decoder_outer_parts(model)
    parts += [
        block for index, block in enumerate(decoder_blocks(model)) if plan.block_precision(index) == "fp32"
    ]
    return parts
