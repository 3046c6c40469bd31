"""Turn a folder of runs (each with summary.json and csv/metrics.csv) into a markdown table and plots.

Usage: python experiments/report.py RUNS_DIR --out OUT_DIR   (writes OUT_DIR/README.md and *.png)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = ("val/ce", "val/kl_to_teacher")
# end-of-run evaluation (eval=default), shown when the runs have it
EVAL_METRICS = ("eval/fad_clap", "eval/fad_encodec", "eval/clap", "eval_quant/fad_clap", "eval_quant/clap")


def load_runs(runs_dir: Path) -> list[dict]:
    runs = []
    for summary_path in sorted(runs_dir.rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        config = (summary_path.parent / "config.yaml").read_text()
        seed = next(
            (line.split(":")[1].strip() for line in config.splitlines() if line.startswith("seed:")), "?"
        )
        curve = defaultdict(list)
        metrics_csv = summary_path.parent / "csv" / "metrics.csv"
        if metrics_csv.is_file():
            with metrics_csv.open() as handle:
                for row in csv.DictReader(handle):
                    for key in METRICS:
                        if row.get(key):
                            curve[key].append((int(row["step"]), float(row[key])))
        arm = "baseline (ce)" if summary["loss"] == "ce" else summary["loss"]
        runs.append({"arm": arm, "seed": seed, "summary": summary, "curve": curve})
    if not runs:
        raise SystemExit(f"no summary.json under {runs_dir}: run experiments/loss_comparison.sh first")
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[dict]) -> str:
    by_arm = defaultdict(list)
    for run in runs:
        by_arm[run["arm"]].append(run["summary"])
    order = sorted(by_arm, key=lambda arm: statistics.mean(s["after"]["val/ce"] for s in by_arm[arm]))
    teacher_ce = statistics.mean(s["after"].get("val/teacher_ce", float("nan")) for s in runs_summaries(runs))
    evals = [k for k in EVAL_METRICS if any(k in s.get("post_training", {}) for s in runs_summaries(runs))]
    lines = [
        "| arm | seeds | steps | val/ce (before -> after) | val/kl_to_teacher (after) |"
        + "".join(f" {k} |" for k in evals),
        "|---|---|---|---|---|" + "---|" * len(evals),
    ]
    for arm in order:
        summaries = by_arm[arm]
        before = mean_std([s["before"]["val/ce"] for s in summaries if "val/ce" in s["before"]])
        after = mean_std([s["after"]["val/ce"] for s in summaries])
        kl = mean_std(
            [s["after"]["val/kl_to_teacher"] for s in summaries if "val/kl_to_teacher" in s["after"]]
        )
        extra = "".join(
            f" {mean_std([s['post_training'][k] for s in summaries if k in s.get('post_training', {})])} |"
            for k in evals
        )
        lines.append(
            f"| {arm} | {len(summaries)} | {summaries[0]['steps']} | {before} -> {after} | {kl} |{extra}"
        )
    lines.append(
        f"\nTeacher val/ce: {teacher_ce:.3f}. Mean ± sample std over seeds; lower is better (CLAP: higher)."
    )
    setups = {s.get("eval_setup") for s in runs_summaries(runs) if s.get("eval_setup")}
    if setups:
        lines.append("Evaluation: " + "; ".join(sorted(setups)) + ".")
    return "\n".join(lines)


def runs_summaries(runs: list[dict]) -> list[dict]:
    return [run["summary"] for run in runs]


def plot(runs: list[dict], out: Path) -> Path:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4))
    arms = sorted({run["arm"] for run in runs})
    colors = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(arms)}
    for ax, key in zip(axes, METRICS, strict=True):
        for run in runs:
            points = run["curve"].get(key)
            if points:
                steps, values = zip(*points, strict=True)
                label = run["arm"] if run["seed"] == "1" else None
                ax.plot(steps, values, color=colors[run["arm"]], alpha=0.8, label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="KD losses vs the CE baseline on the embedded default")
    parser.add_argument("--script", default="experiments/loss_comparison.sh")
    args = parser.parse_args()
    runs = load_runs(args.runs_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = plot(runs, args.out)
    text = "\n".join(
        [
            f"# {args.title}",
            "",
            f"Reproduce: `bash {args.script}` (then this report: "
            f"`python experiments/report.py {args.runs_dir} --out {args.out}`).",
            "",
            table(runs),
            "",
            f"![validation curves]({plot_path.name})",
            "",
        ]
    )
    (args.out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
