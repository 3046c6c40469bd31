"""Tiny metric models built offline in the test session and loaded through the public paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinymusician.data.synthetic import caption_words, synthesize_corpus


@pytest.fixture(scope="session")
def tiny_clap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LAION-style CLAP (HTSAT + RoBERTa) with a byte-level BPE tokenizer trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    root = tmp_path_factory.mktemp("tiny-clap")
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(caption_words())] + [clip.caption for clip in synthesize_corpus(64, seconds=0.1)]
    bpe.train_from_iterator(
        corpus, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(root))
    merges = [tuple(line.split()) for line in (root / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = RobertaTokenizer(vocab=json.loads((root / "vocab.json").read_text()), merges=merges)
    # Non-fusion CLAP: 64 mel bins, spec_size 256, "rand_trunc" (REFERENCES.md); a 2 s window keeps it fast.
    extractor = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", max_length_s=2)
    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 96,
        },
        audio_config={
            "hidden_size": 32,
            "patch_embeds_hidden_size": 16,
            "depths": [1, 1],
            "num_attention_heads": [2, 4],
            "spec_size": 256,
            "num_mel_bins": 64,
            "enable_fusion": False,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    directory = root / "clap"
    ClapModel(config).save_pretrained(directory)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_vggish_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrow VGGish with random weights, saved as a torchvggish-style state dict (.pth)."""
    from tinymusician.metrics.embedders import VGGish

    torch.manual_seed(0)
    model = VGGish(channels=(4, 8, 8, 8, 16, 16), hidden=32, dim=12)
    path = tmp_path_factory.mktemp("tiny-vggish") / "vggish-tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def synthetic_audio(count: int, *, seconds: float, sample_rate: int, seed: int = 0, start: int = 0):
    """Synthetic clips (float32 numpy) and their captions."""
    clips = synthesize_corpus(count, seed=seed, seconds=seconds, sample_rate=sample_rate, start=start)
    return [c.audio for c in clips], [c.caption for c in clips]


@pytest.fixture
def make_clips():
    return synthetic_audio


@pytest.fixture
def write_wav_folder():
    """Write synthetic clips as WAVs (+ metadata.jsonl captions) into a folder."""
    import soundfile as sf

    def write(directory: Path, count: int, *, seconds: float, sample_rate: int, seed: int = 0) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        audio, captions = synthetic_audio(count, seconds=seconds, sample_rate=sample_rate, seed=seed)
        rows = []
        for index, (clip, caption) in enumerate(zip(audio, captions, strict=True)):
            sf.write(str(directory / f"{index:03d}.wav"), np.asarray(clip), sample_rate)
            rows.append(json.dumps({"file_name": f"{index:03d}.wav", "caption": caption}))
        (directory / "metadata.jsonl").write_text("\n".join(rows) + "\n")
        return directory

    return write
