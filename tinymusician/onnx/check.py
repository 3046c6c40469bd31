"""After export: reload the bundle as a user would, compare greedy generation with PyTorch's and measure how
far each precision's logits are from full precision along the same codes (teacher forcing).

Greedy agreement alone is a weak test of quantization: near-tied logits (a random or barely trained model)
flip at the first step and the runs diverge. The relative logit error below is measured along fixed codes
through the same KV-cache loop the runtime uses, so it stays comparable between models and CPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinymusician.onnx.runtime import (
    TinyMusicianONNX,
    delay_pattern_mask,
    has_fast_decoder,
    read_manifest,
)

CHECK_PROMPTS = ("a calm piano melody with soft drums", "fast loud electric guitar")
# Relative logit error (see relative_logit_error) allowed per precision, for any model. Measured on the tiny
# student / trained teacher (this AVX2 CPU without VNNI): int8 0.007 / 0.006, int4 0.087 / 0.038; every weight
# scale off by 10%: int8 0.10 / 0.11; ONNX Runtime's saturating U8S8 kernel (the old int8 format): 0.24 / 0.04.
# fp32 is a parity check of the export (~1e-6).
MAX_RELATIVE_ERROR = {"fp32": 1e-3, "int8": 0.05, "int4": 0.2}


def delayed_sequence(codes: np.ndarray, pad: int, start: int) -> np.ndarray:
    """Aligned codes ``[B, K, T]`` -> the delayed decoder sequence ``[B, K, T + K]`` (start token first)."""
    batch, num_codebooks, frames = codes.shape
    pattern = delay_pattern_mask(num_codebooks, frames, pad)
    sequence = np.broadcast_to(pattern, (batch, *pattern.shape)).copy()
    for k in range(num_codebooks):
        sequence[:, k, k + 1 : k + 1 + frames] = codes[:, k]
    sequence[:, :, 0] = start
    return sequence


def forced_logits(
    runtime: TinyMusicianONNX, prompts: Sequence[str], codes: np.ndarray, guidance_scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Decoder logits ``[S, R, V]`` of a bundle fed fixed codes step by step through its KV cache.

    ``codes [B, K, T]``; S = T + K - 1 steps; R = B*K rows, doubled (unconditional half) when guided, in the
    runtime's order. Also returns ``generated [S, R]``: True where the step predicts a real code (not the
    delay pattern's padding). The text states come from the bundle's own text encoder of that precision.
    """
    facts = runtime.facts
    batch, num_codebooks, frames = codes.shape
    input_ids, mask = runtime.encode_prompts(list(prompts))
    states = runtime.encode_text(input_ids, mask).astype(np.float32)
    guided = guidance_scale is not None and guidance_scale > 1
    if guided:
        states, mask = (
            np.concatenate([states, np.zeros_like(states)]),
            np.concatenate([mask, np.zeros_like(mask)]),
        )
    sequence = delayed_sequence(codes, facts["pad_token_id"], facts["decoder_start_token_id"])
    generated = delay_pattern_mask(num_codebooks, frames, facts["pad_token_id"])[:, 1:] == -1  # [K, S]
    steps = sequence.shape[-1] - 1
    decode = runtime.decoder_steps(states, mask, steps)
    logits = []
    for step in range(steps):
        ids = sequence[:, :, step].reshape(batch * num_codebooks, 1)
        logits.append(decode(np.concatenate([ids, ids]) if guided else ids, step).copy())
    rows = np.tile(generated.T, (1, batch * (2 if guided else 1)))  # [S, R]: row r is codebook r % K
    return np.stack(logits), rows


def torch_forced_logits(
    model: Any, tokenizer: Any, prompts: Sequence[str], codes: np.ndarray, guidance_scale: float = 3.0
) -> np.ndarray:
    """PyTorch's fp32 logits ``[S, R, V]`` for the same inputs as :func:`forced_logits` (one full forward)."""
    import torch

    from tinymusician.models.musicgen import decoder_logits, encode_text, with_unconditional

    config = model.decoder.config
    text = tokenizer(list(prompts), padding=True, return_tensors="pt")
    sequence = delayed_sequence(codes, config.pad_token_id, model.generation_config.decoder_start_token_id)
    inputs = torch.from_numpy(sequence[..., :-1])
    with torch.inference_mode():
        hidden = encode_text(model, text["input_ids"], text["attention_mask"])
        mask = text["attention_mask"]
        if guidance_scale is not None and guidance_scale > 1:
            hidden, mask = with_unconditional(hidden, mask)
            inputs = torch.cat([inputs, inputs])
        logits = decoder_logits(model, hidden, mask, inputs).float()  # [B', K, S, V]
    batch, num_codebooks, steps, vocab = logits.shape
    return logits.permute(2, 0, 1, 3).reshape(steps, batch * num_codebooks, vocab).numpy()


def compare_greedy(
    runtime: TinyMusicianONNX,
    frames: int,
    reference: tuple[np.ndarray, np.ndarray],
    guidance_scale: float,
) -> dict[str, float]:
    """Greedy codes of the bundle vs the PyTorch ``reference`` (audio, codes): fraction equal, max audio difference."""
    audio, codes = runtime.generate(
        list(CHECK_PROMPTS),
        frames / runtime.frame_rate,
        guidance_scale=guidance_scale,
        do_sample=False,
        return_codes=True,
    )
    ref_audio, ref_codes = reference
    return {
        "codes_equal": float((codes == ref_codes).mean()),
        "max_audio_diff": float(np.abs(audio - ref_audio).max()),
        "finite": bool(np.isfinite(audio).all()),
    }


def relative_logit_error(reference: np.ndarray, candidate: np.ndarray, where: np.ndarray) -> dict[str, float]:
    """How far ``candidate`` logits are from ``reference`` relative to the reference's own spread.

    Over the positions in ``where``: ||c - r||/||r|| after removing each position's mean over the vocabulary
    (a constant shift does not change a softmax), so 0 is identical, 1 is an error as large as the logits'
    variation; also top-1 agreement and the largest absolute difference.
    """
    ref, got = reference[where].astype(np.float64), candidate[where].astype(np.float64)
    diff = got - ref
    diff -= diff.mean(axis=-1, keepdims=True)
    spread = ref - ref.mean(axis=-1, keepdims=True)
    return {
        "relative_error": float(np.sqrt((diff**2).sum() / max((spread**2).sum(), 1e-30))),
        "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "max_abs_diff": float(np.abs(got - ref).max()),
        "positions": int(where.sum()),
    }


def check_bundle(
    model: Any, bundle: str | Path, precisions: list[str], guidance_scale: float = 3.0
) -> dict[str, tuple[str, bool]]:
    """Per precision: a summary line and whether it passed.

    Each precision is checked with the merged decoder and, when the bundle has it, the fast one (key
    ``"<precision> fast"``). Passing means: teacher-forced logits within :data:`MAX_RELATIVE_ERROR` of PyTorch's (along PyTorch's greedy
    codes, through the bundle's KV-cache loop), finite audio, and for fp32 identical greedy codes.
    transformers' greedy ``generate`` and the PyTorch logits run once; every precision is compared with them.
    """
    from transformers import AutoTokenizer

    from tinymusician.models.generation import torch_generate

    tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    frames = max(int(read_manifest(Path(bundle))["model"]["min_frames"]), 25)
    prompts = list(CHECK_PROMPTS)
    reference = torch_generate(
        model, tokenizer, prompts, frames, guidance_scale=guidance_scale, do_sample=False
    )
    reference_logits = torch_forced_logits(model, tokenizer, prompts, reference[1], guidance_scale)
    manifest = read_manifest(Path(bundle))
    lines = {}
    for precision in precisions:
        for decoder in ("merged", "fast") if has_fast_decoder(manifest, precision) else ("merged",):
            runtime = TinyMusicianONNX(bundle, precision=precision, decoder=decoder)
            logits, generated = forced_logits(runtime, prompts, reference[1], guidance_scale)
            error = relative_logit_error(reference_logits, logits, generated)
            limit = MAX_RELATIVE_ERROR[precision]
            result = compare_greedy(runtime, frames, reference, guidance_scale)
            line = (
                f"teacher-forced logits vs PyTorch: relative error {error['relative_error']:.4f} "
                f"(max {limit:g}), top-1 {error['top1_agree']:.4f}; greedy {frames} frames x {len(prompts)} "
                f"prompts: codes equal {result['codes_equal']:.4f}, max |audio diff| "
                f"{result['max_audio_diff']:.2e}, finite {result['finite']}"
            )
            ok = (
                result["finite"]
                and error["relative_error"] <= limit
                and (precision != "fp32" or result["codes_equal"] == 1.0)
            )
            lines[precision if decoder == "merged" else f"{precision} fast"] = (line, ok)
    return lines
