"""The teacher-logit cache end to end: `cache_teacher` fills it (sharded, resumable, keyed), `train` with
distill.teacher_source=cache trains from it without loading the teacher, and with k = V its KD equals the live
teacher's; a missing cache or random segment offsets fail at start-up naming the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import compose_train_cfg
from tinymusician.cache_teacher import cache_teacher
from tinymusician.distill.teacher_cache import TeacherCacheError
from tinymusician.models.musicgen import guidance_distilled_scale, load_musicgen
from tinymusician.train import train

KD = [
    "+experiment=kd_only",
    "loss=fkl",
    "cond_dropout=0.0",
    "trainer.max_steps=2",
    "validate_before_fit=false",
]


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache_dir, single_thread):
    out = tmp_path_factory.mktemp("cache-run")
    cfg = compose_train_cfg([*KD, "distill.cache.k=16", "distill.cache.shard_size=12"], out)
    report = cache_teacher(cfg, progress=False)
    return cfg, report


def test_cache_holds_top_k_of_every_segment_in_compact_shards(built):
    cfg, report = built
    root = Path(report["dir"])
    assert report["complete"] and report["splits"]["train"]["windows"] == cfg.data.num_train
    assert report["splits"]["train"]["shards"] == 3 and report["splits"]["val"]["shards"] == 2  # 32/12, 16/12
    assert report["positions_per_second"] > 0 and report["bytes"] == sum(
        p.stat().st_size for p in shards(root)
    )
    with safe_open(str(root / "train-00000.safetensors"), framework="pt") as handle:
        indices, log_probs, tail = (handle.get_tensor(n) for n in ("indices", "log_probs", "tail"))
    assert indices.dtype == torch.int16 and log_probs.dtype == torch.float16 and tail.dtype == torch.float16
    assert indices.shape[0] == 12 and indices.shape[1] == 4 and indices.shape[-1] == 16
    head_and_tail = torch.cat([log_probs.float(), tail.float()[..., None]], -1).logsumexp(-1)
    assert torch.allclose(head_and_tail, torch.zeros_like(head_and_tail), atol=2e-2)  # a distribution
    assert bool((log_probs[..., :-1] >= log_probs[..., 1:]).all())  # top-k, largest first


def test_a_killed_build_resumes_with_only_the_missing_shards(built, tmp_path):
    cfg, first = built
    root = Path(first["dir"])
    (root / "report.json").unlink()  # killed before the end
    missing = root / "train-00001.safetensors"
    before = load_file(str(missing))
    missing.unlink()
    kept = {p: p.stat().st_mtime_ns for p in shards(root)}
    report = cache_teacher(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished shards are not recomputed
    again = load_file(str(missing))
    assert (
        all(torch.equal(again[name], before[name]) for name in before) and report["bytes"] == first["bytes"]
    )
    assert (
        report["computed_positions"] * 48 == first["computed_positions"] * 12
    )  # one shard of 12 of 48 segments
    assert cache_teacher(cfg, progress=False)["reused"]


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_training_from_the_cache_loads_no_teacher_and_matches_the_live_teacher_at_k_equal_v(
    guidance_scale, tmp_path, cache_dir, single_thread, capsys
):
    # k = V (the tiny world's codebook). guidance 3 runs second in one cache dir: a guided run reading the
    # unguided cache (a key without the guidance) would differ from the live guided teacher below.
    full = [*KD, "distill.cache.k=256", f"loss.guidance_scale={guidance_scale}"]
    cache_teacher(compose_train_cfg(full, tmp_path / "build"), progress=False)
    metrics, objects = train(compose_train_cfg([*full, "distill.teacher_source=cache"], tmp_path / "cache"))
    assert objects["models"].teacher is None and objects["module"].teacher_cache is not None
    assert objects["summary"]["teacher_source"]["kind"] == "cache"
    assert "via its logit cache (k=256, tail spread" in capsys.readouterr().out
    live, _ = train(compose_train_cfg(full, tmp_path / "live"))
    for key in ("train/kd", "val/kl_to_teacher", "val/teacher_ce", "val/ce"):
        assert metrics[key] == pytest.approx(live[key], rel=2e-3), key  # fp16 storage only
    saved = load_musicgen(str(tmp_path / "cache" / "student"))
    assert guidance_distilled_scale(saved) == (guidance_scale if guidance_scale > 1 else None)


def test_training_from_a_missing_cache_names_the_command(tmp_path, cache_dir):
    cfg = compose_train_cfg([*KD, "distill.teacher_source=cache", "distill.cache.k=7"], tmp_path)
    with pytest.raises(TeacherCacheError, match="python -m tinymusician.cache_teacher"):
        train(cfg)


def test_random_offsets_and_bad_cache_keys_fail_at_start_up(tmp_path, cache_dir):
    cfg = compose_train_cfg(
        [*KD, "distill.teacher_source=cache", "+data.segment_seconds=1.0", "+data.segment_offsets=random"],
        tmp_path,
    )
    with pytest.raises(TeacherCacheError, match="data.segment_offsets=fixed"):
        train(cfg)
    with pytest.raises(TeacherCacheError, match="distill.cache.tail='flat'"):
        train(compose_train_cfg([*KD, "distill.teacher_source=cache", "distill.cache.tail=flat"], tmp_path))
    with pytest.raises(TeacherCacheError, match="distill.teacher_source='disk'"):
        train(compose_train_cfg([*KD, "distill.teacher_source=disk"], tmp_path))


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "tinymusician.distill.cache_teacher"],  # the spelling: a shim importing the CLI
        ["-m", "tinymusician.cache_teacher"],
        [
            "tinymusician-train"
        ],  # a console script imports its CLI too (config_path must not be module-relative)
    ],
)
def test_the_commands_find_their_configs_from_any_directory(command, tmp_path):
    executable = (
        [sys.executable, *command] if command[0] == "-m" else [str(Path(sys.executable).parent / command[0])]
    )
    out = subprocess.run(
        [*executable, "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "teacher_source: live" in out.stdout
