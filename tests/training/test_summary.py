"""The end-of-run summary prints FAD and CLAP beside val CE, and says what they were measured on."""

from __future__ import annotations

from tinymusician.training.summary import print_summary


def test_summary_prints_eval_and_headline_quant_numbers(capsys):
    summary = {
        "task": "kd_quant",
        "steps": 400,
        "train_seconds": 1.0,
        "loss": "stage_mixed",
        "student": "s",
        "student_trainable_params": 1,
        "teacher": "t",
        "teacher_params": 2,
        "before": {"val/ce": 5.5},
        "after": {"val/ce": 3.5, "val/teacher_ce": 2.3},
        "post_training": {
            "eval/fad_clap": 0.15,
            "eval/clap": 0.52,
            "quant/size_mb": 2.6,
            "quant/top1_agree_q0": 0.9,
        },
        "eval_setup": "N=64 prompts (captions of 64 held-out synthetic clips), reference heldout",
        "eval_report": "/runs/x/eval/final/report.json",
        "student_dir": "d",
        "best_checkpoint": None,
        "log_dir": "l",
    }
    print_summary(summary)
    out = capsys.readouterr().out
    assert "val/ce               5.500 -> 3.500   (teacher 2.300)" in out
    assert "eval/fad_clap        0.1500" in out and "eval/clap            0.5200" in out
    assert "quant/size_mb        2.6000" in out and "top1_agree_q0" not in out  # per-codebook: json only
    assert "N=64 prompts" in out and "report.json" in out
