"""Each ONNX graph of the exported bundle against PyTorch, on shapes not used at export, and the tensor names
transformers.js feeds (the tiny student, and the tiny teacher whose decoder projects the text states)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tinymusician.models.generation import torch_generate
from tinymusician.onnx.graphs import DecoderGraph, EncodecDecodeGraph, TextEncoderGraph, past_names
from tinymusician.onnx.runtime import TinyMusicianONNX

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["calm piano with soft drums in a minor key", "loud fast guitar"]


def session(bundle: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle / "onnx" / f"{name}.onnx"), providers=["CPUExecutionProvider"])


# --- names ------------------------------------------------------------------------------------------------
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
