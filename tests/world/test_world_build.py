"""`python -m tinymusician.world build --budget small` from scratch: every part trains, saves, loads back, and
the orderings the shipped world shows hold (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from tests.world.test_shipped_world import HOLDS
from tinymusician.world.cli import main


@pytest.mark.slow
def test_small_world_rebuilds_and_its_orderings_hold(tmp_path, capsys):
    world, report = tmp_path / "world", tmp_path / "report"
    assert (
        main(
            ["build", "--budget", "small", "--out", str(world), "--report-dir", str(report), "--no-progress"]
        )
        == 0
    )
    for part in ("teacher", "student", "clap"):
        assert (world / part / "config.json").is_file() and any((world / part).glob("*.safetensors"))
    assert not (tmp_path / "world.staging").exists()
    measured = json.loads((report / "world_report.json").read_text())
    failed = [name for name in HOLDS if not measured["orderings"][name]]
    assert not failed, (failed, measured["summary"])
    build = measured["build"]
    assert build["budget"] == "small" and build["teacher"]["val_ce"] < 5.545  # below ln(256): it learned
    assert {"codec_spectrograms.png", "clap_confusion.png", "teacher_curve.png", "0_teacher.wav"} <= {
        p.name for p in report.iterdir()
    }
    assert "teacher < untrained student < noise" in (report / "report.md").read_text()
    assert "report" in capsys.readouterr().out
