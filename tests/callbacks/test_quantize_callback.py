"""QuantizeCallback inside whole training runs (kd_quant, quant_only), failures, and the quantize CLI."""

import csv
import inspect
import json
from types import SimpleNamespace

import pytest
import torch
import transformers

from tests.conftest import compose_train_cfg
from tinymusician.callbacks.quantize import QuantizeCallback
from tinymusician.models.musicgen import load_musicgen, load_tokenizer
from tinymusician.quant import load_quantized
from tinymusician.quant.config import QUANT_TARGET, QuantizationOptions
from tinymusician.quant.job import REPORT_FILE, QuantizationError
from tinymusician.quant.plan import PlanError
from tinymusician.quantize import main as quantize_main
from tinymusician.train import train

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see tests/conftest.py
transformers.logging.set_verbosity_error()  # MusicGen's pad id == vocab size is by design

# eval=none: these tests are about quantization; FAD/CLAP evaluation has its own tests
QUICK = ["validate_before_fit=false", "trainer.val_check_interval=2", "eval=none"]


def logged_metrics(run_dir) -> dict[str, float]:
    """The last logged value of every metric in the run's CSV log."""
    values: dict[str, float] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def quant_callback(objects) -> QuantizeCallback:
    return next(c for c in objects["trainer"].callbacks if isinstance(c, QuantizeCallback))


@pytest.fixture(scope="module")
def kd_quant_run(tiny_pair, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kd_quant")
    cfg = compose_train_cfg(["+experiment=kd_quant", "trainer.max_steps=2", *QUICK], run_dir)
    metrics, objects = train(cfg)
    return run_dir, metrics, objects


def test_kd_quant_run_writes_bundle_report_and_metrics(kd_quant_run):
    run_dir, metrics, objects = kd_quant_run
    assert objects["summary"]["steps"] == 2
    report = json.loads((run_dir / "quantized" / REPORT_FILE).read_text())
    assert report["status"] == "ok" and report["plan"]["name"] == "paper"
    size, fidelity = report["size"], report["fidelity"]
    assert size["after_mb"]["decoder"] == pytest.approx(size["before_mb"]["decoder"] / 2, rel=1e-3)
    assert (
        size["after_mb"]["codec_encoder"] == 0.0
        and 0 < size["reduction"]["deployed"] < size["reduction"]["total"]
    )
    assert 0.9 <= fidelity["top1_agree"] <= 1.0 and fidelity["kl"] >= 0 and fidelity["positions"] > 0
    logged = logged_metrics(run_dir)
    assert logged["quant/size_mb"] == pytest.approx(size["after_mb"]["total"])
    assert logged["quant/top1_agree"] == pytest.approx(fidelity["top1_agree"])
    assert logged["quant/failed"] == 0.0 and "quant/kl" in logged and "quant/top1_agree_q3" in logged
    assert metrics["quant/top1_agree"] == pytest.approx(fidelity["top1_agree"])  # returned by train() too
    # the callback exposes the quantized model to later callbacks (evaluation)
    callback = quant_callback(objects)
    assert callback.quantized_model is not None and callback.quantized_model.precision_plan.name == "paper"


def test_kd_quant_bundle_loads_and_generates_and_student_stays_fp32(kd_quant_run):
    run_dir, _, objects = kd_quant_run
    student = objects["module"].student
    saved = load_musicgen(str(run_dir / "student"))
    for name, tensor in student.state_dict().items():
        assert (
            tensor.dtype == saved.state_dict()[name].dtype == torch.float32 or not tensor.is_floating_point()
        )
        torch.testing.assert_close(saved.state_dict()[name], tensor, rtol=0, atol=0)
    model = load_quantized(run_dir / "quantized")
    tokenizer = load_tokenizer(str(run_dir / "quantized"))
    torch.manual_seed(0)
    audio = model.generate(
        **tokenizer(["a calm piano melody"], return_tensors="pt"), guidance_scale=3, max_new_tokens=8
    )
    assert audio.shape == (1, 1, 5 * 320) and torch.isfinite(audio).all()


def test_quant_only_run_quantizes_the_untrained_student(tiny_pair, tmp_path):
    # (the fast test overrides set trainer.max_steps; restore the experiment's 0)
    cfg = compose_train_cfg(["+experiment=quant_only", "quant=int8", "trainer.max_steps=0", *QUICK], tmp_path)
    _, objects = train(cfg)
    assert objects["summary"]["steps"] == 0 and objects["models"].teacher is None
    report = json.loads((tmp_path / "quantized" / REPORT_FILE).read_text())
    assert report["status"] == "ok" and report["plan"]["decoder"] == "int8"
    assert report["student_dir"] == str(tmp_path / "student")
    assert logged_metrics(tmp_path)["quant/size_mb"] == pytest.approx(report["size"]["after_mb"]["total"])


def test_failing_quantization_reports_and_leaves_the_student_intact(
    tiny_pair, student, tokenizer, batches, tmp_path, monkeypatch
):
    """A failure half-way through (the copy already damaged) must not reach the student or stop fit's end."""
    from lightning.pytorch.loggers import CSVLogger

    import tinymusician.quant.ptq as ptq
    from tinymusician.callbacks.save_student import SaveStudent

    def broken(module, names):
        for name in names[:1]:
            module.get_submodule(name).weight.data.mul_(0)
        raise RuntimeError("int8 kernel exploded")

    monkeypatch.setattr(ptq, "quantize_linears", broken)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    saver = SaveStudent(tmp_path / "student", tokenizer)
    logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = SimpleNamespace(
        is_global_zero=True,
        callbacks=[saver],
        datamodule=SimpleNamespace(val_dataloader=lambda: batches),
        loggers=[logger],
        global_step=0,
        default_root_dir=str(tmp_path),
    )
    module = SimpleNamespace(student=student)
    saver.on_fit_end(trainer, module)
    callback = QuantizeCallback(plan="int8", output_dir=str(tmp_path / "quantized"))
    callback.on_fit_end(trainer, module)  # on_error=warn: no exception
    report = json.loads((tmp_path / "quantized" / REPORT_FILE).read_text())
    assert report["status"] == "error" and "int8 kernel exploded" in report["error"]
    assert report["student_dir"] == str(tmp_path / "student")
    assert logged_metrics(tmp_path)["quant/failed"] == 1.0
    assert callback.quantized_model is None
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = load_musicgen(str(tmp_path / "student")).state_dict()
    assert all(torch.equal(before[k], saved[k]) for k in before)


def test_on_error_raise_still_writes_the_report(student, tokenizer, batches, tmp_path):
    from tinymusician.quant import quantize_model, resolve_plan, save_quantized
    from tinymusician.quant.bundle import is_bundle

    save_quantized(
        quantize_model(student, resolve_plan("int8")), tmp_path
    )  # an older bundle in the same place
    callback = QuantizeCallback(plan={"decoder": "int8", "decoder_blocks": {9: "fp16"}}, on_error="raise")
    data = SimpleNamespace(val_dataloader=lambda: batches)
    with pytest.raises(QuantizationError, match=r"blocks \[9\]"):
        callback.run(student, tokenizer, data, tmp_path)
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["status"] == "error" and "has 2 blocks" in report["error"]
    assert not is_bundle(tmp_path)  # the stale bundle is gone, not mistaken for this run's
    assert not hasattr(student, "precision_plan")


def test_adaptive_callback_reports_its_search(student, tokenizer, batches, tmp_path, capsys):
    search = {"min_top1_agree": 0.0, "calibration_batches": 1, "candidates": ["int8", "bf16"]}
    callback = QuantizeCallback(plan="adaptive", search=search, val_batches=1)
    data = SimpleNamespace(val_dataloader=lambda: batches[:1])
    report = callback.run(student, tokenizer, data, tmp_path)
    assert report["status"] == "ok" and report["plan"]["name"] == "adaptive"
    assert report["search"]["steps"][-1]["meets"] and report["search"]["sensitivity"]
    assert "Chose adaptive" in capsys.readouterr().out
    assert load_quantized(tmp_path).precision_plan == callback.plan


def test_cli_on_the_runs_checkpoint_reproduces_the_training_report(kd_quant_run, tmp_path, capsys):
    run_dir, _, objects = kd_quant_run
    out = tmp_path / "bundle"
    data = [
        "data.num_train=32",
        "data.num_val=16",
        "data.batch_size=8",
    ]  # the run's data (fast test overrides)
    args = [
        objects["summary"]["last_checkpoint"],
        "quant=paper",
        *data,
        "--out",
        str(out),
        "--check-tokens",
        "6",
    ]
    assert quantize_main(args) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    trained = json.loads((run_dir / "quantized" / REPORT_FILE).read_text())
    assert report["status"] == "ok" and report["plan"] == trained["plan"]
    assert report["fidelity"] == trained["fidelity"] and report["size"] == trained["size"]
    assert "generation check" in capsys.readouterr().out


def test_cli_requires_a_known_plan(tiny_pair, tmp_path, capsys):
    assert quantize_main([str(tiny_pair.student)]) == 2
    assert "choose a plan" in capsys.readouterr().err
    assert (
        quantize_main([str(tiny_pair.student), "quant=paper", "quant.plan=pepper", "--out", str(tmp_path)])
        == 2
    )
    assert "fp32, paper, int8, adaptive" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written for a plan that cannot run


def test_output_path_that_is_a_file_is_reported_not_crashed(student, tokenizer, batches, tmp_path):
    target = tmp_path / "quantized"
    target.write_text("a file")
    data = SimpleNamespace(val_dataloader=lambda: batches)
    report = QuantizeCallback(plan="int8").run(student, tokenizer, data, target)  # on_error=warn
    assert report["status"] == "error" and "quant.output_dir" in report["error"]
    assert target.read_text() == "a file"
    with pytest.raises(QuantizationError, match="exists and is not a directory"):
        QuantizeCallback(plan="int8", on_error="raise").run(student, tokenizer, data, target)


def test_the_configs_target_is_this_callback_and_takes_the_jobs_options(tmp_path):
    """conf/quant/*.yaml name the callback by a string the quant config check compares against."""
    assert QUANT_TARGET == f"{QuantizeCallback.__module__}.{QuantizeCallback.__qualname__}"
    cfg = compose_train_cfg(["quant=adaptive"], tmp_path)
    assert cfg.quant._target_ == QUANT_TARGET
    assert set(cfg.quant) - {"_target_"} <= set(QuantizationOptions.option_keys())
    callback = QuantizeCallback(**{k: v for k, v in cfg.quant.items() if k != "_target_"})
    assert callback.options.fixed_plan is None and callback.options.search_config.per_block
    assert callback.options.output_dir == str(tmp_path / "quantized")
    # one list of options and defaults (QuantizationOptions'), no second one in the signature to keep in step
    assert [p.kind for p in inspect.signature(QuantizeCallback).parameters.values()] == [
        inspect.Parameter.VAR_KEYWORD
    ]
    with pytest.raises(PlanError, match=r"unknown options \['colour'\]; known: \['on_error', 'output_"):
        QuantizeCallback(plan="int8", colour="blue")
