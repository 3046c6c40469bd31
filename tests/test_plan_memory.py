"""``python -m tinymusician.plan_memory``: train's overrides in, a table or JSON out, one error line for bad keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymusician.plan_memory import main

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("teacher", "student", "gradients", "optimizer", "activations", "total")


def test_table_names_every_row_and_the_cache(capsys):
    assert main(["model=musicgen", "trainer=fsdp", "trainer.devices=4", "trainer.precision=bf16-mixed"]) == 0
    out = capsys.readouterr().out
    assert "fsdp (FULL_SHARD) x 4 GPU(s)" in out and "bf16-mixed" in out
    assert "facebook/musicgen-large (3,423,470,146 params, bfloat16, replicate)" in out
    for row in ("teacher", "student", "gradients", "optimizer (AdamW)", "activations", "total"):
        assert any(line.split() and line.strip().startswith(row) for line in out.splitlines()), row
    assert "logit cache (k=32): 0.087 GiB per hour of audio (720,000 positions x 130 B)" in out


def test_json_rows_add_up_and_k_sets_the_cache(capsys):
    assert main(["model=musicgen", "distill.teacher_source=cache", "--k", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = plan["bytes_per_gpu"]
    assert set(rows) == set(ROWS)
    assert rows["total"] == pytest.approx(sum(rows[r] for r in ROWS[:-1]))
    assert rows["teacher"] == 0
    assert plan["cache"]["k"] == 8 and plan["cache"]["bytes_per_hour"] == 720_000 * 34
    assert plan["activation_peak"]["phase"] in plan["activation_phases"]


def test_a_joblib_hydra_app_run_earlier_in_the_process_does_not_block_the_plan(tmp_path, capsys):
    """plan_memory only composes: the launcher of a Hydra app that ran before in this process is not its own."""
    from hydra.core.hydra_config import HydraConfig

    from tests.conftest import compose_train_cfg

    compose_train_cfg(
        ["hydra/launcher=joblib"], tmp_path
    )  # leaves a joblib HydraConfig behind, as a sweep does
    assert "joblib" in HydraConfig.get().launcher._target_
    assert main(["model=musicgen", "trainer=ddp", "trainer.accelerator=gpu"]) == 0
    assert "ddp" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["+trainer.strategy=deepspeed"], "trainer.strategy"),
        (["model.student=/no/such/dir"], "model.student"),
        (["model=nope"], "model/nope"),
        (["trainer.precision=8-bit"], "trainer.precision"),
    ],
)
def test_bad_values_are_one_error_line_naming_the_key(args, key, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err


def test_module_entry_point_measures_the_embedded_default(cache_dir):
    """The real command line, with --measure: the estimate against one step run here (the tiny world)."""
    env = {**os.environ, "TINYMUSICIAN_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinymusician.plan_memory",
            "data.num_train=8",
            "data.num_val=1",
            "--measure",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout[result.stdout.index("{") :])
    factor = plan["measured"]["estimate_over_measured"]
    assert 0.5 < factor["step"] < 2.0, factor
