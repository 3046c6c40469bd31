"""Size accounting per component, from the state dict (what a bundle stores), quantized tensors included.

MB are 10^6 bytes. Parts: ``text_encoder`` (T5), ``decoder`` (incl. ``enc_to_dec_proj``), ``codec`` (EnCodec
decoder + codebooks: what generation needs) and ``codec_encoder`` (EnCodec's encoder: 0 in a quantized bundle).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MusicgenForConditionalGeneration

SIZE_PARTS = ("text_encoder", "decoder", "codec", "codec_encoder")
MB = 1e6


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes to store ``tensor``; a quantized tensor counts its int8 values and its scales/zero points."""
    values = tensor.numel() * tensor.element_size()
    if not tensor.is_quantized:
        return values
    if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales = tensor.q_per_channel_scales()
        points = tensor.q_per_channel_zero_points()
        return values + scales.numel() * scales.element_size() + points.numel() * points.element_size()
    return values + 16  # one float64 scale, one int64 zero point


def _tensors(value) -> list[torch.Tensor]:
    """Tensors in a state-dict value (torch.ao's packed params are tuples of tensors)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def state_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state dict; tensors shared under several names (tied weights) count once."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for value in module.state_dict().values():
        for tensor in _tensors(value):
            key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += tensor_bytes(tensor)
    return total


def component_parts(model: MusicgenForConditionalGeneration) -> dict[str, list[nn.Module]]:
    codec = model.audio_encoder
    decoder = [model.decoder]
    if getattr(model, "enc_to_dec_proj", None) is not None:
        decoder.append(model.enc_to_dec_proj)
    return {
        "text_encoder": [model.text_encoder],
        "decoder": decoder,
        "codec": [child for name, child in codec.named_children() if name != "encoder"],
        "codec_encoder": [codec.encoder],
    }


def component_sizes(model: MusicgenForConditionalGeneration) -> dict[str, float]:
    """MB per part and ``total``."""
    sizes = {
        part: sum(state_bytes(module) for module in modules) / MB
        for part, modules in component_parts(model).items()
    }
    sizes["total"] = sum(sizes.values())
    return sizes


def size_report(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per-part sizes before/after and reductions (1 - after/before).

    ``reduction["total"]`` compares the bundle with the whole fp32 model; ``reduction["deployed"]`` compares
    the same parts on both sides (without the EnCodec encoder), i.e. what quantization alone saved.
    """
    deployed_before = before["total"] - before["codec_encoder"]
    deployed_after = after["total"] - after["codec_encoder"]
    reduction = {
        part: (1.0 - after[part] / before[part]) if before[part] > 0 else 0.0
        for part in (*SIZE_PARTS, "total")
    }
    reduction["deployed"] = 1.0 - deployed_after / deployed_before if deployed_before > 0 else 0.0
    return {
        "before_mb": {k: round(v, 3) for k, v in before.items()},
        "after_mb": {k: round(v, 3) for k, v in after.items()},
        "reduction": {k: round(v, 4) for k, v in reduction.items()},
    }
