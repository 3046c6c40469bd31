"""The paper preset (``model=musicgen``) as a GPU user runs it, at MusicGen-Small's size with random weights.

MusicGen-Small's architecture (T5-base, EnCodec 32 kHz, decoder 1024 / 24 layers / 16 heads / ffn 4096,
4 x 2048 codes; REFERENCES.md) built from configs and saved with ``save_pretrained``: the student in fp32,
the teacher (same architecture, other decoder weights) in bf16 as the hub's Large. Both go through
``model=musicgen``'s loading code as local directories with the preset's ``teacher_dtype: bfloat16``, then
``train`` distils for 2 steps and saves the student, which reloads. Minutes and ~10 GB: ``slow``.
"""

import gc
import math
import resource
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    MusicgenForConditionalGeneration,
)

from tests.conftest import compose_train_cfg
from tinymusician.models.musicgen import load_musicgen, musicgen_small_config, save_musicgen
from tinymusician.train import train
from tinymusician.zoo.tiny import build_tokenizer, configure_generation

pytestmark = pytest.mark.slow

WATCHED = "decoder.lm_heads.0.weight"  # a trained tensor, compared before / after / reloaded


@pytest.fixture(scope="module")
def paper_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(student dir fp32, teacher dir bf16), sharing T5 and EnCodec as the hub's Small and Large do."""
    root = tmp_path_factory.mktemp("paper-pair")
    tokenizer = build_tokenizer()  # ids < 89, inside T5-base's 32128
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(musicgen_small_config())
    with torch.no_grad():  # a random EnCodec has all-zero codebooks: every frame would be code 0
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    configure_generation(model)
    student = save_musicgen(model, tokenizer, root / "student")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # another decoder, so the teacher's logits differ from the student's
        for param in model.decoder.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    teacher = save_musicgen(model.to(torch.bfloat16), tokenizer, root / "teacher")
    del model
    gc.collect()
    return student, teacher


def saved_tensor(directory: str | Path, name: str) -> torch.Tensor:
    """One tensor of a save_pretrained directory, read lazily (no full load)."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise KeyError(f"{name} not in {directory}")


def test_paper_preset_distils_small_architecture_with_bf16_teacher(tmp_path, cache_dir, paper_pair):
    student_dir, teacher_dir = paper_pair
    cfg = compose_train_cfg(
        [
            "model=musicgen",
            f"model.student={student_dir}",
            f"model.teacher={teacher_dir}",
            "model.teacher_dtype=bfloat16",
            "+experiment=kd_only",
            "data=synthetic",
            "data.num_train=2",
            "data.num_val=1",
            "data.seconds=0.5",
            "data.batch_size=1",
            "trainer.max_steps=2",
            "trainer.val_check_interval=100",  # validate once, after fit (train() always does)
            "trainer.log_every_n_steps=1",
            "validate_before_fit=false",
            "callbacks.progress_bar=null",
            "+trainer.enable_model_summary=false",
            "callbacks.model_checkpoint=null",  # two ~6 GB .ckpt files: minutes of disk writes on CPU
            "eval=none",
        ],
        tmp_path,
        fast=False,
    )
    assert cfg.model.teacher_dtype == "bfloat16"
    start = time.perf_counter()
    metrics, objects = train(cfg)
    seconds = time.perf_counter() - start
    summary = objects["summary"]
    models = objects["models"]
    assert models.teacher.dtype == torch.bfloat16 and models.student.dtype == torch.float32
    assert models.student.config.decoder.num_hidden_layers == 24
    assert summary["steps"] == 2
    for key in ("train/loss", "train/kd", "val/ce", "val/kl_to_teacher"):
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["train/kd"] > 0
    trained = models.student.state_dict()[WATCHED].detach().clone()
    del metrics, objects, models
    gc.collect()
    # the saved student trained (differs from the initial weights) and reloads through the public path
    assert not torch.equal(trained, saved_tensor(student_dir, WATCHED))
    reloaded = load_musicgen(summary["student_dir"])
    torch.testing.assert_close(reloaded.state_dict()[WATCHED], trained)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"paper preset, 2 steps at MusicGen-Small size: train() {seconds:.0f} s, peak RSS {peak_gb:.1f} GB")
