"""Post-training quantization at the end of fit: a thin Lightning adapter over the quantization job
(:class:`~tinymusician.quant.job.QuantizeJob`).

Runs after :class:`~tinymusician.callbacks.save_student.SaveStudent`, so the full-precision student is on
disk before anything here can fail; a failure is reported (``quant_report.json``, ``quant/failed``) and
does not stop the run unless ``on_error="raise"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from tinymusician.callbacks.save_student import SaveStudent
from tinymusician.quant.config import QuantizationOptions
from tinymusician.quant.job import QUANT_METRICS, QuantizeJob


def job_result(name: str, doc: str) -> property:
    """A read-only view of the job's attribute ``name``."""
    return property(lambda self: getattr(self.job, name), doc=doc)


class QuantizeCallback(L.Callback):
    """Quantize the student at fit end, then log ``quant/*``. Takes the job's options by keyword
    (:class:`~tinymusician.quant.config.QuantizationOptions`: ``plan``, ``output_dir``, ``val_batches``,
    ``search``, ``on_error``, ``save_bundle``).

    Takes the tokenizer and saved directory from :class:`SaveStudent`, the batches from the trainer's data
    module, writes into ``output_dir`` (default ``<run dir>/quantized``), logs ``quant/*`` metrics to every
    logger and keeps the quantized model in :attr:`quantized_model` for later callbacks (evaluation).
    """

    def __init__(self, **options: Any) -> None:
        self.options = QuantizationOptions.from_config(options)
        self.job = QuantizeJob(self.options)

    # What the job's last run left (read-only), read by train() and the evaluation callback.
    quantized_model = job_result(
        "quantized_model", "The quantized copy (None before a run or after a failure)."
    )
    plan = job_result("plan", "The plan used (searched for ``plan=adaptive``).")
    report = job_result("report", "The report written to ``quant_report.json``.")
    last_metrics = job_result("last_metrics", "The ``quant/*`` scalars (train() adds them to its metrics).")
    report_path = job_result("report_path", "Where the report was written (None if it could not be).")
    bundle_dir = job_result("bundle_dir", "Where the bundle was saved (None if not).")

    def metric_keys(self) -> list[str]:
        """The ``quant/*`` keys the job can report (``{k}`` = codebook), for start-up checks."""
        return list(QUANT_METRICS)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        saver = next((c for c in trainer.callbacks if isinstance(c, SaveStudent)), None)
        student_dir = saver.saved_dir if saver is not None else None
        output_dir = self.options.output_dir or Path(trainer.default_root_dir) / "quantized"
        self.run(
            pl_module.student,
            tokenizer=saver.tokenizer if saver is not None else None,
            datamodule=trainer.datamodule,
            output_dir=output_dir,
            source=str(student_dir) if student_dir else None,
            loggers=trainer.loggers,
            step=trainer.global_step,
        )

    def run(self, *args: Any, loggers: Sequence[Any] = (), step: int = 0, **kwargs: Any) -> dict[str, Any]:
        """:meth:`QuantizeJob.run` (same arguments), then its ``quant/*`` metrics to ``loggers`` (also when
        it raises)."""
        try:
            return self.job.run(*args, **kwargs)
        finally:
            if self.job.last_metrics:  # empty only if the run was interrupted before its report
                for logger in loggers:
                    logger.log_metrics(self.job.last_metrics, step=step)
                    logger.save()
