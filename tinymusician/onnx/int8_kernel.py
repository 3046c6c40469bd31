"""Which 8-bit integer product ONNX Runtime computes exactly on this CPU, and the session option that makes it so.

The fast decoder's int8 graphs hold **int8 weights** (ONNX Runtime's default, the U8S8 kernel): VNNI (AVX-512
or AVX-VNNI), AMX and ARM compute U8S8 exactly and faster than U8U8 (per MusicGen-Small step: 1.17x on a VNNI +
AMX Xeon, 1.10-1.15x on an AVX-512 VNNI EPYC). Loading such a graph is the only thing that runs the probe. x86 CPUs with AVX2 or AVX-512 but without VNNI multiply with VPMADDUBSW, whose pairwise 16-bit sums
saturate (2 x 255 x 127 > 32767). There ONNX Runtime's ``session.x64quantprecision`` option rewrites every int8
weight to uint8 (+128, zero point +128: the same values) when the session loads, so the product is U8U8 and exact.
The option is not set unconditionally: ONNX Runtime's own test for "this CPU saturates" is coarse and also fires
on AVX-512 VNNI CPUs, which would lose the fast kernel. So :func:`u8s8_saturates` asks the kernel itself: a tiny
graph of worst-case products (every activation 255, every weight 127), run once per process.

The merged decoder and the text encoder keep uint8 weights: the option does not reach the weights of an ``If``
subgraph (the merged decoder), and transformers.js (WASM) reads both.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# ONNX Runtime's session option: "1" = int8 weights become uint8 at load on CPUs it considers saturating
PRECISION_MODE = "session.x64quantprecision"
PROBE_DEPTH = 256  # the products summed per output: 128 saturating pairs
PROBE_ROWS = (1, 2, 4)  # the decoder's row counts (one pass, CFG, a batch of two under CFG)


def probe_model() -> bytes:
    """``MatMulInteger`` (uint8 x int8 -> int32) and ``DynamicQuantizeMatMul`` (the fused op the decoder's
    matmuls become) over constant int8 weights of 127."""
    from onnx import TensorProto, helper, numpy_helper

    # one weight tensor per node: ONNX Runtime's conversion fails on an int8 initializer two nodes share
    constants = [
        numpy_helper.from_array(np.full((PROBE_DEPTH, 16), 127, np.int8), "weights"),
        numpy_helper.from_array(np.full((PROBE_DEPTH, 16), 127, np.int8), "weights_fused"),
        numpy_helper.from_array(np.zeros(16, np.int8), "weights_zero"),
        numpy_helper.from_array(np.ones(16, np.float32), "weights_scale"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMulInteger", ["codes", "weights"], ["integer"]),
            helper.make_node(
                "DynamicQuantizeMatMul",
                ["values", "weights_fused", "weights_scale", "weights_zero"],
                ["real"],
                domain="com.microsoft",
            ),
        ],
        "u8s8_probe",
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, ["rows", PROBE_DEPTH]),
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["rows", PROBE_DEPTH]),
        ],
        [
            helper.make_tensor_value_info("integer", TensorProto.INT32, ["rows", 16]),
            helper.make_tensor_value_info("real", TensorProto.FLOAT, ["rows", 16]),
        ],
        constants,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def probe_is_exact(options: Any | None = None) -> bool:
    """Whether ONNX Runtime, with these session options, computes the probe's worst-case products exactly."""
    import onnxruntime as ort

    session = ort.InferenceSession(probe_model(), options, providers=["CPUExecutionProvider"])
    exact = 255 * 127 * PROBE_DEPTH
    for rows in PROBE_ROWS:
        # 1.0 everywhere quantizes to 255 with zero point 0: the fused op sees the same worst case
        integer, real = session.run(
            None,
            {
                "codes": np.full((rows, PROBE_DEPTH), 255, np.uint8),
                "values": np.ones((rows, PROBE_DEPTH), np.float32),
            },
        )
        if not (np.all(integer == exact) and np.allclose(real, exact / 255, rtol=1e-4)):
            return False
    return True


@functools.cache
def u8s8_saturates() -> bool:
    """Whether this CPU's U8S8 kernel saturates (ONNX Runtime's default options; asked once per process)."""
    return not probe_is_exact()


def exact_int8_options(options: Any) -> str:
    """Set what ``options`` (an ``onnxruntime.SessionOptions``) needs for exact int8 products on this CPU; return
    the kernel its int8-weight graphs will run (for logs and reports)."""
    if not u8s8_saturates():
        return "U8S8"
    options.add_session_config_entry(PRECISION_MODE, "1")
    if not converted_is_exact():
        log.warning(
            "ONNX Runtime's int8 products are not exact on this CPU even with %s=1: the fast decoder's int8 graphs "
            "will err; use precision='int4' or 'fp32', or decoder='merged' (uint8 weights)",
            PRECISION_MODE,
        )
        return "U8S8 (saturating: not exact on this CPU)"
    return "U8U8 (int8 weights converted at load: this CPU's U8S8 kernel saturates)"


def conversion_options() -> Any:
    """Session options with ONNX Runtime's conversion of int8 weights to uint8 turned on (x64 only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry(PRECISION_MODE, "1")
    return options


@functools.cache
def converted_is_exact() -> bool:
    """Whether the probe is exact with ONNX Runtime's conversion to uint8 (asked once per process)."""
    return probe_is_exact(conversion_options())
