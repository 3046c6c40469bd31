"""Precision plans and start-up validation: unknown names fail early, listing the known ones."""

import pytest
from hydra.errors import MissingConfigException

from tests.conftest import compose_train_cfg
from tinymusician.callbacks.quantize import QuantizeCallback
from tinymusician.quant import NAMED_PLANS, PlanError, PrecisionPlan, check_quant_config, resolve_plan
from tinymusician.quant.sensitivity import SearchConfig


def test_named_plans_say_what_the_issue_says():
    assert resolve_plan("paper") == PrecisionPlan(
        text_encoder="int8", decoder="fp16", codec="fp32", name="paper"
    )
    assert resolve_plan("int8") == PrecisionPlan(
        text_encoder="int8", decoder="int8", codec="fp32", name="int8"
    )
    assert resolve_plan("adaptive") is None  # searched, not fixed
    assert set(NAMED_PLANS) == {"fp32", "paper", "int8"}


def test_unknown_plan_name_lists_the_known_ones():
    with pytest.raises(PlanError, match="unknown quantization plan 'pepper'.*fp32, paper, int8, adaptive"):
        resolve_plan("pepper")
    with pytest.raises(PlanError, match="known: fp32, paper, int8, adaptive"):
        QuantizeCallback(plan="pepper")


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"decoder": "int4"}, "unknown precision 'int4' for decoder; known: fp32, fp16, bf16, int8"),
        ({"codec": "int8"}, "unknown precision 'int8' for codec; known: fp32, fp16, bf16"),
        ({"vocoder": "fp16"}, r"unknown plan keys \['vocoder'\]"),
        ({"decoder_blocks": {"first": "fp16"}}, "block indices"),
        ({"decoder_blocks": {0: "fp8"}}, "unknown precision 'fp8'"),
    ],
)
def test_bad_plans_fail_naming_the_problem(plan, message):
    with pytest.raises(PlanError, match=message):
        resolve_plan(plan)


def test_block_overrides_equal_to_the_decoder_are_dropped_and_round_trip():
    plan = PrecisionPlan(
        text_encoder="int8", decoder="int8", decoder_blocks={"3": "fp16", 1: "int8", 0: "fp16"}
    )
    assert plan.decoder_blocks == {0: "fp16", 3: "fp16"}
    assert plan.block_precision(1) == "int8" and plan.block_precision(3) == "fp16"
    assert PrecisionPlan.from_dict(plan.to_dict()) == plan
    assert "blocks 0,3: fp16" in plan.describe()


def test_search_settings_are_checked():
    with pytest.raises(PlanError, match="candidates: unknown precision 'int4'"):
        SearchConfig(candidates=["int4"])
    with pytest.raises(PlanError, match="fidelity budget"):
        SearchConfig(min_top1_agree=None, max_kl=None)
    with pytest.raises(PlanError, match="only applies to plan=adaptive"):
        QuantizeCallback(plan="paper", search={"min_top1_agree": 0.9})
    with pytest.raises(PlanError, match="on_error='ignore'; known: warn, raise"):
        QuantizeCallback(plan="int8", on_error="ignore")
    assert SearchConfig(candidates=["int8"]).candidates == ("int8", "fp32")


@pytest.mark.parametrize("option", ["paper", "int8", "adaptive", "none"])
def test_every_quant_option_passes_the_startup_check(option, tmp_path):
    cfg = compose_train_cfg([f"quant={option}"], tmp_path)
    check_quant_config(cfg.quant)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.plan=pepper", "known: fp32, paper, int8, adaptive"),
        ("quant.on_error=ignore", "known: warn, raise"),
        ("+quant.colour=blue", r"unknown options \['colour'\]"),
        ("quant.search.candidates=[int8,int4]", "unknown precision 'int4'"),
    ],
)
def test_bad_quant_config_fails_at_startup(override, message, tmp_path):
    quant = "adaptive" if "search" in override else "paper"
    cfg = compose_train_cfg([f"quant={quant}", override], tmp_path)
    with pytest.raises(PlanError, match=message):
        check_quant_config(cfg.quant)


def test_quant_options_without_a_plan_fail_at_startup(tmp_path):
    cfg = compose_train_cfg(["+quant.plan=int8"], tmp_path)  # quant=none (the default) has no _target_
    with pytest.raises(PlanError, match="no _target_.*quant=paper"):
        check_quant_config(cfg.quant)


def test_unknown_quant_group_option_fails_at_compose_listing_options(tmp_path):
    with pytest.raises(MissingConfigException, match="adaptive"):
        compose_train_cfg(["quant=pepper"], tmp_path)


@pytest.mark.parametrize("experiment", ["kd_quant", "quant_only"])
def test_quant_experiments_use_the_papers_plan(experiment, tmp_path):
    cfg = compose_train_cfg([f"+experiment={experiment}"], tmp_path, fast=False)
    assert cfg.quant.plan == "paper"
    assert cfg.quant.output_dir == str(tmp_path / "quantized")
    check_quant_config(cfg.quant)
    if experiment == "quant_only":
        assert cfg.trainer.max_steps == 0 and cfg.model.teacher is None and cfg.loss.name == "ce"
    else:
        kd_only = compose_train_cfg(["+experiment=kd_only"], tmp_path, fast=False)
        assert cfg.loss == kd_only.loss
