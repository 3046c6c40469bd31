"""Results of many runs: read run directories, aggregate arms over seeds, the report's table and figures."""

from tinymusician.results.plots import figures
from tinymusician.results.runs import Run, RunsError, load_runs
from tinymusician.results.table import Table, per_run_markdown, summarize

__all__ = ["Run", "RunsError", "Table", "figures", "load_runs", "per_run_markdown", "summarize"]
