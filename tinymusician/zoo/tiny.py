"""The tiny MusicGen recipe: sizes, caption tokenizer and config of the embedded default's teacher and student.

The trained pair itself is part of the tiny world (``tinymusician.world``: a trained codec, the teacher trained
around it, a tiny CLAP), shipped in ``tinymusician/assets/world`` and named ``tiny`` in configs. This module
holds what the world builder and the tests need to make such models: a T5 tokenizer whose vocabulary is the
synthetic corpus's caption words, and MusicGen configs of the two decoder sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
    T5Tokenizer,
)

from tinymusician.data.synthetic import caption_words
from tinymusician.shipped import WORLD_DIR, world_part


@dataclass(frozen=True)
class DecoderSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the embedded tiny pair (the codec's, when no trained codec is given)."""

    sample_rate: int = 16000
    codebook_size: int = 256
    num_codebooks: int = 4
    text_d_model: int = 64
    text_layers: int = 2
    teacher: DecoderSize = DecoderSize(hidden_size=128, num_layers=4, num_heads=4, ffn_dim=512)
    student: DecoderSize = DecoderSize(hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256)
    max_positions: int = 2048  # MusicGen's: 30 s clips (1500 frames) fit; the sinusoidal table is not stored
    seed: int = 0


@dataclass(frozen=True)
class TinyPair:
    """Directories written by ``save_pretrained`` (model + tokenizer), loadable like hub ids."""

    teacher: Path
    student: Path


def shipped_pair(root: Path = WORLD_DIR) -> TinyPair:
    """The tiny world's trained teacher and untrained student (``tiny`` in configs)."""
    return TinyPair(teacher=world_part("teacher", root), student=world_part("student", root))


def build_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer over the caption vocabulary, made without sentencepiece training or downloads."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{word}", -1.0) for word in caption_words()]
    vocab += [("\u2581", -4.0)] + [(char, -6.0) for char in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def codec_config(
    sample_rate: int,
    codebook_size: int,
    num_codebooks: int,
    *,
    ratios: tuple[int, ...] = (8, 5, 4, 2),  # hop 320: 50 frames/s at 16 kHz, as MusicGen's 50 Hz codes
    num_filters: int = 8,
    hidden_size: int = 32,
    causal: bool = True,
) -> EncodecConfig:
    """A small EnCodec config whose one bandwidth gives exactly ``num_codebooks`` codebooks."""
    bits = codebook_size.bit_length() - 1
    return EncodecConfig(
        sampling_rate=sample_rate,
        upsampling_ratios=list(ratios),
        num_filters=num_filters,
        hidden_size=hidden_size,
        num_lstm_layers=1,
        num_residual_layers=1,
        codebook_size=codebook_size,
        target_bandwidths=[num_codebooks * bits * sample_rate / math.prod(ratios) / 1000],
        normalize=False,
        use_causal_conv=causal,
    )


def musicgen_config(
    spec: TinySpec, size: DecoderSize, vocab_size: int, codec: EncodecConfig | None = None
) -> MusicgenConfig:
    """A tiny MusicGen: T5 of ``spec``, a decoder of ``size``, and ``codec`` (default: an untrained 50 Hz one)."""
    text = T5Config(
        vocab_size=vocab_size,
        d_model=spec.text_d_model,
        d_kv=16,
        d_ff=2 * spec.text_d_model,
        num_layers=spec.text_layers,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    codec = codec or codec_config(spec.sample_rate, spec.codebook_size, spec.num_codebooks, hidden_size=32)
    codebook_size = codec.codebook_size
    decoder = MusicgenDecoderConfig(
        vocab_size=codebook_size,
        num_codebooks=spec.num_codebooks,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        ffn_dim=size.ffn_dim,
        max_position_embeddings=spec.max_positions,
        dropout=0.0,
        pad_token_id=codebook_size,
        bos_token_id=codebook_size,
    )
    return MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder)


def build_untrained_pair(
    spec: TinySpec, codec_config: EncodecConfig | None = None, codec_state: dict | None = None
) -> tuple[MusicgenForConditionalGeneration, MusicgenForConditionalGeneration, T5Tokenizer]:
    """Teacher and student with shared (identical) T5 and EnCodec weights and random decoders.

    ``codec_config`` / ``codec_state``: a trained codec to build around (the world's); without them the codec
    is transformers' random init, whose all-zero codebooks map every frame to code 0.
    """
    tokenizer = build_tokenizer()
    torch.manual_seed(spec.seed)
    teacher = MusicgenForConditionalGeneration(
        musicgen_config(spec, spec.teacher, len(tokenizer), codec_config)
    )
    if codec_state is not None:
        teacher.audio_encoder.load_state_dict(codec_state)
    torch.manual_seed(spec.seed + 1)
    student = MusicgenForConditionalGeneration(
        musicgen_config(spec, spec.student, len(tokenizer), codec_config)
    )
    student.text_encoder.load_state_dict(teacher.text_encoder.state_dict())
    student.audio_encoder.load_state_dict(teacher.audio_encoder.state_dict())
    for model in (teacher, student):
        configure_generation(model)
    return teacher, student, tokenizer


def configure_generation(model: MusicgenForConditionalGeneration) -> None:
    """MusicGen's generation defaults (sampling, top-k 12% of the codes, CFG 3) with this model's special tokens."""
    gen = model.generation_config
    pad = model.config.decoder.pad_token_id
    gen.decoder_start_token_id = pad
    gen.pad_token_id = pad
    gen.bos_token_id = pad
    gen.do_sample = True
    # MusicGen samples from the top 250 of 2048 codes (12%); the same share of 256 codes is 32. Top-250 of
    # 256 would be plain sampling, whose tail draws are audible as noise through the codec.
    gen.top_k = max(1, round(250 / 2048 * model.config.decoder.vocab_size))
    gen.guidance_scale = 3.0
    gen.max_length = 1500
