"""The loggers a user looks at: the wandb online/offline rule and sweep group, an offline wandb run written by
a real `train` (resolved config, run summary, tables, audio, finished), one wandb run per run, and
TensorBoard's event file with the same scalar keys as csv/metrics.csv. No network: no API key is findable."""

from __future__ import annotations

import csv
import json
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import OmegaConf, open_dict

from tests.conftest import CONF_DIR, compose_train_cfg
from tinymusician.train import train
from tinymusician.training.loggers import (
    finish_loggers,
    log_run_end,
    sweep_group,
    wandb_logger,
    wandb_mode,
)

WANDB_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT", "NETRC")


def isolate_wandb(patch: pytest.MonkeyPatch, home: Path) -> None:
    """No API key anywhere (so `auto` is offline), wandb's caches/staging under a temporary HOME, and any
    HTTP request sent to a closed port."""
    for name in WANDB_ENV:
        patch.delenv(name, raising=False)
    home.mkdir(parents=True, exist_ok=True)
    patch.setenv("HOME", str(home))
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # a request would fail, fast
        patch.setenv(proxy, "http://127.0.0.1:9")
    patch.setenv("NO_PROXY", "")


@pytest.fixture(autouse=True)
def no_wandb_key(monkeypatch, tmp_path):
    isolate_wandb(monkeypatch, tmp_path / "home")


# --- reading what an offline run wrote: <dir>/run-<id>.wandb, the records `wandb sync` uploads ----------
def wandb_records(run_dir: Path) -> Iterator:
    """The protobuf records of an offline run's transaction log (leveldb-style: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """run (the init record), config, summary (the last value of each key), history keys, exit code.

    wandb's service writes the log from its own process and may still be flushing it after ``run.finish()``
    returns (seen once in CI on a loaded machine), so read again until the exit record is there."""
    deadline = time.monotonic() + timeout
    while True:
        found = parse_offline_run(run_dir)
        if (found["run"] is not None and found["exit_code"] is not None) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def parse_offline_run(run_dir: Path) -> dict:
    run, config, summary, history, exit_code = None, {}, {}, set(), None
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            summary.update({item_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "history":
            history |= {item_key(item) for item in record.history.item}
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"run": run, "config": config, "summary": summary, "history": history, "exit_code": exit_code}


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


def table_files(run_dir: Path, key: str) -> list[dict]:
    parent, name = key.rsplit("/", 1)
    return [
        json.loads(p.read_text())
        for p in sorted((run_dir / "files/media/table" / parent).glob(f"{name}_*.json"))
    ]


# --- (a) online or offline, and the group -----------------------------------------------------------------
def write_netrc(home: Path, host: str) -> None:
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    (home / ".netrc").chmod(0o600)


def test_mode_rule(tmp_path):
    home = tmp_path / "home"  # the autouse fixture's HOME, empty
    bare = {"HOME": str(home)}
    assert wandb_mode("auto", bare)[0] == "offline"  # no key anywhere: offline, never a prompt
    assert wandb_mode("auto", {**bare, "WANDB_API_KEY": "k" * 40})[0] == "online"
    write_netrc(home, "example.org")
    assert wandb_mode("auto", bare)[0] == "offline"  # a netrc entry for another host is no wandb key
    write_netrc(home, "api.wandb.ai")  # what `wandb login` writes
    assert wandb_mode("auto", bare)[0] == "online"
    assert wandb_mode("auto", {"HOME": str(tmp_path), "NETRC": str(home / ".netrc")})[0] == "online"
    # WANDB_MODE decides over the key; an explicit mode decides over both
    assert wandb_mode("auto", {**bare, "WANDB_MODE": "disabled"})[0] == "disabled"
    assert wandb_mode("auto", {**bare, "WANDB_MODE": "dryrun"})[0] == "offline"
    assert wandb_mode("offline", bare)[0] == "offline"
    assert wandb_mode("online", {"HOME": str(tmp_path), "WANDB_MODE": "offline"})[0] == "online"
    with pytest.raises(ValueError, match="auto, online, offline, disabled"):
        wandb_mode("cloud", bare)


def test_online_without_a_key_fails_instead_of_prompting(tmp_path):
    with pytest.raises(ValueError, match="wandb login"):
        wandb_logger(save_dir=tmp_path, mode="online")


def test_train_reports_the_loggers_config_error_itself(tmp_path, tiny_pair, cache_dir):
    from tinymusician.training.checks import ConfigError

    cfg = compose_train_cfg(["logger=wandb", "logger.wandb.mode=online"], tmp_path)
    with pytest.raises(ConfigError, match="no API key"):  # not Hydra's InstantiationException around it
        train(cfg)


def test_the_group_is_the_sweep_in_a_multirun_and_none_in_a_single_run(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    sweep = tmp_path / "logs" / "train" / "multiruns" / "2026-01-01_00-00-00"
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.subdir = "3"
        cfg.hydra.runtime.output_dir = str(sweep / "3")
    saved = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(cfg)
        assert sweep_group(tmp_path / "logs") == "train/multiruns/2026-01-01_00-00-00"
        assert sweep_group(tmp_path / "elsewhere") == sweep.name
        OmegaConf.set_readonly(cfg.hydra, False)  # set_config made it read-only
        cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(cfg)
        assert sweep_group(tmp_path / "logs") is None
    finally:
        HydraConfig.instance().cfg = saved


def test_logger_configs_compose_and_keep_csv(tmp_path, cache_dir):
    for option, cls in (("wandb", WandbLogger), ("tensorboard", TensorBoardLogger)):
        cfg = compose_train_cfg([f"logger={option}"], tmp_path)
        assert set(cfg.logger) == {"csv", option}  # the results report reads csv/metrics.csv
        built = [instantiate(c) for c in cfg.logger.values()]
        assert {type(b) for b in built} == {CSVLogger, cls}
    assert cfg.logger.tensorboard.save_dir == str(tmp_path)


# --- (b) + (d) a real run with wandb (offline) and TensorBoard -------------------------------------------
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_pair, cache_dir, single_thread):
    out = tmp_path_factory.mktemp("wandb-run")
    with pytest.MonkeyPatch.context() as patch:
        isolate_wandb(patch, out.parent / "home")
        cfg = compose_train_cfg(
            [
                "+experiment=kd_quant",
                "logger=[wandb,tensorboard]",
                "eval=default",
                "eval.num_prompts=2",
                "eval.seconds=0.5",
                "quant.val_batches=1",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "validate_before_fit=false",
            ],
            out,
        )
        _, objects = train(cfg)  # calls log_run_end after summary.json, then finish_loggers
    return out, objects


def test_offline_run_has_the_resolved_config_and_the_run_summary(logged_run):
    out, objects = logged_run
    (run_dir,) = offline_runs(out)
    run = read_offline_run(run_dir)
    summary = objects["summary"]
    assert run["exit_code"] == 0  # finished cleanly
    assert run["run"].project == "tinymusician" and run["run"].job_type == "kd_quant"
    assert run["run"].display_name == f"kd_quant-seed{objects['cfg'].seed}"
    assert "kd_quant" in run["run"].tags and run["run"].run_group == ""  # no sweep: no group
    config = run["config"]
    assert config["loss"]["name"] == "stage_mixed"  # nested, not one string
    assert config["quant"]["plan"] == "paper" and config["trainer"]["max_steps"] == 2
    assert config["paths"]["output_dir"] == str(out)  # resolved
    values = run["summary"]
    assert values["status"] == "finished" and values["steps"] == summary["steps"] == 2
    assert values["train_seconds"] == summary["train_seconds"]
    for key in ("val/ce", "val/kl_to_teacher"):
        assert values[key] == pytest.approx(summary["after"][key])
    headline = {"quant/size_mb", "quant/reduction", "quant/top1_agree", "eval/fad_encodec", "eval_quant/clap"}
    assert headline <= set(values)
    assert values["quant/size_mb"] == pytest.approx(summary["post_training"]["quant/size_mb"])


def test_offline_run_has_the_scalars_under_the_csv_keys(logged_run):
    out, _ = logged_run
    (run_dir,) = offline_runs(out)
    history = read_offline_run(run_dir)["history"]
    with (out / "csv" / "metrics.csv").open() as handle:
        csv_keys = set(next(csv.reader(handle))) - {"step"}
    assert {"train/kd_weight_fwd", "train/temperature", "val/ce", "quant/size_mb"} <= csv_keys
    assert csv_keys <= history


def test_offline_run_has_the_tables_and_the_audio(logged_run):
    out, objects = logged_run
    (run_dir,) = offline_runs(out)
    media = run_dir / "files" / "media"
    for prefix in ("eval", "eval_quant", "reference"):  # 2 prompts, so 2 clips each; the reference once
        assert len(list((media / "audio" / prefix).glob("*.wav"))) == 2
    (samples,) = table_files(run_dir, "eval/samples")
    assert samples["columns"] == ["prompt", "audio", "model"]
    assert sorted(row[2] for row in samples["data"]) == ["quantized", "quantized", "student", "student"]
    assert len(table_files(run_dir, "reference/samples")) == 1
    (quant,) = table_files(run_dir, "quant/report")
    components = {row[0]: row for row in quant["data"]}
    assert {"text_encoder", "decoder", "codec", "total"} <= set(components)
    assert components["text_encoder"][1] == "int8" and components["decoder"][1] == "fp16"
    report = json.loads((out / "quantized" / "quant_report.json").read_text())
    assert components["total"][3] == pytest.approx(report["size"]["after_mb"]["total"])
    (evaluation,) = table_files(run_dir, "eval/report")
    assert evaluation["columns"] == ["model", "metric", "value", "n", "embedder", "reference"]
    rows = {(row[0], row[1]): row for row in evaluation["data"]}
    eval_report = json.loads(Path(objects["summary"]["eval_report"]).read_text())
    fad = rows[("quantized", "fad_encodec")]
    assert fad[2] == pytest.approx(eval_report["quantized"]["fad"]["encodec"]["fad"]) and fad[3] == 2
    assert "heldout" in fad[5] and ("student", "clap") in rows
    (sizes,) = table_files(run_dir, "model/sizes")
    assert [row[0] for row in sizes["data"]] == ["teacher", "student", "quantized"]
    assert len(table_files(run_dir, "schedule/planned_table")) == 1  # the planned weight/temperature plot


def test_tensorboard_has_the_same_scalars_the_audio_and_the_reports(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    events = EventAccumulator(
        str(out / "tensorboard"), size_guidance={"scalars": 0, "audio": 0, "tensors": 0}
    )
    events.Reload()
    tags = events.Tags()
    with (out / "csv" / "metrics.csv").open() as handle:
        csv_keys = set(next(csv.reader(handle))) - {"step"}
    assert csv_keys <= set(tags["scalars"])
    weights = [event.value for event in events.Scalars("train/kd_weight_fwd")]
    assert weights and all(0 <= w <= 1 for w in weights)
    assert {"eval/audio_0", "eval/audio_1", "eval_quant/audio_0", "reference/audio_0"} <= set(tags["audio"])
    text = {"quant/report", "eval/report", "model/sizes", "summary", "eval/prompts"}
    assert text <= {tag.removesuffix("/text_summary") for tag in tags["tensors"]}
    planned = [event.value for event in events.Scalars("schedule/planned_temperature")]
    assert planned[0] > planned[-1] and not any(math.isnan(v) for v in planned)  # annealed from t_max


# --- (c) every run its own wandb run ----------------------------------------------------------------------
def test_two_runs_are_two_finished_wandb_runs(logged_run, tmp_path, cache_dir):
    first_out, _ = logged_run
    second_out = tmp_path / "second"
    # lr=-1 passes the start-up checks and makes AdamW raise inside fit: train() still finishes the wandb run
    cfg = compose_train_cfg(
        [
            "+experiment=baseline",
            "logger=wandb",
            "trainer.max_steps=1",
            "validate_before_fit=false",
            "optim.optimizer.lr=-1",
        ],
        second_out,
    )
    with pytest.raises(ValueError, match="Invalid learning rate"):
        train(cfg)
    (first_dir,) = offline_runs(first_out)
    (second_dir,) = offline_runs(second_out)
    first, second = read_offline_run(first_dir), read_offline_run(second_dir)
    assert first["run"].run_id != second["run"].run_id and second["run"].job_type == "baseline"
    assert first["exit_code"] == 0 and second["exit_code"] == 1  # finished, and finished as failed
    assert "train/loss" in first["history"] and "eval/fad_encodec" not in second["history"]


def test_a_run_left_open_is_finished_by_the_next_logger(tmp_path):
    import wandb

    stale = wandb_logger(save_dir=tmp_path / "a", name="stale")
    stale.log_metrics({"x": 1.0}, step=0)  # starts the run; nobody finishes it
    fresh = wandb_logger(save_dir=tmp_path / "b", name="fresh")
    fresh.log_metrics({"x": 2.0}, step=0)
    assert wandb.run is fresh.experiment and fresh.experiment.id != stale.experiment.id
    finish_loggers([fresh])
    assert wandb.run is None
    assert read_offline_run(offline_runs(tmp_path / "a")[0])["exit_code"] == 1


def test_a_failed_quantization_is_a_table_row_and_no_report_is_no_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "quantized").mkdir()
    report = {"status": "error", "error": "QuantizationError: no calibration batches"}
    (tmp_path / "quantized" / "quant_report.json").write_text(json.dumps(report))
    summary = {
        "status": "finished",
        "steps": 3,
        "after": {"val/ce": 4.5},
        "post_training": {"quant/failed": 1.0},
    }
    board = TensorBoardLogger(save_dir=tmp_path, name="tensorboard", version="")
    log_run_end([board], summary, tmp_path)  # no eval report, no scheduler
    finish_loggers([board])
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {
        tag.removesuffix("/text_summary"): events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
    }
    assert set(texts) == {"quant/report", "model/sizes", "summary"}
    assert "(failed)" in texts["quant/report"] and "no calibration batches" in texts["quant/report"]
    assert "| val/ce | 4.5 |" in texts["summary"] and "| status | finished |" in texts["summary"]
