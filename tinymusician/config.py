"""Config values as plain Python: the one conversion from OmegaConf containers, used wherever config reaches
library code (which should not care whether a list came from YAML, a Hydra override or a Python call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# The Hydra configs (conf/ beside the package in a checkout or an editable install). The CLIs pass it to
# @hydra.main as an absolute path: a relative one resolves against the calling module, which breaks the console
# scripts (`tinymusician-train`) and `python -m` shims that import the CLI ("Primary config module 'conf' not
# found").
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def to_plain(value: Any) -> Any:
    """``DictConfig``/``ListConfig`` -> ``dict``/``list`` (interpolations resolved); anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
