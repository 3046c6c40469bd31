"""The options of the quantization job (the ``quant`` config group), checked before any model is loaded.

:class:`QuantizationOptions` is the one list of option keys and defaults: the job, the training callback
and ``check_quant_config(cfg.quant)`` (cheap, no weights) all build it, so unknown plan names, precisions,
option keys and ``on_error`` values fail the same way everywhere, with the known ones listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tinymusician.config import to_plain
from tinymusician.quant.plan import PlanError, PrecisionPlan, known_plan_names, resolve_plan
from tinymusician.quant.sensitivity import SearchConfig

# conf/quant/*.yaml name the training callback, a thin adapter whose arguments are these options. A string,
# not an import: quant/ sits below callbacks/ (tests check the string still names the callback).
QUANT_TARGET = "tinymusician.callbacks.quantize.QuantizeCallback"
ON_ERROR = ("warn", "raise")


@dataclass(frozen=True)
class QuantizationOptions:
    """What to quantize by and where the results go; validated when built (:class:`PlanError` says why).

    ``plan``: ``paper``, ``int8``, ``adaptive``, ``fp32`` or a mapping of components (``decoder_blocks``
    too); ``search`` configures ``plan="adaptive"`` (:class:`~tinymusician.quant.sensitivity.SearchConfig`);
    ``output_dir`` (None: the caller's default, ``<run dir>/quantized`` in training); ``val_batches``
    held-out batches for the reported fidelity (None: all); ``on_error``: ``warn`` reports a failure and
    goes on, ``raise`` raises it; ``save_bundle``: write the bundle (the report is always written).
    """

    plan: str | Mapping[str, Any] = "paper"
    output_dir: str | None = None
    val_batches: int | None = 4
    search: Mapping[str, Any] | None = None
    on_error: str = "warn"
    save_bundle: bool = True
    # Resolved from the options above (None: searched / not searched).
    fixed_plan: PrecisionPlan | None = field(init=False, repr=False, compare=False)
    search_config: SearchConfig | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan, search = to_plain(self.plan), to_plain(self.search)
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
        if self.on_error not in ON_ERROR:
            raise PlanError(f"quant.on_error={self.on_error!r}; known: {', '.join(ON_ERROR)}")
        if self.val_batches is not None and int(self.val_batches) < 1:
            raise PlanError(f"quant.val_batches={self.val_batches}: must be >= 1 (or null for all)")
        resolved = {
            "plan": plan,
            "search": search,
            "output_dir": to_plain(self.output_dir),
            "val_batches": None if self.val_batches is None else int(self.val_batches),
            "fixed_plan": fixed,
            "search_config": search_config,
        }
        for name, value in resolved.items():  # frozen: set once, here
            object.__setattr__(self, name, value)

    @classmethod
    def option_keys(cls) -> list[str]:
        """The option keys a config may set (sorted)."""
        return sorted(f.name for f in fields(cls) if f.init)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> QuantizationOptions:
        """Options from a mapping (``DictConfig`` too; keys starting with ``_``, e.g. ``_target_``, ignored);
        unknown keys fail listing the known ones."""
        values = {str(k): v for k, v in options.items() if not str(k).startswith("_")}
        unknown = sorted(set(values) - set(cls.option_keys()))
        if unknown:
            raise PlanError(f"quant: unknown options {unknown}; known: {cls.option_keys()}")
        return cls(**values)


def quantization_options(cfg_quant: Mapping[str, Any] | None) -> QuantizationOptions | None:
    """The job's options from ``cfg.quant``; None for ``quant=none`` (no ``_target_``) or another target."""
    if cfg_quant is None:
        return None
    keys = list(cfg_quant.keys())
    if "_target_" not in keys:
        if keys:
            raise PlanError(
                f"quant has options {sorted(keys)} but no _target_ (quant=none?); choose a plan: "
                f"quant={'|'.join(n for n in known_plan_names() if n != 'fp32')}"
            )
        return None
    if cfg_quant["_target_"] != QUANT_TARGET:
        return None  # someone else's callback: its own constructor validates it
    return QuantizationOptions.from_config(cfg_quant)


def check_quant_config(cfg_quant: Mapping[str, Any] | None) -> None:
    """Validate ``cfg.quant`` without loading anything; ``quant=none`` (no ``_target_``) passes."""
    quantization_options(cfg_quant)
