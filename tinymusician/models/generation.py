"""Text to codes to audio with PyTorch: transformers' MusicGen ``generate`` for an exact number of frames.

The one place PyTorch generation lives (the ``generate`` and ``evaluate`` CLIs, the evaluation callback and the
ONNX export check call it). torch and transformers are imported inside the functions, so the torch-free ONNX
runtime can share :class:`GenerationError` without importing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class GenerationError(ValueError):
    """Generation arguments that cannot work (empty prompt, too short or too long)."""


def check_frames(model: Any, frames: int) -> None:
    """Fail with a clear error unless ``frames`` lies between ``min_frames`` and ``max_frames`` of ``model``."""
    from tinymusician.models.musicgen import max_frames, min_frames

    rate = int(model.config.audio_encoder.frame_rate)
    least, most = min_frames(model), max_frames(model)
    if frames < least:
        raise GenerationError(
            f"{frames} frames is too short: at least {least} ({least / rate:.2f} s at {rate} Hz); "
            "ask for more seconds"
        )
    if frames > most:
        raise GenerationError(
            f"{frames} frames ({frames / rate:.1f} s at {rate} Hz) is too long: the decoder's position table "
            f"(max_position_embeddings={model.decoder.config.max_position_embeddings}) holds at most {most} "
            f"frames ({most / rate:.1f} s), as in the ONNX bundle; ask for fewer seconds"
        )


def torch_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    frames: int,
    *,
    guidance_scale: float | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    max_text_tokens: int = 256,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``generate`` for exactly ``frames`` codec frames -> (audio ``[B, samples]``, codes ``[B, K, T]``).

    The codes are taken where ``generate`` hands them to the codec decoder, so they are transformers' own.
    ``top_k=None``: the model's ``generation_config.top_k`` (250 for MusicGen's checkpoints).
    ``guidance_scale=None``: the model's default (1, one pass per step, for a guidance-distilled student; else 3).
    """
    import torch

    from tinymusician.models.musicgen import resolve_guidance_scale

    if top_k is None:
        top_k = getattr(model.generation_config, "top_k", None) or 250

    if any(not p.strip() for p in prompts) or not prompts:
        raise GenerationError("empty prompt: describe the music to generate")
    check_frames(model, frames)
    try:
        guidance_scale = resolve_guidance_scale(model, guidance_scale)
    except ValueError as err:
        raise GenerationError(str(err)) from err
    num_codebooks = model.decoder.config.num_codebooks
    text = tokenizer(
        list(prompts), padding=True, truncation=True, max_length=max_text_tokens, return_tensors="pt"
    ).to(next(model.parameters()).device)
    captured: list[torch.Tensor] = []
    codec = model.audio_encoder
    patched = "decode" in vars(codec)  # someone else's instance-level patch, restored afterwards
    previous = vars(codec).get("decode")
    original_decode = codec.decode

    def decode(audio_codes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        captured.append(audio_codes[0].clone())
        return original_decode(audio_codes, *args, **kwargs)

    bar = None
    streamer = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=frames + num_codebooks - 1, desc="Generating", unit="step")

        class Progress:  # transformers' streamer protocol: put() per step (the BOS first), end() at the end
            first = True

            def put(self, value: torch.Tensor) -> None:
                if self.first:
                    self.first = False
                    return
                bar.update(1)

            def end(self) -> None:
                pass

        streamer = Progress()
    codec.decode = decode
    try:
        with torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            audio = model.generate(
                **text,
                do_sample=do_sample,
                guidance_scale=guidance_scale,
                temperature=temperature if do_sample else None,
                top_k=top_k if do_sample else None,
                max_new_tokens=frames + num_codebooks - 1,
                streamer=streamer,
            )
    finally:
        if patched:
            codec.decode = previous
        else:
            del codec.decode  # back to the class method
        if bar is not None:
            bar.close()
    audio = getattr(audio, "sequences", audio)
    return audio.float().mean(dim=1).cpu().numpy(), captured[0].cpu().numpy()
