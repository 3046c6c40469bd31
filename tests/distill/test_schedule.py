"""StageScheduler: stage boundaries, monotonicity, end values, resumption, validation and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tinymusician.distill import schedule as sched
from tinymusician.distill.schedule import ScheduleState, StageScheduler

REPO = Path(__file__).resolve().parents[2]
GRID = [i / 1000 for i in range(1001)]


def test_stage_boundaries():
    s = StageScheduler(global_until=0.3, refine_from=0.6, w_min=0.2)
    eps = 1e-9
    assert [s(x).stage for x in (0.0, 0.3 - eps, 0.3, 0.6 - eps, 0.6, 1.0)] == [0, 0, 1, 1, 2, 2]
    assert [s(x).stage_name for x in (0.1, 0.45, 0.9)] == ["global", "transition", "refine"]
    assert s(0.3 - eps).w_fwd == 1.0 and s(0.3).w_fwd == 1.0  # the cosine starts at 1: no jump
    assert s(0.6).w_fwd == 0.2
    assert s(0.6 - eps).w_fwd == pytest.approx(0.2, abs=1e-6)
    assert s(0.45).w_fwd == pytest.approx(0.6)  # halfway through the cosine: the midpoint of 1 and w_min
    assert s.boundaries() == [("global", 0.0, 0.3), ("transition", 0.3, 0.6), ("refine", 0.6, 1.0)]


def test_weight_matches_cosine_formula():
    s = StageScheduler(global_until=0.2, refine_from=0.7, w_min=0.1)
    for x in (0.25, 0.4, 0.55, 0.69):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (x - 0.2) / 0.5))
        assert s(x).w_fwd == pytest.approx(expected)


@pytest.mark.parametrize("anneal", ["cosine", "linear", "none"])
def test_monotone_non_increasing(anneal):
    s = StageScheduler(anneal=anneal)
    states = [s(x) for x in GRID]
    assert all(a.w_fwd >= b.w_fwd for a, b in zip(states, states[1:], strict=False))
    assert all(a.temperature >= b.temperature for a, b in zip(states, states[1:], strict=False))
    assert all(a.stage <= b.stage for a, b in zip(states, states[1:], strict=False))


@pytest.mark.parametrize(("anneal", "t_mid"), [("cosine", 1.5), ("linear", 1.5), ("none", 2.0)])
def test_end_values(anneal, t_mid):
    s = StageScheduler(w_min=0.25, t_max=2.0, t_min=1.0, anneal=anneal)
    assert s(0.0) == ScheduleState(1.0, 2.0, 0, "global")
    assert s(1.0).w_fwd == 0.25 and s(1.0).stage == 2
    assert s(1.0).temperature == (2.0 if anneal == "none" else 1.0)
    assert s(0.5).temperature == pytest.approx(t_mid)
    if anneal == "linear":
        assert s(0.25).temperature == pytest.approx(1.75)
    if anneal == "cosine":  # slower at the ends than linear
        assert s(0.1).temperature > 1.9


def test_resuming_gives_the_same_state():
    a, b = StageScheduler(w_min=0.3), StageScheduler(w_min=0.3)
    for x in (0.7, 0.1, 0.45):  # any call order: the state depends on progress alone
        a(x)
    assert [a(x) for x in (0.1, 0.45, 0.7)] == [b(x) for x in (0.1, 0.45, 0.7)]
    step, total = 4500, 10000
    assert a(step / total) == b(0.45)


def test_out_of_range_progress_is_clamped_nan_raises():
    s = StageScheduler()
    assert s(-0.1) == s(0.0)
    assert s(1.02) == s(1.0)
    with pytest.raises(ValueError, match="progress"):
        s(float("nan"))


def test_hard_switch_when_stages_touch():
    s = StageScheduler(global_until=0.5, refine_from=0.5, w_min=0.0)
    assert s(0.4999).w_fwd == 1.0 and s(0.5).w_fwd == 0.0
    assert [name for name, _, _ in s.boundaries()] == ["global", "refine"]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"global_until": 0.7, "refine_from": 0.6}, "global_until"),
        ({"global_until": -0.1}, "global_until"),
        ({"refine_from": 1.5}, "refine_from"),
        ({"w_min": 1.2}, "w_min"),
        ({"w_min": -0.2}, "w_min"),
        ({"t_min": 0.0}, "t_min"),
        ({"t_max": 0.5, "t_min": 1.0}, "t_max"),
        ({"t_max": float("nan")}, "t_max"),
        ({"anneal": "exp"}, "anneal"),
        ({"w_min": "0.2"}, "w_min"),
    ],
)
def test_bad_parameters_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        StageScheduler(**kwargs)


def test_check_schedule_uses_config_names():
    with pytest.raises(ValueError, match=r"loss\.temperature\.end"):
        sched.check_schedule(0.3, 0.6, 0.2, 2.0, -1.0, "cosine", names={"t_min": "loss.temperature.end"})


def test_hydra_instantiable():
    cfg = OmegaConf.create({"_target_": "tinymusician.distill.schedule.StageScheduler", "w_min": 0.1})
    s = instantiate(cfg)
    assert isinstance(s, StageScheduler) and s.w_min == 0.1


def test_dataclass_defaults_match_the_stage_mixed_config():
    """The CLI falls back to the dataclass defaults without the yaml: both must tell the same story."""
    path = REPO / "conf" / "loss" / "stage_mixed.yaml"
    assert path.is_file()
    assert sched.scheduler_from_config(path) == StageScheduler()
    assert sched.scheduler_from_config(REPO / "missing.yaml") == StageScheduler()


def test_cli_plots_and_prints_boundaries(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    sched.main(["--plot", str(out), "--global-until", "0.2", "--refine-from", "0.5", "--anneal", "linear"])
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "global     s in [0.000, 0.200)" in printed
    assert "transition s in [0.200, 0.500)" in printed
    assert "refine     s in [0.500, 1.000]" in printed


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit) as err:
        sched.main(["--w-min", "2"])
    assert err.value.code == 2
    assert "w_min" in capsys.readouterr().err
