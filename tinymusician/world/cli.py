"""Command line of the tiny world: ``build`` retrains every part and reports; ``report`` re-measures a world."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from tinymusician.shipped import WORLD_DIR

REPORT_DIR = Path(__file__).resolve().parents[2] / "experiments" / "world"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinymusician.world", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train codec, teacher and CLAP from scratch, then report")
    build.add_argument("--budget", choices=("small", "full"), default="full", help="full: the shipped world")
    build.add_argument("--out", type=Path, default=WORLD_DIR, help=f"world directory (default {WORLD_DIR})")
    build.add_argument("--report-dir", type=Path, default=REPORT_DIR, help="report.md, figures and WAVs")
    build.add_argument("--no-report", action="store_true")
    build.add_argument("--no-progress", action="store_true")
    report = commands.add_parser("report", help="measure an existing world and write its report")
    report.add_argument("--world", type=Path, default=WORLD_DIR)
    report.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    report.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    if args.command == "build":
        from tinymusician.world.build import build_world

        built = build_world(args.out, args.budget, progress=not args.no_progress)
        print(f"world built in {built['build_seconds'] / 60:.1f} min -> {args.out}")
        if args.no_report:
            return 0
        world = args.out
    else:
        world = args.world
    from tinymusician.world.report import measure_world, write_report

    measured = measure_world(world, progress=not args.no_progress)
    path = write_report(world, measured, args.report_dir)
    print(json.dumps(measured["summary"], indent=1))
    print(f"report {path} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0
