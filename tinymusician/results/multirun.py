"""The sweep's own summary: after every job of a Hydra multirun, one table of arm, seed, status and headline metrics.

Registered in ``conf/hydra/default.yaml`` (``hydra.callbacks.multirun_summary``). It reads the job directories'
summary.json files, so it works with every launcher (basic, joblib, submitit) and sweeper (basic, Optuna), and
writes ``multirun_summary.json`` / ``.md`` into the sweep directory. A sweep with a failed job exits non-zero,
after all the others ran.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tinymusician.results.runs import Run, RunsError, load_runs
from tinymusician.results.table import columns_for, per_run_markdown

log = logging.getLogger(__name__)

FAILED_EXIT_CODE = 1


def job_record(run: Run, root: Path) -> dict[str, Any]:
    headline = {c.title: c.value(run) for c in columns_for([run])} if run.finished else {}
    return {
        "dir": str(run.directory.relative_to(root)),
        "arm": run.arm,
        "seed": run.seed,
        "status": run.status,
        "error": run.summary.get("error"),
        "overrides": run.overrides,
        "metrics": headline,
    }


def summarize_sweep(sweep_dir: Path) -> tuple[dict[str, Any], str]:
    """``(multirun_summary.json content, markdown)`` of the jobs under ``sweep_dir``."""
    runs = load_runs(sweep_dir)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    finished = [r for r in runs if r.finished]
    columns = columns_for(finished) if finished else []
    data = {"sweep_dir": str(sweep_dir), "jobs": len(runs), "status": counts}
    data["runs"] = [job_record(r, sweep_dir) for r in runs]
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    text = "\n".join(
        [
            f"# Sweep {sweep_dir}",
            "",
            f"{len(runs)} jobs: {status}. Report: `python -m tinymusician.report {sweep_dir} --out <dir>`",
            "",
            per_run_markdown(runs, columns),
            "",
        ]
    )
    return data, text


class MultirunSummary(Callback):
    """Hydra callback: at the end of a multirun, print and write the sweep's summary; exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            data, text = summarize_sweep(sweep_dir)
        except RunsError as err:
            log.warning("No sweep summary: %s", err)
            return
        (sweep_dir / "multirun_summary.json").write_text(json.dumps(data, indent=2, default=str))
        (sweep_dir / "multirun_summary.md").write_text(text)
        print(text, flush=True)
        not_finished = [r for r in data["runs"] if r["status"] != "finished"]
        if not_finished:
            print(
                f"error: {len(not_finished)} of {data['jobs']} jobs did not finish: "
                + "; ".join(f"{r['dir']} ({r['arm']}): {r['error'] or r['status']}" for r in not_finished),
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(FAILED_EXIT_CODE)
