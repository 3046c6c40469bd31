"""A Hydra multirun of DDP jobs through the CLI: every job (2 gloo processes) keeps its own directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import FAST_OVERRIDES

TINY_RUN = [o for o in FAST_OVERRIDES if not o.startswith(("trainer.max_steps=", "trainer.val_check"))] + [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "data.batch_size=4",  # per process: the global batch stays 8
]


@pytest.mark.slow  # ~2 min on 2 cores: 2 jobs x 2 processes, each importing torch and transformers
def test_ddp_multirun_keeps_one_directory_per_job(tmp_path, tiny_pair, cache_dir):
    args = [
        "-m",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "seed=1,2",
        # the default sweep dir, logs/multiruns/<time>: a rank re-running the sweep would add one of another
        # second (and its run dir, logs/train/runs/<time>)
        f"paths.log_dir={tmp_path / 'logs'}",
        *TINY_RUN,
    ]
    env = {**os.environ, "TINYMUSICIAN_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    # its own session: if a rank re-runs the sweep and hangs, the timeout ends every process it started
    with subprocess.Popen(
        [sys.executable, "-m", "tinymusician.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,  # relative stray outputs would land here
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["multiruns"]
    [sweep_dir] = (tmp_path / "logs" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]  # one directory per job, no second sweep's
    for job, seed in zip(jobs, (1, 2), strict=True):
        summary = json.loads((job / "summary.json").read_text())
        assert (summary["status"], summary["seed"], summary["steps"]) == ("finished", seed, 2)
        assert summary["log_dir"] == str(job)
        assert f"seed={seed}" in summary["overrides"] and "trainer=ddp" in summary["overrides"]
        # rank 1 ran as this job's process (Hydra's log of job name train_ddp_process_1), in this directory
        assert "Student" in (job / "train_ddp_process_1.log").read_text()
        assert (job / "student" / "config.json").is_file()
    runs = json.loads((sweep_dir / "multirun_summary.json").read_text())["runs"]
    assert [(r["dir"], r["status"]) for r in runs] == [("0", "finished"), ("1", "finished")]
    output = stdout + stderr
    assert output.count("Launching 2 jobs") == 1  # no rank re-ran the sweep
    assert output.count("All distributed processes registered") == 2  # each job: its own 2 processes
