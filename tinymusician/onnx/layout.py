"""The bundle layout shared by the exporter and the torch-free runtime: format id, graph files, tensor names.

Names and suffixes are transformers.js's (``_quantized`` = its ``q8`` dtype, ``_q4`` = ``q4``), so the same
directory loads there; nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

FORMAT = "tinymusician-onnx"  # manifest.json "format"
# 2: the fast decoder's int8 graphs hold int8 weights, which need the runtime's session option on CPUs whose U8S8
# kernel saturates (tinymusician.onnx.int8_kernel); a version-1 runtime would run them without it
FORMAT_VERSION = 2  # what the exporter writes
FORMAT_VERSIONS = (1, 2)  # manifest.json format_version values the runtime reads

GRAPHS = ("text_encoder", "decoder_model_merged", "encodec_decode")
# The fast decoder (one step over an in-place self-attention cache) and the graph giving it the text's keys and
# values; optional: manifest.json's "fast_decoder" says whether a bundle has them (transformers.js ignores them)
FAST_GRAPHS = ("decoder_fast", "decoder_text_kv")
FAST_DECODER_INPUTS = ("input_ids", "encoder_attention_mask", "seqlens_k", "total_sequence_length")
QUANTIZABLE = ("text_encoder", "decoder_model_merged", *FAST_GRAPHS)  # encodec_decode stays fp32
# precision -> graph file suffix (benchmarks/bench_onnx.py adds a comparison precision in its own process)
PRECISIONS = {"fp32": "", "int8": "_quantized", "int4": "_q4"}

DECODER_INPUTS = ("input_ids", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch")
PAST_KINDS = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")


def graph_file(graph: str, precision: str) -> str:
    """``onnx/<graph><suffix>.onnx``; the codec decoder is only ever fp32."""
    suffix = PRECISIONS[precision] if graph in QUANTIZABLE else ""
    return f"onnx/{graph}{suffix}.onnx"


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """``past_key_values.{i}.decoder.key`` ... in the order the decoder graph takes (and returns) them."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in PAST_KINDS]


def cache_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """The fast decoder's self-attention buffers, ``past_key_values.{i}.decoder.key|value`` (in = out buffer)."""
    return [name for name in past_names(num_layers, prefix) if ".decoder." in name]


def text_kv_names(num_layers: int) -> list[str]:
    """The text's cross-attention keys/values: ``past_key_values.{i}.encoder.key|value``, as the merged decoder
    names its cached ones."""
    return [name for name in past_names(num_layers) if ".encoder." in name]
