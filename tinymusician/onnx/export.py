"""Write a MusicGen model as an ONNX bundle in the Hugging Face / transformers.js layout.

```
bundle/
  config.json  generation_config.json  tokenizer.json  tokenizer_config.json
  manifest.json                       what was exported: graphs, precisions, sizes, hashes, versions
  onnx/text_encoder{,_quantized,_q4}.onnx
  onnx/decoder_model_merged{,_quantized,_q4}.onnx
  onnx/encodec_decode.onnx            always fp32 (the paper keeps the codec decoder in full precision)
  onnx/decoder_fast{,_quantized,_q4}.onnx     one step over an in-place KV cache (ONNX Runtime only)
  onnx/decoder_text_kv{,_quantized,_q4}.onnx  the text's cross-attention keys/values, once per generation
```

The two fast graphs (default; ``fast_decoder=False`` skips them) are what :class:`TinyMusicianONNX` steps with:
the merged decoder (kept as it is for transformers.js) returns a concatenated copy of the whole cache at every
step, so a step's cost grows with the clip; the fast decoder writes one position of fixed-capacity buffers in
place (``com.microsoft.GroupQueryAttention``; cross-attention over the text is one
``com.microsoft.MultiHeadAttention``; see :class:`~tinymusician.onnx.graphs.FastDecoderGraph`). Its cache is
fp32 in the fp32 graphs (codes equal the merged decoder's) and int8 in the quantized ones (``cache_dtype="auto"``;
per-channel scales calibrated on the model's own generation, :mod:`tinymusician.onnx.kv_cache`): a late step
reads the cache besides the weights, a quarter as many bytes in int8.

Suffixes are transformers.js's (``_quantized`` = its ``q8`` dtype, ``_q4`` = ``q4``), so a per-file dtype map
such as ``{text_encoder: "q8", decoder_model_merged: "q8", encodec_decode: "fp32"}`` picks them. 8-bit is
ONNX Runtime's dynamic quantization with **uint8** weights (asymmetric, per output channel) and uint8 activations
(per tensor, scale computed at run time): ``MatMulInteger`` U8U8. 4-bit is ONNX Runtime's block-wise weight-only
``MatMulNBits``. Each decoder graph (first step and cached step) is quantized before the two are merged, so
the merged graph shares one copy of every weight. ``manifest.json`` records the format (``quantization``).

Why uint8 weights, not ONNX Runtime's default int8 (U8S8): on x86 CPUs with AVX2 or AVX-512 but without VNNI,
the U8S8 kernel multiplies with VPMADDUBSW, whose pairwise 16-bit sums saturate (64 x 255 x 127 gives
1,048,544 instead of 2,072,640); the tiny student's logits then err by 0.23 of their spread instead of 0.007.
The session option that avoids it does not reach weights of an ``If`` graph (our merged decoder). U8U8 is
computed exactly by every kernel (AVX2 widens to 16 bits first, VNNI, ARM NEON/dot-product, WASM), costs
1.1-1.25x per decoder step over the saturating kernel and keeps the size; ``reduce_range`` (7-bit weights)
avoids saturation too but loses more accuracy, and 8-bit ``MatMulNBits`` was slower (1.3-1.4x). The fast
decoder's graphs, which have no ``If`` and which only ONNX Runtime reads, hold int8 weights instead: U8S8 where
the CPU computes it exactly, converted to uint8 at load where it would not (:mod:`tinymusician.onnx.int8_kernel`).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import MusicgenForConditionalGeneration, PreTrainedTokenizerBase

from tinymusician.models.musicgen import (
    default_guidance_scale,
    guidance_distilled_scale,
    max_frames,
    min_frames,
)
from tinymusician.onnx.graphs import (
    CACHE_DTYPES,
    decoder_spec,
    encodec_decode_spec,
    export_graph,
    fast_decoder_spec,
    text_encoder_spec,
    text_kv_spec,
)
from tinymusician.onnx.kv_cache import calibrate_kv_scales
from tinymusician.onnx.layout import FAST_GRAPHS, FORMAT, FORMAT_VERSION, GRAPHS, PRECISIONS, graph_file
from tinymusician.onnx.merge import merge_decoders
from tinymusician.onnx.runtime import file_sha256

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INT4_BLOCK_SIZE = 32


class ExportError(ValueError):
    """A bundle that cannot be written as asked; the message says what to change."""


# What each quantized precision is, as written into manifest.json (readers must not guess it from the file name).
QUANTIZATION = {
    "int8": {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "op": "MatMulInteger",
        "weights": "uint8, asymmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor, dynamic",
        "kernel": "U8U8",
        # the fast decoder's graphs (ONNX Runtime only, no If subgraph): tinymusician.onnx.int8_kernel
        "fast_decoder": {
            "weights": "int8, symmetric, per output channel",
            "kernel": "U8S8 where the CPU computes it exactly (VNNI, AMX, ARM); elsewhere ONNX Runtime converts "
            "the weights to uint8 at load (session.x64quantprecision) and runs U8U8",
        },
    },
    "int4": {
        "method": "onnxruntime.quantization.MatMulNBitsQuantizer",
        "op": "MatMulNBits",
        "weights": f"4-bit, symmetric, blocks of {INT4_BLOCK_SIZE} along the input",
        "activations": "int8 per block (accuracy_level 4)",
    },
}


def quantize_int8(model: onnx.ModelProto, weights: str = "uint8") -> onnx.ModelProto:
    """Dynamic 8-bit quantization of MatMul weights (ONNX Runtime), per output channel.

    ``weights="uint8"`` (the transformers.js graphs): the U8U8 product is exact on every CPU. ``"int8"`` (the fast
    decoder's graphs) is ONNX Runtime's default (U8S8), which saturates on AVX2 without VNNI (module docstring):
    the runtime then has ONNX Runtime convert it to uint8 at load (:mod:`tinymusician.onnx.int8_kernel`).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    # the quantizer logs one INFO line per tensor on the root logger
    root.setLevel(max(level, logging.WARNING))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            source, target = Path(scratch, "in.onnx"), Path(scratch, "out.onnx")
            onnx.save(model, source)
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[weights],
            )
            return onnx.load(target)
    finally:
        root.setLevel(level)


def quantize_int4(model: onnx.ModelProto, block_size: int = INT4_BLOCK_SIZE) -> onnx.ModelProto:
    """Block-wise symmetric 4-bit weights (``MatMulNBits``); ``accuracy_level=4`` runs the products in int8."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    return quantizer.model.model


QUANTIZERS = {"fp32": lambda model: model, "int8": quantize_int8, "int4": quantize_int4}


def unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node its own copy of an int8 initializer it shares with another: ONNX Runtime's conversion of
    int8 weights to uint8 (``session.x64quantprecision``, set on CPUs whose U8S8 kernel saturates) fails to load a
    graph whose int8 initializer feeds two nodes ("Attempt to replace the existing tensor")."""
    initializers = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    seen: set[str] = set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in seen:
                duplicate = copy.deepcopy(initializers[name])
                duplicate.name = f"{name}_for_{node.name or node.output[0]}"
                model.graph.initializer.append(duplicate)
                node.input[i] = duplicate.name
            seen.add(name)
    return model


def quantize_fast_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fast decoder's int8 graphs: int8 weights (U8S8), none shared between nodes (:func:`unshare_initializers`)."""
    return unshare_initializers(quantize_int8(model, weights="int8"))


# the fast decoder's graphs: int8 weights (U8S8), exact on every CPU through the runtime's session option
FAST_QUANTIZERS = {"int8": quantize_fast_int8}


def resolve_cache_dtypes(cache_dtype: str, precisions: Iterable[str]) -> dict[str, str]:
    """``precision -> cache dtype`` of the fast decoder graphs. ``auto``: the fp32 graphs keep an fp32 cache (their
    codes equal the merged decoder's), every quantized precision stores it in int8 (a quarter of the bytes a late
    step reads; its weights are approximate anyway)."""
    if cache_dtype != "auto" and cache_dtype not in CACHE_DTYPES:
        raise ExportError(f"cache_dtype={cache_dtype!r}: choose from {['auto', *CACHE_DTYPES]}")
    if cache_dtype == "auto":
        return {p: "float32" if p == "fp32" else "int8" for p in precisions}
    return dict.fromkeys(precisions, cache_dtype)


def model_facts(model: MusicgenForConditionalGeneration) -> dict[str, Any]:
    """What the runtime needs to generate without reading the transformers config."""
    decoder, codec = model.decoder.config, model.config.audio_encoder
    return {
        "num_codebooks": decoder.num_codebooks,
        "vocab_size": decoder.vocab_size,
        "pad_token_id": decoder.pad_token_id,
        "decoder_start_token_id": model.generation_config.decoder_start_token_id,
        "num_layers": decoder.num_hidden_layers,
        "num_heads": decoder.num_attention_heads,
        "head_dim": decoder.hidden_size // decoder.num_attention_heads,
        "text_hidden_size": model.text_encoder.config.hidden_size,
        "sampling_rate": int(codec.sampling_rate),
        "frame_rate": int(codec.frame_rate),
        "min_frames": min_frames(model),
        "max_frames": max_frames(model),
    }


def fast_decoder_facts(
    model: MusicgenForConditionalGeneration, cache_dtypes: dict[str, str], calibration: dict[str, Any] | None
) -> dict[str, Any]:
    """manifest.json's ``fast_decoder``: its graphs, cache storage per precision (and, for int8, how its scales
    were calibrated), and the attention op ONNX Runtime needs."""
    return {
        "graphs": list(FAST_GRAPHS),
        "cache_dtype": cache_dtypes,
        **({"kv_scales": calibration} if calibration else {}),
        "attention": "com.microsoft.GroupQueryAttention on packed q|k|v (past and present bound to one buffer)",
        "text_attention": "com.microsoft.MultiHeadAttention (keys/values [B, H, L, D], key padding mask)",
        "max_cache_positions": int(model.decoder.config.max_position_embeddings),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import onnxruntime
    import transformers

    return {
        "tinymusician": version("tinymusician"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Inline weights below 2 GB (protobuf's limit); above it, one external data file beside the graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 2_000_000_000
    onnx.save(model, path, save_as_external_data=large, location=f"{path.name}_data" if large else None)
    return path


def export_bundle(
    model: MusicgenForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    precisions: Iterable[str] = ("fp32",),
    opset: int = DEFAULT_OPSET,
    source: str = "",
    max_text_tokens: int = 256,
    fast_decoder: bool = True,
    cache_dtype: str = "auto",
) -> dict[str, Any]:
    """Export ``model`` into ``out_dir`` and return the manifest (also written to ``manifest.json``).

    ``fast_decoder``: also write the in-place-cache decoder graphs; ``cache_dtype`` (``float32``, ``float16``,
    ``int8`` or ``auto``: fp32 for the fp32 graphs, int8 for the quantized ones) is what their self-attention
    cache stores; int8 scales are calibrated on the model's own generation (:mod:`tinymusician.onnx.kv_cache`)."""
    precisions = list(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ExportError(f"precision {unknown or precisions}: choose from {list(PRECISIONS)}")
    cache_dtypes = resolve_cache_dtypes(cache_dtype, precisions)
    if model.config.decoder.audio_channels != 1:
        raise ExportError("stereo MusicGen is not supported by the exporter (transformers.js decodes mono)")
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: transformers.js and the ONNX "
            "runtime read tokenizer.json; convert it with transformers' AutoTokenizer(..., use_fast=True)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()  # the caller's model stays as it is
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    files: dict[str, dict[str, Any]] = {}

    def record(graph: str, precision: str, proto: onnx.ModelProto) -> None:
        relative = graph_file(graph, precision)
        path = save(proto, out / relative)
        files[relative] = {"graph": graph, "precision": precision, "bytes": path.stat().st_size}
        log.info("wrote %s (%.1f MB)", relative, path.stat().st_size / 1e6)

    kv_scales, calibration = None, None
    if fast_decoder and "int8" in cache_dtypes.values():
        kv_scales, calibration = calibrate_kv_scales(model, tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        traced = {}
        specs = [
            ("text_encoder", text_encoder_spec),
            ("decoder_first", lambda m: decoder_spec(m, with_past=False)),
            ("decoder_cached", lambda m: decoder_spec(m, with_past=True)),
            ("encodec_decode", encodec_decode_spec),
        ]
        if fast_decoder:
            for dtype in dict.fromkeys(cache_dtypes.values()):
                scales = kv_scales if dtype == "int8" else None
                specs.append(
                    (f"decoder_fast_{dtype}", lambda m, d=dtype, k=scales: fast_decoder_spec(m, d, k))
                )
            specs.append(("decoder_text_kv", text_kv_spec))
        for name, spec in specs:
            log.info("tracing %s", name)
            traced[name] = export_graph(spec(model), Path(scratch, f"{name}.onnx"), opset)
        record("encodec_decode", "fp32", onnx.load(traced["encodec_decode"]))
        for precision in precisions:
            log.info("writing %s graphs", precision)
            quantize = QUANTIZERS[precision]
            record("text_encoder", precision, quantize(onnx.load(traced["text_encoder"])))
            first = quantize(onnx.load(traced["decoder_first"]))
            cached = quantize(onnx.load(traced["decoder_cached"]))
            record("decoder_model_merged", precision, merge_decoders(first, cached))
            quantize_fast = FAST_QUANTIZERS.get(precision, quantize)
            for graph in FAST_GRAPHS if fast_decoder else ():
                name = f"{graph}_{cache_dtypes[precision]}" if graph == "decoder_fast" else graph
                record(graph, precision, quantize_fast(onnx.load(traced[name])))
    for relative, entry in files.items():
        entry["sha256"] = file_sha256(out / relative)

    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "opset": opset,
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "precisions": precisions,
        "quantization": {
            p: {k: v for k, v in QUANTIZATION[p].items() if fast_decoder or k != "fast_decoder"}
            for p in precisions
            if p in QUANTIZATION
        },
        "graphs": [*GRAPHS, *(FAST_GRAPHS if fast_decoder else ())],
        "files": files,
        "model": model_facts(model),
        **({"fast_decoder": fast_decoder_facts(model, cache_dtypes, calibration)} if fast_decoder else {}),
        # a guidance-distilled student generates in one pass by default (the runtime reads default_scale)
        "guidance": {
            "distilled_scale": guidance_distilled_scale(model),
            "default_scale": default_guidance_scale(model),
        },
        "max_text_tokens": max_text_tokens,
        "versions": versions(),
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    model.train(was_training)
    return manifest
