"""Layer-dropped students (``model.student_init``): a MusicGen that keeps some of its source's decoder layers.

As DistilBERT was built from BERT: the student is ``model.student``'s source with only the chosen decoder layers
(copied exactly, renumbered in order); embeddings, lm_heads, the final layer norm, ``enc_to_dec_proj``, T5 and
EnCodec unchanged. ``weights: random`` re-initialises that architecture's decoder side (transformers' own init)
as the comparison arm. The result is a plain ``MusicgenForConditionalGeneration`` with fewer decoder layers, so
``save_pretrained`` / ``from_pretrained``, quantization, evaluation and export need nothing new.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import MusicgenConfig, MusicgenForCausalLM, MusicgenForConditionalGeneration

from tinymusician.config import to_plain

KEY = "model.student_init"
# Named layer choices: source layer count -> kept indices
LAYER_CHOICES: dict[str, Callable[[int], list[int]]] = {
    "every_other": lambda n: list(range(0, n, 2)),
    "first_half": lambda n: list(range(n // 2)),
}
WEIGHTS = ("pretrained", "random")
# Where the provenance lives: a plain attribute of the decoder config (saved in config.json's "decoder")
PROVENANCE = "student_init"


@dataclass(frozen=True)
class StudentInit:
    """``model.student_init`` checked, before the source's layer count is known."""

    layers: str | tuple[int, ...] | None = None  # None: all; a LAYER_CHOICES name; explicit indices
    weights: str = "pretrained"

    @property
    def is_default(self) -> bool:
        """All layers, pretrained weights: the source as it is (today's behaviour, no work at all)."""
        return self.layers is None and self.weights == "pretrained"

    def kept(self, num_layers: int, source: str) -> list[int]:
        """The source's decoder layer indices kept, in order; an error naming the key when they do not fit."""
        if self.layers is None:
            return list(range(num_layers))
        if isinstance(self.layers, str):
            kept = LAYER_CHOICES[self.layers](num_layers)
        else:
            kept = list(self.layers)
            outside = [i for i in kept if not 0 <= i < num_layers]
            if outside:
                raise ValueError(
                    f"{KEY}.layers={kept}: index {outside[0]} is out of range: {source} has {num_layers} decoder "
                    f"layers (0..{num_layers - 1})"
                )
        if not kept:
            raise ValueError(
                f"{KEY}.layers={describe_layers(self.layers)}: keeps no layer of the {num_layers} of {source}; "
                "keep at least one"
            )
        return kept


def parse_student_init(value: object) -> StudentInit:
    """``model.student_init`` (a mapping, null or absent) as :class:`StudentInit`; one-line errors naming the key.

    Checks everything that needs no model: the names, the types, explicit indices unique and increasing.
    """
    value = to_plain(value)
    if value is None:
        return StudentInit()
    if not isinstance(value, Mapping):
        raise ValueError(f"{KEY}={value!r}: expected a mapping with keys layers and weights")
    unknown = sorted(set(value) - {"layers", "weights"})
    if unknown:
        raise ValueError(f"{KEY}: unknown key(s) {unknown}; known: ['layers', 'weights']")
    weights = value.get("weights") or "pretrained"
    if weights not in WEIGHTS:
        raise ValueError(f"{KEY}.weights={weights!r}: unknown; known: {list(WEIGHTS)}")
    layers = value.get("layers")
    expected = (
        f"expected null (all layers), one of {list(LAYER_CHOICES)} or a list of layer indices like [0, 3, 5]"
    )
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise ValueError(f"{KEY}.layers={layers!r}: unknown choice; {expected}")
    elif isinstance(layers, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"{KEY}.layers={layers!r}: {expected}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{KEY}.layers={layers}: an index appears twice; each layer is kept once")
        if list(layers) != sorted(layers):
            raise ValueError(
                f"{KEY}.layers={layers}: indices must increase (the kept layers stay in the source's order); "
                f"write {sorted(layers)}"
            )
        layers = tuple(layers)
    elif layers is not None:
        raise ValueError(f"{KEY}.layers={layers!r}: {expected}")
    return StudentInit(layers=layers, weights=weights)


def describe_layers(layers: str | Sequence[int]) -> str:
    """``every_other`` or ``[0, 3, 5]``, as the config says it."""
    return layers if isinstance(layers, str) else str(list(layers))


def provenance(init: StudentInit, source: str, num_layers: int) -> dict[str, object]:
    """What the student was built from, as recorded in its decoder config (and config.json)."""
    return {
        "source": source,
        "source_layers": num_layers,
        "layers": init.kept(num_layers, source),
        "weights": init.weights,
    }


def student_init_config(config: MusicgenConfig, init: StudentInit, source: str) -> MusicgenConfig:
    """The architecture ``init`` builds from ``config`` (a copy; ``config`` unchanged): fewer decoder layers and
    the provenance. Reads no weights: start-up checks and the memory plan use it."""
    if init.is_default:
        return config
    num_layers = int(config.decoder.num_hidden_layers)
    record = provenance(init, source, num_layers)
    config = copy.deepcopy(config)
    config.decoder.num_hidden_layers = len(record["layers"])
    setattr(config.decoder, PROVENANCE, record)
    return config


def drop_decoder_layers(model: MusicgenForConditionalGeneration, layers: Sequence[int]) -> None:
    """Keep only the decoder layers ``layers`` (indices of ``model``'s, in order), in place.

    The kept layer modules move as they are (weights untouched, no copy); each is renumbered to its new position,
    which its attention uses to index the KV cache in generation, and the config gets the new layer count.
    """
    decoder = model.decoder.model.decoder
    kept = [decoder.layers[i] for i in layers]
    for index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # self- and cross-attention: their slot in the cache
                module.layer_idx = index
    decoder.layers = torch.nn.ModuleList(kept)
    configs = {id(c): c for c in (model.config.decoder, model.decoder.config, decoder.config)}
    for config in configs.values():  # one shared object after from_pretrained; set each if not
        config.num_hidden_layers = len(kept)


def reinitialise_decoder(model: MusicgenForConditionalGeneration, seed: int) -> None:
    """The decoder side (embeddings, layers, final norm, lm_heads, ``enc_to_dec_proj``) re-drawn with
    transformers' own init for this architecture, seeded by ``seed``; T5 and EnCodec untouched (frozen and shared
    with the teacher). The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = MusicgenForCausalLM._from_config(
            copy.deepcopy(model.config.decoder), dtype=model.decoder.dtype
        )
        projection = getattr(model, "enc_to_dec_proj", None)
        new_projection = None
        if projection is not None:
            # a new module: transformers' init skips tensors it marked as loaded, so re-init a fresh one
            new_projection = torch.nn.Linear(projection.in_features, projection.out_features)
            model._init_weights(new_projection)
    model.decoder.load_state_dict(fresh.state_dict())
    if new_projection is not None:
        projection.load_state_dict(new_projection.state_dict())


def build_student(
    model: MusicgenForConditionalGeneration, init: StudentInit, source: str, seed: int
) -> MusicgenForConditionalGeneration:
    """Apply ``init`` to the loaded source ``model`` in place (nothing for the default); returns it."""
    if init.is_default:
        return model
    num_layers = int(model.config.decoder.num_hidden_layers)
    record = provenance(init, source, num_layers)
    if record["layers"] != list(range(num_layers)):
        drop_decoder_layers(model, record["layers"])
    if init.weights == "random":
        reinitialise_decoder(model, seed)
    setattr(model.config.decoder, PROVENANCE, record)
    return model
