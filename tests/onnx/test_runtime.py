"""The NumPy/ONNX Runtime generator on an exported bundle: delay pattern and sampling, greedy parity with
transformers, limits, a fresh process without torch, broken bundles, the generate command line and
transformers.js (Node) on the same bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinymusician.generate import main as generate_main
from tinymusician.models.generation import torch_generate
from tinymusician.onnx.runtime import (
    BundleError,
    GenerationError,
    TinyMusicianONNX,
    delay_pattern_mask,
    sample_next,
    undelay,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["calm piano with soft drums in a minor key", "loud fast guitar"]
JS_DIR = Path(__file__).parents[1] / "js"


@pytest.fixture(scope="module")
def runtime(bundle) -> TinyMusicianONNX:
    return TinyMusicianONNX(bundle, threads=1)


def frames_to_seconds(runtime: TinyMusicianONNX, frames: int) -> float:
    return frames / runtime.frame_rate


# --- delay pattern and sampling ---------------------------------------------------------------------------
def test_delay_pattern_mask_round_trip_and_layout():
    pattern = delay_pattern_mask(4, 6, pad=99)
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


# --- generation -------------------------------------------------------------------------------------------
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
    (broken / "onnx" / "decoder_fast_quantized.onnx").unlink()
    with pytest.raises(BundleError, match="decoder_fast_quantized.onnx: missing"):
        TinyMusicianONNX(broken, precision="int8")
    TinyMusicianONNX(broken, precision="int8", decoder="merged")  # the merged decoder does not need it
    TinyMusicianONNX(broken, precision="fp32")  # the other precision still loads
    (broken / "onnx" / "decoder_model_merged_quantized.onnx").unlink()
    with pytest.raises(BundleError, match="decoder_model_merged_quantized.onnx: missing"):
        TinyMusicianONNX(broken, precision="int8", decoder="merged")

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


# --- command line -----------------------------------------------------------------------------------------
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
    else:  # the same int8 graph (the merged decoder) through ONNX Runtime in Python
        ref_audio, ref_codes = TinyMusicianONNX(
            bundle, precision=precision, threads=1, decoder="merged"
        ).generate(PROMPTS, frames / 50, guidance_scale=guidance, do_sample=False, return_codes=True)
    assert codes.shape == ref_codes.shape
    # transformers.js does not force the end of the delay pattern to pad (REFERENCES.md): only codes in the
    # last K-1 frames may differ, at most (K-2)(K-1)/2 of them per prompt.
    differ = codes != ref_codes
    assert not differ[:, :, : frames - (k - 1)].any()
    assert differ.sum(axis=(1, 2)).max() <= (k - 2) * (k - 1) // 2
    if not differ.any():
        np.testing.assert_allclose(audio, ref_audio, atol=1e-4)
    assert np.isfinite(audio).all()
