"""Offline, CPU-only fixtures: the shipped tiny world's MusicGen pair, loaded through the public path."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that needs the network is a bug
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from transformers import MusicgenForConditionalGeneration  # noqa: E402

from tinymusician.config import CONF_DIR  # noqa: E402
from tinymusician.data.synthetic import synthesize_corpus  # noqa: E402
from tinymusician.zoo.tiny import (  # noqa: E402
    DecoderSize,
    TinySpec,
    build_tokenizer,
    configure_generation,
    musicgen_config,
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's test command): two workers share the 2 cores, so each computes on one thread;
    # two intra-op threads per worker would wait on each other's descheduled peers (see `single_thread`).
    torch.set_num_threads(1)


FAST_OVERRIDES = [
    "data.num_train=32",
    "data.num_val=16",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "+trainer.enable_model_summary=false",
    "eval=none",  # every arm evaluates by default (64 clips); a test that scores asks for it: eval=default
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tinymusician-cache")
    os.environ["TINYMUSICIAN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_pair():
    """The shipped world's trained teacher and untrained student (save_pretrained directories)."""
    from tinymusician.zoo.tiny import shipped_pair

    return shipped_pair()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core VM, OpenMP threads waiting for a
    descheduled peer stall every op (10-100x slower). Opt in per module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(tiny_pair):
    """The fast tiny student, loaded through the public path (from_pretrained returns it in eval mode)."""
    from tinymusician.models.musicgen import load_musicgen

    return load_musicgen(str(tiny_pair.student))


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from tinymusician.models.musicgen import load_tokenizer

    return load_tokenizer(str(tiny_pair.student))


def compose_train_cfg(overrides: list[str], output_dir: Path, fast: bool = True) -> DictConfig:
    """Compose conf/train.yaml as `python -m tinymusician.train` would, writing into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=(FAST_OVERRIDES if fast else []) + overrides, return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        del cfg["hydra"]  # as in a real run: @hydra.main hands train() the job config only
    return cfg


# --- metric models (FAD / CLAP tests, the evaluation callback) ---------------------------------------
@pytest.fixture(scope="session")
def tiny_clap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LAION-style CLAP (HTSAT + RoBERTa) with a byte-level BPE tokenizer trained here."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    from tinymusician.world.clap import build_tokenizer

    root = tmp_path_factory.mktemp("tiny-clap")
    tokenizer = build_tokenizer(vocab_size=400)  # byte-level BPE over the caption grammar, as the world's
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
    from tinymusician.metrics.vggish import VGGish

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


# --- teacher-forcing batches (quantization tests, the quantize callback) ---------------------------------
CAPTIONS = ["a calm piano melody", "fast bright drums with a deep bass line", "slow organ chords", "a tune"]


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


def make_corpus_batches(
    model, tokenizer, count: int = 2, clips: int = 4, seconds: float = 0.64
) -> list[dict]:
    """Teacher-forcing batches of what a trained model was made for: held-out corpus clips encoded by its own
    codec, with their captions (random codes are off-distribution for it, and flip its top-1 far more easily)."""
    from tinymusician.data.codec_tokens import encode_audio
    from tinymusician.data.synthetic import heldout_clips

    corpus = heldout_clips(
        count * clips, seconds=seconds, sample_rate=model.config.audio_encoder.sampling_rate
    )
    codes = encode_audio(model, [clip.audio for clip in corpus])
    batches = []
    for start in range(0, len(corpus), clips):
        text = tokenizer(
            [c.caption for c in corpus[start : start + clips]], padding=True, return_tensors="pt"
        )
        chunk = torch.stack(codes[start : start + clips])
        batches.append({"codes": chunk, "lengths": torch.full((clips,), chunk.shape[-1]), **text})
    return batches


@pytest.fixture(scope="session")
def corpus_batch_maker():
    return make_corpus_batches


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
