"""EvaluateCallback inside a real `train` run (eval=default): WAVs, JSON report, eval/* metrics in the logs,
the quantized student when a quantize callback exposes one, and start-up errors of the eval configs."""

from __future__ import annotations

import copy
import csv
import json
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train_cfg
from tinymusician.callbacks.evaluate import EvaluateCallback
from tinymusician.data.synthetic import heldout_clips
from tinymusician.train import train


class FakeQuantize(L.Callback):
    """Stands in for QuantizeCallback: at fit end it exposes an int8-dynamic copy of the student's decoder."""

    def __init__(self) -> None:
        self.quantized_model = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = copy.deepcopy(pl_module.student).eval()
        model.decoder = torch.ao.quantization.quantize_dynamic(
            model.decoder, {torch.nn.Linear}, dtype=torch.qint8
        )
        self.quantized_model = model


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_pair, tiny_clap_dir):
    out = tmp_path_factory.mktemp("eval-run")
    cfg = compose_train_cfg(
        [
            "+experiment=kd_only",
            "eval=default",
            "eval.prompts=null",  # the prompts file and the val reference here; the tiny world's default: tests/world
            "eval.reference=val",
            "eval.embedders=[{name: encodec, source: student}]",
            "eval.seconds=1.0",
            "eval.num_prompts=4",
            "eval.reference_max_clips=8",
            "eval.every_n_epochs=1",
            "eval.fad_inf=true",
            f"eval.clap_model={tiny_clap_dir}",
            f"+callbacks.fake_quant._target_={__name__}.FakeQuantize",
            "trainer.max_steps=4",  # one epoch (32 clips, batch 8): evaluations at its end and at fit end
            "validate_before_fit=false",
        ],
        out,
    )
    _, objects = train(cfg)
    callback = next(c for c in objects["trainer"].callbacks if isinstance(c, EvaluateCallback))
    return out, callback, objects


def test_callback_writes_wavs_and_a_report_with_finite_fad(evaluated_run):
    out, callback, _ = evaluated_run
    final = out / "eval" / "final"
    report = json.loads((final / "report.json").read_text())
    for name in ("student", "quantized"):
        wavs = sorted(p.name for p in (final / name).glob("*.wav"))
        assert wavs == ["000.wav", "001.wav", "002.wav", "003.wav"]
        result = report[name]
        fad = result["fad"]["encodec"]
        assert math.isfinite(fad["fad"]) and fad["fad"] >= 0
        assert fad["n_clips"] == 4 and fad["clip_seconds"] == 1.0 and fad["n_frames"] == 4 * 50  # exactly 1 s
        assert "student codec" in fad["embedder"]["source"] and math.isfinite(fad["fad_inf"]["fad_inf"])
        assert result["reference"]["kind"] == "val" and result["reference"]["n_clips"] == 8
        assert result["clap"]["n_pairs"] == 4 and -1 <= result["clap"]["score"] <= 1
        assert result["generation"]["guidance_scale"] == 3.0  # the model's default: an ordinary student, CFG
    assert report["quantized_by"] == "FakeQuantize" and report["generation"]["guidance_scale"] is None
    assert [r["tag"] for r in callback.reports] == ["epoch000", "final"]
    assert (out / "eval" / "epoch000" / "report.json").is_file() and "quantized" not in callback.reports[0]
    # the embedding models were freed after the evaluation
    assert not callback.evaluation.clap_embedder.loaded


def test_callback_logs_eval_metrics_to_the_loggers(evaluated_run):
    out, callback, _ = evaluated_run
    expected = {
        "eval/fad_encodec",
        "eval/fad_inf_encodec",
        "eval/clap",
        "eval_quant/fad_encodec",
        "eval_quant/clap",
    }
    assert expected <= set(callback.last_metrics)
    with (out / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    logged = {key: [float(r[key]) for r in rows if r.get(key)] for key in expected}
    assert all(values and all(math.isfinite(v) for v in values) for values in logged.values())
    assert len(logged["eval/fad_encodec"]) == len(
        callback.reports
    )  # every evaluation, the final one included
    assert len(logged["eval_quant/fad_encodec"]) == 1  # the quantized student exists only after fit


def test_metric_models_stay_out_of_the_student_checkpoint(evaluated_run):
    _, _, objects = evaluated_run
    module = objects["module"]
    checkpoint = torch.load(objects["summary"]["last_checkpoint"], map_location="cpu", weights_only=False)
    assert all(key.startswith("student.") for key in checkpoint["state_dict"])
    assert all(key.startswith("student.") for key in module.state_dict())
    assert not any("clap" in key.lower() for key in checkpoint["state_dict"])


def test_eval_configs_fail_at_startup_with_clear_messages(tmp_path, monkeypatch):
    monkeypatch.delenv("MUSICCAPS_CSV", raising=False)
    paper = compose_train_cfg(["eval=paper"], tmp_path, fast=False)
    assert paper.eval.clap_model == "laion/larger_clap_music" and paper.eval.embedders[0].name == "vggish"
    with pytest.raises(Exception, match="prompts file 'data/musiccaps-public.csv' does not exist"):
        instantiate(paper.eval)
    unknown = compose_train_cfg(["eval=default", "eval.embedders=[{name: passt}]"], tmp_path)
    with pytest.raises(Exception, match=r"unknown embedder 'passt'.*\['clap', 'encodec', 'vggish'\]"):
        instantiate(unknown.eval)
    missing = compose_train_cfg(["eval=default", f"eval.reference={tmp_path / 'refs'}"], tmp_path)
    with pytest.raises(Exception, match="eval.reference=.*refs.*does not exist"):
        instantiate(missing.eval)
    callback = instantiate(compose_train_cfg(["eval=default"], tmp_path).eval)
    assert isinstance(callback, EvaluateCallback) and len(callback.prompts) == 64  # the held-out captions
    assert callback.prompts[:2] == [clip.caption for clip in heldout_clips(2, seconds=0.1)]
    from_file = instantiate(compose_train_cfg(["eval=default", "eval.prompts=null"], tmp_path).eval)
    assert len(from_file.prompts) == 8
    with pytest.raises(Exception, match="eval.prompts='held': give a list of prompts, or `heldout`"):
        instantiate(compose_train_cfg(["eval=default", "eval.prompts=held"], tmp_path).eval)
