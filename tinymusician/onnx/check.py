"""After export: reload the bundle as a user would and compare greedy generation with PyTorch's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tinymusician.onnx.runtime import TinyMusicianONNX, read_manifest

CHECK_PROMPTS = ("a calm piano melody with soft drums", "fast loud electric guitar")


def compare_greedy(
    bundle: str | Path,
    precision: str,
    frames: int,
    reference: tuple[np.ndarray, np.ndarray],
    guidance_scale: float,
) -> dict[str, float]:
    """Greedy codes of the bundle vs the PyTorch ``reference`` (audio, codes): fraction equal, max audio difference."""
    runtime = TinyMusicianONNX(bundle, precision=precision)
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


def check_bundle(
    model: Any, bundle: str | Path, precisions: list[str], guidance_scale: float = 3.0
) -> dict[str, tuple[str, bool]]:
    """Per precision: a summary line and whether it passed (fp32: identical codes; all: finite audio).

    transformers' greedy ``generate`` runs once; every precision is compared with that one reference.
    """
    from transformers import AutoTokenizer

    from tinymusician.generate import torch_generate

    tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    frames = max(int(read_manifest(Path(bundle))["model"]["min_frames"]), 25)
    reference = torch_generate(
        model, tokenizer, list(CHECK_PROMPTS), frames, guidance_scale=guidance_scale, do_sample=False
    )
    lines = {}
    for precision in precisions:
        result = compare_greedy(bundle, precision, frames, reference, guidance_scale)
        line = (
            f"greedy {frames} frames x {len(CHECK_PROMPTS)} prompts vs PyTorch: codes equal "
            f"{result['codes_equal']:.4f}, max |audio diff| {result['max_audio_diff']:.2e}, "
            f"finite {result['finite']}"
        )
        ok = result["finite"] and (precision != "fp32" or result["codes_equal"] == 1.0)
        lines[precision] = (line, ok)
    return lines
