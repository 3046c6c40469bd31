"""The adaptive plan: sensitivities per unit, and the smallest plan that meets the fidelity budget."""

import pytest

from tinymusician.quant import PrecisionPlan, SearchConfig, quantize_model, search_plan
from tinymusician.quant.fidelity import ReferenceLogits
from tinymusician.quant.size import component_sizes


def deployed_mb(model) -> float:
    sizes = component_sizes(model)
    return sizes["text_encoder"] + sizes["decoder"]


def test_a_loose_budget_gives_the_smallest_plan(student, batches):
    result = search_plan(student, batches[:1], SearchConfig(min_top1_agree=0.0))
    assert len(result.steps) == 1 and result.steps[0]["meets"]
    units = ["text_encoder", "decoder", "block0", "block1"]
    assert [o.unit for o in result.sensitivity] == [u for u in units for _ in range(4)]
    assert {o.precision for o in result.sensitivity} == {"fp32", "int8", "fp16", "bf16"}
    assert all(o.kl == 0.0 and o.top1_agree == 1.0 for o in result.sensitivity if o.precision == "fp32")
    smallest = {u: min((o for o in result.sensitivity if o.unit == u), key=lambda o: o.mb).mb for u in units}
    chosen = {
        o.unit: o.mb for o in result.sensitivity if o.precision == chosen_precision(result.plan, o.unit)
    }
    assert chosen == smallest
    # blocks are mostly Linear weights: int8 is their smallest; the tiny decoder's outer parts are mostly
    # embeddings, which int8 keeps in fp32, so a 16-bit float is smaller there
    assert result.plan.block_precision(0) == result.plan.block_precision(1) == "int8"
    assert result.plan.decoder in ("fp16", "bf16") and result.plan.text_encoder == "int8"
    assert "Chose adaptive" in result.reason and "block0" in result.table()


def chosen_precision(plan: PrecisionPlan, unit: str) -> str:
    if unit.startswith("block"):
        return plan.block_precision(int(unit.removeprefix("block")))
    return getattr(plan, unit)


def test_an_exact_budget_quantizes_only_what_changes_nothing(student, batches):
    result = search_plan(
        student, batches[:1], SearchConfig(min_top1_agree=1.0, max_kl=0.0, candidates=["int8"])
    )
    assert result.fidelity.top1_agree == 1.0 and result.fidelity.kl <= 0.0
    solo = {o.unit: o for o in result.sensitivity if o.precision == "int8"}
    assert solo["decoder"].kl > 0 and result.plan.decoder == "fp32"  # measurably sensitive: kept
    # whatever was quantized changed nothing measurable on its own (the untrained student barely reads T5)
    quantized = [u for u in solo if chosen_precision(result.plan, u) == "int8"]
    assert all(solo[u].kl == 0.0 and solo[u].top1_agree == 1.0 for u in quantized)


def test_a_tight_budget_is_met_and_promotions_are_measured(student, batch_maker, tokenizer):
    calibration = batch_maker(student, tokenizer, count=1, frames=8, seed=1)
    candidates = ["int8", "bf16"]
    loose = search_plan(student, calibration, SearchConfig(min_top1_agree=0.0, candidates=candidates))
    smallest_kl = loose.fidelity.kl
    config = SearchConfig(min_top1_agree=None, max_kl=smallest_kl / 4, candidates=candidates)
    result = search_plan(student, calibration, config)
    assert result.fidelity.kl <= smallest_kl / 4
    assert result.steps[-1]["meets"] and not any(step["meets"] for step in result.steps[:-1])
    quantized = quantize_model(student, result.plan)
    # the reported calibration fidelity is what the plan really gives
    assert ReferenceLogits(student, calibration).compare(quantized).kl == pytest.approx(result.fidelity.kl)
    assert deployed_mb(quantized) < deployed_mb(student)
    assert deployed_mb(quantize_model(student, loose.plan)) <= deployed_mb(quantized) + 1e-9


def test_whole_decoder_search_without_blocks(student, batches):
    config = SearchConfig(min_top1_agree=0.0, per_block=False, candidates=["bf16"])
    result = search_plan(student, batches[:1], config)
    assert result.plan == PrecisionPlan(text_encoder="bf16", decoder="bf16", name="adaptive")
    assert {o.unit for o in result.sensitivity} == {"text_encoder", "decoder"}
