"""bench_onnx.py's helpers for where decoding time goes: the weight-streaming floor, per-step timing, the
CPU's SIMD features and the int4 ``MatMulNBits`` kernel variants (accuracy level x block size).

The floor: one decoder step must read every weight once, so no backend's step can beat the time to stream that
many bytes from memory with the same threads. It is measured in its own process (``python
bench_onnx_kernels.py floor BYTES THREADS``) as the best of many multi-threaded sums over a buffer of that size
(larger than the caches for MusicGen-Small: about 420 MB of int8 weights). Nothing here imports torch at module
level: bench_onnx.py's ONNX Runtime workers import this file and must stay torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# /proc/cpuinfo flags that decide which int8 / int4 / bf16 kernels ONNX Runtime's MLAS and PyTorch can use
X86_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16")
X86_FEATURES += ("avx512_fp16", "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "fphp")

# --- int4 kernel variants ------------------------------------------------------------------------------------
# MatMulNBits accuracy_level: the minimum precision of the products. 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
# (activations quantized to int8 per block). The bundle's int4 is level 4, blocks of 32 (tinymusician/onnx/export.py).
VARIANT = re.compile(r"int4-acc([0-4])-b(16|32|64|128|256)")
DEFAULT_VARIANTS = ("acc0-b32", "acc1-b32", "acc2-b32", "acc0-b128", "acc4-b128")
ALL_VARIANTS = tuple(f"acc{a}-b{b}" for a in range(5) for b in (16, 32, 64, 128, 256))


def variant_precision(variant: str) -> str:
    """``"acc0-b32"`` -> the comparison precision ``"int4-acc0-b32"`` (backend ``ort-int4-acc0-b32``)."""
    precision = f"int4-{variant}"
    if not VARIANT.fullmatch(precision):
        raise ValueError(f"int4 variant {variant!r}: write accA-bB, A in 0..4, B in 16, 32, 64, 128, 256")
    return precision


def quantize_int4_variant(model: Any, accuracy_level: int, block_size: int) -> Any:
    """:func:`tinymusician.onnx.export.quantize_int4` with a chosen accuracy level (it always uses 4)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level
    )
    quantizer.process()
    return quantizer.model.model


def register_int4_variants(precisions: Iterable[str], *, exporter: bool) -> None:
    """Teach this process the comparison precisions among ``precisions`` (file suffix ``_q4_accA_bB``).

    Every ONNX Runtime worker registers them (the manifest lists them, and the runtime checks its precisions);
    ``exporter`` also registers their quantizers (that imports torch: the parent process only).
    """
    from functools import partial

    from tinymusician.onnx import layout

    for precision in precisions:
        match = VARIANT.fullmatch(precision)
        if not match:
            continue
        level, block = int(match[1]), int(match[2])
        layout.PRECISIONS[precision] = f"_q4_acc{level}_b{block}"
        if exporter:
            from tinymusician.onnx import export

            export.QUANTIZERS[precision] = partial(
                quantize_int4_variant, accuracy_level=level, block_size=block
            )
            export.QUANTIZATION[precision] = {
                **export.QUANTIZATION["int4"],
                "weights": f"4-bit, symmetric, blocks of {block} along the input",
                "activations": f"accuracy_level {level}",
            }


def register_manifest_variants(bundle: str | Path) -> None:
    """A worker's registration: whatever int4 variants the bundle's manifest lists."""
    path = Path(bundle) / "manifest.json"
    if path.is_file():
        register_int4_variants(json.loads(path.read_text())["precisions"], exporter=False)


# --- the machine ------------------------------------------------------------------------------------------
def cpu_features() -> tuple[list[str], list[str]]:
    """(present, absent) among the SIMD features that matter here, from ``/proc/cpuinfo``'s flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [], []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    wanted = ARM_FEATURES if "asimd" in flags else X86_FEATURES
    return [f for f in wanted if f in flags], [f for f in wanted if f not in flags]


def machine_header(threads: int) -> str:
    import onnxruntime

    from tinymusician.machine import cpu_model

    present, absent = cpu_features()
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {threads} threads; onnxruntime {onnxruntime.__version__}\n"
        f"CPU features: {' '.join(present) or '?'} (absent: {' '.join(absent) or 'none'})"
    )


# --- the weight-streaming floor ---------------------------------------------------------------------------
def initializer_bytes(path: str | Path) -> int:
    """Bytes of every initializer of an ONNX graph, subgraphs (the merged decoder's ``If`` branches) included."""
    import onnx
    from onnx import numpy_helper

    def graph_bytes(graph: Any) -> int:
        total = 0
        for tensor in graph.initializer:
            total += len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    total += graph_bytes(attribute.g)
                total += sum(graph_bytes(g) for g in attribute.graphs)
        return total

    return graph_bytes(onnx.load(str(path)).graph)


def measure_floor(nbytes: int, threads: int, repeats: int = 40, budget_s: float = 20.0) -> dict[str, float]:
    """Best time to read ``nbytes`` once with ``threads`` threads: a float32 sum (vectorized, memory-bound at
    this size) over a buffer whose pages were touched first; also an int64 sum, the faster counts."""
    import torch

    torch.set_num_threads(threads)
    words = max(1, nbytes // 4)
    buffer = torch.ones(words, dtype=torch.float32)  # written once: every page is resident
    views = {"float32 sum": buffer, "int64 sum": buffer[: words // 2 * 2].view(torch.int64)}
    best = {name: float("inf") for name in views}
    started = time.perf_counter()
    for repeat in range(repeats):
        for name, view in views.items():
            begin = time.perf_counter()
            view.sum()
            best[name] = min(best[name], time.perf_counter() - begin)
        if repeat >= 5 and time.perf_counter() - started > budget_s:
            break
    kernel = min(best, key=best.get)
    return {
        "floor_ms": 1000 * best[kernel],
        "floor_bytes": words * 4,
        "floor_gbs": words * 4 / best[kernel] / 1e9,
        "floor_repeats": repeat + 1,
        "floor_kernel": kernel,
        "torch_threads": torch.get_num_threads(),
    }


# --- per-step timing --------------------------------------------------------------------------------------
def start_end(durations: Sequence[float], fraction: float = 0.1) -> dict[str, float]:
    """Median step (ms) over the first and the last ``fraction`` of the steps, and end / start."""
    if len(durations) < 2:
        return {}
    count = max(1, round(len(durations) * fraction))
    start = 1000 * statistics.median(durations[:count])
    end = 1000 * statistics.median(durations[-count:])
    return {
        "step_start_ms": start,
        "step_end_ms": end,
        "step_end_vs_start": end / start,
        "steps": len(durations),
    }


def step_clock(model: Any) -> list[float]:
    """Wrap ``model.generate_codes`` (a :class:`TinyMusicianONNX`) so its ``on_step`` calls record the time of
    every step; returns the list they are appended to (the call's start first). ``generate`` is unchanged."""
    ticks: list[float] = []
    original = model.generate_codes

    def timed(*args: Any, on_step: Any = None, **kwargs: Any) -> Any:
        ticks.clear()
        ticks.append(time.perf_counter())

        def tick(done: int, total: int) -> None:
            ticks.append(time.perf_counter())
            if on_step is not None:
                on_step(done, total)

        return original(*args, on_step=tick, **kwargs)

    model.generate_codes = timed
    return ticks


def capture_first_logits(model: Any) -> dict[str, Any]:
    """Record the first step's logits ``[R, V]`` of the next generation, whichever decoder graph the runtime
    steps with: through ``decoder_steps`` (the runtime's per-step decoder), or for a runtime without it the first
    output of the merged decoder's first run. The wrappers remove themselves after that call."""
    captured: dict[str, Any] = {}
    if hasattr(model, "decoder_steps"):

        def decoder_steps(*args: Any, **kwargs: Any) -> Any:
            del model.decoder_steps  # back to the class's method
            decode = model.decoder_steps(*args, **kwargs)

            def first(*step_args: Any) -> Any:
                logits = decode(*step_args)
                if "logits" not in captured:
                    captured["logits"] = logits.reshape(-1, logits.shape[-1]).copy()
                return logits

            return first if "logits" not in captured else decode

        model.decoder_steps = decoder_steps
        return captured
    session = model.sessions["decoder_model_merged"]

    def first_run(*args: Any, **kwargs: Any) -> Any:
        del session.run
        outputs = session.run(*args, **kwargs)
        captured.setdefault("logits", outputs[0].reshape(-1, outputs[0].shape[-1]).copy())
        return outputs

    session.run = first_run
    return captured


def logit_error(reference: Any, candidate: Any) -> dict[str, float]:
    """max |candidate - reference| / the reference's spread (max - min), plus check.py's relative error."""
    import numpy as np

    from tinymusician.onnx.check import relative_logit_error

    reference = np.asarray(reference, dtype=np.float64).reshape(-1, reference.shape[-1])
    candidate = np.asarray(candidate, dtype=np.float64).reshape(-1, candidate.shape[-1])
    error = relative_logit_error(reference, candidate, np.ones(len(reference), dtype=bool))
    return {**error, "max_vs_spread": error["max_abs_diff"] / float(reference.max() - reference.min())}


def main(argv: Sequence[str]) -> None:
    if len(argv) != 3 or argv[0] != "floor":
        raise SystemExit("usage: python bench_onnx_kernels.py floor BYTES THREADS")
    print(json.dumps(measure_floor(int(argv[1]), int(argv[2]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
