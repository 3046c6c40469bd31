"""ONNX export and on-device generation. Importing this package does not import torch."""

from tinymusician.onnx.runtime import BundleError, GenerationError, TinyMusicianONNX

__all__ = ["BundleError", "GenerationError", "TinyMusicianONNX"]
