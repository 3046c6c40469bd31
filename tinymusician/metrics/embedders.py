"""Audio embedders for FAD and the CLAP score: ``clap``, ``encodec`` and ``vggish``, behind one small registry.

Every embedder turns mono clips (any sample rate: resampled here) into embedding frames ``[frames, dim]``.
Weights load lazily on the first ``embed`` and go away with ``unload()``; an embedder is a plain object,
never an ``nn.Module`` attribute of the LightningModule, so it never enters the student's checkpoint.
Construction is cheap and fails loudly (missing weight file, unknown hub id offline, unknown name).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from tinymusician.metrics.audio import AudioInput, prepare_clips
from tinymusician.metrics.vggish import (
    VGGISH_HOP,
    VGGISH_MELS,
    VGGISH_PATCH,
    VGGISH_RATE,
    VGGISH_WEIGHTS_URL,
    VGGISH_WINDOW,
    VGGish,
    VGGishError,
    read_vggish_weights,
    vggish_examples,
)
from tinymusician.shipped import resolve_tiny

log = logging.getLogger(__name__)


class EmbedderError(ValueError):
    """An embedder that cannot be built or loaded; the message names the setting to fix."""


class AudioEmbedder:
    """Base class: mono audio at :attr:`sample_rate` -> embedding frames ``[frames, dim]`` per clip.

    Subclasses set ``name``, ``sample_rate``, ``dim``, ``min_seconds`` and implement ``_load``, ``_release``
    and ``_embed_batch`` (equal-length clips ``[B, samples]`` -> ``[B, frames, dim]``).
    """

    name: ClassVar[str] = ""
    sample_rate: int
    dim: int
    min_seconds: float = 0.0

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        if batch_size < 1:
            raise EmbedderError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._loaded = False

    # --- subclass hooks -------------------------------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _embed_batch(self, audio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the embeddings depend on; goes into reports and statistics files."""
        return {"name": self.name, "sample_rate": self.sample_rate, "dim": self.dim}

    # --- public -----------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> AudioEmbedder:
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def unload(self) -> None:
        """Free the weights (they reload on the next ``embed``)."""
        if self._loaded:
            self._release()
            self._loaded = False
            gc.collect()

    @torch.inference_mode()
    def embed(self, audio: AudioInput, sample_rate: int, progress: bool = False) -> list[torch.Tensor]:
        """Embedding frames ``[frames, dim]`` (float32, CPU) of each clip, in input order."""
        clips = prepare_clips(
            audio,
            sample_rate,
            self.sample_rate,
            min_seconds=self.min_seconds,
            who=f"the {self.name} embedder",
        )
        self.load()
        by_length: dict[int, list[int]] = {}
        for index, clip in enumerate(clips):
            by_length.setdefault(clip.shape[-1], []).append(index)
        batches = [
            ids[start : start + self.batch_size]
            for ids in by_length.values()
            for start in range(0, len(ids), self.batch_size)
        ]
        out: list[torch.Tensor | None] = [None] * len(clips)
        for ids in tqdm(batches, desc=f"Embedding ({self.name})", unit="batch", disable=not progress):
            frames = self._embed_batch(torch.stack([clips[i] for i in ids]).to(self.device))
            for i, clip_frames in zip(ids, frames, strict=True):
                out[i] = clip_frames.float().cpu()
        return out  # type: ignore[return-value]

    def embed_clips(self, audio: AudioInput, sample_rate: int) -> torch.Tensor:
        """One embedding per clip ``[N, dim]``: the mean of its frames."""
        return torch.stack([frames.mean(dim=0) for frames in self.embed(audio, sample_rate)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _model_config(source: str, setting: str, *, local_only: bool = False) -> Any:
    """The ``config.json`` of a hub id or ``save_pretrained`` dir; clear errors when it is not reachable."""
    from transformers import AutoConfig

    from tinymusician.models.musicgen import ModelSourceError, looks_like_path

    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{setting}={source!r}: directory does not exist; give a save_pretrained directory or a hub id"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{setting}={source!r}: no config.json in this directory, so it is no model"
            )
        return AutoConfig.from_pretrained(str(path))
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelSourceError(
            f"{setting}={source!r}: cannot load it from the Hugging Face hub (offline, or unknown id). Download "
            f"it once where there is internet (`hf download {source}`) into HF_HOME, or save it to a directory "
            f"and pass that path. Cause: {err}"
        ) from err


def _local(source: str) -> str:
    from tinymusician.models.musicgen import looks_like_path

    return str(Path(source).expanduser()) if looks_like_path(source) else source


# ---------------------------------------------------------------------------------------------------------
# CLAP
# ---------------------------------------------------------------------------------------------------------
class ClapEmbedder(AudioEmbedder):
    """LAION CLAP through transformers' ``ClapModel``: 48 kHz audio, L2-normalised ``projection_dim`` vectors.

    Windowing is deterministic: a clip up to the model's window (10 s for LAION) is repeat-padded, as LAION
    does; a longer clip is cut into consecutive windows (the last one aligned to the clip's end) and each
    window is one frame. LAION instead takes one random crop; we never do, so scores are reproducible.
    ``embed_text`` gives the text embeddings the CLAP score compares against.
    """

    name = "clap"
    DEFAULT_SOURCE = "laion/larger_clap_music"
    MAX_TEXT_TOKENS = 77  # LAION's text length

    def __init__(
        self,
        source: str | None = DEFAULT_SOURCE,
        *,
        model: Any = None,
        processor: Any = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        from transformers import ClapProcessor

        source = resolve_tiny(source, "clap")  # `tiny`: the tiny world's CLAP
        if model is None and not source:
            raise EmbedderError(
                "clap embedder: give `source` (hub id or directory of a ClapModel) or a model"
            )
        self.source = source or getattr(getattr(model, "config", None), "name_or_path", "in-memory ClapModel")
        config = model.config if model is not None else _model_config(str(source), "clap source")
        if getattr(config, "model_type", None) != "clap":
            raise EmbedderError(
                f"clap source {self.source!r} is a {config.model_type!r} model, not a CLAP model"
            )
        self._given_model = model
        self._model = model
        if processor is None and not source:
            raise EmbedderError("clap embedder: an in-memory model needs its `processor` (or give `source`)")
        self.processor = (
            processor if processor is not None else ClapProcessor.from_pretrained(_local(str(source)))
        )
        extractor = self.processor.feature_extractor
        self.fusion = bool(config.audio_config.enable_fusion)
        self.dim = int(config.projection_dim)
        self.sample_rate = int(extractor.sampling_rate)
        self.window = int(extractor.nb_max_samples)
        self.min_seconds = extractor.fft_window_size / self.sample_rate

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.source,
            "window_seconds": self.window / self.sample_rate,
            "windowing": "repeat-pad up to one window; longer clips: consecutive windows (last one end-aligned)",
        }

    def _load(self) -> None:
        if self._model is None:
            from transformers import ClapModel

            log.info("Loading CLAP from %s", self.source)
            self._model = ClapModel.from_pretrained(_local(str(self.source)))
        self._model.eval().to(self.device)

    def _release(self) -> None:
        self._model = self._given_model

    def window_starts(self, length: int) -> list[int]:
        """Deterministic window starts covering ``length`` samples."""
        if length <= self.window:
            return [0]
        starts = list(range(0, length - self.window + 1, self.window))
        if starts[-1] != length - self.window:
            starts.append(length - self.window)
        return starts

    def _embed_batch(self, audio: torch.Tensor) -> torch.Tensor:
        starts = self.window_starts(audio.shape[-1])
        windows = [clip[s : s + self.window].double().cpu().numpy() for clip in audio for s in starts]
        features = self.processor.feature_extractor(
            windows,
            sampling_rate=self.sample_rate,
            # Windows never exceed max length, so neither mode crops at random; "rand_trunc" gives the single
            # mel a non-fusion model expects, "fusion" the 4 stacked copies a fusion model expects.
            truncation="fusion" if self.fusion else "rand_trunc",
            padding="repeatpad",
            return_tensors="pt",
        )
        model = self._model
        input_features = features["input_features"].to(self.device, model.dtype)
        is_longer = torch.zeros(
            len(windows), 1, dtype=torch.bool, device=self.device
        )  # no random fusion pick
        embeds = model.get_audio_features(input_features=input_features, is_longer=is_longer).pooler_output
        return embeds.reshape(audio.shape[0], len(starts), -1)

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, dim]``."""
        if isinstance(texts, str) or not texts:
            raise EmbedderError("embed_text needs a non-empty list of strings")
        self.load()
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.MAX_TEXT_TOKENS, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self._model.get_text_features(**tokens).pooler_output.float().cpu()


# ---------------------------------------------------------------------------------------------------------
# EnCodec
# ---------------------------------------------------------------------------------------------------------
class EncodecEmbedder(AudioEmbedder):
    """A MusicGen checkpoint's own EnCodec encoder: continuous latents (before quantization), one per frame.

    ``source`` is a MusicGen checkpoint (its ``.audio_encoder``) or an EnCodec checkpoint, as hub id or dir;
    ``codec`` passes an already loaded ``EncodecModel`` (e.g. the student's), which is used, not copied.
    """

    name = "encodec"

    def __init__(
        self,
        source: str | None = None,
        *,
        codec: nn.Module | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
    ) -> None:
        from tinymusician.models.musicgen import codec_hop

        if codec is None and not source:
            raise EmbedderError(
                "encodec embedder: give `source` (a MusicGen or EnCodec checkpoint: hub id or directory, e.g. "
                "facebook/musicgen-small) or pass a loaded codec"
            )
        if device is None:
            device = next(codec.parameters()).device if codec is not None else "cpu"
        super().__init__(device=device, batch_size=batch_size)
        if codec is not None:
            config = codec.config
            self.source = source or getattr(config, "name_or_path", "") or "in-memory EnCodec"
        else:
            config = _model_config(str(source), "encodec source")
            if config.model_type == "musicgen":
                config = config.audio_encoder
            elif config.model_type != "encodec":
                raise EmbedderError(
                    f"encodec source {source!r} is a {config.model_type!r} model; give a MusicGen or EnCodec one"
                )
            self.source = str(source)
        self._given_codec = codec
        self._codec = codec
        self.codec_config = config
        self.sample_rate = int(config.sampling_rate)
        self.dim = int(config.hidden_size)
        hop = codec_hop(config)
        self.frame_rate = self.sample_rate / hop
        self.min_seconds = hop / self.sample_rate

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.source, "frame_rate": self.frame_rate}

    def _load(self) -> None:
        if self._codec is None:
            from tinymusician.models.musicgen import load_musicgen

            log.info("Loading the EnCodec encoder of %s", self.source)
            if _model_config(self.source, "encodec source").model_type == "musicgen":
                self._codec = load_musicgen(self.source).audio_encoder  # the rest is dropped right here
            else:
                from transformers import EncodecModel

                self._codec = EncodecModel.from_pretrained(_local(self.source))
            self._codec.eval().to(self.device)

    def _release(self) -> None:
        self._codec = self._given_codec  # a codec we were given belongs to its owner

    def _embed_batch(self, audio: torch.Tensor) -> torch.Tensor:
        codec = self._codec
        dtype = next(codec.parameters()).dtype
        channels = int(self.codec_config.audio_channels)
        x = audio[:, None, :].to(dtype).expand(-1, channels, -1)
        if self.codec_config.normalize:  # what EncodecModel.encode does before its encoder
            x = x / (x.mean(dim=1, keepdim=True).pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-8)
        latents = codec.encoder(x)  # [B, dim, frames]
        return latents.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# VGGish (the network itself: metrics/vggish.py)
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def _as_embedder_error() -> Iterator[None]:
    """The network module's errors as this module's, so a bad weight file is an EmbedderError like any other."""
    try:
        yield
    except VGGishError as err:
        raise EmbedderError(str(err)) from err


class VGGishEmbedder(AudioEmbedder):
    """VGGish embeddings (128-d, one per 0.96 s of 16 kHz audio): the embedder of MusicGen's published FAD.

    ``weights`` is a local torchvggish state dict (``vggish-10086976.pth``); nothing is downloaded.
    """

    name = "vggish"
    sample_rate = VGGISH_RATE
    min_seconds = (VGGISH_WINDOW + (VGGISH_PATCH - 1) * VGGISH_HOP) / VGGISH_RATE  # one example: 0.975 s

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        final_relu: bool = False,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if not weights:
            raise EmbedderError(
                f"vggish embedder: `weights` is required, the path of torchvggish's state dict ({VGGISH_WEIGHTS_URL})"
            )
        self.weights = Path(weights).expanduser()
        self.final_relu = final_relu
        with _as_embedder_error():
            state = read_vggish_weights(self.weights, mmap=True)  # reads shapes, not the 290 MB of data
            if "embeddings.4.weight" not in state:
                VGGish.from_state_dict(state)  # raises the precise "not a VGGish state dict" error
        self.dim = int(state["embeddings.4.weight"].shape[0])
        del state
        self._model: VGGish | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": str(self.weights), "final_relu": self.final_relu}

    def _load(self) -> None:
        log.info("Loading VGGish from %s", self.weights)
        with _as_embedder_error():
            self._model = VGGish.from_state_dict(read_vggish_weights(self.weights), self.final_relu)
        self._model.eval().to(self.device)

    def _release(self) -> None:
        self._model = None

    def _embed_batch(self, audio: torch.Tensor) -> torch.Tensor:
        examples = vggish_examples(audio)  # [B, E, 96, 64]
        batch, count = examples.shape[:2]
        flat = examples.reshape(batch * count, 1, VGGISH_PATCH, VGGISH_MELS).float()
        return self._model(flat).reshape(batch, count, -1)


# ---------------------------------------------------------------------------------------------------------
EMBEDDERS: dict[str, type[AudioEmbedder]] = {
    "clap": ClapEmbedder,
    "encodec": EncodecEmbedder,
    "vggish": VGGishEmbedder,
}


def build_embedder(spec: str | Mapping[str, Any], **kwargs: Any) -> AudioEmbedder:
    """An embedder from its registry name (or ``{"name": ..., **kwargs}``); unknown names list the known ones."""
    if isinstance(spec, Mapping):
        kwargs = {**{k: v for k, v in spec.items() if k != "name"}, **kwargs}
        name = spec.get("name")
    else:
        name = spec
    if name not in EMBEDDERS:
        raise EmbedderError(f"unknown embedder {name!r}; known embedders: {sorted(EMBEDDERS)}")
    try:
        return EMBEDDERS[str(name)](**kwargs)
    except TypeError as err:
        raise EmbedderError(f"embedder {name!r}: bad arguments {sorted(kwargs)}: {err}") from err
