"""The quantization job called directly, without Lightning: what the quantize CLI and the callback share."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tinymusician.quant import load_quantized
from tinymusician.quant.bundle import is_bundle
from tinymusician.quant.config import QuantizationOptions, check_quant_config
from tinymusician.quant.job import REPORT_FILE, QuantizeJob, report_metrics
from tinymusician.quant.plan import PlanError


def test_job_quantizes_a_copy_writes_bundle_and_report(student, tokenizer, batches, tmp_path):
    before = {k: v.clone() for k, v in student.state_dict().items()}
    job = QuantizeJob(QuantizationOptions(plan="int8", val_batches=1))
    report = job.run(
        student, tokenizer, SimpleNamespace(val_dataloader=lambda: batches), tmp_path, source="s"
    )
    assert report["status"] == "ok" and report["student_dir"] == "s" and report["plan"]["decoder"] == "int8"
    assert json.loads((tmp_path / REPORT_FILE).read_text())["fidelity"] == report["fidelity"]
    assert job.report_path == tmp_path / REPORT_FILE and job.bundle_dir == tmp_path and is_bundle(tmp_path)
    assert job.last_metrics == report_metrics(report) and job.last_metrics["quant/failed"] == 0.0
    assert report["fidelity"]["positions"] > 0 and 0.0 <= report["fidelity"]["top1_agree"] <= 1.0
    assert job.quantized_model.precision_plan == job.plan == load_quantized(tmp_path).precision_plan
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not hasattr(student, "precision_plan")
    assert student.training is False  # eval_mode restores the flags it found


def test_a_failed_rerun_leaves_nothing_of_the_earlier_run(student, tokenizer, batches, tmp_path):
    data = SimpleNamespace(val_dataloader=lambda: batches)
    job = QuantizeJob(QuantizationOptions(plan="int8", val_batches=1))
    assert job.run(student, tokenizer, data, tmp_path / "ok")["status"] == "ok"
    (tmp_path / "file").write_text("not a directory")
    report = job.run(student, tokenizer, data, tmp_path / "file")  # on_error=warn: reported, not raised
    assert report["status"] == "error" and "NotADirectoryError" in report["error"]
    assert job.quantized_model is None and job.bundle_dir is None and job.plan is None
    assert job.last_metrics == {"quant/failed": 1.0} and job.report_path is None


def test_options_take_config_values_and_list_the_known_keys():
    options = QuantizationOptions.from_config(
        OmegaConf.create({"_target_": "x", "plan": {"decoder": "int8"}, "val_batches": "2"})
    )
    assert options.fixed_plan.decoder == "int8" and options.plan == {"decoder": "int8"}
    assert options.val_batches == 2 and options.search_config is None and options.on_error == "warn"
    adaptive = QuantizationOptions(plan="adaptive", search=OmegaConf.create({"candidates": ["int8"]}))
    assert adaptive.fixed_plan is None and adaptive.search_config.candidates == ("int8", "fp32")
    with pytest.raises(
        PlanError, match=r"unknown options \['colour'\]; known: \['on_error', 'output_dir', 'plan'"
    ):
        QuantizationOptions.from_config({"colour": "blue"})
    with pytest.raises(PlanError, match="val_batches=0: must be >= 1"):
        QuantizationOptions(val_batches=0)
    check_quant_config({"_target_": "someone.else.Callback", "colour": "blue"})  # theirs to validate


def test_the_job_needs_no_lightning():
    code = "import sys, tinymusician.quant.job; print(sorted(m for m in sys.modules if 'lightning' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
