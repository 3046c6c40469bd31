"""Exporting a bundle: its layout and manifest, the quantized graphs' fidelity and integer products, the
self-check's error measure, and the export command line (on the tiny student and the tiny teacher)."""

from __future__ import annotations

import json
import platform
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tinymusician.models.generation import torch_generate
from tinymusician.onnx.int8_kernel import (
    PRECISION_MODE,
    conversion_options,
    exact_int8_options,
    probe_is_exact,
    u8s8_saturates,
)
from tinymusician.onnx.runtime import TinyMusicianONNX

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["calm piano with soft drums in a minor key", "loud fast guitar"]


# --- layout and manifest ----------------------------------------------------------------------------------
def test_bundle_has_the_transformers_js_layout(bundle):
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "manifest.json",
    ):
        assert (bundle / name).is_file(), name
    manifest = json.loads((bundle / "manifest.json").read_text())
    expected = {
        "onnx/text_encoder.onnx",
        "onnx/decoder_model_merged.onnx",
        "onnx/encodec_decode.onnx",
        "onnx/text_encoder_quantized.onnx",
        "onnx/decoder_model_merged_quantized.onnx",
        "onnx/text_encoder_q4.onnx",
        "onnx/decoder_model_merged_q4.onnx",
    }
    fast = {
        f"onnx/{g}{s}.onnx" for g in ("decoder_fast", "decoder_text_kv") for s in ("", "_quantized", "_q4")
    }
    assert (
        set(manifest["files"]) == expected | fast
    )  # the fast graphs are ONNX Runtime's; transformers.js ignores them
    for relative, entry in manifest["files"].items():
        assert (bundle / relative).stat().st_size == entry["bytes"]
    assert manifest["opset"] >= 14 and manifest["versions"]["onnxruntime"]
    sizes = {r: e["bytes"] for r, e in manifest["files"].items()}
    assert sizes["onnx/decoder_model_merged_quantized.onnx"] < sizes["onnx/decoder_model_merged.onnx"]
    assert sizes["onnx/decoder_model_merged_q4.onnx"] < sizes["onnx/decoder_model_merged_quantized.onnx"]


# --- quantization fidelity: teacher-forced logits through the KV-cache loop -------------------------------
# Relative to the logits' spread, per model, independent of check.MAX_RELATIVE_ERROR (the export check's
# limits for any user model) so that loosening that check cannot loosen these. Measured on this AVX2 CPU
# without VNNI, student / teacher: int8 (uint8 weights) 0.007 / 0.006, int4 0.087 / 0.038; every weight scale
# off by 10%: int8 0.10 / 0.11, int4 0.137 / 0.126; int8 weights (U8S8, saturating here) 0.24 / 0.04.
# The tiny world's teacher (trained 2000 steps, wider weight ranges): int8 0.012, int4 0.084.
MAX_ERROR = {
    "student": {"fp32": 1e-4, "int8": 0.025, "int4": 0.12},
    "teacher": {"fp32": 1e-4, "int8": 0.025, "int4": 0.11},
}
MIN_TOP1 = {"fp32": 1.0, "int8": 0.95, "int4": 0.8}
FIDELITY_PROMPTS = [*PROMPTS, "slow organ chords", "a tune"]


@pytest.fixture(scope="module")
def forced_references(student, tokenizer, projected):
    """Per model: its fp32 greedy codes and PyTorch's fp32 logits along them (one full forward)."""
    from tinymusician.onnx.check import torch_forced_logits

    references = {}
    for name, model, tok in (("student", student, tokenizer), ("teacher", projected[0], projected[1])):
        _, codes = torch_generate(model, tok, FIDELITY_PROMPTS, 30, do_sample=False)
        references[name] = codes, torch_forced_logits(model, tok, FIDELITY_PROMPTS, codes)
    return references


def test_relative_logit_error_is_scale_aware_and_shift_free():
    from tinymusician.onnx.check import relative_logit_error

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3, 40)).astype(np.float32)
    where = np.ones((5, 3), bool)
    same = relative_logit_error(logits, logits + rng.normal(size=(5, 3, 1)).astype(np.float32), where)
    assert same["relative_error"] < 1e-6 and same["top1_agree"] == 1.0  # a per-position shift is no error
    scaled = relative_logit_error(logits, logits * 1.1, where)
    assert scaled["relative_error"] == pytest.approx(0.1, rel=1e-4)
    where[0] = False
    broken = logits.copy()
    broken[0] = -broken[0]
    assert relative_logit_error(logits, broken, where)["relative_error"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_quantized_logits_stay_close_to_fp32(bundle, projected, forced_references, which, precision):
    """Each precision's bundle (its own text encoder and decoder) fed fp32's greedy codes step by step through
    the KV cache, against PyTorch fp32; the trained teacher has peaked distributions, the student near-tied ones.
    """
    from tinymusician.onnx.check import forced_logits, relative_logit_error

    path = bundle if which == "student" else projected[2]
    codes, reference = forced_references[which]
    logits, generated = forced_logits(
        TinyMusicianONNX(path, precision=precision, threads=1), FIDELITY_PROMPTS, codes
    )
    assert logits.shape == reference.shape
    assert generated.sum() == 2 * len(FIDELITY_PROMPTS) * codes.shape[1] * codes.shape[2]  # CFG doubles rows
    error = relative_logit_error(reference, logits, generated)
    assert error["relative_error"] <= MAX_ERROR[which][precision], error
    assert error["top1_agree"] >= MIN_TOP1[precision], error
    if precision == "fp32":  # the teacher-forced loop is exact: the same numbers as PyTorch's full forward
        np.testing.assert_allclose(logits, reference, atol=1e-4)


# --- int8 graphs: exact integer products ------------------------------------------------------------------
def integer_product_probes(graph: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every ``MatMulInteger`` weight of a graph (subgraphs included) with its zero point."""
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    probes = []

    def visit(g: onnx.GraphProto) -> None:
        weights.update({t.name: numpy_helper.to_array(t) for t in g.initializer})
        for node in g.node:
            if node.op_type == "MatMulInteger" and node.input[1] in weights:
                probes.append((weights[node.input[1]], weights[node.input[3]]))
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(graph.graph)
    return probes


def matmul_integer(
    a: np.ndarray, a_zero: int, b: np.ndarray, b_zero: np.ndarray, options: ort.SessionOptions | None = None
) -> np.ndarray:
    """ONNX Runtime's MatMulInteger on this CPU (int32 result), with these session options."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array(a_zero, np.uint8), "a_zero"),
            numpy_helper.from_array(b_zero, "b_zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return runner.run(None, {"a": a})[0]


# ONNX Runtime converts int8 weights to uint8 (session.x64quantprecision) on x86 only
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# what ONNX Runtime's optimizer turns the quantizer's MatMulInteger (+ scale) into; input 1 is the weight
INTEGER_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def runtime_options(force_conversion: bool = False) -> ort.SessionOptions:
    """The session options :class:`TinyMusicianONNX` uses for exact int8 products on this CPU; or, forced, the
    ones it uses on a CPU whose U8S8 kernel saturates."""
    if force_conversion:
        return conversion_options()
    options = ort.SessionOptions()
    exact_int8_options(options)
    return options


def assert_exact_products(
    b: np.ndarray, b_zero: np.ndarray, options: ort.SessionOptions | None = None
) -> None:
    """Worst-case activations (all 255) and random ones, against the integer product in NumPy."""
    rng = np.random.default_rng(0)
    for a, a_zero in (
        (np.full((2, b.shape[0]), 255, np.uint8), 0),
        (rng.integers(0, 256, (3, b.shape[0]), dtype=np.uint8), 117),
    ):
        exact = (a.astype(np.int64) - a_zero) @ (b.astype(np.int64) - b_zero.astype(np.int64))
        np.testing.assert_array_equal(matmul_integer(a, a_zero, b, b_zero, options), exact)


@pytest.mark.parametrize("graph", ["decoder_model_merged", "text_encoder"])
def test_int8_graphs_compute_exact_integer_products_on_this_cpu(bundle, graph):
    """The bundle's int8 format (manifest) is what its graph holds, and ONNX Runtime computes its integer
    products exactly on this CPU for worst-case activations (all 255) and random ones: U8S8 saturates its
    pairwise 16-bit sums on AVX2 without VNNI, U8U8 must not on any CPU."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["int8"]["weights"].startswith("uint8")
    assert manifest["quantization"]["int4"]["op"] == "MatMulNBits" and "fp32" not in manifest["quantization"]
    probes = integer_product_probes(onnx.load(bundle / "onnx" / f"{graph}_quantized.onnx"))
    assert probes and all(b.dtype == np.uint8 for b, _ in probes)
    extreme = np.full((64, 8), 255, np.uint8), np.zeros(8, np.uint8)  # the largest products, every pair
    for b, b_zero in [extreme, *probes]:
        assert_exact_products(b, b_zero)


@pytest.mark.parametrize("graph", ["decoder_fast", "decoder_text_kv"])
@pytest.mark.parametrize("force_conversion", [False, True], ids=["this-cpu", "converted"])
def test_fast_int8_graphs_compute_exact_products_with_the_runtimes_options(
    bundle, graph, force_conversion, tmp_path
):
    """The fast decoder's int8 graphs hold int8 weights (U8S8, faster where VNNI/AMX/ARM compute it exactly), and
    the runtime's session options make their products exact on this CPU; so does the conversion to uint8 it
    asks ONNX Runtime for on a CPU whose U8S8 saturates (forced here, so every CPU checks that path)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["int8"]["fast_decoder"]["weights"].startswith("int8")
    probes = integer_product_probes(onnx.load(bundle / "onnx" / f"{graph}_quantized.onnx"))
    assert probes and all(b.dtype == np.int8 for b, _ in probes)
    extreme = np.full((256, 8), 127, np.int8), np.zeros(8, np.int8)  # every pair saturates a 16-bit sum
    for b, b_zero in [extreme, *probes]:
        assert_exact_products(b, b_zero, runtime_options(force_conversion))
    if force_conversion and X86:  # where both products are exact, check that the conversion happened at all
        options = runtime_options(force_conversion=True)
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(bundle / "onnx" / f"{graph}_quantized.onnx"), options)
        optimized = onnx.load(options.optimized_model_filepath)
        types = {t.name: t.data_type for t in optimized.graph.initializer}
        integer_ops = [n for n in optimized.graph.node if n.op_type in INTEGER_MATMULS]
        assert integer_ops and all(types[n.input[1]] == onnx.TensorProto.UINT8 for n in integer_ops)


def test_u8s8_probe_tells_how_a_larger_product_behaves():
    """The runtime's verdict on this CPU (a 256-deep probe) holds for a decoder-sized worst case: exact when it
    says U8S8 is exact, not exact (saturated) when it says it saturates; and its options make it exact."""
    b, b_zero = np.full((1024, 64), 127, np.int8), np.zeros(64, np.int8)
    a = np.full((2, 1024), 255, np.uint8)
    exact = 255 * 127 * 1024
    assert bool(np.all(matmul_integer(a, 0, b, b_zero) == exact)) == (not u8s8_saturates())
    assert np.all(matmul_integer(a, 0, b, b_zero, runtime_options()) == exact)
    assert probe_is_exact(runtime_options()) and probe_is_exact(runtime_options(force_conversion=True))


def test_a_cpu_where_no_option_makes_int8_exact_is_warned_about(monkeypatch, caplog):
    """If ONNX Runtime's conversion did not make the products exact (a CPU it does not cover), the runtime says so
    and names what to use instead, rather than generating from saturated products in silence."""
    from tinymusician.onnx import int8_kernel

    monkeypatch.setattr(int8_kernel, "u8s8_saturates", lambda: True)
    monkeypatch.setattr(int8_kernel, "converted_is_exact", lambda: False)
    with caplog.at_level("WARNING", logger=int8_kernel.__name__):
        kernel = exact_int8_options(ort.SessionOptions())
    assert "not exact" in kernel and "decoder='merged'" in caplog.text and PRECISION_MODE in caplog.text


def test_shared_int8_weights_are_unshared_so_the_conversion_loads():
    """quantize_dynamic may feed one int8 weight to two matmuls; ONNX Runtime's conversion to uint8 then fails to
    load the graph (on x86, where it converts). The exporter gives each node its own copy, same products."""
    from onnx import TensorProto, helper, numpy_helper

    from tinymusician.onnx.export import unshare_initializers

    b = np.random.default_rng(0).integers(-128, 128, (32, 8), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", [x, "b"], [f"y{x}"]) for x in ("a", "c")],
        "shared",
        [helper.make_tensor_value_info(x, TensorProto.UINT8, [2, 32]) for x in ("a", "c")],
        [helper.make_tensor_value_info(f"y{x}", TensorProto.INT32, None) for x in ("a", "c")],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    forced = runtime_options(force_conversion=True)
    if X86:
        with pytest.raises(Exception, match="replace the existing tensor"):
            ort.InferenceSession(model.SerializeToString(), forced, providers=["CPUExecutionProvider"])
    unshared = unshare_initializers(model)
    assert (
        len(unshared.graph.initializer) == 2
        and unshared.graph.node[0].input[1] != unshared.graph.node[1].input[1]
    )
    session = ort.InferenceSession(unshared.SerializeToString(), forced, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 256, (2, 32), dtype=np.uint8)
    for result in session.run(None, {"a": a, "c": a}):
        np.testing.assert_array_equal(result, a.astype(np.int64) @ b.astype(np.int64))


def test_only_a_fast_int8_decoder_runs_the_probe(bundle, monkeypatch):
    """fp32, int4 and the merged decoder need no probe (nor the onnx import it costs)."""
    from tinymusician.onnx import runtime

    calls = []
    monkeypatch.setattr(runtime, "exact_int8_options", lambda options: calls.append(options) or "U8S8")
    for precision, decoder in (("fp32", "auto"), ("int4", "auto"), ("int8", "merged")):
        TinyMusicianONNX(bundle, precision=precision, decoder=decoder, threads=1)
    assert not calls
    assert TinyMusicianONNX(bundle, precision="int8", threads=1).int8_kernel == "U8S8" and len(calls) == 1


def test_runtime_with_converted_int8_weights_gives_the_same_logits(bundle, monkeypatch):
    """The fast int8 decoder as a CPU with a saturating U8S8 kernel loads it (weights converted to uint8 by ONNX
    Runtime) gives the logits this CPU's choice gives: both products are exact."""
    from tinymusician.onnx import int8_kernel
    from tinymusician.onnx.check import forced_logits

    native = TinyMusicianONNX(bundle, precision="int8", threads=1)
    codes = native.generate(PROMPTS, 0.5, seed=3, return_codes=True)[1]
    monkeypatch.setattr(int8_kernel, "u8s8_saturates", lambda: True)
    converted = TinyMusicianONNX(bundle, precision="int8", threads=1)
    assert converted.int8_kernel.startswith("U8U8") and native.int8_kernel in ("U8S8", converted.int8_kernel)
    merged = TinyMusicianONNX(bundle, precision="int8", decoder="merged", threads=1)
    assert merged.int8_kernel == "U8U8" and TinyMusicianONNX(bundle, precision="int4").int8_kernel is None
    assert converted.decoder == native.decoder == "fast"
    for graph in ("decoder_fast", "decoder_text_kv"):  # the option reaches the sessions that need it
        config = converted.sessions[graph].get_session_options().get_session_config_entry(PRECISION_MODE)
        assert config == "1", graph
    expected, where = forced_logits(native, PROMPTS, codes)
    np.testing.assert_allclose(forced_logits(converted, PROMPTS, codes)[0][where], expected[where], atol=1e-5)


# --- command line -----------------------------------------------------------------------------------------
def test_export_cli_writes_and_checks_a_bundle(tiny_pair, tmp_path, capsys, single_thread):
    from tinymusician.export import main as export_main

    out = tmp_path / "cli-bundle"
    assert export_main([str(tiny_pair.student), "--out", str(out), "--precision", "int8"]) == 0
    text = capsys.readouterr().out
    assert "decoder_model_merged_quantized.onnx" in text
    assert "fast decoder's self-attention cache: int8 int8" in text  # auto: quantized graphs, int8 cache
    error, limit = map(
        float, re.search(r"check int8 .*relative error ([0-9.]+) \(max ([0-9.]+)\)", text).groups()
    )
    assert error <= limit == 0.05 and "FAILED" not in text
    assert float(re.search(r"check int8 .*codes equal ([0-9.]+)", text).group(1)) >= 0.5  # a smoke check
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precisions"] == ["int8"] and "onnx/decoder_model_merged.onnx" not in manifest["files"]
    assert TinyMusicianONNX(out).precisions["decoder_model_merged"] == "int8"  # the bundle's only precision
    assert export_main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "MODEL=" in capsys.readouterr().err  # the message names the argument to fix


def test_export_cli_fails_when_the_bundle_does_not_reproduce_pytorch(
    tiny_pair, tmp_path, monkeypatch, capsys
):
    from tinymusician.export import main as export_main
    from tinymusician.onnx import check

    def broken(*args, **kwargs):
        return {"codes_equal": 0.5, "max_audio_diff": 0.1, "finite": True}

    monkeypatch.setattr(check, "compare_greedy", broken)
    assert export_main([str(tiny_pair.student), "--out", str(tmp_path / "b")]) == 1
    assert "FAILED" in capsys.readouterr().out
