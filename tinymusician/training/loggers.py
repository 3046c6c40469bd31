"""The run's loggers as a user looks at them: the wandb logger (online/offline rule, the sweep as its group),
the end-of-run reports and headline metrics for wandb and TensorBoard, and a clean finish of every wandb run."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from tinymusician.config import to_plain
from tinymusician.distill.schedule import StageScheduler
from tinymusician.quant.job import REPORT_FILE
from tinymusician.training.checks import ConfigError
from tinymusician.training.summary import headline

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # older spellings wandb still accepts
WANDB_HOST = "api.wandb.ai"
SCHEDULE_POINTS = 101  # points of the planned schedule's curve


# --- online or offline ------------------------------------------------------------------------------------
def wandb_hosts(env: Mapping[str, str]) -> list[str]:
    """The hosts whose netrc entry holds a key: WANDB_BASE_URL's, else api.wandb.ai and wandb's default."""
    if env.get("WANDB_BASE_URL"):
        return [urlsplit(env["WANDB_BASE_URL"]).netloc]
    hosts = [WANDB_HOST]
    try:  # recent wandb releases default to another host (and read api.wandb.ai's entry as a fallback)
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL

        hosts.append(urlsplit(DEFAULT_BASE_URL).netloc)
    except ImportError:
        pass
    return hosts


def wandb_api_key_found(env: Mapping[str, str] | None = None) -> bool:
    """An API key in WANDB_API_KEY or in the netrc file (NETRC, else ~/.netrc) for the wandb host."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY", "").strip():
        return True
    path = Path(env["NETRC"]) if env.get("NETRC") else Path(env.get("HOME") or Path.home()) / ".netrc"
    try:
        entries = netrc.netrc(str(path))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any((entries.authenticators(host) or (None, None, None))[2] for host in wandb_hosts(env))


def wandb_mode(mode: str = "auto", env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(online | offline | disabled, why): an explicit ``mode`` wins, then WANDB_MODE, then online only if
    an API key is found (so a run never prompts for one)."""
    env = os.environ if env is None else env
    if mode != "auto":
        if mode not in WANDB_MODES:
            raise ConfigError(f"logger.wandb.mode={mode!r}: use auto, {', '.join(WANDB_MODES)}")
        return mode, f"logger.wandb.mode={mode}"
    if env.get("WANDB_MODE"):
        value = WANDB_MODE_ALIASES.get(env["WANDB_MODE"], env["WANDB_MODE"])
        if value not in WANDB_MODES:
            raise ConfigError(f"WANDB_MODE={env['WANDB_MODE']!r}: use {', '.join(WANDB_MODES)}")
        return value, f"WANDB_MODE={env['WANDB_MODE']}"
    if wandb_api_key_found(env):
        return "online", "an API key is set"
    return "offline", "no API key (WANDB_API_KEY or `wandb login`)"


def sweep_group(log_dir: str | Path | None = None) -> str | None:
    """In a Hydra multirun, the sweep: its directory relative to ``log_dir`` (else its name); else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
        depth = len(Path(str(hydra_cfg.sweep.subdir)).parts)
    except Exception:  # noqa: BLE001 - no (complete) Hydra config: not a sweep
        return None
    # The job's own hydra.sweep.dir re-resolves with the job's overrides (task_name, now): the run dir's
    # parent is the directory the launcher really created.
    sweep = run_dir.parents[depth - 1] if depth else run_dir
    if log_dir is not None and sweep.is_relative_to(Path(log_dir).resolve()):
        return str(sweep.relative_to(Path(log_dir).resolve()))
    return sweep.name


def wandb_logger(
    *,
    save_dir: str | Path,
    project: str = "tinymusician",
    name: str | None = None,
    entity: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: Sequence[str] = (),
    mode: str = "auto",
    log_dir: str | Path | None = None,
    log_model: bool = False,
    settings: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """Lightning's :class:`WandbLogger` for one run; ``mode`` by :func:`wandb_mode`, ``group`` by
    :func:`sweep_group` when null. Never prompts: ``online`` without an API key fails here."""
    import wandb

    chosen, why = wandb_mode(mode)
    if chosen == "online" and not wandb_api_key_found():
        raise ConfigError(
            f"wandb online ({why}) but no API key: run `wandb login` or set WANDB_API_KEY, "
            "or use logger.wandb.mode=offline"
        )
    if wandb.run is not None:  # a run left unfinished (finish_loggers not called): this run must be its own
        log.warning("Finishing the wandb run %s left open by an earlier job", wandb.run.name)
        wandb.finish(exit_code=1)
    save_dir = Path(save_dir).resolve()
    options = dict(to_plain(settings) or {})
    if chosen != "online":  # the system monitor may probe cloud metadata endpoints: no network at all
        options.setdefault("x_disable_stats", True)
    group = group if group is not None else sweep_group(log_dir)
    hint = f"; upload later with: wandb sync {save_dir}/wandb/offline-run-*" if chosen == "offline" else ""
    log.info("wandb: %s (%s), project %s, group %s%s", chosen, why, project, group, hint)
    logger = WandbLogger(
        name=name,
        save_dir=str(save_dir),
        project=project,
        entity=entity,
        group=group,
        job_type=job_type,
        tags=list(to_plain(tags) or []),
        log_model=log_model,
        mode=chosen,  # a wandb.init argument; Lightning's own `offline` flag would set WANDB_MODE process-wide
        settings=wandb.Settings(**options),
        **kwargs,
    )
    if logger._wandb_init.get("anonymous") is None:  # Lightning always passes it; wandb warns it is unused
        logger._wandb_init.pop("anonymous", None)
    return logger


# --- the end of a run -------------------------------------------------------------------------------------
@dataclass
class ReportTable:
    """One report as rows: a wandb.Table, a markdown table for TensorBoard's text tab."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def markdown(self) -> str:
        def cell(value: Any) -> str:
            return f"{value:.4g}" if isinstance(value, float) else str(value)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def read_json(path: str | Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def find_quant_report(summary: Mapping[str, Any], output_dir: Path) -> Path | None:
    """summary["quant_report"], else ``<run>/quantized/quant_report.json``, else one anywhere in the run."""
    for candidate in (summary.get("quant_report"), output_dir / "quantized" / REPORT_FILE):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return next(iter(sorted(output_dir.rglob(REPORT_FILE))), None)


def quant_table(report: Mapping[str, Any]) -> ReportTable:
    """Per component: precision, MB before and after, reduction (plus the total)."""
    table = ReportTable(["component", "precision", "size_before_mb", "size_after_mb", "reduction"])
    if report.get("status") != "ok":
        table.rows.append(["(failed)", report.get("error", ""), math.nan, math.nan, math.nan])
        return table
    size, plan = report["size"], report.get("plan") or {}
    for part, before in size["before_mb"].items():
        after = size["after_mb"][part]
        if part == "total":
            precision = report.get("plan_description") or plan.get("name", "")
        elif part == "codec_encoder" and after == 0:
            precision = "not in the bundle"
        else:
            precision = plan.get(part.removesuffix("_encoder") if part == "codec_encoder" else part, "")
            if part == "decoder" and plan.get("decoder_blocks"):
                precision = f"{precision}, blocks {plan['decoder_blocks']}"
        table.rows.append([part, precision, before, after, size["reduction"].get(part, math.nan)])
    return table


def fidelity_table(report: Mapping[str, Any]) -> ReportTable | None:
    """Teacher-forced agreement of the quantized student with the full-precision one, per codebook."""
    fidelity = report.get("fidelity") if report.get("status") == "ok" else None
    if not fidelity:
        return None
    table = ReportTable(["codebook", "top1_agree", "kl"])
    per_kl = fidelity.get("kl_per_codebook") or []
    for k, agree in enumerate(fidelity.get("top1_agree_per_codebook") or []):
        table.rows.append([f"q{k}", agree, per_kl[k] if k < len(per_kl) else math.nan])
    table.rows.append(["all", fidelity["top1_agree"], fidelity["kl"]])
    return table


def eval_table(report: Mapping[str, Any]) -> ReportTable:
    """One row per (model, metric): value, N, embedder, reference."""
    table = ReportTable(["model", "metric", "value", "n", "embedder", "reference"])
    for model in ("student", "quantized"):
        result = report.get(model)
        if not isinstance(result, Mapping):
            continue
        ref = result.get("reference") or {}
        reference = f"{ref.get('kind', 'stats')} ({ref.get('n_clips', '?')} clips)"
        for name, entry in (result.get("fad") or {}).items():
            source = f"{name} ({entry['embedder'].get('source', '')})"
            table.rows.append([model, f"fad_{name}", entry["fad"], entry["n_clips"], source, reference])
            if "fad_inf" in entry:
                row = [
                    model,
                    f"fad_inf_{name}",
                    entry["fad_inf"]["fad_inf"],
                    entry["n_clips"],
                    source,
                    reference,
                ]
                table.rows.append(row)
        if result.get("clap"):
            clap = result["clap"]
            source = f"clap ({clap['embedder'].get('source', '')})"
            table.rows.append([model, "clap", clap["score"], clap["n_pairs"], source, "its prompts"])
        generation = result.get("generation") or {}
        if "rtf" in generation:
            setup = f"{generation.get('device')}, {generation.get('threads')} threads"
            table.rows.append([model, "rtf", generation["rtf"], result.get("n_clips"), "", setup])
    return table


def directory_mb(path: str | Path | None) -> float:
    if not path or not Path(path).is_dir():
        return math.nan
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def sizes_table(summary: Mapping[str, Any], quant: Mapping[str, Any] | None) -> ReportTable:
    """Teacher, student and quantized student: parameters, MB of the weights and MB on disk."""
    table = ReportTable(["model", "params", "size_mb", "disk_mb"])
    table.rows.append(["teacher", summary.get("teacher_params", 0), math.nan, math.nan])
    before = quant["size"]["before_mb"]["total"] if quant and quant.get("status") == "ok" else math.nan
    student_mb = summary.get("student_size_mb", before)
    student = ["student", summary.get("student_trainable_params", 0), student_mb]
    table.rows.append([*student, directory_mb(summary.get("student_dir"))])
    if quant and quant.get("status") == "ok":
        disk = quant.get("bundle_file_mb", directory_mb(quant.get("bundle_dir")))
        table.rows.append(["quantized", None, quant["size"]["after_mb"]["total"], disk])
    return table


def run_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What a dashboard's run table shows: status, steps, time, val/* after training, quant/eval headline."""
    values: dict[str, Any] = {
        key: summary[key]
        for key in ("task", "loss", "seed", "status", "steps", "train_seconds", "quant_error")
        if summary.get(key) is not None
    }
    values.update(summary.get("after") or {})
    values.update({f"before/{k}": v for k, v in (summary.get("before") or {}).items()})
    values.update({k: v for k, v in (summary.get("post_training") or {}).items() if headline(k)})
    for key in ("student_trainable_params", "teacher_params", "student_size_mb"):
        if key in summary:
            values[f"model/{key}"] = summary[key]
    return values


@dataclass
class PlannedSchedule:
    """The stage scheduler's forward weight and temperature at ``steps`` of the whole run."""

    steps: list[int]
    weight: list[float]
    temperature: list[float]

    @classmethod
    def of(cls, scheduler: StageScheduler, total_steps: int) -> PlannedSchedule:
        xs = sorted({round(i * total_steps / (SCHEDULE_POINTS - 1)) for i in range(SCHEDULE_POINTS)})
        total = max(total_steps, 1)
        return cls(
            xs, [scheduler.weight(x / total) for x in xs], [scheduler.temperature(x / total) for x in xs]
        )


@dataclass
class RunEnd:
    """What the end of a run logs: report tables, headline values (the run summary), the planned schedule."""

    tables: dict[str, ReportTable]
    values: dict[str, Any]
    steps: int
    schedule: PlannedSchedule | None = None


def log_run_end(
    loggers: Sequence[Logger],
    summary: Mapping[str, Any],
    output_dir: str | Path,
    scheduler: StageScheduler | None = None,
) -> None:
    """After summary.json: the quantization and evaluation reports and the model sizes as tables, the
    headline metrics as the run summary (wandb) / text (TensorBoard), and ``scheduler``'s planned curves.
    CSV loggers get nothing here: the reports are files in the run directory already."""
    output_dir = Path(output_dir)
    quant = read_json(find_quant_report(summary, output_dir))
    evaluation = read_json(summary.get("eval_report"))
    tables = {"model/sizes": sizes_table(summary, quant)}
    if quant is not None:
        tables["quant/report"] = quant_table(quant)
        if (fidelity := fidelity_table(quant)) is not None:
            tables["quant/fidelity"] = fidelity
    if evaluation is not None:
        tables["eval/report"] = eval_table(evaluation)
    steps = int(summary.get("steps") or 0)
    end = RunEnd(tables, run_headline(summary), steps)
    end.schedule = PlannedSchedule.of(scheduler, steps) if scheduler is not None else None
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _wandb_run_end(logger, end)
        elif isinstance(logger, TensorBoardLogger):
            _tensorboard_run_end(logger, end)


def _wandb_run_end(logger: WandbLogger, end: RunEnd) -> None:
    import wandb

    run = logger.experiment
    logged: dict[str, Any] = {
        key: wandb.Table(columns=t.columns, data=t.rows) for key, t in end.tables.items()
    }
    if end.schedule is not None:
        logged["schedule/planned"] = wandb.plot.line_series(
            xs=end.schedule.steps,
            ys=[end.schedule.weight, end.schedule.temperature],
            keys=["kd_weight_fwd", "temperature"],
            title="Planned stage schedule (logged: train/kd_weight_fwd, train/temperature)",
            xname="trainer/global_step",
        )
    run.log({**logged, "trainer/global_step": end.steps})
    run.summary.update(end.values)


def _tensorboard_run_end(logger: TensorBoardLogger, end: RunEnd) -> None:
    writer = logger.experiment
    for key, table in end.tables.items():
        writer.add_text(key, table.markdown(), end.steps)
    summary = ReportTable(["key", "value"], [[key, value] for key, value in end.values.items()])
    writer.add_text("summary", summary.markdown(), end.steps)
    if end.schedule is not None:
        schedule = end.schedule
        for x, weight, temperature in zip(schedule.steps, schedule.weight, schedule.temperature, strict=True):
            writer.add_scalar("schedule/planned_kd_weight_fwd", weight, x)
            writer.add_scalar("schedule/planned_temperature", temperature, x)
    writer.flush()


def finish_loggers(loggers: Sequence[Logger], failed: bool = False) -> None:
    """End every logger: each wandb run finishes (exit code 1 if ``failed``), so every run of a multirun is
    its own finished wandb run and ``wandb sync`` uploads the sweep later; the others flush and close."""
    for logger in loggers:
        try:
            if isinstance(logger, WandbLogger):
                run = logger._experiment  # not .experiment: that would start a run just to finish it
                if run is None:
                    continue
                offline = getattr(run.settings, "mode", "") in ("offline", "dryrun")
                directory = Path(run.dir).parent if offline and run.dir else None
                run.finish(exit_code=1 if failed else 0)
                if directory is not None:
                    log.info("wandb offline run %s; upload it with: wandb sync %s", run.id, directory)
            else:
                logger.finalize("failed" if failed else "success")
        except Exception:  # noqa: BLE001 - finishing one logger must not hide the run's own error or the rest
            log.exception("Could not finish logger %s", type(logger).__name__)
