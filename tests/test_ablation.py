"""The paper's ablation as one Hydra multirun in a subprocess, then the report built from its files; a job that
crashes inside a sweep is reported while the others complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_OVERRIDES
from tests.training.test_loggers import offline_runs, read_offline_run

QUICK = [
    *[o for o in FAST_OVERRIDES if "progress_bar" not in o and o != "eval=none"],
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
]
# every arm's own eval (eval=default), made small: 4 held-out captions, 0.5 s clips
SMALL_EVAL = ["eval.num_prompts=4", "eval.seconds=0.5", "eval.batch_size=4"]


def sweep(
    args: list[str], sweep_dir: Path, cache_dir: Path, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """``env``: variables to set, or to remove when None."""
    cmd = [
        sys.executable, "-m", "tinymusician.train", "-m", *args, *QUICK,
        f"hydra.sweep.dir={sweep_dir}", f"paths.log_dir={sweep_dir.parent}",
    ]  # fmt: skip
    changes = {"TINYMUSICIAN_CACHE": str(cache_dir), **(env or {})}
    env = {k: v for k, v in {**os.environ, **changes}.items() if v is not None}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_four_arms_multirun_and_the_report_of_its_files(tmp_path, tiny_pair, cache_dir):
    sweep_dir = tmp_path / "sweep"
    arms = ["+experiment=baseline,kd_only,quant_only,kd_quant", "seed=0,1", *SMALL_EVAL]
    result = sweep(arms, sweep_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep_dir / "multirun_summary.json").read_text())
    assert summary["jobs"] == 8 and summary["status"] == {"finished": 8}
    assert sorted((r["arm"], r["seed"]) for r in summary["runs"]) == sorted(
        (arm, seed) for arm in ("baseline", "kd_only", "quant_only", "kd_quant") for seed in (0, 1)
    )
    assert "| kd_quant | 1 | finished |" in (sweep_dir / "multirun_summary.md").read_text()

    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, "-m", "tinymusician.report", str(sweep_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    rows = {row["arm"]: row for row in table["rows"]}
    assert list(rows) == ["baseline", "kd_only", "quant_only", "kd_quant"]
    assert {row["n_finished"] for row in rows.values()} == {2}
    columns = {c["key"] for c in table["columns"]}
    assert {"fad_clap", "fad_encodec", "clap", "val_ce", "size_mb", "top1_agree", "rtf"} <= columns
    for arm in ("quant_only", "kd_quant"):  # quantized: smaller, with a fidelity
        assert rows[arm]["size_mb"]["mean"] < 0.7 * rows["baseline"]["size_mb"]["mean"]
        assert rows[arm]["top1_agree"]["n"] == 2
    assert rows["baseline"]["top1_agree"]["n"] == 0 and rows["quant_only"]["kl_to_teacher"]["n"] == 0
    assert rows["kd_only"]["kl_to_teacher"]["n"] == 2 and rows["baseline"]["fad_clap"]["n"] == 2
    text = (out / "README.md").read_text()
    assert "| kd_quant | 2 |" in text and "Evaluation: N=4 prompts" in text
    assert (out / "metrics.png").is_file() and (out / "size_vs_quality.png").is_file()


@pytest.mark.slow
def test_a_job_that_crashes_is_reported_and_the_others_complete(tmp_path, tiny_pair, cache_dir):
    sweep_dir = tmp_path / "sweep"
    # lr=-1 passes the start-up checks and makes AdamW raise inside fit: a crash, not a config error.
    # logger=wandb: no API key anywhere (HOME moved), so offline; every job must be its own finished wandb run.
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": None, "WANDB_MODE": None, "NETRC": None}
    args = ["+experiment=baseline", "eval=none", "optim.optimizer.lr=-1,0.001", "logger=wandb"]
    result = sweep(args, sweep_dir, cache_dir, env)
    assert result.returncode == 1
    assert "1 of 2 jobs did not finish: 0 (baseline optim.optimizer.lr=-1): ValueError" in result.stderr
    crashed = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert crashed["status"] == "failed" and "Invalid learning rate" in crashed["error"]
    assert "Traceback" in crashed["traceback"]
    finished = json.loads((sweep_dir / "1" / "summary.json").read_text())
    assert finished["status"] == "finished" and finished["steps"] == 4
    assert (sweep_dir / "1" / "student" / "config.json").is_file()
    summary = json.loads((sweep_dir / "multirun_summary.json").read_text())
    assert summary["status"] == {"failed": 1, "finished": 1}
    runs = [read_offline_run(d) for job in ("0", "1") for d in offline_runs(sweep_dir / job)]
    assert [r["exit_code"] for r in runs] == [1, 0]  # both finished: the crashed one as failed
    assert runs[0]["run"].run_group == runs[1]["run"].run_group == "sweep"  # the sweep is the group
    assert runs[0]["run"].run_id != runs[1]["run"].run_id and "val/ce" in runs[1]["history"]
