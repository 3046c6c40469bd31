"""Offline, CPU-only fixtures: a fast tiny MusicGen pair built once per session through the public path."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that needs the network is a bug
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from tinymusician.models.tiny import TinySpec  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A smaller teacher budget than the default so the session builds its pair in seconds.
FAST_TINY = {"teacher_steps": 60, "teacher_clips": 128}
FAST_OVERRIDES = [
    *(f"model.tiny.{key}={value}" for key, value in FAST_TINY.items()),
    "data.num_train=32",
    "data.num_val=16",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "+trainer.enable_model_summary=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tinymusician-cache")
    os.environ["TINYMUSICIAN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_pair(cache_dir: Path):
    """The fast tiny pair, trained teacher included, saved with save_pretrained."""
    from tinymusician.models.tiny import ensure_tiny_pair

    return ensure_tiny_pair(cache_dir, TinySpec(**FAST_TINY))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core VM, OpenMP threads waiting for a
    descheduled peer stall every op (10-100x slower). Opt in per module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(tiny_pair):
    """The fast tiny student, loaded through the public path (from_pretrained returns it in eval mode)."""
    from tinymusician.models.musicgen import load_musicgen

    return load_musicgen(str(tiny_pair.student))


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from tinymusician.models.musicgen import load_tokenizer

    return load_tokenizer(str(tiny_pair.student))


def compose_train_cfg(overrides: list[str], output_dir: Path, fast: bool = True) -> DictConfig:
    """Compose conf/train.yaml as `python -m tinymusician.train` would, writing into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=(FAST_OVERRIDES if fast else []) + overrides, return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        del cfg["hydra"]  # as in a real run: @hydra.main hands train() the job config only
    return cfg
