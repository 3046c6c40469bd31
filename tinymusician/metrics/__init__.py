"""Evaluation metrics as torchmetrics ``Metric``s: Fréchet Audio Distance and CLAP score, plus their embedders."""

from tinymusician.metrics.audio import AudioInputError, resample
from tinymusician.metrics.clap_score import CLAPScore
from tinymusician.metrics.embedders import (
    EMBEDDERS,
    AudioEmbedder,
    ClapEmbedder,
    EmbedderError,
    EncodecEmbedder,
    VGGishEmbedder,
    build_embedder,
)
from tinymusician.metrics.fad import (
    EmbeddingStats,
    FADError,
    FrechetAudioDistance,
    fad_infinity,
    frechet_distance,
    load_stats,
    save_stats,
)

__all__ = [
    "EMBEDDERS",
    "AudioEmbedder",
    "AudioInputError",
    "CLAPScore",
    "ClapEmbedder",
    "EmbedderError",
    "EmbeddingStats",
    "EncodecEmbedder",
    "FADError",
    "FrechetAudioDistance",
    "VGGishEmbedder",
    "build_embedder",
    "fad_infinity",
    "frechet_distance",
    "load_stats",
    "resample",
    "save_stats",
]
