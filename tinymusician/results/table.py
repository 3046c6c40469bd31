"""The paper-style table of a set of runs: one row per arm, mean +- std over its finished seeds, with N."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinymusician.results.runs import Run

# The paper's arms first, in its order; any other arm follows in the order first seen.
PAPER_ARMS = ("baseline", "kd_only", "quant_only", "kd_quant")


@dataclass(frozen=True)
class Column:
    """A table column: its key, heading, which direction is better and how a run yields its value."""

    key: str
    title: str
    better: str  # "lower", "higher" or "" (neither)
    value: Callable[[Run], float | None]
    definition: str
    digits: int = 3


def size_mb(run: Run) -> float | None:
    """MB of what the run ships: the quantized bundle, or the fp32 student (None: its quantization failed)."""
    if run.quantization == "failed":
        return None
    return run.metric("quant/size_mb") if run.quantized else run.metric("student_size_mb")


def reduction(run: Run) -> float | None:
    if run.quantization is not None:
        return run.metric("quant/reduction")
    return 0.0 if run.metric("student_size_mb") is not None else None


def embedder_names(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for key in run.summary.get("post_training") or {}:
            if key.startswith("eval/fad_") and not key.startswith("eval/fad_inf_"):
                name = key[len("eval/fad_") :]
                names += [name] if name not in names else []
    return names


def columns_for(runs: list[Run]) -> list[Column]:
    """The columns these runs can fill (a column no run has is left out)."""
    shipped = "of the model the arm ships (the quantized student when it quantizes, else the fp32 student)"
    columns = [
        *(
            Column(
                f"fad_{name}",
                f"FAD {name}",
                "lower",
                lambda r, n=name: r.deployed(f"fad_{n}"),
                f"FAD {name}: Fréchet distance of `{name}` embeddings of the generated clips to the reference, {shipped}",
            )
            for name in embedder_names(runs)
        ),
        Column(
            "clap", "CLAP", "higher", lambda r: r.deployed("clap"),
            f"CLAP: mean cosine of each prompt's and its clip's CLAP embeddings, {shipped}",
        ),
        Column(
            "val_ce", "val CE", "lower", lambda r: r.metric("val/ce"),
            "val CE: the fp32 student's cross-entropy (nats) on the validation split after training",
        ),
        Column(
            "kl_to_teacher", "KL to teacher", "lower", lambda r: r.metric("val/kl_to_teacher"),
            "KL to teacher: KL(teacher || fp32 student) on the validation split after training",
        ),
        Column(
            "size_mb", "size MB", "lower", size_mb,
            "size MB: what the arm ships (the quantized bundle, or the fp32 student)", digits=2,
        ),
        Column(
            "reduction", "reduction", "higher", reduction,
            "reduction: 1 - size / the fp32 student's size (0 for an arm that does not quantize)",
        ),
        Column(
            "top1_agree", "fidelity (top-1)", "higher", lambda r: r.metric("quant/top1_agree"),
            "fidelity: teacher-forced top-1 agreement of the quantized with the fp32 student on validation batches",
        ),
        Column(
            "rtf", "generation RTF", "lower", lambda r: r.deployed("rtf"),
            f"generation RTF: wall seconds of generation per second of audio while evaluating (batched: a "
            f"throughput, not a latency), {shipped}",
        ),
    ]  # fmt: skip
    return [c for c in columns if any(c.value(r) is not None for r in runs if r.finished)]


@dataclass
class Cell:
    """Mean, sample std (None for one value) and N of one metric over an arm's finished runs."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values) if self.values else math.nan

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int) -> str:
        if not self.values:
            return "n/a"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class ArmRow:
    arm: str
    runs: list[Run]
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def not_finished(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]


@dataclass
class Table:
    """Rows per arm; ``markdown()`` renders it with the N of every cell and what each number is."""

    columns: list[Column]
    rows: list[ArmRow]

    def row(self, arm: str) -> ArmRow:
        return next(r for r in self.rows if r.arm == arm)

    def markdown(self) -> str:
        heads = [
            f"{c.title} {'↓' if c.better == 'lower' else '↑' if c.better == 'higher' else ''}".strip()
            for c in self.columns
        ]
        lines = [
            "| arm | N | " + " | ".join(heads) + " |",
            "|---|---|" + "---|" * len(self.columns),
        ]
        for row in self.rows:
            failed = f" ({len(row.not_finished)} not finished)" if row.not_finished else ""
            cells = " | ".join(row.cells[c.key].text(c.digits) for c in self.columns)
            lines.append(f"| {row.arm} | {len(row.finished)}{failed} | {cells} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [{"key": c.key, "title": c.title, "better": c.better} for c in self.columns],
            "rows": [
                {
                    "arm": row.arm,
                    "n_finished": len(row.finished),
                    "not_finished": [
                        {"dir": str(r.directory), "status": r.status, "error": r.summary.get("error")}
                        for r in row.not_finished
                    ],
                    "seeds": [r.seed for r in row.finished],
                    **{
                        c.key: {
                            "mean": row.cells[c.key].mean,
                            "std": row.cells[c.key].std,
                            "n": row.cells[c.key].n,
                            "values": row.cells[c.key].values,
                        }
                        for c in self.columns
                    },
                }
                for row in self.rows
            ],
        }


def arm_order(arms: list[str]) -> list[str]:
    paper = [a for a in PAPER_ARMS if a in arms]
    return paper + list(dict.fromkeys(a for a in arms if a not in paper))


def summarize(runs: list[Run]) -> Table:
    """Group runs by arm (labelled by :func:`~tinymusician.results.runs.load_runs`) and aggregate each column."""
    columns = columns_for(runs)
    by_arm: dict[str, list[Run]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, []).append(run)
    rows = []
    for arm in arm_order(list(by_arm)):
        row = ArmRow(arm, by_arm[arm])
        for column in columns:
            values = [column.value(r) for r in row.finished]
            row.cells[column.key] = Cell([v for v in values if v is not None])
        rows.append(row)
    return Table(columns, rows)


def seed_order(seed: Any) -> tuple[int, Any]:
    """Numbers in numeric order (2 before 10), then anything else as text."""
    try:
        return 0, int(seed)
    except (TypeError, ValueError):
        return 1, str(seed)


def per_run_markdown(runs: list[Run], columns: list[Column]) -> str:
    """One line per run (arm, seed, status and every column), for the appendix and the sweep's summary."""
    lines = [
        "| arm | seed | status | " + " | ".join(c.title for c in columns) + " | run |",
        "|---|---|---|" + "---|" * (len(columns) + 1),
    ]
    order = arm_order([r.arm for r in runs])
    for run in sorted(runs, key=lambda r: (order.index(r.arm), seed_order(r.seed))):
        values = [column.value(run) for column in columns]
        cells = " | ".join(
            "" if v is None else f"{v:.{c.digits}f}" for v, c in zip(values, columns, strict=True)
        )
        status = run.status + (f": {run.summary['error']}" if run.summary.get("error") else "")
        status += " (quantization failed)" if run.quantization == "failed" else ""
        lines.append(f"| {run.arm} | {run.seed} | {status} | {cells} | {run.directory.name} |")
    return "\n".join(lines)
