"""The ``adaptive`` plan: measure each part's sensitivity, then pick the smallest plan within a fidelity budget.

1. Sensitivity: for every unit (T5, the decoder's outer parts, each decoder block) and every candidate
   precision, quantize that unit alone and measure teacher-forced fidelity against the fp32 model on the
   calibration batches (KL and top-1 agreement).
2. Order each unit's options by measured size (not by bits: an int8 decoder keeps fp32 embeddings, so
   its outer parts can be larger than in fp16), keep the ones that buy fidelity (fp16 vs bf16, same size:
   the lower KL), and start each unit at the smallest that meets the budget on its own.
3. Evaluate the combined plan; while it misses the budget, promote the unit whose next precision up saves
   the most KL per MB added (KL is close to additive across units for small perturbations; agreement is not,
   so every step is measured, not estimated).

EnCodec's precision is not searched: teacher-forced logits cannot see it. It is set by ``codec``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn
from transformers import MusicgenForConditionalGeneration

from tinymusician.quant.fidelity import Batch, Fidelity, ReferenceLogits
from tinymusician.quant.plan import PRECISIONS, WEIGHT_BYTES, PlanError, PrecisionPlan, check_precision
from tinymusician.quant.ptq import decoder_blocks, decoder_outer_parts, quantize_model
from tinymusician.quant.size import MB, state_bytes

log = logging.getLogger(__name__)

TEXT, OUTER = "text_encoder", "decoder"


@dataclass(frozen=True)
class SearchConfig:
    """The fidelity budget and the search space of the ``adaptive`` plan."""

    min_top1_agree: float | None = 0.95
    max_kl: float | None = None
    candidates: Sequence[str] = ("int8", "fp16", "bf16", "fp32")
    per_block: bool = True
    calibration_batches: int = 2
    codec: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        for precision in self.candidates:
            if precision not in PRECISIONS:
                raise PlanError(
                    f"search.candidates: unknown precision {precision!r}; known: {', '.join(PRECISIONS)}"
                )
        if "fp32" not in self.candidates:  # the search must be able to fall back to "unchanged"
            object.__setattr__(self, "candidates", (*self.candidates, "fp32"))
        check_precision("codec", self.codec)
        if self.min_top1_agree is None and self.max_kl is None:
            raise PlanError("search: set a fidelity budget (min_top1_agree and/or max_kl)")
        if self.min_top1_agree is not None and not 0.0 <= self.min_top1_agree <= 1.0:
            raise PlanError(f"search.min_top1_agree={self.min_top1_agree}: must lie in [0, 1]")
        if self.max_kl is not None and self.max_kl < 0:
            raise PlanError(f"search.max_kl={self.max_kl}: must be >= 0")
        if self.calibration_batches < 1:
            raise PlanError(f"search.calibration_batches={self.calibration_batches}: must be >= 1")

    @classmethod
    def from_dict(cls, values: dict | None) -> SearchConfig:
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise PlanError(f"search: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def budget(self) -> str:
        parts = []
        if self.min_top1_agree is not None:
            parts.append(f"top-1 agreement >= {self.min_top1_agree:g}")
        if self.max_kl is not None:
            parts.append(f"KL <= {self.max_kl:g}")
        return " and ".join(parts)


@dataclass
class Option:
    """One unit at one precision, measured alone (everything else fp32)."""

    unit: str
    precision: str
    mb: float
    kl: float
    top1_agree: float


@dataclass
class SearchResult:
    plan: PrecisionPlan
    fidelity: Fidelity  # of ``plan`` on the calibration batches
    budget: str
    sensitivity: list[Option]
    steps: list[dict] = field(default_factory=list)
    reason: str = ""
    evaluations: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "budget": self.budget,
            "calibration_fidelity": self.fidelity.to_dict(),
            "sensitivity": [asdict(option) for option in self.sensitivity],
            "steps": self.steps,
            "reason": self.reason,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        """Sensitivity per unit (KL / agreement alone), then the steps, as printable text."""
        precisions = sorted({o.precision for o in self.sensitivity}, key=lambda p: (WEIGHT_BYTES[p], p))
        units = list(dict.fromkeys(o.unit for o in self.sensitivity))
        by_key = {(o.unit, o.precision): o for o in self.sensitivity}
        chosen = {TEXT: self.plan.text_encoder, OUTER: self.plan.decoder}
        chosen.update({f"block{i}": self.plan.block_precision(i) for i in range(_num_blocks(units))})
        header = f"{'unit':<14}" + "".join(f"{p + ' KL/agree':>22}" for p in precisions) + "   chosen"
        lines = ["Sensitivity (each unit alone, vs fp32):", header]
        for unit in units:
            cells = ""
            for precision in precisions:
                option = by_key.get((unit, precision))
                cells += f"{'-':>22}" if option is None else f"{option.kl:>12.2e} / {option.top1_agree:.4f}"
            lines.append(f"{unit:<14}{cells}   {chosen.get(unit, '?')}")
        lines.append("Steps:")
        lines += [
            f"  {s['action']}: {s['mb']:.2f} MB, top-1 {s['top1_agree']:.4f}, KL {s['kl']:.2e}"
            + ("  (meets budget)" if s["meets"] else "")
            for s in self.steps
        ]
        lines.append(self.reason)
        return "\n".join(lines)


def _num_blocks(units: list[str]) -> int:
    return sum(unit.startswith("block") for unit in units)


def unit_names(model: MusicgenForConditionalGeneration, per_block: bool) -> list[str]:
    blocks = [f"block{i}" for i in range(len(decoder_blocks(model)))] if per_block else []
    return [TEXT, OUTER, *blocks]


def unit_modules(model: MusicgenForConditionalGeneration, unit: str, per_block: bool) -> list[nn.Module]:
    if unit == TEXT:
        return [model.text_encoder]
    if unit == OUTER:
        outer = decoder_outer_parts(model)
        return outer if per_block else [*outer, *decoder_blocks(model)]
    return [decoder_blocks(model)[int(unit.removeprefix("block"))]]


def unit_mb(model: MusicgenForConditionalGeneration, unit: str, per_block: bool) -> float:
    return sum(state_bytes(m) for m in unit_modules(model, unit, per_block)) / MB


def build_plan(
    choice: dict[str, str], num_blocks: int, per_block: bool, codec: str, name: str
) -> PrecisionPlan:
    """Unit -> precision as a :class:`PrecisionPlan` (blocks not in ``choice`` follow the decoder)."""
    blocks = {i: choice.get(f"block{i}", "fp32") for i in range(num_blocks)} if per_block else {}
    return PrecisionPlan(
        text_encoder=choice.get(TEXT, "fp32"),
        decoder=choice.get(OUTER, "fp32"),
        codec=codec,
        decoder_blocks=blocks,
        name=name,
    )


def fidelity_ladder(unit_options: list[Option]) -> list[Option]:
    """Options by size; a larger one is kept only if it is more faithful than every smaller one kept.

    fp32 (the exact fallback) is always the last rung.
    """
    ordered = sorted(unit_options, key=lambda o: (round(o.mb, 9), o.precision != "fp32", o.kl, -o.top1_agree))
    ladder: list[Option] = []
    for option in ordered:
        if option.precision == "fp32":
            continue
        if (
            not ladder
            or option.kl < min(o.kl for o in ladder)
            or option.top1_agree > max(o.top1_agree for o in ladder)
        ):
            ladder.append(option)
    ladder.append(next(o for o in unit_options if o.precision == "fp32"))
    return ladder


def search_plan(
    model: MusicgenForConditionalGeneration,
    batches: Sequence[Batch],
    config: SearchConfig,
    name: str = "adaptive",
) -> SearchResult:
    """The smallest plan (by the greedy rule above) meeting ``config``'s budget on ``batches``."""
    start = time.perf_counter()
    reference = ReferenceLogits(model, batches)
    per_block = config.per_block
    num_blocks = len(decoder_blocks(model))
    units = unit_names(model, per_block)
    evaluations = 0

    def evaluate(choice: dict[str, str]) -> tuple[PrecisionPlan, Fidelity, float]:
        nonlocal evaluations
        plan = build_plan(choice, num_blocks, per_block, config.codec, name)
        candidate = quantize_model(model, plan, share_unchanged=True)
        fidelity = reference.compare(candidate)
        mb = sum(unit_mb(candidate, unit, per_block) for unit in units)
        evaluations += 1
        del candidate
        return plan, fidelity, mb

    # 1. each unit alone at each candidate precision
    options: dict[str, list[Option]] = {}
    for unit in units:
        fp32_mb = unit_mb(model, unit, per_block)
        options[unit] = [Option(unit, "fp32", fp32_mb, 0.0, 1.0)]
        for precision in config.candidates:
            if precision == "fp32":
                continue
            plan = build_plan({unit: precision}, num_blocks, per_block, config.codec, name)
            candidate = quantize_model(model, plan, share_unchanged=True)
            fidelity = reference.compare(candidate)
            evaluations += 1
            mb = unit_mb(candidate, unit, per_block)
            del candidate
            # KL >= 0; rounding can give -1e-9 on identical distributions
            options[unit].append(Option(unit, precision, mb, max(fidelity.kl, 0.0), fidelity.top1_agree))
            log.debug(
                "adaptive: %s at %s alone: KL %.3g, top-1 %.4f",
                unit,
                precision,
                fidelity.kl,
                fidelity.top1_agree,
            )

    # 2. per unit, a ladder of measured sizes, smallest first, keeping only options that buy fidelity
    # (an fp16 table can be smaller than an int8 layer whose embeddings stay fp32; fp16 vs bf16: lower KL)
    ladders = {unit: fidelity_ladder(unit_options) for unit, unit_options in options.items()}
    level: dict[str, int] = {}
    for unit, ladder in ladders.items():
        ok = [
            i
            for i, o in enumerate(ladder)
            if (config.min_top1_agree is None or o.top1_agree >= config.min_top1_agree)
            and (config.max_kl is None or o.kl <= config.max_kl)
        ]
        level[unit] = ok[0] if ok else len(ladder) - 1

    # 3. measure the combination; promote the best KL-per-MB unit until the budget holds
    steps: list[dict] = []
    action = "start: each unit at its smallest precision that meets the budget alone"
    while True:
        choice = {unit: ladders[unit][level[unit]].precision for unit in units}
        plan, fidelity, mb = evaluate(choice)
        meets = fidelity.meets(config.min_top1_agree, config.max_kl)
        steps.append(
            {
                "action": action,
                "plan": plan.describe(),
                "mb": round(mb, 3),
                "top1_agree": fidelity.top1_agree,
                "kl": fidelity.kl,
                "meets": meets,
            }
        )
        log.debug("adaptive: %s -> %s", action, steps[-1])
        if meets:
            break
        promotable = [unit for unit in units if level[unit] < len(ladders[unit]) - 1]
        if not promotable:
            break  # everything fp32: cannot happen unless the budget is unreachable (e.g. agreement > 1)

        def score(unit: str) -> float:
            now, up = ladders[unit][level[unit]], ladders[unit][level[unit] + 1]
            return (now.kl - up.kl) / max(up.mb - now.mb, 1e-9)

        best = max(promotable, key=score)
        level[best] += 1
        action = f"promote {best} to {ladders[best][level[best]].precision} (most KL saved per MB)"

    if meets:
        reason = (
            f"Chose {plan.describe()}: {mb:.2f} MB (T5 + decoder), the smallest plan found meeting "
            f"{config.budget()} on {fidelity.positions} calibration positions "
            f"(top-1 {fidelity.top1_agree:.4f}, KL {fidelity.kl:.2e}) after {len(steps)} combined evaluation(s)."
        )
    else:
        reason = f"No plan meets {config.budget()}; falling back to {plan.describe()}."
    result = SearchResult(
        plan=plan,
        fidelity=fidelity,
        budget=config.budget(),
        sensitivity=[o for unit in units for o in options[unit]],
        steps=steps,
        reason=reason,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
    )
    return result
