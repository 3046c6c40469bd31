"""The quantization job: quantize a copy of a student by a plan (or search one), measure it, save the bundle.

Called by the training callback (:class:`~tinymusician.callbacks.quantize.QuantizeCallback`, after the
full-precision student is saved) and by ``python -m tinymusician.quantize``, so both write the same bundle
and ``quant_report.json``. A failure is reported (the JSON, ``quant/failed``) rather than raised unless
``on_error="raise"``; the student passed in is never modified.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import MusicgenForConditionalGeneration, PreTrainedTokenizerBase

from tinymusician.quant.bundle import PLAN_FILE, STATE_FILE, save_quantized
from tinymusician.quant.config import QuantizationOptions
from tinymusician.quant.fidelity import Batch, ReferenceLogits, take_batches
from tinymusician.quant.plan import PrecisionPlan
from tinymusician.quant.ptq import quantize_model
from tinymusician.quant.sensitivity import search_plan
from tinymusician.quant.size import component_sizes, size_report

log = logging.getLogger(__name__)

REPORT_FILE = "quant_report.json"
NOTES = [
    "int8 = dynamic int8 on nn.Linear layers only (per-output-channel weight scales, activations quantized "
    "per batch at run time); embeddings, norms and biases stay fp32, so T5's tied embedding stays one table.",
    "The EnCodec encoder is not in the bundle (codec_encoder after = 0): text-to-music generation only "
    "decodes codes. reduction.total includes that saving; reduction.deployed compares the same parts only.",
    "enc_to_dec_proj stays in the decoder's float dtype (fp32 for an int8 decoder); casts between parts of "
    "different precision are forward hooks, re-installed when a bundle is loaded.",
]


# Every key report_metrics() can return (tests check the two agree).
QUANT_METRICS = (
    "quant/failed",
    "quant/size_mb",
    "quant/size_mb_fp32",
    "quant/reduction",
    "quant/reduction_deployed",
    "quant/size_mb_text_encoder",
    "quant/size_mb_decoder",
    "quant/size_mb_codec",
    "quant/top1_agree",
    "quant/top1_agree_q{k}",
    "quant/kl",
    "quant/max_logit_diff",
)


class QuantizationError(RuntimeError):
    """Quantization failed and ``on_error="raise"``; the report JSON holds the details."""


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode inside, every sub-module's own training flag restored after."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


class QuantizeJob:
    """Quantize by :class:`~tinymusician.quant.config.QuantizationOptions`; the last run's results stay here.

    :meth:`run` writes into ``output_dir`` the bundle (load it with ``tinymusician.quant.load_quantized``)
    and ``quant_report.json``: MB per component before/after, reductions, and teacher-forced fidelity
    against the full-precision student on ``val_batches`` validation batches. ``plan="adaptive"`` searches
    the plan on calibration batches of the training split, so the reported fidelity is on held-out data.
    After a run: :attr:`quantized_model` (None on failure), :attr:`plan`, :attr:`report`,
    :attr:`last_metrics` (the ``quant/*`` scalars), :attr:`report_path` and :attr:`bundle_dir`.
    """

    def __init__(self, options: QuantizationOptions) -> None:
        self.options = options
        self.quantized_model: MusicgenForConditionalGeneration | None = None
        self.plan: PrecisionPlan | None = None
        self.report: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}
        self.report_path: Path | None = None
        self.bundle_dir: Path | None = None

    def run(
        self,
        student: MusicgenForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase | None,
        datamodule: Any,
        output_dir: str | Path,
        source: str | None = None,
    ) -> dict[str, Any]:
        """Quantize a copy of ``student``; write bundle + report into ``output_dir``; return the report.

        ``datamodule`` gives ``val_dataloader()`` (and, for the search, ``dataloader("train", shuffle=False)``
        when it lists a ``train`` split); ``source`` names the student in the report and messages.
        """
        output_dir = Path(output_dir)
        start = time.perf_counter()
        fixed_plan = self.options.fixed_plan
        report: dict[str, Any] = {
            "status": "running",
            "plan_requested": fixed_plan.name if fixed_plan else "adaptive",
            "student_dir": source,
            "notes": NOTES,
        }
        # Results are per run: nothing of an earlier run may look like this one's.
        self.quantized_model, self.plan, self.bundle_dir, self.last_metrics = None, None, None, {}
        try:
            prepare_output_dir(output_dir)
            self._quantize(student, tokenizer, datamodule, output_dir, report)
            report["status"] = "ok"
        except Exception as err:
            report["status"] = "error"
            report["error"] = f"{type(err).__name__}: {err}"
            report["traceback"] = traceback.format_exc(limit=8)
            self.quantized_model = None
            log.error(
                "Quantization (%s) failed; the full-precision student is intact%s. %s",
                report["plan_requested"],
                f" at {source}" if source else "",
                report["error"],
            )
            if self.options.on_error == "raise":
                self._finish(report, output_dir, start)
                raise QuantizationError(report["error"]) from err
        self._finish(report, output_dir, start)
        return report

    def _quantize(
        self,
        student: MusicgenForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase | None,
        datamodule: Any,
        output_dir: Path,
        report: dict[str, Any],
    ) -> None:
        if student.device.type != "cpu":  # torch.ao's dynamic int8 kernels are CPU kernels
            student = copy.deepcopy(student).cpu()
        with eval_mode(student), torch.no_grad():
            plan = self.options.fixed_plan
            if plan is None:
                search = self.options.search_config
                assert search is not None  # QuantizationOptions: no fixed plan means a search config
                calibration = take_batches(calibration_loader(datamodule), search.calibration_batches)
                result = search_plan(student, calibration, search)
                print(result.table(), flush=True)
                report["search"] = result.to_dict()
                plan = result.plan
            self.plan = plan
            report["plan"] = plan.to_dict()
            report["plan_description"] = plan.describe()
            before = component_sizes(student)
            quantized = quantize_model(student, plan)
            after = component_sizes(quantized)
            report["size"] = size_report(before, after)
            batches: list[Batch] = take_batches(datamodule.val_dataloader(), self.options.val_batches)
            fidelity = ReferenceLogits(student, batches).compare(quantized)
            report["fidelity"] = fidelity.to_dict()
        if self.options.save_bundle:
            self.bundle_dir = save_quantized(quantized, output_dir, tokenizer)
            report["bundle_dir"] = str(self.bundle_dir)
            report["bundle_file_mb"] = round(
                sum(p.stat().st_size for p in self.bundle_dir.iterdir() if p.is_file()) / 1e6, 3
            )
        self.quantized_model = quantized
        log.info(
            "Quantized (%s): %.1f MB -> %.1f MB (%.1f%% smaller), top-1 agreement %.4f, KL %.2e",
            plan.describe(),
            before["total"],
            after["total"],
            100 * report["size"]["reduction"]["total"],
            fidelity.top1_agree,
            fidelity.kl,
        )

    def _finish(self, report: dict[str, Any], output_dir: Path, start: float) -> None:
        report["seconds"] = round(time.perf_counter() - start, 2)
        self.report = report
        self.report_path = None
        try:
            (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
            self.report_path = output_dir / REPORT_FILE
        except OSError as err:  # e.g. the output path is a file: the error is already in the report
            log.error(
                "Could not write %s (%s); quant/failed is logged and summary.json says why", REPORT_FILE, err
            )
        self.last_metrics = report_metrics(report)


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and drop an older bundle there (a failed run must not leave it looking current)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(
            f"quantization output {output_dir} exists and is not a directory; remove it or set "
            "quant.output_dir to a directory"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (PLAN_FILE, STATE_FILE):
        (output_dir / stale).unlink(missing_ok=True)


def calibration_loader(datamodule: Any) -> Iterable[Batch]:
    """Training-split batches in a fixed order when the data module offers them, else validation batches."""
    if hasattr(datamodule, "dataloader") and "train" in getattr(datamodule, "split_names", ()):
        return datamodule.dataloader("train", shuffle=False)
    return datamodule.val_dataloader()


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The ``quant/*`` scalars of a report (only ``quant/failed`` when quantization failed)."""
    metrics = {"quant/failed": float(report["status"] != "ok")}
    if report["status"] != "ok":
        return metrics
    size, fidelity = report["size"], report["fidelity"]
    metrics["quant/size_mb"] = size["after_mb"]["total"]
    metrics["quant/size_mb_fp32"] = size["before_mb"]["total"]
    metrics["quant/reduction"] = size["reduction"]["total"]
    metrics["quant/reduction_deployed"] = size["reduction"]["deployed"]
    for part in ("text_encoder", "decoder", "codec"):
        metrics[f"quant/size_mb_{part}"] = size["after_mb"][part]
    metrics["quant/top1_agree"] = fidelity["top1_agree"]
    metrics.update({f"quant/top1_agree_q{k}": v for k, v in enumerate(fidelity["top1_agree_per_codebook"])})
    metrics["quant/kl"] = fidelity["kl"]
    metrics["quant/max_logit_diff"] = fidelity["max_logit_diff"]
    return metrics
