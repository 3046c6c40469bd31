"""Post-training mixed-precision quantization: precision plans, PTQ, size accounting, fidelity, search,
bundles, and the job that runs them (:class:`QuantizeJob`)."""

from tinymusician.quant.bundle import load_quantized, save_quantized
from tinymusician.quant.config import QuantizationOptions, check_quant_config
from tinymusician.quant.fidelity import Fidelity, ReferenceLogits, compare_models
from tinymusician.quant.job import QuantizationError, QuantizeJob
from tinymusician.quant.plan import (
    COMPONENTS,
    NAMED_PLANS,
    PRECISIONS,
    PlanError,
    PrecisionPlan,
    known_plan_names,
    resolve_plan,
)
from tinymusician.quant.ptq import apply_plan, quantize_model
from tinymusician.quant.sensitivity import SearchConfig, search_plan
from tinymusician.quant.size import component_sizes

__all__ = [
    "COMPONENTS",
    "NAMED_PLANS",
    "PRECISIONS",
    "Fidelity",
    "PlanError",
    "PrecisionPlan",
    "QuantizationError",
    "QuantizationOptions",
    "QuantizeJob",
    "ReferenceLogits",
    "SearchConfig",
    "apply_plan",
    "check_quant_config",
    "compare_models",
    "component_sizes",
    "known_plan_names",
    "load_quantized",
    "quantize_model",
    "resolve_plan",
    "save_quantized",
    "search_plan",
]
