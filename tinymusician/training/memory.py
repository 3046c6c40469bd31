"""Memory per GPU of a training run, planned from parameter counts and the config (no weights load), checked
against the measured peak of one training step; and the teacher-logit cache's disk size per hour of audio."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, MusicgenConfig, MusicgenForConditionalGeneration

from tinymusician.config import to_plain
from tinymusician.distill.divergences import chunk_elements
from tinymusician.distill.losses import configured_guidance_scale
from tinymusician.models.musicgen import DTYPES, codec_hop, musicgen_small_config
from tinymusician.training.distributed import check_distributed
from tinymusician.zoo.pair import (
    configured_source,
    quiet_transformers,
    role_config,
    source_config,
    source_label,
)

GIB = 1024**3
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}

# MusicGen's released decoders (hidden, layers, heads, ffn; REFERENCES.md), used when their config.json is not
# reachable (offline, not in the Hugging Face cache). All share t5-base and EnCodec 32 kHz (4 x 2048 codes, 50 Hz).
MUSICGEN_DECODERS: dict[str, tuple[int, int, int, int]] = {
    "facebook/musicgen-small": (1024, 24, 16, 4096),
    "facebook/musicgen-medium": (1536, 48, 24, 6144),
    "facebook/musicgen-large": (2048, 48, 32, 8192),
}
# trainer.precision -> (bytes of student weights / grads / optimizer states, bytes of activations, autocast).
# Mixed precision keeps fp32 weights (the master copy) and runs matmuls in half under autocast; "true" half
# precision holds the weights themselves in half, and AdamW keeps its states in the weights' dtype.
PRECISIONS: dict[str, tuple[int, int, bool]] = {
    "32-true": (4, 4, False),
    "32": (4, 4, False),
    "64-true": (8, 8, False),
    "64": (8, 8, False),
    "bf16-mixed": (4, 2, True),
    "bf16": (4, 2, True),
    "16-mixed": (4, 2, True),
    "16": (4, 2, True),
    "bf16-true": (2, 2, False),
    "16-true": (2, 2, False),
}
# optimizer class name -> states per trainable parameter (AdamW: exp_avg and exp_avg_sq)
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "SGD": 1}
# FSDP sharding strategy -> what it divides by the shard group: (weights, grads and optimizer states)
FSDP_SHARDING = {
    "FULL_SHARD": (True, True),
    "HYBRID_SHARD": (True, True),
    "SHARD_GRAD_OP": (False, True),
    "_HYBRID_SHARD_ZERO2": (False, True),
    "NO_SHARD": (False, False),
}
TEACHER_SOURCES = ("live", "cache")
DEFAULT_CACHE_K = 32
# fp32 [rows, V] buffers a fused divergence holds at once in one chunk of positions (log-softmaxes, p, ratios,
# mixtures; its saved gradient apart), measured per loss on this CPU (peak RSS over one chunk's size)
KD_CHUNK_BUFFERS = {"fkl": 8, "rkl": 6, "skl": 10, "srkl": 9, "jsd": 8, "akl": 8, "stage_mixed": 9}
KD_CHUNK_BUFFERS_UNKNOWN = 10  # a loss not measured: the largest
ROWS = ("teacher", "student", "gradients", "optimizer", "activations")


# --- architectures ---------------------------------------------------------------------------------------
def known_musicgen_config(name: str) -> MusicgenConfig:
    """The released MusicGen ``name``'s architecture from :data:`MUSICGEN_DECODERS` (no download): the small
    one's config (t5-base, EnCodec 32 kHz) with this size's decoder."""
    hidden, layers, heads, ffn = MUSICGEN_DECODERS[name]
    with quiet_transformers():
        config = musicgen_small_config()
    config.decoder.update(
        {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "ffn_dim": ffn}
    )
    # EnCodec 32 kHz has no convolutional shortcuts: 56.9M params as REFERENCES.md (with them, 57.6M)
    config.audio_encoder.use_conv_shortcut = False
    return config


def cached_hub_config(name: str) -> Path | None:
    """``name``'s config.json if the Hugging Face cache holds it (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(name, "config.json")
    return Path(path) if isinstance(path, str) else None


def model_config(model_cfg: DictConfig, role: str) -> tuple[MusicgenConfig, str]:
    """(``model.<role>``'s MusicgenConfig, where it came from): config.json (a local dir, ``tiny``, the hub
    cache) or, for a released MusicGen not reachable here, :data:`MUSICGEN_DECODERS`. The student's as it trains:
    ``model.student_init`` applied (``model.student=teacher``: built from the teacher's)."""
    source, _ = configured_source(model_cfg, role)
    if source in MUSICGEN_DECODERS:
        cached = cached_hub_config(source)
        if cached is None:
            config = known_musicgen_config(source)
            origin = "REFERENCES.md architecture (config.json not reachable)"
        else:
            with quiet_transformers():
                config, origin = AutoConfig.from_pretrained(str(cached.parent)), f"{cached}"
        return role_config(config, model_cfg, role, source), origin
    return source_config(model_cfg, role), "config.json"


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in one MusicGen: parameter counts by part, decoder sizes, frame rate."""

    source: str
    origin: str  # where the architecture came from
    params: int  # all parameters (T5, EnCodec, decoder, projection)
    trainable: int  # what the student trains: everything but the frozen T5 and EnCodec
    layer_params: int  # one decoder layer (what FSDP wraps and gathers at a time)
    hidden: int
    layers: int
    heads: int
    ffn: int
    codebooks: int
    vocab: int
    max_positions: int
    frame_rate: float
    dropout: float
    activation_dropout: float

    @classmethod
    def of(cls, config: MusicgenConfig, source: str, origin: str) -> ModelShape:
        """Parameter counts from the architecture alone (see :func:`parameter_counts`)."""
        params, frozen, layer_params = parameter_counts(config.to_json_string(use_diff=False))
        decoder = config.decoder
        return cls(
            source=source,
            origin=origin,
            params=params,
            trainable=params - frozen,
            layer_params=layer_params,
            hidden=int(decoder.hidden_size),
            layers=int(decoder.num_hidden_layers),
            heads=int(decoder.num_attention_heads),
            ffn=int(decoder.ffn_dim),
            codebooks=int(decoder.num_codebooks),
            vocab=int(decoder.vocab_size),
            max_positions=int(decoder.max_position_embeddings),
            frame_rate=float(config.audio_encoder.sampling_rate) / codec_hop(config.audio_encoder),
            dropout=float(getattr(decoder, "dropout", 0.0) or 0.0),
            activation_dropout=float(getattr(decoder, "activation_dropout", 0.0) or 0.0),
        )


@functools.lru_cache(maxsize=16)
def parameter_counts(config_json: str) -> tuple[int, int, int]:
    """(all, frozen T5 + EnCodec, largest decoder layer) parameters of a MusicgenConfig's JSON, counted on the
    meta device: exact for any architecture, no memory, under a second (cached: plans repeat models)."""
    with quiet_transformers(), torch.device("meta"):
        model = MusicgenForConditionalGeneration(MusicgenConfig.from_dict(json.loads(config_json)))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    frozen = count(model.text_encoder) + count(model.audio_encoder)
    return count(model), frozen, max(count(layer) for layer in model.decoder.model.decoder.layers)


def model_shape(model_cfg: DictConfig, role: str) -> ModelShape:
    config, origin = model_config(model_cfg, role)
    return ModelShape.of(config, source_label(model_cfg, role), origin)


# --- the config's training setup ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    name: str  # ddp (replicates) or fsdp
    sharding: str | None  # FSDP's sharding strategy
    world: int  # processes (GPUs) in the run
    shard_group: int  # processes one shard set is split over (a node under HYBRID_SHARD)

    def divides(self, what: str) -> int:
        """The divisor of ``what`` (weights / states) per GPU."""
        if self.name != "fsdp" or self.sharding is None:
            return 1
        weights, states = FSDP_SHARDING[self.sharding]
        return self.shard_group if (weights if what == "weights" else states) else 1


def device_count(trainer_cfg: DictConfig) -> tuple[int, int]:
    """(devices per node, nodes) from ``trainer.devices`` / ``trainer.num_nodes``."""
    devices = to_plain(trainer_cfg.get("devices", 1))
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()):
        count = int(devices)
    else:
        count = 0
    if count < 1:
        raise ValueError(
            f"trainer.devices={devices!r}: the memory plan needs a number of GPUs per node (trainer.devices=N)"
        )
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if nodes < 1:
        raise ValueError(f"trainer.num_nodes={nodes}: must be >= 1")
    return count, nodes


def strategy_of(trainer_cfg: DictConfig) -> Strategy:
    """``trainer.strategy`` (a name or a ``_target_`` config) as ddp or fsdp; anything else names the key."""
    devices, nodes = device_count(trainer_cfg)
    strategy = to_plain(trainer_cfg.get("strategy", "auto"))
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", ""))
        name = target.rsplit(".", 1)[-1]
        sharding = strategy.get("sharding_strategy", "FULL_SHARD")
    else:
        name, target, sharding = str(strategy), str(strategy), "FULL_SHARD"
    lowered = name.lower()
    if lowered in ("auto", "single_device", "singledevicestrategy") or lowered.startswith("ddp"):
        return Strategy("ddp", None, devices * nodes, 1)
    if lowered.startswith("fsdp"):
        sharding = str(getattr(sharding, "name", sharding)).upper()
        if sharding not in FSDP_SHARDING:
            raise ValueError(
                f"trainer.strategy.sharding_strategy={sharding!r}: unknown; known: {sorted(FSDP_SHARDING)}"
            )
        group = devices if "HYBRID" in sharding else devices * nodes
        return Strategy("fsdp", sharding, devices * nodes, group)
    raise ValueError(
        f"trainer.strategy={target!r}: the memory plan knows ddp (DDPStrategy, also 'auto' and one device) and "
        "fsdp (FSDPStrategy); use trainer=ddp or trainer=fsdp"
    )


def precision_of(trainer_cfg: DictConfig) -> tuple[str, int, int, bool]:
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r}: unknown to the memory plan; known: {list(PRECISIONS)}"
        )
    return (precision, *PRECISIONS[precision])


def optimizer_states(optim_cfg: DictConfig) -> tuple[str, int]:
    target = str((optim_cfg.get("optimizer") or {}).get("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    if name not in OPTIMIZER_STATES:
        raise ValueError(
            f"optim.optimizer._target_={target!r}: unknown to the memory plan; known: {sorted(OPTIMIZER_STATES)}"
        )
    states = OPTIMIZER_STATES[name]
    if name == "SGD" and not float(optim_cfg.optimizer.get("momentum", 0.0) or 0.0):
        states = 0
    return name, states


def segment_seconds(data_cfg: DictConfig, shape: ModelShape) -> tuple[float, str]:
    """Seconds per training item: data.segment_seconds, the synthetic clips' data.seconds, or (whole clips) the
    longest the decoder's positions allow."""
    if data_cfg.get("segment_seconds") is not None:
        return float(data_cfg.segment_seconds), "data.segment_seconds"
    if data_cfg.get("seconds") is not None:
        return float(data_cfg.seconds), "data.seconds"
    frames = shape.max_positions - shape.codebooks + 1
    return frames / shape.frame_rate, "whole clips: the longest the decoder's positions allow"


def distill_setting(cfg: DictConfig) -> tuple[str, int]:
    """(distill.teacher_source, distill.cache.k), with defaults while those keys are not in the config."""
    distill = cfg.get("distill") or {}
    source = str(distill.get("teacher_source", "live") or "live")
    if source not in TEACHER_SOURCES:
        raise ValueError(f"distill.teacher_source={source!r}: unknown; known: {list(TEACHER_SOURCES)}")
    k = int((distill.get("cache") or {}).get("k", DEFAULT_CACHE_K) or DEFAULT_CACHE_K)
    return source, k


def requires_teacher(cfg: DictConfig) -> bool:
    """Whether the configured loss distils (a KD term, teacher logits, the KD's saved gradient)."""
    from hydra.utils import instantiate

    try:
        return bool(instantiate(cfg.loss).requires_teacher)
    except Exception as err:  # Hydra wraps the loss registry's ValueError; surface its message
        raise ValueError(f"loss: {err.__cause__ or err}") from err


# --- the cache ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSize:
    """Disk size of the teacher-logit cache: per position and codebook, k (int16 index, fp16 log-prob) pairs
    plus one fp16 tail log-mass."""

    k: int
    frame_rate: float
    codebooks: int

    @property
    def positions_per_hour(self) -> float:
        return self.frame_rate * 3600 * self.codebooks

    @property
    def bytes_per_position(self) -> int:
        return self.k * (2 + 2) + 2

    @property
    def bytes_per_hour(self) -> float:
        return self.positions_per_hour * self.bytes_per_position

    def to_dict(self) -> dict[str, float]:
        return {
            "k": self.k,
            "positions_per_hour": self.positions_per_hour,
            "bytes_per_position": self.bytes_per_position,
            "bytes_per_hour": self.bytes_per_hour,
            "gib_per_hour": self.bytes_per_hour / GIB,
        }


# --- the plan ----------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Bytes per GPU: rows (teacher, student, gradients, optimizer, activations, total), the activation peak's
    phase and parts, the setup the numbers follow from, and the cache's disk size."""

    rows: dict[str, float]
    peak_phase: str
    phases: dict[str, dict[str, float]]
    setup: dict[str, Any]
    cache: CacheSize
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.rows["total"]

    @property
    def step_bytes(self) -> float:
        """What one training step adds to the loaded weights: gradients, optimizer states, activations."""
        return self.rows["gradients"] + self.rows["optimizer"] + self.rows["activations"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes_per_gpu": dict(self.rows),
            "gib_per_gpu": {k: v / GIB for k, v in self.rows.items()},
            "activation_peak": {"phase": self.peak_phase, "parts": self.phases[self.peak_phase]},
            "activation_phases": self.phases,
            "setup": self.setup,
            "cache": self.cache.to_dict(),
            "notes": self.notes,
        }

    def format(self) -> str:
        s = self.setup
        lines = [
            f"Memory plan per GPU: {s['strategy']} x {s['world']} GPU(s), precision {s['precision']}, "
            f"batch {s['batch_size']} per GPU, {s['seconds']:g} s items (T = {s['positions']} positions), "
            f"loss {s['loss']}",
            f"  teacher  {s['teacher']} ({s['teacher_params']:,} params, {s['teacher_dtype']}, "
            f"{s['teacher_sharding']})"
            if s["teacher_params"]
            else f"  teacher  none in memory (model.teacher={s['teacher']}, "
            f"distill.teacher_source={s['teacher_source']})",
            f"  student  {s['student']} ({s['student_params']:,} params, {s['student_trainable']:,} trainable)",
            "",
            f"  {'':<19}{'GiB':>9}",
        ]
        labels = {"optimizer": f"optimizer ({s['optimizer']})", "activations": "activations"}
        for row in (*ROWS, "total"):
            if row == "total":
                lines.append(f"  {'-' * 28}")
            lines.append(f"  {labels.get(row, row):<19}{self.rows[row] / GIB:>9.3f}")
        parts = ", ".join(
            f"{name} {value / GIB:.3f}" for name, value in self.phases[self.peak_phase].items() if value
        )
        lines += [
            "",
            f"  activation peak: {self.peak_phase} ({parts} GiB)",
            f"  logit cache (k={self.cache.k}): {self.cache.bytes_per_hour / GIB:.3f} GiB per hour of audio "
            f"({self.cache.positions_per_hour:,.0f} positions x {self.cache.bytes_per_position} B)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def layer_activation_bytes(
    shape: ModelShape, batch: int, positions: int, text_tokens: int, act: int
) -> float:
    """What autograd keeps for one decoder layer (pre-LN self-attention, cross-attention, FFN) per batch.

    Per position: self-attention LN input and output, q, k, v, attention output (6 D); cross-attention LN input
    and output, q, attention output (4 D); FFN LN input and output (2 D), fc1 output and the activation (2 F);
    1-byte dropout masks. Per text token: the cross-attention keys and values (2 D). Fused SDPA (flash or
    memory-efficient) keeps no [T, T] score matrix.
    """
    per_position = (12 * shape.hidden + 2 * shape.ffn) * act
    if shape.dropout > 0:
        per_position += 3 * shape.hidden
    if shape.activation_dropout > 0:
        per_position += shape.ffn
    return batch * (positions * per_position + text_tokens * 2 * shape.hidden * act)


@dataclass(frozen=True)
class Batch:
    """One training batch's sizes per GPU: items, positions T (frames + K - 1), text tokens, activation bytes."""

    size: int
    positions: int
    text_tokens: int
    act: int


def activation_phases(
    student: ModelShape,
    teacher: ModelShape | None,
    batch: Batch,
    *,
    kd: bool,
    teacher_bytes: int,
    k: int,
    checkpointing: bool,
    loss_name: str,
    accelerator: str,
    optimizer_temporaries: float,
    guided: bool = False,
) -> dict[str, dict[str, float]]:
    """Bytes alive at the peak of each phase of a training step, by part (``teacher=None`` with ``kd``: the
    teacher's top-``k`` from the cache). ``guided`` (loss.guidance_scale > 1): the live teacher runs the
    conditional and unconditional batch at once, and its target is their fp32 mix."""
    act = batch.act
    layer = layer_activation_bytes(student, batch.size, batch.positions, batch.text_tokens, act)
    layer_input = batch.size * batch.positions * student.hidden * act
    saved = layer_input * student.layers if checkpointing else layer * student.layers
    saved += (
        3 * layer_input + batch.size * batch.text_tokens * student.hidden * act
    )  # embeddings, final LN, text
    recompute = layer if checkpointing else 0.0  # checkpointing rebuilds one layer's activations at a time
    logits = batch.size * student.codebooks * batch.positions * student.vocab  # elements of one [B, K, T, V]
    student_logits, fp32_logits = logits * act, logits * 4
    rows_per_chunk = max(1, chunk_elements(accelerator) // student.vocab)
    buffers = KD_CHUNK_BUFFERS.get(loss_name, KD_CHUNK_BUFFERS_UNKNOWN)
    phases: dict[str, dict[str, float]] = {
        # the K heads' outputs and their stacked copy, [B, K, T, V]
        "student heads": {"decoder": saved, "student logits": 2 * student_logits}
    }
    loss_forward = {"decoder": saved, "student logits": student_logits}
    # cross_entropy keeps its fp32 log-softmax for backward; its backward makes two gradients (nll's, then
    # log-softmax's), the last one summed with the KD's
    backward = {"decoder": saved + recompute, "CE log-probs": fp32_logits, "logits gradient": 2 * fp32_logits}
    if kd:
        if teacher is not None:
            passes = 2 if guided else 1
            teacher_logits = logits * 4 if guided else logits * teacher_bytes  # the guided mix is fp32
            phases["teacher forward"] = {
                "decoder": saved,
                "student logits": student_logits,
                # no_grad: one layer's working set at a time
                "teacher layer": passes
                * batch.size
                * batch.positions
                * (4 * teacher.hidden + 2 * teacher.ffn)
                * teacher_bytes,
                # heads and their stacked copy (both passes), then the mix
                "teacher logits": 2 * passes * logits * teacher_bytes + (teacher_logits if guided else 0),
            }
        else:  # the cache's top-k (fp16 log-probs, int16 indices) and the fp16 tail mass per position
            teacher_logits = batch.size * student.codebooks * batch.positions * (4 * k + 2)
        loss_forward["teacher logits"] = teacher_logits
        loss_forward["CE log-probs"] = fp32_logits
        # the fused divergences keep d(KD)/d(logits) in fp32 (the backward scales it in place), and hold a
        # few fp32 temporaries of one chunk of positions at a time
        loss_forward["KD gradient"] = backward["KD gradient"] = fp32_logits
        loss_forward["KD chunk"] = buffers * min(logits, rows_per_chunk * student.vocab) * 4
    else:
        loss_forward["CE log-probs"] = fp32_logits
    phases["loss forward"] = loss_forward
    phases["backward"] = backward
    # foreach AdamW computes sqrt(v) for every parameter at once, after the activations are gone
    phases["optimizer step"] = {"update temporaries": optimizer_temporaries}
    return phases


def plan_memory(cfg: DictConfig, k: int | None = None) -> MemoryPlan:
    """The memory per GPU of ``python -m tinymusician.train`` with ``cfg`` (composed conf/train.yaml).

    Reads config.json only (or the released MusicGen table), so it answers for models this machine could not
    hold. ``k`` overrides distill.cache.k for the cache's disk size.
    """
    precision, weight_bytes, act, mixed = precision_of(cfg.trainer)
    strategy = strategy_of(cfg.trainer)
    optimizer, states = optimizer_states(cfg.optim)
    teacher_source, cache_k = distill_setting(cfg)
    k = cache_k if k is None else int(k)
    if k < 1:
        raise ValueError(f"k={k}: the cache keeps at least one entry per position")
    kd = requires_teacher(cfg)
    if kd and cfg.model.get("teacher") is None:
        raise ValueError(f"loss={cfg.loss.get('name')} distils from a teacher but model.teacher is null")
    problem = check_distributed(cfg)  # model.teacher_sharding and the strategy, as training checks them
    if problem is not None:
        raise ValueError(problem)
    sharding = str(cfg.model.get("teacher_sharding", "replicate") or "replicate")
    dtype_name = str(cfg.model.get("teacher_dtype", "float32") or "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model.teacher_dtype={dtype_name!r}: unknown dtype; known: {sorted(DTYPES)}")
    teacher_bytes = BYTES[DTYPES[dtype_name]]
    checkpointing = bool(cfg.model.get("student_gradient_checkpointing", False))

    student = model_shape(cfg.model, "student")
    live_teacher = cfg.model.get("teacher") is not None and teacher_source == "live"
    teacher = model_shape(cfg.model, "teacher") if live_teacher else None
    notes = []

    seconds, seconds_from = segment_seconds(cfg.data, student)
    frames = max(1, round(seconds * student.frame_rate))
    positions = frames + student.codebooks - 1  # the delay pattern adds K - 1 steps
    batch = int(cfg.data.batch_size)
    text_tokens = int(cfg.data.get("max_text_tokens", 64))

    # --- resident: weights, gradients, optimizer states
    shard_weights, shard_states = strategy.divides("weights"), strategy.divides("states")
    rows = {"teacher": 0.0}
    if teacher is not None:
        rows["teacher"] = teacher.params * teacher_bytes  # every rank holds all of it
    rows["student"] = student.params * weight_bytes / shard_weights
    if shard_weights > 1:  # FSDP gathers one wrapped decoder layer at a time for its forward / backward
        rows["student"] += student.layer_params * weight_bytes
    if mixed:  # autocast caches a half copy of each trainable weight until the backward pass has used it
        rows["student"] += student.trainable * 2 / shard_weights
    rows["gradients"] = student.trainable * weight_bytes / shard_states
    if shard_states > 1:  # a layer's full gradient exists until it is reduce-scattered
        rows["gradients"] += student.layer_params * weight_bytes
    rows["optimizer"] = student.trainable * states * weight_bytes / shard_states

    # --- activations: the largest of the step's phases (each holds what is alive at its own peak)
    phases = activation_phases(
        student,
        teacher,
        Batch(batch, positions, text_tokens, act),
        kd=kd,
        teacher_bytes=teacher_bytes,
        k=k,
        checkpointing=checkpointing,
        loss_name=str(cfg.loss.get("name")),
        accelerator=str(cfg.trainer.get("accelerator", "auto")),
        optimizer_temporaries=student.trainable * weight_bytes / shard_states,
        guided=configured_guidance_scale(cfg.get("loss")) > 1,
    )
    if kd and teacher is None:
        notes.append(f"distill.teacher_source=cache: no teacher in memory, its top-{k} read from disk")
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    rows["activations"] = sum(phases[peak_phase].values())
    rows["total"] = sum(rows[row] for row in ROWS)

    if cfg.model.get("teacher") is None:
        notes.append("model.teacher=null: no teacher")
    elif not kd:
        notes.append(f"loss={cfg.loss.get('name')} has no KD term: the teacher is loaded for validation only")
    notes.append(
        "excluded: the CUDA context and allocator reserve (~0.5-1 GiB per GPU), communication buffers, "
        "validation, checkpoint saving"
    )
    setup = {
        "strategy": strategy.name if strategy.sharding is None else f"fsdp ({strategy.sharding})",
        "world": strategy.world,
        "precision": precision,
        "batch_size": batch,
        "global_batch": batch * strategy.world,
        "seconds": seconds,
        "seconds_from": seconds_from,
        "frames": frames,
        "positions": positions,
        "text_tokens": text_tokens,
        "loss": str(cfg.loss.get("name", "?")),
        "kd": kd,
        "optimizer": optimizer,
        "gradient_checkpointing": checkpointing,
        "teacher": str(cfg.model.get("teacher")),
        "teacher_source": teacher_source,
        "teacher_dtype": dtype_name,
        "teacher_sharding": sharding,
        "teacher_params": teacher.params if teacher is not None else 0,
        "teacher_origin": teacher.origin if teacher is not None else None,
        "student": student.source,
        "student_origin": student.origin,
        "student_params": student.params,
        "student_trainable": student.trainable,
    }
    return MemoryPlan(
        rows, peak_phase, phases, setup, CacheSize(k, student.frame_rate, student.codebooks), notes
    )


# --- measuring -----------------------------------------------------------------------------------------------
def resident_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes, from /proc/self/status (Linux)."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so a baseline reads what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakResident:
    """Filled by :func:`peak_resident_increase` when its block ends."""

    before: int = 0
    peak: int = 0

    @property
    def increase(self) -> int:
        return self.peak - self.before


@contextlib.contextmanager
def peak_resident_increase() -> Iterator[PeakResident]:
    """Peak resident memory a block adds to the process (bytes): the high-water mark is reset first by writing 5
    to /proc/self/clear_refs (Linux >= 4.0), then VmHWM at the end minus VmRSS at the start."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError as err:
        raise RuntimeError(f"cannot reset the peak resident memory (/proc/self/clear_refs: {err})") from err
    result = PeakResident(before=resident_bytes()[0])
    yield result
    result.peak = resident_bytes()[1]


@dataclass(frozen=True)
class MeasuredStep:
    """One training step measured on this machine: the peak it added above the loaded weights, and those."""

    step_bytes: int  # peak resident increase of forward + backward + optimizer step
    teacher_bytes: int  # the loaded teacher's parameters
    student_bytes: int  # the loaded student's parameters

    @property
    def total(self) -> int:
        return self.step_bytes + self.teacher_bytes + self.student_bytes


def parameter_bytes(model: torch.nn.Module | None) -> int:
    return 0 if model is None else sum(p.numel() * p.element_size() for p in model.parameters())


def measure_training_step(cfg: DictConfig) -> MeasuredStep:
    """Peak resident memory of one training step (forward, backward, optimizer step) of ``cfg`` on this CPU.

    A first forward and backward pass warms the kernels up and is not measured; the measured step then
    allocates the gradients, the optimizer states and the activations from scratch. fp32 and bf16-mixed
    (autocast) only: it measures, it does not train.
    """
    from hydra.utils import instantiate

    from tinymusician.distill.module import DistillationModule
    from tinymusician.zoo.pair import load_teacher_student

    precision, _, _, mixed = precision_of(cfg.trainer)
    if precision not in ("32-true", "32", "bf16-mixed", "bf16"):
        raise ValueError(f"trainer.precision={precision!r}: measured for 32-true and bf16-mixed only")
    if distill_setting(cfg)[0] != "live":
        raise ValueError("distill.teacher_source=cache: the step is measured with the live teacher only")
    models = load_teacher_student(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = DistillationModule(
        student=models.student,
        teacher=models.teacher,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optim.optimizer),
        cond_dropout=float(cfg.get("cond_dropout", 0.0)),
    )
    module.train()
    optimizer = module.configure_optimizers()

    def forward_backward() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            with autocast:
                loss = module.training_step(batch, 0)
            loss.backward()

    forward_backward()
    optimizer.zero_grad(set_to_none=True)
    with peak_resident_increase() as peak:
        forward_backward()
        optimizer.step()
    return MeasuredStep(
        step_bytes=peak.increase,
        teacher_bytes=parameter_bytes(models.teacher),
        student_bytes=parameter_bytes(models.student),
    )


def estimate_factor(plan: MemoryPlan, measured: MeasuredStep) -> dict[str, float]:
    """Estimate / measured, for the step's own memory and for the total with the weights."""
    return {
        "step": plan.step_bytes / max(measured.step_bytes, 1),
        "total": plan.total / max(measured.total, 1),
    }


__all__ = [
    "MUSICGEN_DECODERS",
    "CacheSize",
    "MeasuredStep",
    "MemoryPlan",
    "ModelShape",
    "estimate_factor",
    "measure_training_step",
    "peak_resident_increase",
    "plan_memory",
]
