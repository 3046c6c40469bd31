"""Launchers (joblib, slurm), the sweep presets of conf/sweep and the Optuna sweeper: configs and real sweeps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tests.conftest import CONF_DIR, FAST_OVERRIDES

LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
PAPER_ARMS = {"baseline", "kd_only", "quant_only", "kd_quant"}  # +sweep=ablation: the paper's four
CHEAPER_ARMS = {"kd_only", "kd_guided", "kd_guided_quant", "kd_layerdrop", "kd_layerdrop_random"}
ARMS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# A run of two optimizer steps, validated once at the end.
TINY_RUN = [o for o in FAST_OVERRIDES if not o.startswith("trainer.max_steps=")] + ["trainer.max_steps=2"]


@pytest.fixture
def hydra_compose() -> Iterator:
    """compose() of conf/train.yaml with the hydra node, inside an initialized Hydra (its config loader too)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda overrides: compose("train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cache_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # one torch thread per process: what joblib gives its workers, and no oversubscription on small machines
    env = {**os.environ, "TINYMUSICIAN_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tinymusician.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# --- launchers -------------------------------------------------------------------------------------------
SLURM_OVERRIDES = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.gpus_per_node=2",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.timeout_min=30",
    "hydra.launcher.array_parallelism=2",
]


def test_slurm_launcher_defaults_and_command_line_overrides(hydra_compose):
    launcher = hydra_compose(["hydra/launcher=slurm"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    defaults = {k: launcher[k] for k in ("partition", "gpus_per_node", "tasks_per_node", "timeout_min")}
    assert defaults == {"partition": None, "gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 240}
    assert launcher.array_parallelism == 8 and launcher.max_num_timeout == 0

    cfg = hydra_compose([*SLURM_OVERRIDES, "hydra.sweep.dir=/sweeps/s1"])
    launcher = cfg.hydra.launcher
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 2)
    assert (launcher.timeout_min, launcher.array_parallelism) == (30, 2)
    assert launcher.submitit_folder == "/sweeps/s1/submitit/%j"  # submitit's files inside the sweep dir
    assert launcher.name == "tinymusician-train"


def test_slurm_launcher_cfg_hydra_on_the_command_line(cache_dir):
    result = run_cli([*SLURM_OVERRIDES, "--cfg", "hydra", "-p", "hydra.launcher"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"]) == ("gpu", 2, 30)
    assert launcher["array_parallelism"] == 2
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/submitit/%j"


def never_called(cfg: DictConfig) -> None:
    raise AssertionError("a submitted job ran in the test process")


def test_slurm_launcher_submits_one_job_array_with_the_configured_resources(
    hydra_compose, tmp_path, monkeypatch
):
    """The real SlurmLauncher.launch up to sbatch: a fake sbatch keeps the script it would have submitted."""
    import submitit.slurm.slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "submitted.sh"
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # no cluster to wait for: every job "returns" None
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda job: [None])

    sweep_dir = tmp_path / "sweep"
    cfg = hydra_compose([*SLURM_OVERRIDES, f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.mem_gb=16"])
    launcher = instantiate(cfg.hydra.launcher)
    context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=None)
    launcher.setup(hydra_context=context, task_function=never_called, config=cfg)
    returns = launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], initial_job_idx=0)

    assert len(returns) == 3
    lines = set(script.read_text().splitlines())
    for flag in (
        "--array=0-2%2",  # three jobs, at most array_parallelism=2 at a time
        "--partition=gpu",
        "--gpus-per-node=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=8",
        "--mem=16GB",
        "--time=30",
        "--job-name=tinymusician-train",
    ):
        assert f"#SBATCH {flag}" in lines, (flag, sorted(lines))
    assert f"#SBATCH --output={sweep_dir}/submitit/%A_%a/%A_%a_0_log.out" in lines


def test_joblib_launcher_is_the_plugins_config_with_n_jobs_from_the_command_line(hydra_compose):
    assert not (CONF_DIR / "hydra" / "launcher" / "joblib.yaml").exists()  # the plugin's own, not shadowed
    launcher = hydra_compose(["hydra/launcher=joblib"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == -1  # all CPUs unless told
    assert hydra_compose(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]).hydra.launcher.n_jobs == 2


# --- the Optuna preset --------------------------------------------------------------------------------------
def test_optuna_preset_composes_a_tpe_search_over_kd_knobs(hydra_compose):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import LogUniformDistribution, UniformDistribution

    cfg = hydra_compose(["+sweep=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 1234
    assert (sweeper.direction, sweeper.n_trials, sweeper.n_jobs) == ("minimize", 20, 1)
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.optimized_metric == "val/ce"

    # the search space as the sweeper parses it: every key a real knob, every range a valid distribution
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert fixed == {"+experiment": "kd_only"}
    assert space == {
        "optim.optimizer.lr": LogUniformDistribution(3e-4, 1e-2),
        "loss.alpha": UniformDistribution(0.0, 0.5),
        "loss.temperature.start": UniformDistribution(1.0, 4.0),
        "loss.schedule.w_min": UniformDistribution(0.0, 0.5),
    }
    job = hydra_compose(["+experiment=kd_only", "+sweep=optuna"])
    for key in space:
        assert OmegaConf.select(job, key) is not None, key

    overridden = hydra_compose(
        [
            "+sweep=optuna",
            "hydra.sweeper.direction=maximize",
            "hydra.sweeper.n_trials=3",
            "optimized_metric=eval/clap",
        ]
    )
    assert (overridden.hydra.sweeper.direction, overridden.hydra.sweeper.n_trials) == ("maximize", 3)
    assert overridden.optimized_metric == "eval/clap"


class ReturnsLauncher:
    """Stands in for a launcher: the jobs 'return' the given values in turn."""

    def __init__(self, values: list) -> None:
        self.values = list(values)

    def launch(self, overrides, initial_job_idx: int) -> list[JobReturn]:
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=self.values.pop(0)) for _ in overrides]


@pytest.mark.parametrize("failed_value", [None, math.nan])
def test_optuna_sweeper_fails_a_trial_that_returns_none_but_stops_on_nan(
    failed_value, hydra_compose, tmp_path
):
    """What a failed training job must return to an Optuna sweep (hydra-optuna-sweeper 1.3, optuna 2.10)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    cfg = hydra_compose(["+sweep=optuna", f"hydra.sweep.dir={tmp_path}"])
    options = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    sweeper = OptunaSweeperImpl(
        sampler=instantiate(options["sampler"]),
        **{k: options[k] for k in ("direction", "storage", "study_name", "max_failure_rate")},
        **{"search_space": None, "custom_search_space": None, "params": cfg.hydra.sweeper.params},
        n_trials=3,
        n_jobs=1,
    )
    sweeper.config, sweeper.hydra_context, sweeper.job_idx = cfg, object(), 0
    sweeper.launcher = ReturnsLauncher([2.0, failed_value, 1.5])
    if failed_value is None:
        sweeper.sweep(arguments=[])  # trial 1 is marked failed, the study goes on
        results = OmegaConf.load(tmp_path / "optimization_results.yaml")
        assert results.best_value == 1.5
    else:
        with pytest.raises(ValueError, match="Values cannot be specified when state is"):
            sweeper.sweep(arguments=[])
        assert not (tmp_path / "optimization_results.yaml").exists()


# --- the basic sweeper's presets ----------------------------------------------------------------------------
def expand(cfg: DictConfig, arguments: list[str]) -> list[list[str]]:
    """The jobs the basic sweeper launches: its params, then the command line's sweep arguments."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + arguments
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return batches[0]


def as_dict(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


PRESETS = {
    # preset: (number of jobs, the swept key -> the set of its values)
    "losses": (8, {"loss": set(LOSSES)}),
    "alpha": (5, {"loss.alpha": {"0.0", "0.05", "0.1", "0.2", "0.4"}}),
    "schedule": (
        12,
        {
            "loss.schedule.global_until": {"0.2", "0.3"},
            "loss.schedule.refine_from": {"0.6", "0.8"},
            "loss.temperature.start": {"1.0", "2.0", "4.0"},
        },
    ),
    "ablation": (12, {"+experiment": PAPER_ARMS, "seed": {"0", "1", "2"}}),
    "cheaper_student": (15, {"+experiment": CHEAPER_ARMS, "seed": {"0", "1", "2"}}),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_sweep_preset_expands_to_jobs_that_compose(name, hydra_compose):
    count, swept = PRESETS[name]
    master = hydra_compose([f"+sweep={name}"])
    assert master.hydra.mode == RunMode.MULTIRUN  # `+sweep=...` sweeps even without -m
    jobs = expand(master, [])
    assert len({tuple(j) for j in jobs}) == len(jobs) == count
    for key, values in swept.items():
        assert {as_dict(job)[key] for job in jobs} == values
    for job in jobs:
        # as the launcher composes a job: its overrides, then the command line's (the preset itself)
        cfg = hydra_compose([*job, f"+sweep={name}"])
        OmegaConf.copy_cache(from_config=master, to_config=cfg)  # Hydra shares ${now:} with the jobs
        assert cfg.hydra.sweep.dir == master.hydra.sweep.dir  # one sweep dir, whatever task_name the arm sets
        overrides = as_dict(job)
        assert cfg.task_name == overrides["+experiment"]
        for key, value in overrides.items():
            if not key.startswith("+"):
                assert str(OmegaConf.select(cfg, key if key != "loss" else "loss.name")) == value
        if cfg.loss.name != "ce":
            instantiate(cfg.loss)  # the loss validates alpha, stage boundaries and temperatures


@pytest.mark.parametrize(
    ("name", "arguments", "count", "key", "values"),
    [
        # a new key multiplies the jobs; a key of the preset is replaced; a plain override is in every job
        ("losses", ["seed=0,1"], 16, "seed", {"0", "1"}),
        ("ablation", ["seed=0,1,2,3,4"], 20, "seed", {"0", "1", "2", "3", "4"}),
        ("ablation", ["+experiment=kd_only,kd_quant"], 6, "+experiment", {"kd_only", "kd_quant"}),
        ("alpha", ["trainer.max_steps=50"], 5, "trainer.max_steps", {"50"}),
    ],
)
def test_command_line_sweeps_add_to_or_replace_a_presets_values(
    name, arguments, count, key, values, hydra_compose
):
    jobs = expand(hydra_compose([f"+sweep={name}"]), arguments)
    assert len(jobs) == count
    assert {as_dict(job)[key] for job in jobs} == values


# --- real sweeps ----------------------------------------------------------------------------------------
def job_summaries(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]


def test_optuna_sweep_end_to_end(tmp_path, tiny_pair, cache_dir):
    sweep_dir = tmp_path / "optuna"
    args = ["+sweep=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}", *TINY_RUN]
    result = run_cli([*args, f"paths.log_dir={tmp_path}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    summaries = job_summaries(sweep_dir)
    assert [s["status"] for s in summaries] == ["finished", "finished"]
    assert {s["task"] for s in summaries} == {"kd_only"}
    val_ce = [s["after"]["val/ce"] for s in summaries]
    assert math.isfinite(results.best_value) and results.best_value == pytest.approx(min(val_ce), rel=1e-12)
    # the best trial's parameters are the overrides of the job that reached that value
    best = Path(summaries[val_ce.index(min(val_ce))]["log_dir"])
    overrides = as_dict(OmegaConf.load(best / ".hydra" / "overrides.yaml"))
    assert set(results.best_params) == {
        "optim.optimizer.lr",
        "loss.alpha",
        "loss.temperature.start",
        "loss.schedule.w_min",
    }
    for key, value in results.best_params.items():
        assert float(overrides[key]) == pytest.approx(value, rel=1e-12)


@pytest.mark.slow  # ~40 s of CPU: each joblib worker imports torch and transformers again
def test_joblib_multirun_runs_both_jobs(tmp_path, tiny_pair, cache_dir):
    sweep_dir = tmp_path / "joblib"
    result = run_cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "+experiment=kd_only",
            "loss=fkl,rkl",
            f"hydra.sweep.dir={sweep_dir}",
            f"paths.log_dir={tmp_path}",
            *TINY_RUN,
        ],
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    summaries = job_summaries(sweep_dir)
    assert [(s["loss"], s["status"], s["steps"]) for s in summaries] == [
        ("fkl", "finished", 2),
        ("rkl", "finished", 2),
    ]
    assert all(math.isfinite(s["after"]["val/ce"]) for s in summaries)


def test_every_experiment_arm_is_in_a_sweep_preset():
    assert (
        set(ARMS) == PAPER_ARMS | CHEAPER_ARMS
    )  # a new conf/experiment file joins the ablation or the comparison
