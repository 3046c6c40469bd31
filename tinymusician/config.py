"""Config values as plain Python: the one conversion from OmegaConf containers, used wherever config reaches
library code (which should not care whether a list came from YAML, a Hydra override or a Python call)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(value: Any) -> Any:
    """``DictConfig``/``ListConfig`` -> ``dict``/``list`` (interpolations resolved); anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
