"""Bundles shared by the ONNX tests, exported once per session (export is the slow part of these tests)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tinymusician.models.musicgen import load_musicgen, load_tokenizer
from tinymusician.onnx.export import export_bundle
from tinymusician.onnx.graphs import DecoderGraph


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """The root conftest's ``single_thread`` for session fixtures (it is module-scoped, so they cannot use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def decoder_calls(runtime) -> Iterator[list[int]]:
    """Record the rows of ``input_ids`` of every decoder step the runtime takes (either decoder graph)."""
    rows: list[int] = []
    make = runtime.decoder_steps

    def counting(*args, **kwargs):
        decode = make(*args, **kwargs)

        def step(ids, position):
            rows.append(ids.shape[0])
            return decode(ids, position)

        return step

    runtime.decoder_steps = counting
    try:
        yield rows
    finally:
        del runtime.decoder_steps  # back to the class's method


@pytest.fixture(scope="session")
def bundle(tiny_pair, tmp_path_factory) -> Path:
    """The fast tiny student (k-means codebooks, so codes matter) exported in fp32, int8 and int4."""
    student, tokenizer = load_musicgen(str(tiny_pair.student)), load_tokenizer(str(tiny_pair.student))
    out = tmp_path_factory.mktemp("bundle") / "tiny-musicgen"
    with one_torch_thread():
        export_bundle(
            student, tokenizer, out, precisions=["fp32", "int8", "int4"], source="tiny test student"
        )
    return out


@pytest.fixture(scope="session")
def projected(tiny_pair, tmp_path_factory):
    """The tiny teacher: its decoder is wider than T5 (128 vs 64), so enc_to_dec_proj is in the graph.

    (model, tokenizer, bundle); in tests/onnx this replaces the root conftest's random ``projected`` model.
    """
    model = load_musicgen(str(tiny_pair.teacher))
    tokenizer = load_tokenizer(str(tiny_pair.teacher))
    assert DecoderGraph(model, with_past=False).enc_to_dec_proj is not None
    out = tmp_path_factory.mktemp("teacher-bundle") / "teacher"
    with one_torch_thread():
        export_bundle(model, tokenizer, out, precisions=["fp32", "int8", "int4"])
    return model, tokenizer, out
