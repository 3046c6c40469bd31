"""Tiny MusicGen teacher/student pairs built offline: the embedded default and the test fixtures.

The recipe is deterministic (seeded) and cached by a hash of :class:`TinySpec`, so the first run builds it
and later runs load it through the same ``from_pretrained`` path as the real hub checkpoints:

1. a T5 tokenizer whose vocabulary is the synthetic corpus's caption words (+ letters as fallback);
2. a tiny T5 encoder and a tiny EnCodec whose codebooks are initialised from encoder latents of synthetic
   audio (a random codec has all-zero codebooks, which would map every frame to code 0);
3. a teacher decoder wider and deeper than the student's, both sharing T5 and EnCodec weights;
4. the teacher trained with cross-entropy on its own synthetic clips (a different seed from the default
   distillation corpus), so that distillation has a real signal.

``python -m tinymusician.zoo.tiny [--force]`` (re)builds the default pair and prints where it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import time
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

from tinymusician.data.synthetic import caption_words, synthesize_corpus
from tinymusician.models.musicgen import save_musicgen

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the recipe below changes, so stale caches are rebuilt
DEFAULT_CACHE_DIR = "~/.cache/tinymusician"


@dataclass(frozen=True)
class DecoderSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int


@dataclass(frozen=True)
class TinySpec:
    """Sizes and training budget of the embedded tiny pair (defaults: a few minutes on a 2-core CPU)."""

    sample_rate: int = 16000
    codebook_size: int = 256
    num_codebooks: int = 4
    text_d_model: int = 64
    text_layers: int = 2
    teacher: DecoderSize = DecoderSize(hidden_size=128, num_layers=4, num_heads=4, ffn_dim=512)
    student: DecoderSize = DecoderSize(hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256)
    max_positions: int = 1024
    seed: int = 0
    teacher_clips: int = 1024
    teacher_seconds: float = 2.0
    teacher_steps: int = 600
    teacher_batch_size: int = 16
    teacher_lr: float = 3e-3

    @classmethod
    def from_dict(cls, values: dict) -> TinySpec:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"model.tiny: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        for role in ("teacher", "student"):
            if isinstance(values.get(role), dict):
                values[role] = DecoderSize(**values[role])
        return cls(**values)

    def key(self) -> str:
        payload = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TinyPair:
    """Directories written by ``save_pretrained`` (model + tokenizer), loadable like hub ids."""

    teacher: Path
    student: Path


def build_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer over the caption vocabulary, made without sentencepiece training or downloads."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{word}", -1.0) for word in caption_words()]
    vocab += [("\u2581", -4.0)] + [(char, -6.0) for char in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def musicgen_config(spec: TinySpec, size: DecoderSize, vocab_size: int) -> MusicgenConfig:
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
    hop = 320  # 8*5*4*2 -> 50 frames/s at 16 kHz, as MusicGen's 50 Hz codes
    bits = spec.codebook_size.bit_length() - 1
    codec = EncodecConfig(
        sampling_rate=spec.sample_rate,
        upsampling_ratios=[8, 5, 4, 2],
        num_filters=8,
        hidden_size=32,
        num_lstm_layers=1,
        codebook_size=spec.codebook_size,
        target_bandwidths=[spec.num_codebooks * bits * spec.sample_rate / hop / 1000],
        normalize=False,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=spec.codebook_size,
        num_codebooks=spec.num_codebooks,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        ffn_dim=size.ffn_dim,
        max_position_embeddings=spec.max_positions,
        dropout=0.0,
        pad_token_id=spec.codebook_size,
        bos_token_id=spec.codebook_size,
    )
    return MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder)


@torch.no_grad()
def init_codebooks_from_audio(
    model: MusicgenForConditionalGeneration, audio: torch.Tensor, seed: int
) -> None:
    """Residual codebooks from encoder latents (sampled + a few k-means steps): every code gets used."""
    codec = model.audio_encoder
    generator = torch.Generator().manual_seed(seed)
    latents = codec.encoder(audio[:, None, :])  # [N, D, frames]
    residual = latents.transpose(1, 2).reshape(-1, latents.shape[1])
    for layer in codec.quantizer.layers:
        size = layer.codebook.embed.shape[0]
        centroids = residual[torch.randperm(len(residual), generator=generator)[:size]].clone()
        for _ in range(8):
            assign = torch.cdist(residual, centroids).argmin(dim=1)
            counts = torch.bincount(assign, minlength=size).float()
            sums = torch.zeros_like(centroids).index_add_(0, assign, residual)
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        layer.codebook.embed.copy_(centroids)
        layer.codebook.embed_avg.copy_(centroids)
        residual = residual - centroids[torch.cdist(residual, centroids).argmin(dim=1)]


def build_untrained_pair(
    spec: TinySpec,
) -> tuple[MusicgenForConditionalGeneration, MusicgenForConditionalGeneration, T5Tokenizer]:
    """Teacher and student with shared (identical) T5 and EnCodec weights and random decoders."""
    tokenizer = build_tokenizer()
    torch.manual_seed(spec.seed)
    teacher = MusicgenForConditionalGeneration(musicgen_config(spec, spec.teacher, len(tokenizer)))
    clips = synthesize_corpus(64, seed=spec.seed + 7919, seconds=2.0, sample_rate=spec.sample_rate)
    init_codebooks_from_audio(teacher, torch.stack([torch.from_numpy(c.audio) for c in clips]), spec.seed)
    torch.manual_seed(spec.seed + 1)
    student = MusicgenForConditionalGeneration(musicgen_config(spec, spec.student, len(tokenizer)))
    student.text_encoder.load_state_dict(teacher.text_encoder.state_dict())
    student.audio_encoder.load_state_dict(teacher.audio_encoder.state_dict())
    for model in (teacher, student):
        configure_generation(model)
    return teacher, student, tokenizer


def configure_generation(model: MusicgenForConditionalGeneration) -> None:
    """MusicGen's generation defaults (sampling, top-k 250, CFG 3) with this model's special tokens."""
    gen = model.generation_config
    pad = model.config.decoder.pad_token_id
    gen.decoder_start_token_id = pad
    gen.pad_token_id = pad
    gen.bos_token_id = pad
    gen.do_sample = True
    gen.top_k = 250
    gen.guidance_scale = 3.0
    gen.max_length = 1500


def train_tiny_teacher(
    teacher: MusicgenForConditionalGeneration, tokenizer: T5Tokenizer, spec: TinySpec, cache_dir: Path
) -> float:
    """Cross-entropy training of the teacher on its own synthetic clips; returns its final val CE."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from tinymusician.data.synthetic import SyntheticDataModule
    from tinymusician.distill.losses import build_loss
    from tinymusician.distill.module import DistillationModule
    from tinymusician.distill.optim import warmup_cosine

    data = SyntheticDataModule(
        num_train=spec.teacher_clips,
        num_val=64,
        seconds=spec.teacher_seconds,
        seed=spec.seed + 1000,
        batch_size=spec.teacher_batch_size,
        cache_dir=str(cache_dir),
    )
    data.attach(teacher, tokenizer)
    module = DistillationModule(
        student=teacher,
        loss=build_loss("ce"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=spec.teacher_lr, weight_decay=0.01),
        scheduler=lambda optimizer, total_steps: warmup_cosine(optimizer, total_steps, warmup_steps=30),
        cond_dropout=0.1,
    )
    log.info(
        "Training the tiny teacher: %d steps on %d synthetic clips", spec.teacher_steps, spec.teacher_clips
    )
    trainer = L.Trainer(
        max_steps=spec.teacher_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=spec.teacher_steps,  # validate once, at the end
        accelerator="cpu",
        devices=1,
        gradient_clip_val=1.0,
        callbacks=[TQDMProgressBar(refresh_rate=20)],
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    module.student.eval()
    return float(metrics["val/ce"])


def ensure_tiny_pair(
    cache_dir: str | Path = DEFAULT_CACHE_DIR, spec: TinySpec | None = None, force: bool = False
) -> TinyPair:
    """Return the cached tiny pair, building and training it on first use (about a minute on 2 cores)."""
    spec = spec or TinySpec()
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / f"tiny-{spec.key()}"
    pair = TinyPair(teacher=root / "teacher", student=root / "student")
    done = root / "DONE.json"
    if done.is_file() and not force:
        return pair
    if root.exists():
        shutil.rmtree(root)
    log.info("Building the tiny MusicGen teacher/student pair in %s (once; cached afterwards)", root)
    start = time.perf_counter()
    teacher, student, tokenizer = build_untrained_pair(spec)
    staging = cache_dir / f".tiny-{spec.key()}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_musicgen(student, tokenizer, staging / "student")
    teacher_ce = train_tiny_teacher(teacher, tokenizer, spec, cache_dir)
    save_musicgen(teacher, tokenizer, staging / "teacher")
    report = {
        "spec": dataclasses.asdict(spec),
        "recipe": RECIPE_VERSION,
        "teacher_val_ce": teacher_ce,
        "ln_vocab": float(torch.log(torch.tensor(float(spec.codebook_size)))),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (staging / "DONE.json").write_text(json.dumps(report, indent=2))
    staging.replace(root)  # atomic: a half-built pair is never mistaken for a cached one
    log.info(
        "Tiny teacher val CE %.3f (ln V = %.3f), built in %.0f s",
        teacher_ce,
        report["ln_vocab"],
        report["build_seconds"],
    )
    return pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    pair = ensure_tiny_pair(args.cache_dir, force=args.force)
    print(
        json.dumps(
            {
                "teacher": str(pair.teacher),
                "student": str(pair.student),
                **json.loads((pair.teacher.parent / "DONE.json").read_text()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
