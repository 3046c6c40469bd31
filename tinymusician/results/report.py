"""The results report of a runs directory: markdown (table, per-run appendix, what every number is), PNGs and
``table.json``. One builder for every experiment (the ablation, the loss comparison, any sweep)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from tinymusician.results.plots import figures
from tinymusician.results.runs import Run, load_runs
from tinymusician.results.table import Table, per_run_markdown, summarize
from tinymusician.shipped import WORLD_DIR, WORLD_PARTS

CELLS = "Cells: mean ± sample std over the arm's finished seeds; N = finished seeds."


def distinct(runs: list[Run], key: str) -> list[str]:
    return sorted({str(r.summary[key]) for r in runs if r.summary.get(key) is not None})


def short_path(path: str) -> str:
    """A model source as a reader can find it: ``tiny`` for a shipped tiny-world part (wherever the checkout
    was), else relative to the working directory when it lies below it."""
    parts = Path(path).parts
    if parts[-3:-1] == WORLD_DIR.parts[-2:] and parts[-1] in WORLD_PARTS:
        return f"tiny (the shipped world's {parts[-1]})"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def setup_lines(runs: list[Run]) -> list[str]:
    """What the numbers are: evaluation setup, teacher, steps, machine and threads (as the runs recorded them)."""
    finished = [r for r in runs if r.finished]
    lines = []
    setups = distinct(finished, "eval_setup")
    if setups:
        lines.append("Evaluation: " + "; ".join(setups) + ".")
    teacher_ce = [r.metric("val/teacher_ce") for r in finished if r.metric("val/teacher_ce") is not None]
    teachers = distinct(finished, "teacher")
    if teacher_ce:
        lines.append(
            f"Teacher: {', '.join(short_path(t) for t in teachers)}; val CE {statistics.mean(teacher_ce):.3f}."
        )
    students = distinct(finished, "student")
    steps = sorted({int(r.metric("steps") or 0) for r in finished})
    lines.append(f"Student: {', '.join(short_path(s) for s in students)}; training steps: {steps}.")
    machines = {
        json.dumps({k: m.get(k) for k in ("cpu", "cores", "torch_threads", "torch")}, sort_keys=True)
        for m in (r.summary.get("machine") for r in finished)
        if m
    }
    for text in sorted(machines):
        m = json.loads(text)
        lines.append(
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s) per run, torch {m['torch']}."
        )
    return lines


def failures(runs: list[Run]) -> list[str]:
    return [
        f"- {r.arm} (seed {r.seed}, `{r.directory.name}`): {r.status}"
        + (f": {r.summary['error']}" if r.summary.get("error") else "")
        for r in runs
        if not r.finished
    ]


def markdown(
    runs: list[Run], table: Table, images: list[str], title: str, command: str | None, rebuild: str
) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Reproduce: `{command}`", ""]
    definitions = [f"- {c.definition}." for c in table.columns]
    lines += [f"This report: `{rebuild}`", "", table.markdown(), "", CELLS, *definitions, ""]
    lines += [*setup_lines(runs), ""]
    failed = failures(runs)
    if failed:
        lines += ["Runs that did not finish (left out of the means):", *failed, ""]
    lines += [f"![{Path(image).stem}]({image})" for image in images]
    lines += ["", "## Every run", "", per_run_markdown(runs, table.columns), ""]
    return "\n".join(lines)


def write_report(
    runs_dir: Path,
    out: Path,
    markdown_path: Path | None = None,
    title: str = "Results",
    command: str | None = None,
) -> tuple[Path, Table]:
    """Read ``runs_dir``, write ``out/{table.json, *.png}`` and the markdown (default ``out/README.md``)."""
    runs = load_runs(runs_dir)
    table = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    markdown_path = markdown_path or out / "README.md"
    images = []
    for name, fig in figures(runs, table).items():
        fig.savefig(out / name, dpi=110)
        images.append(os.path.relpath(out / name, markdown_path.parent))
    (out / "table.json").write_text(json.dumps(table.to_json(), indent=1, default=str))
    rebuild = f"python -m tinymusician.report {runs_dir} --out {out}"
    if markdown_path != out / "README.md":
        rebuild += f" --markdown {markdown_path}"
    text = markdown(runs, table, images, title, command, rebuild)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(text)
    return markdown_path, table
