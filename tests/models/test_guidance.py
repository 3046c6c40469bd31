"""Classifier-free guidance as transformers' MusicGen does it, in teacher forcing, and guidance-distilled students."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

from tests.conftest import CAPTIONS
from tinymusician.models.generation import GenerationError, torch_generate
from tinymusician.models.musicgen import (
    DEFAULT_GUIDANCE_SCALE,
    default_guidance_scale,
    guidance_distilled_scale,
    load_musicgen,
    save_musicgen,
    set_guidance_distilled,
    teacher_forcing,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher(tiny_pair):
    return load_musicgen(str(tiny_pair.teacher))


def flat(logits: torch.Tensor) -> torch.Tensor:
    """``[B, K, T, V]`` -> transformers' ``(B*K, T, V)`` rows."""
    batch, codebooks, steps, vocab = logits.shape
    return logits.reshape(batch * codebooks, steps, vocab)


def test_guided_targets_equal_transformers_cfg_processor_on_the_same_logits(teacher, tokenizer, batch_maker):
    batch = batch_maker(teacher, tokenizer, count=1)[0]
    forcing = teacher_forcing(teacher, batch)
    with torch.no_grad():
        cond = forcing.logits(teacher)
    uncond_forcing = teacher_forcing(teacher, batch)
    uncond_forcing.text_mask = torch.zeros_like(uncond_forcing.text_mask)  # MusicGen's null condition
    with torch.no_grad():
        uncond = uncond_forcing.logits(teacher)
        guided = forcing.logits(teacher, 3.0)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the caption matters to the trained teacher
    processor = ClassifierFreeGuidanceLogitsProcessor(3.0)
    for step in (0, 5, guided.shape[2] - 1):
        scores = torch.cat([flat(cond)[:, step], flat(uncond)[:, step]])  # transformers' doubled batch
        input_ids = torch.zeros(scores.shape[0] // 2, 1, dtype=torch.long)  # only its batch size is read
        expected = processor(input_ids, scores)
        torch.testing.assert_close(flat(guided)[:, step], expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(forcing.logits(teacher, 1.0), cond)  # scale 1: the conditional teacher, one pass


def test_teacher_forced_guided_logits_are_what_generate_samples_from(teacher, tokenizer):
    """Greedy ``generate`` with CFG 3: its processed scores at every step equal the guided teacher forcing of the
    codes it produced (same null condition, same mix, same delay pattern)."""
    prompts = CAPTIONS[:2]  # different lengths: padded text
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    frames = 12
    with torch.inference_mode():
        out = teacher.generate(
            **text,
            do_sample=False,
            guidance_scale=3.0,
            max_new_tokens=frames + 3,
            output_scores=True,
            return_dict_in_generate=True,
        )
    _, codes = torch_generate(teacher, tokenizer, prompts, frames, guidance_scale=3.0, do_sample=False)
    codes = torch.from_numpy(codes)
    forcing = teacher_forcing(teacher, {"codes": codes, **text})
    with torch.no_grad():
        guided = forcing.logits(teacher, 3.0)  # [B, K, T + K - 1, V]
    valid = forcing.delayed.valid
    scores = torch.stack(out.scores, dim=1).reshape(guided.shape)  # steps of (B*K, V)
    torch.testing.assert_close(guided[valid], scores[valid], rtol=1e-4, atol=1e-4)


def count_decoder_rows(model, run) -> list[int]:
    rows: list[int] = []
    handle = model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        run()
    finally:
        handle.remove()
    return rows


def test_a_guidance_distilled_student_generates_in_one_pass_at_batch_one(tiny_pair, tokenizer, tmp_path):
    student = load_musicgen(str(tiny_pair.student))
    frames, codebooks = 10, student.decoder.config.num_codebooks
    assert default_guidance_scale(student) == DEFAULT_GUIDANCE_SCALE
    cfg_rows = count_decoder_rows(
        student, lambda: torch_generate(student, tokenizer, ["a tune"], frames, seed=0)
    )
    steps = frames + codebooks - 1
    # one decoder call per step (transformers 5 adds one call past the last step), conditional + null rows
    assert len(cfg_rows) in (steps, steps + 1) and set(cfg_rows) == {2 * codebooks}

    set_guidance_distilled(student, 3.0)
    save_musicgen(student, tokenizer, tmp_path / "guided")
    loaded = load_musicgen(str(tmp_path / "guided"))
    assert guidance_distilled_scale(loaded) == 3.0 and default_guidance_scale(loaded) == 1.0
    assert loaded.generation_config.guidance_scale == 1.0  # transformers' own generate: one pass too
    rows = count_decoder_rows(loaded, lambda: torch_generate(loaded, tokenizer, ["a tune"], frames, seed=0))
    assert rows == [codebooks] * len(cfg_rows)  # batch 1: K rows per step, half the CFG work
    forced = count_decoder_rows(
        loaded, lambda: torch_generate(loaded, tokenizer, ["a tune"], frames, guidance_scale=3.0, seed=0)
    )
    assert forced == cfg_rows  # users can still force CFG
    with pytest.raises(GenerationError, match="guidance_scale=0.5"):
        torch_generate(loaded, tokenizer, ["a tune"], frames, guidance_scale=0.5)

    set_guidance_distilled(loaded, None)  # distilled again without guidance: an ordinary student
    assert (
        guidance_distilled_scale(loaded) is None and default_guidance_scale(loaded) == DEFAULT_GUIDANCE_SCALE
    )
