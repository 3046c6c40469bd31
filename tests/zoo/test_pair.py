"""The teacher/student pair: what "compatible" means, checked at start-up from config.json and after loading."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import MusicgenConfig, T5Config

import tinymusician.zoo.pair as pair
from tests.conftest import compose_train_cfg
from tinymusician.models.musicgen import load_musicgen
from tinymusician.shipped import world_part
from tinymusician.train import train
from tinymusician.zoo.pair import (
    IncompatiblePairError,
    check_compatible,
    check_model_config,
    pair_differences,
)


def tiny_model_cfg(**values):
    """``conf/model/tiny.yaml`` as ``cfg.model``."""
    return OmegaConf.create({"student": "tiny", "teacher": "tiny", "teacher_dtype": "float32", **values})


def tiny_config(role: str) -> MusicgenConfig:
    """The shipped world's config of ``role`` (config.json only)."""
    return MusicgenConfig.from_pretrained(world_part(role))


def config_only_dir(config: MusicgenConfig, directory: Path) -> Path:
    """config.json and a placeholder weights file holding none of the model's tensors: enough for the
    start-up checks, which read config.json only (and see a weights file), never a model to load."""
    config.save_pretrained(directory)
    save_file({"placeholder": torch.zeros(1)}, str(directory / "model.safetensors"))
    return directory


def test_pair_check_ignores_dtype_and_bookkeeping():
    student, teacher = tiny_config("student"), tiny_config("teacher")
    for part in ("text_encoder", "audio_encoder", "decoder"):
        sub = getattr(teacher, part)
        sub.dtype = "bfloat16"  # what loading with teacher_dtype=bfloat16 writes
        sub._name_or_path = "/elsewhere/musicgen-large"
        sub.architectures = ["SomethingElse"]
        sub.transformers_version = "0.0.1"
    # the old whole-dict comparison rejected exactly this pair
    assert student.text_encoder.to_dict() != teacher.text_encoder.to_dict()
    assert pair_differences(student, teacher) == []
    # a wider, deeper teacher decoder is the point of distillation, not a mismatch
    assert teacher.decoder.hidden_size != student.decoder.hidden_size


def test_tiny_pair_is_checked_at_startup_without_loading_it(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the start-up check must not load the tiny pair's weights")

    monkeypatch.setattr(pair, "load_musicgen", refuse)
    check_model_config(tiny_model_cfg(teacher_dtype="bfloat16"))
    with pytest.raises(AssertionError, match="must not load"):
        pair.load_teacher_student(tiny_model_cfg())


@pytest.mark.parametrize(
    ("part", "field", "value"),
    [
        ("text_encoder", "d_model", 128),
        ("text_encoder", "num_layers", 3),
        ("text_encoder", "vocab_size", 32128),
        ("decoder", "num_codebooks", 8),
        ("decoder", "vocab_size", 512),
        ("decoder", "pad_token_id", 0),
        ("audio_encoder", "sampling_rate", 32000),
        ("audio_encoder", "codebook_size", 2048),
    ],
)
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_incompatible_pair_fails_at_startup_from_config_json(tmp_path, part, field, value, role):
    config = tiny_config(role)
    setattr(getattr(config, part), field, value)
    directory = config_only_dir(config, tmp_path / role)
    cfg = tiny_model_cfg(**{role: str(directory)})
    with pytest.raises(IncompatiblePairError) as info:
        check_model_config(cfg)
    message = str(info.value)
    difference = next(d for d in message.split("; ") if f"{part}.{field}:" in d)
    assert f"{role} {value!r}" in difference
    assert str(directory) in message and "'tiny'" in message


def test_compatible_directory_pair_passes_startup(tmp_path):
    student = config_only_dir(tiny_config("student"), tmp_path / "student")
    teacher_config = tiny_config("teacher")
    teacher_config.text_encoder.dtype = teacher_config.decoder.dtype = "bfloat16"
    teacher = config_only_dir(teacher_config, tmp_path / "teacher")
    check_model_config(tiny_model_cfg(student=str(student), teacher=str(teacher), teacher_dtype="bfloat16"))


def test_non_musicgen_model_is_rejected_at_startup(tmp_path):
    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64).save_pretrained(tmp_path)
    save_file({"placeholder": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.teacher=.*'t5' model, not MusicGen"):
        check_model_config(tiny_model_cfg(teacher=str(tmp_path)))


def test_unknown_teacher_dtype_fails_at_startup():
    with pytest.raises(ValueError, match=r"model.teacher_dtype='float8'.*bfloat16"):
        check_model_config(tiny_model_cfg(teacher_dtype="float8"))


def test_bf16_teacher_trains_through_the_public_path(tmp_path, tiny_pair):
    """The paper preset's default (teacher_dtype: bfloat16) on the tiny pair: load, check, distil, save."""
    cfg = compose_train_cfg(
        [
            "+experiment=kd_only",
            "model.teacher_dtype=bfloat16",
            "trainer.max_steps=2",
            "validate_before_fit=false",
        ],
        tmp_path,
    )
    metrics, objects = train(cfg)
    teacher, student = objects["models"].teacher, objects["models"].student
    assert teacher.config.text_encoder.to_dict()["dtype"] != student.config.text_encoder.to_dict()["dtype"]
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert objects["summary"]["steps"] == 2
    for key in ("train/loss", "train/kd", "val/ce", "val/kl_to_teacher"):
        assert math.isfinite(metrics[key]), key
    assert metrics["train/kd"] > 0
    reloaded = load_musicgen(objects["summary"]["student_dir"])
    assert reloaded.dtype == torch.float32


def test_different_t5_weights_fail_after_loading(tiny_pair, student):
    teacher = load_musicgen(str(tiny_pair.teacher), dtype="bfloat16")
    check_compatible(student, teacher)  # the shared T5, rounded to bf16, is the same T5
    with torch.no_grad():
        teacher.text_encoder.shared.weight.add_(0.1)
    with pytest.raises(IncompatiblePairError, match="different T5 weights.*shared"):
        check_compatible(student, teacher, "s_dir", "t_dir")


def test_train_cli_stops_at_startup_on_an_incompatible_pair(tmp_path):
    config = tiny_config("teacher")
    config.decoder.num_codebooks = 8
    teacher = config_only_dir(config, tmp_path / "teacher")
    cache = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "tinymusician.train",
        "+experiment=kd_only",
        f"model.teacher={teacher}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TINYMUSICIAN_CACHE": str(cache)},
    )
    assert result.returncode != 0
    assert "decoder.num_codebooks: teacher 8, student 4" in result.stderr, result.stderr[-3000:]
    # failed at start-up: no model was loaded, so nothing was encoded or saved
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))
    assert not any((tmp_path / "logs").rglob("model.safetensors"))
