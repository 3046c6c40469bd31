"""Reading run directories back: arm labels, the table (mean ± std, N, the deployed model's numbers), the report
files and the copy a commit can rebuild from, the sweep's own summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tinymusician.report import main as report_main
from tinymusician.results import load_runs, summarize
from tinymusician.results.multirun import MultirunSummary, summarize_sweep
from tinymusician.results.report import write_report
from tinymusician.results.runs import REPORT_FILES, copy_report_files


def write_run(
    directory: Path,
    overrides: list[str],
    after: dict | None = None,
    post: dict | None = None,
    status: str = "finished",
    **fields,
) -> Path:
    """A run directory as `python -m tinymusician.train` leaves it (only the files a report reads)."""
    directory.mkdir(parents=True)
    (directory / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(overrides), directory / ".hydra" / "overrides.yaml")
    seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), None)
    summary = {
        "task": "train",
        "seed": seed,
        "status": status,
        "after": after or {},
        "post_training": post or {},
    }
    summary.update(fields)
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "csv").mkdir()
    (directory / "csv" / "metrics.csv").write_text("step,val/ce,train/loss\n0,5.0,\n10,,4.0\n20,4.0,\n")
    return directory


def ablation_dir(root: Path) -> Path:
    """Two seeds of baseline and kd_quant, one kd_quant seed that failed; a shared override everywhere."""
    for seed, ce in ((0, 3.4), (1, 3.6)):
        write_run(
            root / f"b{seed}",
            ["+experiment=baseline", f"seed={seed}", "trainer.max_steps=400", "logger=csv"],
            after={"val/ce": ce, "val/kl_to_teacher": 1.0},
            post={"eval/fad_clap": 0.2 + seed / 10, "eval/clap": 0.5},
            student_size_mb=4.0,
        )
        write_run(
            root / f"q{seed}",
            ["+experiment=kd_quant", f"seed={seed}", "trainer.max_steps=400", "logger=csv"],
            after={"val/ce": ce - 0.1},
            post={
                "eval/fad_clap": 0.1,
                "eval_quant/fad_clap": 0.3,  # the quantized student's: what kd_quant ships
                "eval/clap": 0.6,
                "eval_quant/clap": 0.55,
                "quant/size_mb": 2.0,
                "quant/reduction": 0.5,
                "quant/top1_agree": 0.99,
            },
            student_size_mb=4.0,
        )
    write_run(
        root / "q2",
        ["+experiment=kd_quant", "seed=2", "trainer.max_steps=400", "logger=csv"],
        status="failed",
        error="ValueError: Invalid learning rate: -1",
    )
    return root


def test_arms_are_the_experiment_plus_the_overrides_that_differ(tmp_path):
    write_run(tmp_path / "a", ["+experiment=kd_only", "loss=fkl", "seed=1", "data.num_train=8"])
    write_run(tmp_path / "b", ["+experiment=kd_only", "loss=rkl", "seed=1", "data.num_train=8"])
    write_run(tmp_path / "c", ["+experiment=kd_only", "loss=rkl", "seed=2", "data.num_train=8"])
    write_run(tmp_path / "d", ["+experiment=baseline", "seed=1", "data.num_train=8", "paths.log_dir=/x"])
    arms = {run.directory.name: run.arm for run in load_runs(tmp_path)}
    assert arms == {
        "a": "kd_only loss=fkl",
        "b": "kd_only loss=rkl",
        "c": "kd_only loss=rkl",
        "d": "baseline",
    }


def test_table_means_over_finished_seeds_with_the_deployed_models_numbers(tmp_path):
    table = summarize(load_runs(ablation_dir(tmp_path)))
    assert [row.arm for row in table.rows] == ["baseline", "kd_quant"]  # the paper's order
    baseline, kd_quant = table.row("baseline"), table.row("kd_quant")
    assert len(baseline.finished) == 2 and len(kd_quant.finished) == 2 and len(kd_quant.not_finished) == 1
    assert baseline.cells["val_ce"].mean == pytest.approx(3.5)
    assert baseline.cells["val_ce"].std == pytest.approx(0.1414, abs=1e-4)
    assert baseline.cells["fad_clap"].values == pytest.approx([0.2, 0.3])
    assert kd_quant.cells["fad_clap"].values == pytest.approx([0.3, 0.3])  # eval_quant, not eval
    assert kd_quant.cells["clap"].mean == pytest.approx(0.55)
    assert baseline.cells["size_mb"].mean == 4.0 and kd_quant.cells["size_mb"].mean == 2.0
    assert baseline.cells["reduction"].mean == 0.0 and kd_quant.cells["reduction"].mean == 0.5
    assert baseline.cells["top1_agree"].n == 0 and kd_quant.cells["top1_agree"].n == 2
    assert baseline.cells["kl_to_teacher"].n == 2 and kd_quant.cells["kl_to_teacher"].n == 0
    lines = table.markdown().splitlines()
    assert lines[2].startswith("| baseline | 2 | ") and "3.500 ± 0.141" in lines[2]
    assert lines[3].startswith("| kd_quant | 2 (1 not finished) | ") and "n/a" in lines[3]


def test_report_writes_table_plots_and_a_copy_it_can_be_rebuilt_from(tmp_path):
    runs = ablation_dir(tmp_path / "runs")
    (runs / "b0" / "checkpoints").mkdir()
    (runs / "b0" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    path, table = write_report(
        runs, tmp_path / "out", title="Ablation", command="bash experiments/ablation.sh"
    )
    text = path.read_text()
    assert path == tmp_path / "out" / "README.md" and text.startswith("# Ablation")
    assert "Reproduce: `bash experiments/ablation.sh`" in text
    assert "Invalid learning rate" in text  # the failed job is listed, not silently dropped
    for image in ("metrics.png", "size_vs_quality.png", "curves.png"):
        assert (tmp_path / "out" / image).stat().st_size > 1000 and f"]({image})" in text
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [row["arm"] for row in saved["rows"]] == ["baseline", "kd_quant"]
    assert saved["rows"][1]["not_finished"][0]["status"] == "failed"

    copied = copy_report_files(runs, tmp_path / "data")
    files = {
        p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*") if p.is_file()
    }
    assert copied == len(files) and "b0/checkpoints/last.ckpt" not in files
    assert {f.split("/", 1)[1] for f in files} <= set(REPORT_FILES)
    _, rebuilt = write_report(tmp_path / "data", tmp_path / "out2")
    for original, copy in zip(table.rows, rebuilt.rows, strict=True):
        assert copy.arm == original.arm and len(copy.runs) == len(original.runs)
        assert {k: c.values for k, c in copy.cells.items()} == {
            k: c.values for k, c in original.cells.items()
        }


def test_report_cli_names_an_empty_folder(tmp_path, capsys):
    assert report_main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"no run under {tmp_path}" in capsys.readouterr().err


def test_sweep_summary_lists_every_job_and_exits_nonzero_on_a_failure(tmp_path, capsys):
    sweep = ablation_dir(tmp_path / "sweep")
    data, text = summarize_sweep(sweep)
    assert data["jobs"] == 5 and data["status"] == {"finished": 4, "failed": 1}
    failed = next(r for r in data["runs"] if r["status"] == "failed")
    assert failed["dir"] == "q2" and failed["arm"] == "kd_quant" and "learning rate" in failed["error"]
    assert text.count("| kd_quant |") == 3
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as exit_info:
        MultirunSummary().on_multirun_end(config)
    assert exit_info.value.code == 1
    assert "1 of 5 jobs did not finish: q2 (kd_quant)" in capsys.readouterr().err
    assert json.loads((sweep / "multirun_summary.json").read_text())["status"]["failed"] == 1

    finished_only = tmp_path / "finished_only"
    write_run(finished_only / "0", ["+experiment=baseline", "seed=0"], after={"val/ce": 3.0})
    MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(finished_only)}}}))
    assert "1 jobs: 1 finished" in (finished_only / "multirun_summary.md").read_text()


def test_numbers_come_from_the_runs_reports_and_a_failed_quantization_ships_nothing(tmp_path):
    overrides = ["+experiment=kd_quant", "seed=0"]
    ok = write_run(tmp_path / "ok", overrides, after={"val/ce": 3.0}, student_size_mb=4.0)
    (ok / "quantized").mkdir()
    size = {
        "before_mb": {"text_encoder": 1, "decoder": 2, "codec": 1, "total": 4.0},
        "after_mb": {"text_encoder": 0.5, "decoder": 1, "codec": 1, "total": 2.5},
        "reduction": {"total": 0.375, "deployed": 0.3},
    }
    fidelity = {"top1_agree": 0.97, "top1_agree_per_codebook": [0.97], "kl": 0.01, "max_logit_diff": 0.1}
    (ok / "quantized" / "quant_report.json").write_text(
        json.dumps({"status": "ok", "size": size, "fidelity": fidelity})
    )
    (ok / "eval" / "final").mkdir(parents=True)
    result = {"fad": {"clap": {"fad": 0.4}}, "clap": {"score": 0.6}, "generation": {"rtf": 0.2}}
    (ok / "eval" / "final" / "report.json").write_text(json.dumps({"student": result, "quantized": result}))
    failed = write_run(
        tmp_path / "failed",
        ["+experiment=kd_quant", "seed=1"],
        after={"val/ce": 3.2},
        post={"quant/failed": 1.0, "eval/fad_clap": 0.3},  # on_error: warn kept the run going
        student_size_mb=4.0,
    )
    runs = load_runs(tmp_path)
    by_name = {run.directory.name: run for run in runs}
    assert by_name["ok"].quantized and by_name["ok"].metric("quant/size_mb") == 2.5  # summary has no copy
    assert by_name["ok"].deployed("clap") == 0.6 and by_name["ok"].deployed("rtf") == 0.2
    assert by_name["failed"].quantization == "failed" and by_name["failed"].deployed("fad_clap") is None
    row = summarize(runs).row("kd_quant")
    assert row.cells["size_mb"].values == [2.5] and row.cells["fad_clap"].values == [0.4]
    assert row.cells["top1_agree"].values == [0.97] and row.cells["val_ce"].n == 2
    text, _ = write_report(tmp_path, tmp_path / "out")
    assert "finished (quantization failed)" in text.read_text()
    assert failed.name in text.read_text()
