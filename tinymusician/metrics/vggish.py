"""The VGGish network (Hershey et al. 2017) from scratch: its log-mel front end, the layers in torchvggish's
state-dict layout, and the reader of torchvggish's weight file (``vggish-10086976.pth``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn


class VGGishError(ValueError):
    """Weights or layer sizes that are not VGGish's; the message says what was expected."""


VGGISH_RATE = 16000
VGGISH_WINDOW = 400  # 25 ms STFT window
VGGISH_HOP = 160  # 10 ms
VGGISH_FFT = 512
VGGISH_MELS = 64
VGGISH_PATCH = 96  # frames per example: 0.96 s, examples do not overlap
VGGISH_WEIGHTS_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
_CONV_INDICES = (0, 3, 6, 8, 11, 13)  # conv layers in torchvggish's `features` Sequential
_LINEAR_INDICES = (0, 2, 4)


@lru_cache(maxsize=1)
def vggish_mel_matrix() -> torch.Tensor:
    """``[257, 64]`` triangular HTK-mel weights over 125-7500 Hz, computed on linear FFT bins; DC bin zero."""

    def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log1p(hz / 700.0)

    num_bins = VGGISH_FFT // 2 + 1
    bins_mel = hz_to_mel(torch.linspace(0.0, VGGISH_RATE / 2, num_bins, dtype=torch.float64))[:, None]
    edges = torch.linspace(
        float(hz_to_mel(torch.tensor(125.0))), float(hz_to_mel(torch.tensor(7500.0))), VGGISH_MELS + 2
    ).double()
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = torch.minimum(rising, falling).clamp_min(0.0)
    weights[0] = 0.0
    return weights


def vggish_examples(audio: torch.Tensor) -> torch.Tensor:
    """VGGish's front end: 16 kHz audio ``[B, samples]`` -> log-mel examples ``[B, E, 96, 64]``.

    25 ms periodic-Hann frames every 10 ms, |FFT| with 512 points, 64 mel bands, log(mel + 0.01), then
    non-overlapping 96-frame (0.96 s) examples; a trailing partial example is dropped.
    """
    frames = audio.double().unfold(-1, VGGISH_WINDOW, VGGISH_HOP)  # [B, T, 400], no centring or padding
    window = torch.hann_window(VGGISH_WINDOW, periodic=True, dtype=torch.float64, device=audio.device)
    magnitude = torch.fft.rfft(frames * window, n=VGGISH_FFT).abs()
    log_mel = torch.log(magnitude @ vggish_mel_matrix().to(audio.device) + 0.01)
    examples = log_mel.shape[1] // VGGISH_PATCH
    return log_mel[:, : examples * VGGISH_PATCH].reshape(audio.shape[0], examples, VGGISH_PATCH, VGGISH_MELS)


class VGGish(nn.Module):
    """The VGGish network (Hershey et al. 2017): 6 conv layers in 4 blocks on a 96x64 log-mel patch, then
    3 fully connected layers. Module indices match torchvggish's state dict (``features.0`` ... ``embeddings.4``).

    The embedding is the last linear layer's output without a ReLU, as in the TensorFlow model Google's FAD
    uses (torchvggish adds a ReLU there; ``final_relu=True`` restores it).
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 256, 512, 512),
        hidden: int = 4096,
        dim: int = 128,
        final_relu: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != 6:
            raise VGGishError(f"VGGish has 6 conv layers, got channels={list(channels)}")
        plan: list[int | str] = [channels[0], "M", channels[1], "M", channels[2], channels[3], "M"]
        plan += [channels[4], channels[5], "M"]
        layers: list[nn.Module] = []
        in_channels = 1
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [
            nn.Linear(channels[5] * (VGGISH_PATCH // 16) * (VGGISH_MELS // 16), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        ]
        self.embeddings = nn.Sequential(*head, *([nn.ReLU(inplace=True)] if final_relu else []))

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """Log-mel examples ``[N, 1, 96, 64]`` -> embeddings ``[N, dim]``."""
        x = self.features(examples)  # [N, C, 6, 4]
        x = x.permute(0, 2, 3, 1).flatten(1)  # TensorFlow's NHWC flatten order, which the ported weights use
        return self.embeddings(x)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], final_relu: bool = False) -> VGGish:
        """Build with the layer sizes the state dict implies and load it strictly."""
        required = [f"features.{i}.{p}" for i in _CONV_INDICES for p in ("weight", "bias")]
        required += [f"embeddings.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")]
        missing = [key for key in required if key not in state]
        if missing:
            raise VGGishError(
                f"not a VGGish state dict: missing {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                f"(expected torchvggish's layout, e.g. {VGGISH_WEIGHTS_URL.rsplit('/', 1)[-1]})"
            )
        model = cls(
            channels=[int(state[f"features.{i}.weight"].shape[0]) for i in _CONV_INDICES],
            hidden=int(state["embeddings.0.weight"].shape[0]),
            dim=int(state["embeddings.4.weight"].shape[0]),
            final_relu=final_relu,
        )
        model.load_state_dict({k: v for k, v in state.items() if k in required}, strict=True)
        return model


def read_vggish_weights(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A VGGish state dict via ``torch.load(weights_only=True)`` (tensors only: no code runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"VGGish weight file {str(path)!r} does not exist. Download torchvggish's "
            f"{VGGISH_WEIGHTS_URL.rsplit('/', 1)[-1]} ({VGGISH_WEIGHTS_URL}) and pass its path as `weights`."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if mmap:  # files saved in torch's legacy (non-zip) format cannot be memory-mapped
            return read_vggish_weights(path, mmap=False)
        raise VGGishError(f"cannot read VGGish weights from {str(path)!r}: {err}") from err
    except Exception as err:  # pickle errors, truncated files
        raise VGGishError(f"cannot read VGGish weights from {str(path)!r}: {err}") from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise VGGishError(f"VGGish weights {str(path)!r} hold a {type(state).__name__}, not a state dict")
    return dict(state)
