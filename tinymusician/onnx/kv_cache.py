"""Per-channel scales for the fast decoder's int8 self-attention cache, calibrated on the model's own music.

The cache is what a step reads besides the weights, and it grows with the clip: in fp32, MusicGen-Small's
(24 layers, keys and values, 2 rows with guidance, 1024 channels) is 393 KB per position, so at the end of a 10 s
clip a step reads 196 MB of cache beside its 455 MB of int8 weights. int8 storage (ONNX Runtime's
GroupQueryAttention dequantizes it as it reads, attention stays fp32) cuts that to a quarter. A channel's scale is
the largest magnitude its key (or value) projection reached while the model generated from a few prompts, with
headroom for larger ones later (those saturate at int8's range), over 127.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import MusicgenForConditionalGeneration, PreTrainedTokenizerBase

from tinymusician.models.generation import torch_generate
from tinymusician.models.musicgen import max_frames, min_frames

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = (
    "calm piano with soft drums",
    "loud fast electric guitar rock",
    "ambient synth pads, slow and dreamy",
    "upbeat dance track with heavy bass",
)
CALIBRATION_SECONDS = 4.0
HEADROOM = 1.25  # scale = HEADROOM * max |x| / 127: room for magnitudes the calibration did not reach


def calibrate_kv_scales(
    model: MusicgenForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    seconds: float = CALIBRATION_SECONDS,
    headroom: float = HEADROOM,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[layers, 2 (key, value), H * D]`` scales from ``model``'s own sampled generation (its default guidance,
    so the unconditional rows' keys and values count too), and how they were calibrated (for the manifest)."""
    layers = model.decoder.model.decoder.layers
    width = model.decoder.config.hidden_size
    amax = torch.zeros(len(layers), 2, width)

    def recorder(index: int, kind: int):  # noqa: ANN202
        def hook(module, inputs, output) -> None:  # noqa: ANN001
            seen = output.detach().abs().float().reshape(-1, width).amax(dim=0)
            amax[index, kind] = torch.maximum(amax[index, kind], seen)

        return hook

    handles = [
        projection.register_forward_hook(recorder(index, kind))
        for index, layer in enumerate(layers)
        for kind, projection in enumerate((layer.self_attn.k_proj, layer.self_attn.v_proj))
    ]
    frame_rate = model.config.audio_encoder.frame_rate
    frames = min(max(round(seconds * frame_rate), min_frames(model)), max_frames(model))
    started = time.perf_counter()
    try:
        torch_generate(model, tokenizer, list(prompts), frames, seed=seed)
    finally:
        for handle in handles:
            handle.remove()
    log.info("calibrated the int8 KV cache on %d prompts x %d frames in %.1f s", len(prompts), frames,
             time.perf_counter() - started)  # fmt: skip
    scales = amax.clamp_min(1e-8) * headroom / 127
    facts = {
        "prompts": len(prompts),
        "frames": frames,
        "seed": seed,
        "scale": f"{headroom:g} x max |x| / 127 per channel, sampled with the model's default guidance",
    }
    return scales, facts
