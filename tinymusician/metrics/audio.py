"""Audio plumbing for the metrics: input checks, mono downmix, quality resampling, reading WAV folders.

Clips travel as mono float32 tensors ``[samples]``; every embedder gets them at its own rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")

AudioInput = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


class AudioInputError(ValueError):
    """Audio a metric cannot score (empty, non-finite, too short, wrong shape); the message says which clip."""


def resample(audio: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited polyphase resampling along the last axis (``scipy.signal.resample_poly``, Kaiser window).

    Exact rational ratios (e.g. 32 kHz -> 48 kHz is 3/2), so a tone keeps its frequency and nothing above the
    new Nyquist folds back. Computed in float64 on the CPU; the result has ``audio``'s dtype and device.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise AudioInputError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return audio
    gcd = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // gcd, int(orig_rate) // gcd
    out = resample_poly(audio.detach().double().cpu().numpy(), up, down, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=audio.device, dtype=audio.dtype)


def split_clips(audio: AudioInput) -> list[torch.Tensor]:
    """Clips as ``[channels, samples]`` tensors from a ``[S]``/``[B, S]``/``[B, C, S]`` tensor or a list.

    A 2-D tensor is a batch of mono clips; a list holds ``[S]`` or ``[C, S]`` clips of any lengths.
    """
    if isinstance(audio, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(audio)
        if tensor.dim() == 1:
            return [tensor[None]]
        if tensor.dim() == 2:
            return [clip[None] for clip in tensor]
        if tensor.dim() == 3:
            return list(tensor)
        raise AudioInputError(
            f"audio tensor of shape {tuple(tensor.shape)}: expected [samples], [batch, samples] "
            "or [batch, channels, samples]"
        )
    clips = []
    for index, clip in enumerate(audio):
        tensor = torch.as_tensor(clip)
        if tensor.dim() not in (1, 2):
            raise AudioInputError(
                f"clip {index} has shape {tuple(tensor.shape)}: expected [samples] or [channels, samples]"
            )
        clips.append(tensor if tensor.dim() == 2 else tensor[None])
    return clips


def prepare_clips(
    audio: AudioInput,
    sample_rate: int,
    target_rate: int,
    *,
    min_seconds: float = 0.0,
    who: str = "this metric",
) -> list[torch.Tensor]:
    """Check, downmix to mono and resample: mono float32 ``[samples]`` clips at ``target_rate``.

    Raises :class:`AudioInputError` naming the clip for an empty batch, an empty clip, NaN/inf samples or a
    clip shorter than ``min_seconds`` (the embedder's analysis window).
    """
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioInputError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    clips = split_clips(audio)
    if not clips:
        raise AudioInputError(f"no audio clips given to {who}")
    prepared = []
    for index, clip in enumerate(clips):
        if clip.numel() == 0 or clip.shape[-1] == 0:
            raise AudioInputError(f"clip {index} is empty (0 samples); {who} needs audio")
        if not clip.is_floating_point():
            clip = clip.float() / (torch.iinfo(clip.dtype).max if clip.dtype != torch.bool else 1.0)
        if not torch.isfinite(clip).all():
            bad = int((~torch.isfinite(clip)).sum())
            raise AudioInputError(
                f"clip {index} contains {bad} NaN or infinite samples; {who} needs finite audio"
            )
        seconds = clip.shape[-1] / sample_rate
        if seconds < min_seconds:
            raise AudioInputError(
                f"clip {index} is {seconds:.3f} s long ({clip.shape[-1]} samples at {sample_rate} Hz), shorter "
                f"than the {min_seconds:.3f} s analysis window of {who}; give longer clips"
            )
        mono = clip.float().mean(dim=0)
        prepared.append(resample(mono, int(sample_rate), int(target_rate)))
    return prepared


def list_audio_files(directory: str | Path) -> list[Path]:
    """Sorted audio files (``.wav``/``.flac``/``.ogg``) directly inside ``directory``; fails if there are none."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"audio folder {str(path)!r} does not exist or is not a directory")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise AudioInputError(
            f"audio folder {str(path)!r} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})"
        )
    return files


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """One file as float32 ``[channels, samples]`` and its sample rate."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise AudioInputError(f"cannot read audio file {str(path)!r}: {err}") from err
    return torch.from_numpy(data.T.copy()), int(rate)


def write_wav(path: str | Path, audio: torch.Tensor, sample_rate: int) -> Path:
    """Mono ``[samples]`` float audio to a 16-bit PCM WAV (clipped to [-1, 1])."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = audio.detach().float().cpu().clamp(-1.0, 1.0).numpy()
    sf.write(str(path), data, int(sample_rate), subtype="PCM_16")
    return path
