"""Build the results report of a folder of runs: ``python -m tinymusician.report RUNS_DIR --out DIR``.

Reads the runs' saved files (summary.json, quantization and evaluation reports, csv/metrics.csv), never a
logger, and writes the table (mean ± std over seeds with N), the PNG plots and ``table.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinymusician.results.report import write_report
from tinymusician.results.runs import RunsError, copy_report_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path, help="a sweep's directory (or any folder of run directories)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the PNGs, table.json and README.md"
    )
    parser.add_argument("--markdown", type=Path, help="write the markdown here instead of OUT/README.md")
    parser.add_argument("--title", default="Results")
    parser.add_argument("--command", help="the command that produced the runs (printed as 'Reproduce')")
    parser.add_argument(
        "--copy-data",
        type=Path,
        metavar="DIR",
        help="copy each run's report files (summary, reports, metrics CSV; no weights or audio) to DIR and "
        "build the report from that copy, so a commit of DIR can rebuild it",
    )
    args = parser.parse_args(argv)
    try:
        runs_dir = args.runs_dir
        if args.copy_data:  # copy first, then report from the copy: its rebuild command names what is kept
            count = copy_report_files(args.runs_dir, args.copy_data)
            print(f"{count} report files copied to {args.copy_data}", file=sys.stderr)
            runs_dir = args.copy_data
        path, _ = write_report(runs_dir, args.out, args.markdown, args.title, args.command)
    except RunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"report written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
