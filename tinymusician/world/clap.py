"""Train the tiny world's CLAP: transformers' ``ClapModel`` (HTSAT audio tower, RoBERTa text tower) on the corpus.

Recipe: 16 kHz log-mel (64 Slaney bins, 50-4000 Hz, window 1024, hop 512), an 8 s window (HTSAT spec 128,
patch 4, embed 32, one block per stage, heads 1/2/4/8, attention window 4), text 2 x 64, projection 64; a
byte-level BPE tokenizer trained on the caption grammar. Each step sees random 2-8 s crops, repeat-padded as
the feature extractor pads, fresh captions, and per clip one hard-negative caption per attribute (the same
template with only that attribute changed); in-batch pairs with identical attributes are masked, since they
are not negatives. Saved as a ``save_pretrained`` model + ``ClapProcessor``, which
:class:`~tinymusician.metrics.embedders.ClapEmbedder` loads like ``laion/larger_clap_music``.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinymusician.data import synthetic
from tinymusician.data.synthetic import ATTRIBUTES, SyntheticClip, caption_words, synthesize_clip
from tinymusician.world.codec import reconstruct

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class ClapRecipe:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    train_clips: int = 2500
    corpus_seed: int = 0
    window_seconds: int = 8  # the feature extractor's max_length_s (an int in transformers)
    min_crop_seconds: float = 2.0
    full_window_probability: float = 0.4
    # Robustness to what the CLAP will score: generations decoded by the world codec. A CLAP trained on clean
    # renders alone rates codec reconstructions like noise (CLAP score 0.19 vs 0.92 for the clips themselves,
    # and 0.21 at 20 dB SNR of white noise), so crops are also drawn from codec reconstructions of part of the
    # pool, or get white noise at a random SNR.
    codec_clips: int = 600  # pool clips reconstructed by the codec (8 s each, ~0.4 s per clip)
    codec_probability: float = 0.35
    noise_probability: float = 0.25
    noise_snr_db: tuple[float, float] = (0.0, 30.0)
    vocab_size: int = 512
    seed: int = 0


def attribute_key(attributes: dict[str, str]) -> int:
    """One integer per attribute combination (clips with equal keys are not negatives of each other)."""
    key = 0
    for name, values in ATTRIBUTES.items():
        key = key * len(values) + values.index(attributes[name])
    return key


def caption_variants(
    attributes: dict[str, str], rng: np.random.Generator
) -> tuple[str, dict[str, dict[str, str]]]:
    """A fresh caption and, per attribute and value, the same template with only that attribute changed.

    The caption's random draws depend on which attributes exist, never on their values, so replaying one
    generator state with one value changed gives a caption that differs in that attribute alone.
    """
    state = copy.deepcopy(rng)
    caption = synthetic._caption(attributes, rng)
    variants = {
        name: {
            value: synthetic._caption({**attributes, name: value}, copy.deepcopy(state)) for value in values
        }
        for name, values in ATTRIBUTES.items()
    }
    return caption, variants


def build_tokenizer(vocab_size: int, seed: int = 12345):
    """A RoBERTa byte-level BPE tokenizer trained on the caption grammar (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    rng = np.random.default_rng(seed)
    corpus = [" ".join(caption_words())]
    for _ in range(4000):
        attributes = {name: str(values[rng.integers(len(values))]) for name, values in ATTRIBUTES.items()}
        corpus.append(synthetic._caption(attributes, rng))
    bpe = ByteLevelBPETokenizer()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=special)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        lines = (Path(tmp) / "merges.txt").read_text().splitlines()[1:]
    # vocab as a dict and merges as a list: RobertaTokenizerFast(vocab_file=...) silently gives 5 tokens
    return RobertaTokenizer(vocab=vocab, merges=[tuple(line.split()) for line in lines if line])


def build_feature_extractor(window_seconds: int):
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=SAMPLE_RATE,
        hop_length=512,
        fft_window_size=1024,
        max_length_s=window_seconds,
        frequency_min=50.0,
        frequency_max=4000.0,
        truncation="rand_trunc",
        padding="repeatpad",
    )


class TorchMel:
    """The feature extractor's repeat-pad log-mel in torch, fast enough for every training step."""

    def __init__(self, extractor) -> None:
        from transformers.audio_utils import window_function

        self.extractor = extractor
        self.window = torch.from_numpy(window_function(extractor.fft_window_size, "hann")).float()
        self.filters = torch.from_numpy(extractor.mel_filters_slaney).float()
        self.max_samples = int(extractor.nb_max_samples)

    def repeatpad(self, clip: torch.Tensor) -> torch.Tensor:
        n = clip.shape[-1]
        if n >= self.max_samples:
            return clip[: self.max_samples]
        tiled = clip.repeat(self.max_samples // n)
        return F.pad(tiled, (0, self.max_samples - tiled.shape[-1]))

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, max_samples]`` -> ``input_features [B, 1, frames, mels]``."""
        spec = (
            torch.stft(
                audio,
                n_fft=self.extractor.fft_window_size,
                hop_length=self.extractor.hop_length,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            ).abs()
            ** 2
        )
        mel = torch.einsum("fm,bft->btm", self.filters, spec)
        return (10.0 * torch.log10(mel.clamp(min=1e-10)))[:, None]


def build_model(tokenizer, extractor, seed: int):
    from transformers import ClapConfig, ClapModel

    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 80,  # ClapEmbedder truncates at 77 tokens (+2 for RoBERTa's offset)
            "pad_token_id": tokenizer.pad_token_id,
        },
        audio_config={
            "hidden_size": 256,  # = patch_embeds_hidden_size * 2 ** (stages - 1)
            "patch_embeds_hidden_size": 32,
            "depths": [1, 1, 1, 1],
            "num_attention_heads": [1, 2, 4, 8],
            "window_size": 4,
            "spec_size": 128,
            "num_mel_bins": extractor.feature_size,
            "enable_fusion": False,
        },
        projection_dim=64,
    )
    torch.manual_seed(seed)
    return ClapModel(config)


def text_features(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    tokens = tokenizer(list(texts), padding=True, return_tensors="pt")
    out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return getattr(out, "pooler_output", out)


def audio_features(model, features: torch.Tensor) -> torch.Tensor:
    out = model.get_audio_features(input_features=features)
    return getattr(out, "pooler_output", out)


def clap_pool(recipe: ClapRecipe) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """The training clips (``window_seconds`` long) and their attributes."""
    pool = [
        synthesize_clip(i, seed=recipe.corpus_seed, seconds=recipe.window_seconds, sample_rate=SAMPLE_RATE)
        for i in range(recipe.train_clips)
    ]
    return torch.from_numpy(np.stack([clip.audio for clip in pool])), [clip.attributes for clip in pool]


@torch.inference_mode()
def codec_reconstructions(codec, audio: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``audio [N, samples]`` encoded and decoded by ``codec`` (an ``EncodecModel``), trimmed to length."""
    return torch.cat([reconstruct(codec, chunk)[1] for chunk in audio.split(batch_size)]).clamp(-1, 1)


def train_clap(
    recipe: ClapRecipe,
    on_step: Callable[[int, dict], None] | None = None,
    *,
    pool: tuple[torch.Tensor, list[dict[str, str]]] | None = None,
    codec=None,
):
    """(model in eval mode, ClapProcessor) trained for ``recipe.steps`` steps.

    ``pool``: :func:`clap_pool`'s output when already made; ``codec``: the world codec whose reconstructions
    the CLAP also trains on (none: clean and noisy crops only).
    """
    from transformers import ClapProcessor

    tokenizer = build_tokenizer(recipe.vocab_size)
    extractor = build_feature_extractor(recipe.window_seconds)
    mel = TorchMel(extractor)
    model = build_model(tokenizer, extractor, recipe.seed)
    pool_audio, pool_attributes = pool or clap_pool(recipe)
    reconstructed = None
    if codec is not None and recipe.codec_clips > 0:
        reconstructed = codec_reconstructions(codec, pool_audio[: recipe.codec_clips])
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr
    )
    rng = np.random.default_rng([recipe.seed, 1])
    max_samples, min_samples = mel.max_samples, int(recipe.min_crop_seconds * SAMPLE_RATE)
    batch = recipe.batch_size
    for step in range(recipe.steps):
        model.train()
        if step < recipe.warmup_steps:
            lr = recipe.lr * (step + 1) / recipe.warmup_steps
        else:
            progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
            lr = recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        picked = rng.choice(recipe.train_clips, size=batch, replace=False)
        crops = []
        for position, i in enumerate(picked):
            source = pool_audio
            kind = rng.random()
            if reconstructed is not None and kind < recipe.codec_probability:
                i = picked[position] = rng.integers(len(reconstructed))  # a clip that has a reconstruction
                source = reconstructed
            clip = source[i]
            if rng.random() >= recipe.full_window_probability:
                length = int(rng.integers(min_samples, max_samples))
                offset = 0 if rng.random() < 0.5 else int(rng.integers(0, max_samples - length + 1))
                clip = mel.repeatpad(clip[offset : offset + length])
            if recipe.codec_probability <= kind < recipe.codec_probability + recipe.noise_probability:
                snr = rng.uniform(*recipe.noise_snr_db)
                noise = torch.from_numpy(rng.standard_normal(clip.shape[-1]).astype(np.float32))
                clip = clip + noise * clip.pow(2).mean().sqrt() * 10 ** (-snr / 20)
            crops.append(clip)
        texts, keys, negatives, negative_keys = [], [], [], []
        for i in picked:
            attributes = pool_attributes[i]
            caption, variants = caption_variants(attributes, rng)
            texts.append(caption)
            keys.append(attribute_key(attributes))
            for name, values in ATTRIBUTES.items():
                others = [v for v in values if v != attributes[name]]
                value = others[rng.integers(len(others))]
                negatives.append(variants[name][value])
                negative_keys.append(attribute_key({**attributes, name: value}))
        audio_emb = audio_features(model, mel(torch.stack(crops)))
        text_emb = text_features(model, tokenizer, texts + negatives)
        key = torch.tensor(keys)
        all_keys = torch.tensor(keys + negative_keys)
        # audio -> text over in-batch captions and the hard negatives; text -> audio over in-batch audio
        scale_a = model.logit_scale_a.clamp(max=math.log(100)).exp()
        scale_t = model.logit_scale_t.clamp(max=math.log(100)).exp()
        same_a = key[:, None] == all_keys[None, :]
        same_a[torch.arange(batch), torch.arange(batch)] = False
        logits_a = (scale_a * audio_emb @ text_emb.T).masked_fill(same_a, -1e4)
        same_t = key[:, None] == key[None, :]
        same_t.fill_diagonal_(False)
        logits_t = (scale_t * text_emb[:batch] @ audio_emb.T).masked_fill(same_t, -1e4)
        target = torch.arange(batch)
        loss = 0.5 * (F.cross_entropy(logits_a, target) + F.cross_entropy(logits_t, target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step, {"loss": loss.item(), "lr": lr})
    model.eval()
    return model, ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)


@torch.inference_mode()
def retrieval_and_attributes(embedder, clips: Sequence[SyntheticClip], seed: int = 777) -> dict:
    """Text -> audio R@1 / R@5 with the clips' own captions, and zero-shot accuracy (+ confusion) per attribute.

    ``embedder`` is a :class:`~tinymusician.metrics.embedders.ClapEmbedder` (the public inference path).
    """
    n = len(clips)
    audio = F.normalize(embedder.embed_clips([clip.audio for clip in clips], SAMPLE_RATE), dim=-1)
    text = F.normalize(embedder.embed_text([clip.caption for clip in clips]), dim=-1)
    similarity = text @ audio.T
    rank = (similarity > similarity.diag()[:, None]).sum(1)
    keys = np.array([attribute_key(clip.attributes) for clip in clips])
    out: dict = {
        "n_clips": n,
        "R@1": float((rank < 1).float().mean()),
        "R@5": float((rank < 5).float().mean()),
        "chance_R@1": 1.0 / n,
        "oracle_R@1": float(np.mean(1.0 / (keys[:, None] == keys[None, :]).sum(1))),
    }
    rng = np.random.default_rng(seed)
    variants = [caption_variants(clip.attributes, rng)[1] for clip in clips]
    for name, values in ATTRIBUTES.items():
        texts = [variants[i][name][value] for i in range(n) for value in values]
        emb = F.normalize(embedder.embed_text(texts), dim=-1).reshape(n, len(values), -1)
        predicted = (emb * audio[:, None]).sum(-1).argmax(1).numpy()
        truth = np.array([values.index(clip.attributes[name]) for clip in clips])
        confusion = np.zeros((len(values), len(values)), dtype=int)
        np.add.at(confusion, (truth, predicted), 1)
        out[f"accuracy_{name}"] = float((predicted == truth).mean())
        out[f"confusion_{name}"] = confusion.tolist()
    return out
