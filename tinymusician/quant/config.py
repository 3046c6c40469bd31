"""Start-up validation of the ``quant`` config group, before any model is loaded.

``check_quant_config(cfg.quant)`` is cheap (no weights): unknown plan names, precisions, option keys and
``on_error`` values fail here with the known ones listed. :class:`QuantizeCallback` runs the same checks
when it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tinymusician.quant.plan import PlanError, PrecisionPlan, known_plan_names, resolve_plan
from tinymusician.quant.sensitivity import SearchConfig

QUANT_TARGET = "tinymusician.callbacks.quantize.QuantizeCallback"
ON_ERROR = ("warn", "raise")


def validate_options(
    plan: Any, search: Mapping[str, Any] | None, on_error: str, val_batches: int | None
) -> tuple[PrecisionPlan | None, SearchConfig | None]:
    """(fixed plan or None, search config or None); raises :class:`PlanError` naming what is wrong."""
    if isinstance(plan, (DictConfig, ListConfig)):
        plan = OmegaConf.to_container(plan, resolve=True)
    if isinstance(search, DictConfig):
        search = OmegaConf.to_container(search, resolve=True)
    fixed = resolve_plan(plan)
    if fixed is None:
        search_config = SearchConfig.from_dict(search)
    elif search:
        raise PlanError(
            f"quant.search only applies to plan=adaptive (this plan is {fixed.name}); "
            f"known plans: {', '.join(known_plan_names())}"
        )
    else:
        search_config = None
    if on_error not in ON_ERROR:
        raise PlanError(f"quant.on_error={on_error!r}; known: {', '.join(ON_ERROR)}")
    if val_batches is not None and int(val_batches) < 1:
        raise PlanError(f"quant.val_batches={val_batches}: must be >= 1 (or null for all)")
    return fixed, search_config


def check_quant_config(cfg_quant: DictConfig | Mapping[str, Any] | None) -> None:
    """Validate ``cfg.quant`` without loading anything; ``quant=none`` (no ``_target_``) passes."""
    if cfg_quant is None:
        return
    keys = list(cfg_quant.keys())
    if "_target_" not in keys:
        if keys:
            raise PlanError(
                f"quant has options {sorted(keys)} but no _target_ (quant=none?); choose a plan: "
                f"quant={'|'.join(n for n in known_plan_names() if n != 'fp32')}"
            )
        return
    if cfg_quant["_target_"] != QUANT_TARGET:
        return  # someone else's callback: its own constructor validates it
    import inspect

    from tinymusician.callbacks.quantize import QuantizeCallback

    parameters = inspect.signature(QuantizeCallback.__init__).parameters
    accepted = set(parameters) - {"self"}
    options = [k for k in keys if not str(k).startswith("_")]
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise PlanError(f"quant: unknown options {unknown}; known: {sorted(accepted)}")

    def value(key: str) -> Any:
        if key not in keys:
            return parameters[key].default
        item = cfg_quant[key]
        if isinstance(item, (DictConfig, ListConfig)):
            return OmegaConf.to_container(item, resolve=True)
        return item

    validate_options(
        plan=value("plan"),
        search=value("search"),
        on_error=value("on_error"),
        val_batches=value("val_batches"),
    )
