"""Precision plans: which precision each part of a MusicGen model gets after post-training quantization.

A :class:`PrecisionPlan` maps the three components to a precision, optionally per decoder block:

- ``text_encoder``: the T5 encoder;
- ``decoder``: the MusicGen decoder (embeddings, blocks, final norm, LM heads) and ``enc_to_dec_proj``;
- ``codec``: EnCodec's decoder and codebooks (its encoder is left out of quantized bundles: generation only
  decodes codes).

Precisions: ``fp32`` (unchanged), ``fp16`` / ``bf16`` (weights and compute cast), ``int8`` (dynamic int8 on
every ``nn.Linear``: int8 weights with one scale per output channel, activations quantized per batch at run
time; embeddings, norms and biases stay fp32, so T5's tied embedding stays one shared fp32 table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
COMPONENTS = ("text_encoder", "decoder", "codec")
# EnCodec is convolutions + LSTM: there is no dynamic int8 kernel for its convolutions.
SUPPORTED = {"text_encoder": PRECISIONS, "decoder": PRECISIONS, "codec": ("fp32", "fp16", "bf16")}
# Floating-point dtype the activations of a part run in: int8 dynamic layers take and return fp32.
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
# Bytes per Linear weight element, for ordering candidates by size.
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
# Plans chosen by a search on the model itself rather than fixed in advance.
SEARCHED_PLANS = ("adaptive",)


class PlanError(ValueError):
    """An unknown plan, component or precision; the message lists the known ones."""


def check_precision(component: str, precision: Any) -> str:
    if component not in SUPPORTED:
        raise PlanError(f"unknown plan component {component!r}; known: {', '.join(COMPONENTS)}")
    if precision not in SUPPORTED[component]:
        raise PlanError(
            f"unknown precision {precision!r} for {component}; known: {', '.join(SUPPORTED[component])}"
        )
    return str(precision)


@dataclass(frozen=True)
class PrecisionPlan:
    """Component -> precision, plus per-decoder-block overrides (block index -> precision).

    Overrides equal to ``decoder`` are dropped, so two plans that quantize the same way compare equal.
    """

    text_encoder: str = "fp32"
    decoder: str = "fp32"
    codec: str = "fp32"
    decoder_blocks: Mapping[int, str] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self) -> None:
        for component in COMPONENTS:
            check_precision(component, getattr(self, component))
        blocks: dict[int, str] = {}
        for key, precision in dict(self.decoder_blocks or {}).items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise PlanError(f"decoder_blocks keys are block indices (ints), got {key!r}") from None
            if index < 0:
                raise PlanError(f"decoder_blocks: block index {index} is negative")
            check_precision("decoder", precision)
            if precision != self.decoder:
                blocks[index] = str(precision)
        object.__setattr__(self, "decoder_blocks", dict(sorted(blocks.items())))

    def block_precision(self, index: int) -> str:
        return self.decoder_blocks.get(index, self.decoder)

    def precisions(self) -> set[str]:
        return {self.text_encoder, self.decoder, self.codec, *self.decoder_blocks.values()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text_encoder": self.text_encoder,
            "decoder": self.decoder,
            "codec": self.codec,
            "decoder_blocks": {str(k): v for k, v in self.decoder_blocks.items()},
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PrecisionPlan:
        known = {"name", *COMPONENTS, "decoder_blocks"}
        unknown = set(values) - known
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(values))

    def describe(self) -> str:
        decoder = f"decoder {self.decoder}"
        if self.decoder_blocks:
            groups: dict[str, list[int]] = {}
            for index, precision in self.decoder_blocks.items():
                groups.setdefault(precision, []).append(index)
            decoder += " (" + "; ".join(f"blocks {_ranges(ids)}: {p}" for p, ids in groups.items()) + ")"
        return f"{self.name}: T5 {self.text_encoder}, {decoder}, EnCodec decoder {self.codec}"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    start = prev = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ",".join(out)


NAMED_PLANS: dict[str, PrecisionPlan] = {
    # No change at all: the identity, for measuring what the bundle format alone does.
    "fp32": PrecisionPlan(name="fp32"),
    # TinyMusician's plan: T5 int8, decoder fp16, EnCodec fp32 (slower than fp32 on CPUs: fp16 matmuls).
    "paper": PrecisionPlan(text_encoder="int8", decoder="fp16", codec="fp32", name="paper"),
    # Dynamic int8 for both transformers: the smallest fixed plan and the fastest on CPU.
    "int8": PrecisionPlan(text_encoder="int8", decoder="int8", codec="fp32", name="int8"),
}


def known_plan_names() -> list[str]:
    return [*NAMED_PLANS, *SEARCHED_PLANS]


def resolve_plan(spec: str | Mapping[str, Any] | PrecisionPlan) -> PrecisionPlan | None:
    """A plan from its name, a mapping of components (and ``decoder_blocks``) or a plan; ``None`` = searched.

    Unknown names fail listing the known ones.
    """
    if isinstance(spec, PrecisionPlan):
        return spec
    if isinstance(spec, str):
        if spec in SEARCHED_PLANS:
            return None
        if spec not in NAMED_PLANS:
            raise PlanError(f"unknown quantization plan {spec!r}; known: {', '.join(known_plan_names())}")
        return NAMED_PLANS[spec]
    if isinstance(spec, Mapping):
        return PrecisionPlan.from_dict(spec)
    raise PlanError(
        f"a plan is a name ({', '.join(known_plan_names())}) or a mapping of {', '.join(COMPONENTS)}; "
        f"got {type(spec).__name__}"
    )
