"""A guidance-distilled student's bundle: the manifest records it and the runtime generates in one pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.onnx.conftest import decoder_calls, one_torch_thread
from tinymusician.models.generation import torch_generate
from tinymusician.models.musicgen import load_musicgen, load_tokenizer, set_guidance_distilled
from tinymusician.onnx.export import export_bundle
from tinymusician.onnx.runtime import TinyMusicianONNX

pytestmark = pytest.mark.usefixtures("single_thread")


def decoder_rows(runtime: TinyMusicianONNX, **kwargs) -> list[int]:
    """The rows of input_ids of each decoder call of one generation."""
    with decoder_calls(runtime) as rows:
        runtime.generate("a tune", 0.2, seed=0, **kwargs)
    return rows


def test_ordinary_bundles_keep_cfg_as_their_default(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["guidance"] == {"distilled_scale": None, "default_scale": 3.0}
    runtime = TinyMusicianONNX(bundle)
    assert runtime.default_guidance_scale == 3.0
    assert set(decoder_rows(runtime)) == {2 * runtime.facts["num_codebooks"]}


def test_a_guidance_distilled_bundle_runs_one_pass_per_step_and_can_be_forced_to_cfg(tiny_pair, tmp_path):
    student, tokenizer = load_musicgen(str(tiny_pair.student)), load_tokenizer(str(tiny_pair.student))
    set_guidance_distilled(student, 3.0)
    out = tmp_path / "guided"
    with one_torch_thread():
        export_bundle(student, tokenizer, out, precisions=["fp32"], source="guidance-distilled test student")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["guidance"] == {"distilled_scale": 3.0, "default_scale": 1.0}
    assert (
        json.loads((out / "generation_config.json").read_text())["guidance_scale"] == 1.0
    )  # transformers.js
    runtime = TinyMusicianONNX(out)
    codebooks = runtime.facts["num_codebooks"]
    one_pass = decoder_rows(runtime)
    assert set(one_pass) == {codebooks} and len(one_pass) == runtime.frames_for(0.2) + codebooks - 1
    assert set(decoder_rows(runtime, guidance_scale=3.0)) == {2 * codebooks}
    # greedy one-pass codes are PyTorch's one-pass codes (both read the model's default)
    _, codes = runtime.generate(["a tune"], 0.2, do_sample=False, return_codes=True)
    _, reference = torch_generate(student, tokenizer, ["a tune"], runtime.frames_for(0.2), do_sample=False)
    np.testing.assert_array_equal(codes, reference)
