"""ONNX export and the NumPy/ONNX Runtime generator, on the tiny student (k-means codebooks, so codes matter)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tinymusician.generate import main as generate_main
from tinymusician.models.generation import torch_generate
from tinymusician.onnx.export import export_bundle
from tinymusician.onnx.graphs import DecoderGraph, EncodecDecodeGraph, TextEncoderGraph, past_names
from tinymusician.onnx.runtime import (
    BundleError,
    GenerationError,
    TinyMusicianONNX,
    delay_pattern,
    sample_next,
    undelay,
)

PROMPTS = ["calm piano with soft drums in a minor key", "loud fast guitar"]
JS_DIR = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def bundle(student, tokenizer, tmp_path_factory, single_thread) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny-musicgen"
    export_bundle(student, tokenizer, out, precisions=["fp32", "int8", "int4"], source="tiny test student")
    return out


@pytest.fixture(scope="module")
def runtime(bundle) -> TinyMusicianONNX:
    return TinyMusicianONNX(bundle, threads=1)


def session(bundle: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle / "onnx" / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def frames_to_seconds(runtime: TinyMusicianONNX, frames: int) -> float:
    return frames / runtime.frame_rate


# --- layout and names -------------------------------------------------------------------------------------
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
    assert set(manifest["files"]) == expected
    for relative, entry in manifest["files"].items():
        assert (bundle / relative).stat().st_size == entry["bytes"]
    assert manifest["opset"] >= 14 and manifest["versions"]["onnxruntime"]
    sizes = {r: e["bytes"] for r, e in manifest["files"].items()}
    assert sizes["onnx/decoder_model_merged_quantized.onnx"] < sizes["onnx/decoder_model_merged.onnx"]
    assert sizes["onnx/decoder_model_merged_q4.onnx"] < sizes["onnx/decoder_model_merged_quantized.onnx"]


def test_tensor_names_are_the_ones_transformers_js_feeds(bundle, student):
    layers = student.decoder.config.num_hidden_layers
    text = session(bundle, "text_encoder")
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in text.get_outputs()] == ["last_hidden_state"]
    decoder = session(bundle, "decoder_model_merged")
    inputs = {i.name: i for i in decoder.get_inputs()}
    assert set(inputs) == {
        "input_ids",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "use_cache_branch",
        *past_names(layers),
    }
    assert inputs["use_cache_branch"].type == "tensor(bool)"
    for name in past_names(layers):
        assert inputs[name].shape[0] == "batch_size"  # transformers.js fills exactly this name
        assert isinstance(inputs[name].shape[2], str)  # other named dims get 0 on the first step
    assert [o.name for o in decoder.get_outputs()] == ["logits", *past_names(layers, "present")]
    codec = session(bundle, "encodec_decode")
    assert [i.name for i in codec.get_inputs()] == ["audio_codes"]
    assert codec.get_inputs()[0].type == "tensor(int64)"
    assert [o.name for o in codec.get_outputs()] == ["audio_values"]


# --- each graph against PyTorch on shapes not used at export ----------------------------------------------
def test_text_encoder_graph_matches_pytorch(bundle, student):
    ids = torch.randint(3, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    with torch.no_grad():
        ref = TextEncoderGraph(student)(ids, mask).numpy()
    got = session(bundle, "text_encoder").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize(
    "batch,text_len,steps,past_len,masked_row",
    [(1, 3, 1, 0, False), (3, 8, 4, 0, True), (3, 8, 1, 6, True), (2, 5, 1, 4, False), (1, 2, 2, 9, False)],
)
def test_merged_decoder_matches_pytorch(bundle, student, batch, text_len, steps, past_len, masked_row):
    """Against transformers' own decoder (DecoderGraph), padded and fully masked (unconditional) text rows."""
    config = student.decoder.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim, k = config.hidden_size // heads, config.num_codebooks
    generator = torch.Generator().manual_seed(batch * 100 + steps)
    hidden = torch.randn(batch, text_len, student.text_encoder.config.hidden_size, generator=generator)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, text_len // 2 + 1 :] = 0
    if masked_row:
        mask[-1] = 0
    ids = torch.randint(0, config.vocab_size, (batch * k, steps), generator=generator)
    past = [
        torch.randn(batch, heads, past_len if ".decoder." in n else text_len, head_dim, generator=generator)
        for n in past_names(layers)
    ]
    with torch.no_grad():
        ref = DecoderGraph(student, with_past=past_len > 0)(ids, hidden, mask, *(past if past_len else []))
    feeds = {
        "input_ids": ids.numpy(),
        "encoder_hidden_states": hidden.numpy(),
        "encoder_attention_mask": mask.numpy(),
    }
    feeds["use_cache_branch"] = np.array([past_len > 0])
    for name, tensor in zip(past_names(layers), past, strict=True):
        # the first step gets empty pasts sized as transformers.js sizes them (by input_ids' batch, B*K)
        feeds[name] = tensor.numpy() if past_len else np.zeros((batch * k, heads, 0, head_dim), np.float32)
    got = session(bundle, "decoder_model_merged").run(None, feeds)
    assert len(got) == len(ref)
    for out, expected in zip(got, ref, strict=True):
        assert out.shape == tuple(expected.shape)
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-4)


def test_encodec_decode_graph_matches_pytorch(bundle, student):
    codes = torch.randint(
        0, student.decoder.config.vocab_size, (1, 3, student.decoder.config.num_codebooks, 19)
    )
    with torch.no_grad():
        ref = EncodecDecodeGraph(student)(codes).numpy()
    got = session(bundle, "encodec_decode").run(None, {"audio_codes": codes.numpy()})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.abs(ref).max() > 1e-3  # codes matter: the codec does not decode silence


@pytest.fixture(scope="module")
def projected(tiny_pair, tmp_path_factory, single_thread):
    """The tiny teacher: its decoder is wider than T5 (128 vs 64), so enc_to_dec_proj is in the graph."""
    from tinymusician.models.musicgen import load_musicgen, load_tokenizer

    model = load_musicgen(str(tiny_pair.teacher))
    tokenizer = load_tokenizer(str(tiny_pair.teacher))
    assert DecoderGraph(model, with_past=False).enc_to_dec_proj is not None
    out = tmp_path_factory.mktemp("teacher-bundle") / "teacher"
    export_bundle(model, tokenizer, out, precisions=["fp32", "int8", "int4"])
    return model, tokenizer, out


def test_projected_text_states_match_pytorch(projected):
    model, tokenizer, bundle = projected
    config = model.decoder.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    hidden = torch.randn(2, 6, model.text_encoder.config.hidden_size)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1] = 0
    ids = torch.randint(0, config.vocab_size, (2 * config.num_codebooks, 3))
    with torch.no_grad():
        ref = DecoderGraph(model, with_past=False)(ids, hidden, mask)
    feeds = {
        "input_ids": ids.numpy(),
        "encoder_hidden_states": hidden.numpy(),
        "encoder_attention_mask": mask.numpy(),
    }
    feeds["use_cache_branch"] = np.array([False])
    for name in past_names(config.num_hidden_layers):
        feeds[name] = np.zeros((2, heads, 0, head_dim), np.float32)
    got = session(bundle, "decoder_model_merged").run(None, feeds)
    for out, expected in zip(got, ref, strict=True):
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-4)
    frames = 16
    codes = TinyMusicianONNX(bundle, threads=1).generate(
        PROMPTS, frames / 50, do_sample=False, return_codes=True
    )[1]
    ref_codes = torch_generate(model, tokenizer, PROMPTS, frames, do_sample=False)[1]
    np.testing.assert_array_equal(codes, ref_codes)


# --- generation -------------------------------------------------------------------------------------------
def test_delay_pattern_round_trip_and_layout():
    pattern = delay_pattern(4, 6, pad=99)
    assert pattern.shape == (4, 10)
    assert (pattern[:, 0] == 99).all()
    for k in range(4):
        assert (np.flatnonzero(pattern[k] == -1) == np.arange(k + 1, k + 7)).all()
    codes = np.arange(2 * 4 * 6).reshape(2, 4, 6)
    delayed = np.full((2, 4, 10), 99)
    for k in range(4):
        delayed[:, k, k + 1 : k + 7] = codes[:, k]
    np.testing.assert_array_equal(undelay(delayed, 6), codes)


def test_sampling_follows_the_softmax():
    scores = np.log(np.array([[0.6, 0.3, 0.1]], dtype=np.float32)).repeat(20000, axis=0)
    picked = sample_next(scores, np.random.default_rng(0), temperature=1.0, top_k=0)
    np.testing.assert_allclose(np.bincount(picked, minlength=3) / len(picked), [0.6, 0.3, 0.1], atol=0.015)
    hot = sample_next(scores, np.random.default_rng(0), temperature=2.0, top_k=0)
    expected = np.array([0.6, 0.3, 0.1]) ** 0.5
    np.testing.assert_allclose(
        np.bincount(hot, minlength=3) / len(hot), expected / expected.sum(), atol=0.015
    )


def test_sampling_respects_top_k_and_temperature():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2000, 50)).astype(np.float32)
    top3 = np.argsort(scores, axis=-1)[:, -3:]
    picked = sample_next(scores, np.random.default_rng(1), temperature=1.0, top_k=3)
    assert all(p in row for p, row in zip(picked, top3, strict=True))
    np.testing.assert_array_equal(sample_next(scores, None, 1.0, 3), scores.argmax(-1))
    cold = sample_next(scores, np.random.default_rng(1), temperature=1e-3, top_k=0)
    assert (cold == scores.argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_greedy_onnx_generation_reproduces_transformers(runtime, student, tokenizer, guidance_scale):
    frames = 24
    audio, codes = runtime.generate(
        PROMPTS,
        frames_to_seconds(runtime, frames),
        guidance_scale=guidance_scale,
        do_sample=False,
        return_codes=True,
    )
    ref_audio, ref_codes = torch_generate(
        student, tokenizer, PROMPTS, frames, guidance_scale=guidance_scale, do_sample=False
    )
    assert codes.shape == ref_codes.shape == (2, student.decoder.config.num_codebooks, frames)
    np.testing.assert_array_equal(codes, ref_codes)
    assert audio.shape == ref_audio.shape
    np.testing.assert_allclose(audio, ref_audio, atol=1e-4)
    assert runtime.last_stats["rtf"] > 0 and runtime.last_stats["audio_s"] == pytest.approx(frames / 50)


def test_tokenization_matches_transformers(runtime, tokenizer):
    ids, mask = runtime.encode_prompts(PROMPTS)
    ref = tokenizer(PROMPTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_bundles_generate_finite_audio(bundle, runtime, precision):
    """A smoke check only: greedy runs of a random student flip at near-tied logits and then diverge, so their
    agreement says little about quantization (the teacher-forced tests below measure it)."""
    quantized = TinyMusicianONNX(bundle, precision=precision, threads=1)
    seconds = frames_to_seconds(runtime, 40)
    audio, codes = quantized.generate(PROMPTS, seconds, do_sample=False, return_codes=True)
    _, fp32_codes = runtime.generate(PROMPTS, seconds, do_sample=False, return_codes=True)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
    assert (codes == fp32_codes).mean() >= 0.5


# --- quantization fidelity: teacher-forced logits through the KV-cache loop -------------------------------
# Relative to the logits' spread, per model, independent of check.MAX_RELATIVE_ERROR (the export check's
# limits for any user model) so that loosening that check cannot loosen these. Measured on this AVX2 CPU
# without VNNI, student / teacher: int8 (uint8 weights) 0.007 / 0.006, int4 0.087 / 0.038; every weight scale
# off by 10%: int8 0.10 / 0.11, int4 0.137 / 0.126; int8 weights (U8S8, saturating here) 0.24 / 0.04.
MAX_ERROR = {
    "student": {"fp32": 1e-4, "int8": 0.025, "int4": 0.12},
    "teacher": {"fp32": 1e-4, "int8": 0.025, "int4": 0.08},
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


def matmul_integer(a: np.ndarray, a_zero: int, b: np.ndarray, b_zero: np.ndarray) -> np.ndarray:
    """ONNX Runtime's MatMulInteger on this CPU (int32 result)."""
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
    runner = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return runner.run(None, {"a": a})[0]


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
    rng = np.random.default_rng(0)
    extreme = np.full((64, 8), 255, np.uint8), np.zeros(8, np.uint8)  # the largest products, every pair
    for b, b_zero in [extreme, *probes]:
        for a, a_zero in (
            (np.full((2, b.shape[0]), 255, np.uint8), 0),
            (rng.integers(0, 256, (3, b.shape[0]), dtype=np.uint8), 117),
        ):
            exact = (a.astype(np.int64) - a_zero) @ (b.astype(np.int64) - b_zero.astype(np.int64))
            np.testing.assert_array_equal(matmul_integer(a, a_zero, b, b_zero), exact)


def test_sampling_is_seeded(runtime):
    seconds = frames_to_seconds(runtime, 12)
    first = runtime.generate(PROMPTS[:1], seconds, seed=3)
    again = runtime.generate(PROMPTS[:1], seconds, seed=3)
    other = runtime.generate(PROMPTS[:1], seconds, seed=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_prompt_and_length_limits(runtime, bundle, caplog):
    with pytest.raises(GenerationError, match="empty"):
        runtime.generate(["piano", "  "], 0.5)
    with pytest.raises(GenerationError, match="temperature"):
        runtime.generate(["piano"], 0.5, temperature=0.0)
    assert np.isfinite(runtime.generate(["piano"], 0.3, temperature=0.0, do_sample=False)).all()
    with pytest.raises(GenerationError, match="frames"):
        runtime.generate(PROMPTS, frames_to_seconds(runtime, runtime.facts["min_frames"] - 1))
    with pytest.raises(GenerationError, match="frames"):
        runtime.generate(PROMPTS, frames_to_seconds(runtime, runtime.facts["max_frames"] + 1))
    limit = runtime.manifest["max_text_tokens"]
    long_prompt = " ".join(["piano"] * (limit + 20))
    ids, mask = runtime.encode_prompts([long_prompt, "drums"])
    assert ids.shape[1] == limit and mask[1].sum() < limit
    assert ids[0, -1] == runtime.tokenizer.token_to_id("</s>")  # truncation keeps the end-of-text token
    assert "truncated" in caplog.text
    audio = runtime.generate([long_prompt], frames_to_seconds(runtime, 8), do_sample=False)
    assert np.isfinite(audio).all()


# --- loading: fresh process without torch, broken bundles -------------------------------------------------
def test_bundle_generates_in_a_fresh_process_without_torch(bundle):
    code = f"""
import sys
sys.modules["torch"] = None  # any torch import fails: the ONNX backend must not need it
from tinymusician.onnx.runtime import TinyMusicianONNX
model = TinyMusicianONNX({str(bundle)!r}, precision="int8", threads=1)
audio = model.generate(["calm piano"], 0.3, seed=0)
assert audio.shape == (1, 0.3 * 50 * 320), audio.shape
print("ok", model.last_stats["rtf"])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_missing_or_replaced_files_fail_clearly(bundle, tmp_path, student):
    broken = copy_bundle(bundle, tmp_path)
    (broken / "onnx" / "decoder_model_merged_quantized.onnx").unlink()
    with pytest.raises(BundleError, match="decoder_model_merged_quantized.onnx: missing"):
        TinyMusicianONNX(broken, precision="int8")
    TinyMusicianONNX(broken, precision="fp32")  # the other precision still loads

    truncated = broken / "onnx" / "encodec_decode.onnx"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(BundleError, match="encodec_decode.onnx: 1000 bytes"):
        TinyMusicianONNX(broken)

    with pytest.raises(BundleError, match="manifest.json: missing"):
        TinyMusicianONNX(tmp_path)
    with pytest.raises(BundleError, match="precision="):
        TinyMusicianONNX(bundle, precision="fp8")


def test_config_from_another_model_is_rejected(bundle, tmp_path):
    mixed = copy_bundle(bundle, tmp_path)
    config = json.loads((mixed / "config.json").read_text())
    config["decoder"]["num_codebooks"] = 8
    (mixed / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="num_codebooks=8"):
        TinyMusicianONNX(mixed)


def test_hash_verification_catches_a_same_size_change(bundle, tmp_path):
    changed = copy_bundle(bundle, tmp_path)
    path = changed / "onnx" / "text_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        TinyMusicianONNX(changed, verify_hashes=True)


# --- command lines ----------------------------------------------------------------------------------------
def test_generate_cli_with_both_backends(bundle, tiny_pair, tmp_path, capsys):
    import soundfile as sf

    out = tmp_path / "onnx.wav"
    args = ["--seconds", "0.4", "--greedy", "--threads", "1"]
    assert (
        generate_main([*PROMPTS, "--model", str(bundle), "--out", str(out), "--precision", "int8", *args])
        == 0
    )
    assert "real-time factor" in capsys.readouterr().out
    assert sf.info(str(out)).frames == 20 * 320 and (tmp_path / "onnx-1.wav").is_file()
    torch_out = tmp_path / "torch.wav"
    assert generate_main([PROMPTS[0], "--model", str(tiny_pair.student), "--out", str(torch_out), *args]) == 0
    assert sf.info(str(torch_out)).frames == 20 * 320
    assert generate_main(["", "--model", str(bundle), "--out", str(out)]) == 2
    assert "empty" in capsys.readouterr().err


def test_export_cli_writes_and_checks_a_bundle(tiny_pair, tmp_path, capsys, single_thread):
    from tinymusician.export import main as export_main

    out = tmp_path / "cli-bundle"
    assert export_main([str(tiny_pair.student), "--out", str(out), "--precision", "int8"]) == 0
    text = capsys.readouterr().out
    assert "decoder_model_merged_quantized.onnx" in text
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


# --- transformers.js (Node) -------------------------------------------------------------------------------
def run_transformers_js(bundle: Path, dtype: str, out: Path, new_tokens: int, guidance: float) -> dict:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the transformers.js test needs Node.js >= 18")
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail(f"transformers.js is not installed: cd {JS_DIR} && ONNXRUNTIME_NODE_INSTALL=skip npm ci")
    command = ["node", "generate.mjs", str(bundle), dtype, str(out), str(new_tokens), str(guidance), *PROMPTS]
    result = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def as_array(entry: dict, dtype=np.float32) -> np.ndarray:
    return np.asarray(entry["data"], dtype=dtype).reshape(entry["dims"])


@pytest.mark.parametrize("dtype,precision", [("fp32", "fp32"), ("q8", "int8")])
def test_transformers_js_generates_the_same_codes(bundle, student, tokenizer, tmp_path, dtype, precision):
    k = student.decoder.config.num_codebooks
    frames, guidance = 20, 3.0
    result = run_transformers_js(bundle, dtype, tmp_path / "out.json", frames + k - 1, guidance)
    codes = as_array(result["codes"], np.int64)
    audio = as_array(result["audio"])[:, 0]
    ids, _ = TinyMusicianONNX(bundle).encode_prompts(PROMPTS)
    np.testing.assert_array_equal(as_array(result["input_ids"], np.int64), ids)
    if precision == "fp32":
        ref_audio, ref_codes = torch_generate(
            student, tokenizer, PROMPTS, frames, guidance_scale=guidance, do_sample=False
        )
    else:  # the same int8 graphs through ONNX Runtime in Python
        ref_audio, ref_codes = TinyMusicianONNX(bundle, precision=precision, threads=1).generate(
            PROMPTS, frames / 50, guidance_scale=guidance, do_sample=False, return_codes=True
        )
    assert codes.shape == ref_codes.shape
    # transformers.js does not force the end of the delay pattern to pad (REFERENCES.md): only codes in the
    # last K-1 frames may differ, at most (K-2)(K-1)/2 of them per prompt.
    differ = codes != ref_codes
    assert not differ[:, :, : frames - (k - 1)].any()
    assert differ.sum(axis=(1, 2)).max() <= (k - 2) * (k - 1) // 2
    if not differ.any():
        np.testing.assert_allclose(audio, ref_audio, atol=1e-4)
    assert np.isfinite(audio).all()
