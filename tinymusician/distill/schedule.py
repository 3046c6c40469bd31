"""Stage schedule of the stage-mixed KD loss: forward weight w(s) and temperature T(s) over training.

Progress s = global_step / total_steps, so a run resumed from a checkpoint resumes the schedule exactly.
``python -m tinymusician.distill.schedule --plot schedule.png`` draws it with conf/loss/stage_mixed.yaml's
values.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tinymusician.config import CONF_DIR

__all__ = ["ANNEALS", "STAGE_NAMES", "ScheduleState", "StageScheduler", "check_schedule"]

STAGE_NAMES = ("global", "transition", "refine")
ANNEALS = ("cosine", "linear", "none")

# The Hydra config the CLI mirrors; absent in an installed wheel, then the dataclass defaults apply.
_STAGE_MIXED_YAML = CONF_DIR / "loss" / "stage_mixed.yaml"


@dataclass(frozen=True)
class ScheduleState:
    w_fwd: float  # weight of the forward (skewed) KL; 1 - w_fwd goes to the reverse one
    temperature: float
    stage: int  # index into STAGE_NAMES
    stage_name: str


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_schedule(
    global_until: float,
    refine_from: float,
    w_min: float,
    t_max: float,
    t_min: float,
    anneal: str,
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise ValueError naming the offending key (``names`` maps field names to config keys)."""

    def key(field: str) -> str:
        return (names or {}).get(field, field)

    for field, value in (
        ("global_until", global_until),
        ("refine_from", refine_from),
        ("w_min", w_min),
        ("t_max", t_max),
        ("t_min", t_min),
    ):
        if not _is_number(value):
            raise ValueError(f"{key(field)} must be a finite number, got {value!r}")
    for field, value in (("global_until", global_until), ("refine_from", refine_from), ("w_min", w_min)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key(field)} must lie in [0, 1], got {value}")
    if global_until > refine_from:
        raise ValueError(
            f"{key('global_until')} ({global_until}) must be <= {key('refine_from')} ({refine_from}): "
            "the global stage has to end before the refine stage starts"
        )
    if t_min <= 0:
        raise ValueError(f"{key('t_min')} must be > 0, got {t_min}")
    if t_max < t_min:
        raise ValueError(
            f"{key('t_max')} ({t_max}) must be >= {key('t_min')} ({t_min}): T is annealed downwards"
        )
    if anneal not in ANNEALS:
        raise ValueError(f"{key('anneal')} must be one of {', '.join(ANNEALS)}, got {anneal!r}")


def _cosine_fall(x: float) -> float:
    """1 at x = 0 down to 0 at x = 1, with zero slope at both ends (no kink at the stage boundaries)."""
    return 0.5 * (1.0 + math.cos(math.pi * x))


@dataclass
class StageScheduler:
    """Maps progress s in [0, 1] to the forward weight, the temperature and the stage.

    w = 1 while s < global_until ("global"), a cosine from 1 to w_min until refine_from ("transition"),
    then w_min ("refine"). T goes from t_max at s = 0 to t_min at s = 1 (``anneal="none"`` keeps t_max).
    """

    global_until: float = 0.3
    refine_from: float = 0.6
    w_min: float = 0.2
    t_max: float = 2.0
    t_min: float = 1.0
    anneal: str = "cosine"

    def __post_init__(self) -> None:
        check_schedule(self.global_until, self.refine_from, self.w_min, self.t_max, self.t_min, self.anneal)

    def stage(self, progress: float) -> int:
        s = self._clamp(progress)
        if s < self.global_until:
            return 0
        return 1 if s < self.refine_from else 2

    def weight(self, progress: float) -> float:
        s = self._clamp(progress)
        stage = self.stage(s)
        if stage == 0:
            return 1.0
        if stage == 2:
            return self.w_min
        x = (s - self.global_until) / (self.refine_from - self.global_until)
        return self.w_min + (1.0 - self.w_min) * _cosine_fall(x)

    def temperature(self, progress: float) -> float:
        s = self._clamp(progress)
        if self.anneal == "none":
            return self.t_max
        fall = _cosine_fall(s) if self.anneal == "cosine" else 1.0 - s
        return self.t_min + (self.t_max - self.t_min) * fall

    def __call__(self, progress: float) -> ScheduleState:
        stage = self.stage(progress)
        return ScheduleState(
            w_fwd=self.weight(progress),
            temperature=self.temperature(progress),
            stage=stage,
            stage_name=STAGE_NAMES[stage],
        )

    def boundaries(self) -> list[tuple[str, float, float]]:
        """(stage name, start, end) of each non-empty stage."""
        spans = [(0.0, self.global_until), (self.global_until, self.refine_from), (self.refine_from, 1.0)]
        return [(name, a, b) for name, (a, b) in zip(STAGE_NAMES, spans, strict=True) if b > a]

    @staticmethod
    def _clamp(progress: float) -> float:
        # Trainers' step estimates can overshoot the last step slightly; NaN is always a bug.
        progress = float(progress)
        if not math.isfinite(progress):
            raise ValueError(f"training progress must be finite, got {progress}")
        return min(max(progress, 0.0), 1.0)


def scheduler_from_config(path: Path = _STAGE_MIXED_YAML) -> StageScheduler:
    """The scheduler conf/loss/stage_mixed.yaml describes, or the dataclass defaults without that file."""
    if not path.is_file():
        return StageScheduler()
    from omegaconf import OmegaConf

    from tinymusician.config import to_plain

    cfg = to_plain(OmegaConf.load(path))
    sched, temp = cfg.get("schedule") or {}, cfg.get("temperature") or {}
    defaults = StageScheduler()
    return StageScheduler(
        global_until=sched.get("global_until", defaults.global_until),
        refine_from=sched.get("refine_from", defaults.refine_from),
        w_min=sched.get("w_min", defaults.w_min),
        t_max=temp.get("start", defaults.t_max),
        t_min=temp.get("end", defaults.t_min),
        anneal=temp.get("anneal", defaults.anneal),
    )


def plot_schedule(scheduler: StageScheduler, path: str | Path, points: int = 501) -> None:
    """Draw w(s) and T(s) with the stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [i / (points - 1) for i in range(points)]
    fig, ax_w = plt.subplots(figsize=(7, 3.5))
    colours = {"global": "tab:blue", "transition": "tab:orange", "refine": "tab:green"}
    for name, a, b in scheduler.boundaries():
        ax_w.axvspan(a, b, color=colours[name], alpha=0.12, label=f"{name} stage")
    ax_w.plot(s, [scheduler.weight(x) for x in s], color="black", label="w(s): forward weight")
    ax_w.set_xlabel("training progress s = step / total steps")
    ax_w.set_ylabel("w(s)")
    ax_w.set_xlim(0, 1)
    ax_w.set_ylim(-0.05, 1.05)
    ax_t = ax_w.twinx()
    ax_t.plot(s, [scheduler.temperature(x) for x in s], color="tab:red", linestyle="--", label="T(s)")
    ax_t.set_ylabel("temperature T(s)")
    handles = ax_w.get_legend_handles_labels()[0] + ax_t.get_legend_handles_labels()[0]
    ax_w.legend(handles=handles, loc="center left", fontsize=8)
    ax_w.set_title("stage-mixed KD: w(s) SKL + (1 - w(s)) SRKL, scaled by T(s)^2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    defaults = asdict(scheduler_from_config())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="write a PNG of w(s) and T(s) here")
    for field in ("global_until", "refine_from", "w_min", "t_max", "t_min"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=float, default=defaults[field])
    parser.add_argument("--anneal", choices=ANNEALS, default=defaults["anneal"])
    args = vars(parser.parse_args(argv))
    plot = args.pop("plot")
    try:
        scheduler = StageScheduler(**args)
    except ValueError as err:
        parser.error(str(err))
    for name, a, b in scheduler.boundaries():
        print(f"{name:<10} s in [{a:.3f}, {b:.3f}{']' if b == 1.0 else ')'}")
    print(
        f"w: 1 -> {scheduler.w_min}; T: {scheduler.temperature(0.0)} -> {scheduler.temperature(1.0)} "
        f"({scheduler.anneal})"
    )
    if plot is not None:
        plot_schedule(scheduler, plot)
        print(f"wrote {plot}")


if __name__ == "__main__":
    main()
