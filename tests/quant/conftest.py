"""Fixtures of the quantization tests: the tiny student, its tokenizer, fixed teacher-forcing batches."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import MusicgenForConditionalGeneration

from tinymusician.models.tiny import (
    DecoderSize,
    TinySpec,
    build_tokenizer,
    configure_generation,
    musicgen_config,
)

CAPTIONS = ["a calm piano melody", "fast bright drums with a deep bass line", "slow organ chords", "a tune"]


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()  # MusicGen's pad id == vocab size is by design


@pytest.fixture(scope="module", autouse=True)
def one_thread(single_thread):
    """Every quantization test module runs single-threaded (see tests/conftest.py: single_thread)."""
    yield


def make_batches(model, tokenizer, count: int = 2, frames: int = 16, seed: int = 0) -> list[dict]:
    """Teacher-forcing batches (random codes, padded captions, one shorter clip per batch)."""
    generator = torch.Generator().manual_seed(seed)
    text = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    batches = []
    for _ in range(count):
        codes = torch.randint(
            0, model.config.decoder.vocab_size, (len(CAPTIONS), 4, frames), generator=generator
        )
        lengths = torch.full((len(CAPTIONS),), frames)
        lengths[-1] = frames // 2
        batches.append({"codes": codes, "lengths": lengths, **text})
    return batches


@pytest.fixture(scope="module")
def batches(student, tokenizer) -> list[dict]:
    return make_batches(student, tokenizer)


@pytest.fixture(scope="session")
def batch_maker():
    return make_batches


@pytest.fixture(scope="module")
def projected() -> MusicgenForConditionalGeneration:
    """A random tiny MusicGen whose decoder width (48) differs from T5's (64): it has enc_to_dec_proj."""
    torch.manual_seed(0)
    spec = TinySpec()
    model = MusicgenForConditionalGeneration(
        musicgen_config(
            spec, DecoderSize(hidden_size=48, num_layers=3, num_heads=4, ffn_dim=96), len(build_tokenizer())
        )
    )
    configure_generation(model)
    with torch.no_grad():  # a random EnCodec has all-zero codebooks: give the codes something to decode
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    return model.eval()
