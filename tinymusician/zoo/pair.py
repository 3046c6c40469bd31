"""Load the teacher/student pair a config names (tiny, hub id or local dir) through one code path.

The student may be built from its source by keeping some decoder layers (``model.student_init``, in
:mod:`tinymusician.zoo.student_init`); ``model.student=teacher`` names the teacher's source for it. Also the
student's training options that change how its decoder runs, not what it computes: gradient
checkpointing and ``torch.compile`` (``model.student_gradient_checkpointing``, ``model.compile_student``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, MusicgenConfig, MusicgenForConditionalGeneration, PreTrainedTokenizerBase
from transformers.models.musicgen.modeling_musicgen import MusicgenDecoderLayer

from tinymusician.config import to_plain
from tinymusician.models.musicgen import (
    DTYPES,
    check_model_source,
    freeze,
    load_musicgen,
    load_tokenizer,
    looks_like_path,
)
from tinymusician.shipped import resolve_tiny
from tinymusician.zoo.student_init import (
    build_student,
    describe_layers,
    parse_student_init,
    student_init_config,
)

log = logging.getLogger(__name__)

# What "the same codec, vocabulary and T5" means for position-by-position distillation. Architecture only:
# bookkeeping such as dtype (a bf16 teacher writes `dtype: bfloat16`), _name_or_path, architectures or
# transformers_version differs between two copies of the same model and must not count.
PAIR_FIELDS: dict[str, tuple[str, ...]] = {
    # logits [B, K, T, V] are compared 1:1, and the student's pad token builds both models' delayed inputs
    "decoder": ("num_codebooks", "vocab_size", "audio_channels", "pad_token_id"),
    # the student's codec encodes the corpus: the teacher must read the same codes at the same frame rate
    "audio_encoder": ("model_type", "sampling_rate", "codebook_size", "upsampling_ratios", "audio_channels"),
    # T5 is encoded once (by the student) and fed to both decoders
    "text_encoder": (
        "model_type",
        "vocab_size",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_heads",
        "feed_forward_proj",
        "dense_act_fn",
        "is_gated_act",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
        "layer_norm_epsilon",
    ),
}


# ``model.compile_student``: torch.compile's modes, or a mapping of these torch.compile arguments.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_ARGUMENTS = ("mode", "backend", "fullgraph", "dynamic", "options")
# ``model.student=teacher``: the student is built from the teacher's source (``tiny`` then means the shipped
# teacher, which ``model.student: ${model.teacher}`` could not say: ``tiny`` in the student role is the
# shipped student). A local directory called ``teacher`` is written ``./teacher``.
FROM_TEACHER = "teacher"
# ``model.student: ${model.teacher}`` means the same (rather than silently the shipped student under ``tiny``)
TEACHER_INTERPOLATIONS = ("${model.teacher}", "${.teacher}")


class IncompatiblePairError(ValueError):
    """Teacher and student cannot be distilled position by position; the message lists what differs."""


@dataclass
class TeacherStudent:
    student: MusicgenForConditionalGeneration
    teacher: MusicgenForConditionalGeneration | None
    tokenizer: PreTrainedTokenizerBase
    student_source: str
    teacher_source: str | None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """MusicGen's pad id == codebook size is by design; transformers warns about it at every config."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def configured_source(model_cfg: DictConfig, role: str) -> tuple[str, str]:
    """(the source ``model.<role>`` names, the world part ``tiny`` means there): ``model.student=teacher`` is
    ``(model.teacher, "teacher")``, and so is ``model.student: ${model.teacher}``."""
    name = str(model_cfg.get(role))
    if role == "student" and (name == FROM_TEACHER or interpolates_teacher(model_cfg)):
        teacher = model_cfg.get("teacher")
        if teacher is None:
            raise ValueError(
                "model.student=teacher builds the student from model.teacher, which is null; name the student's "
                "source in model.student (`tiny`, a hub id or a directory) or set model.teacher"
            )
        return str(teacher), "teacher"
    return name, role


def interpolates_teacher(model_cfg: DictConfig) -> bool:
    """``model.student`` is written ``${model.teacher}`` (its raw value, before interpolation)."""
    if not isinstance(model_cfg, DictConfig) or not OmegaConf.is_interpolation(model_cfg, "student"):
        return False
    return OmegaConf.to_container(model_cfg, resolve=False).get("student") in TEACHER_INTERPOLATIONS


def role_config(config: MusicgenConfig, model_cfg: DictConfig, role: str, source: str) -> MusicgenConfig:
    """The architecture ``model.<role>`` trains with, from its source's ``config``: the student's after
    ``model.student_init`` (fewer decoder layers, provenance recorded), the teacher's as saved."""
    if role != "student":
        return config
    return student_init_config(config, parse_student_init(model_cfg.get("student_init")), source)


def source_label(model_cfg: DictConfig, role: str) -> str:
    """``model.<role>`` for messages and plans: the source as configured, and how the student is built from it."""
    name, part = configured_source(model_cfg, role)
    label = f"{name} (the teacher's)" if part != role else name
    init = parse_student_init(model_cfg.get("student_init")) if role == "student" else None
    if init is None or init.is_default:
        return label
    layers = "all decoder layers" if init.layers is None else f"decoder layers {describe_layers(init.layers)}"
    return f"{label}, {layers}, {init.weights} weights"


def source_config(model_cfg: DictConfig, role: str) -> MusicgenConfig:
    """``model.<role>``'s MusicgenConfig without loading weights: config.json only (``tiny``: the shipped world's).

    The student's is the one it trains with: ``model.student_init`` applied (:func:`role_config`)."""
    name, part = configured_source(model_cfg, role)
    source = resolve_tiny(name, part)
    key = f"model.{part}"
    check_model_source(source, key)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(
                str(Path(source).expanduser()) if looks_like_path(source) else source
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{key}={source!r}: cannot read its config.json ({err}); save the model again with "
                "`save_pretrained`, or point the key at another model"
            ) from err
    if getattr(config, "model_type", None) != "musicgen":
        raise ValueError(
            f"{key}={source!r}: config.json describes a {getattr(config, 'model_type', '?')!r} model, not "
            "MusicGen ('musicgen', text-to-music with a T5 encoder and EnCodec); point it at a MusicGen model "
            "such as facebook/musicgen-small"
        )
    return role_config(config, model_cfg, role, source)


def plain(value: object) -> object:
    """Lists and tuples compare equal (a config.json round trip turns one into the other)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def pair_differences(student: MusicgenConfig, teacher: MusicgenConfig) -> list[str]:
    """``PAIR_FIELDS`` on which the two configs disagree, as ``part.field: teacher X, student Y``."""
    differences = []
    for part, fields in PAIR_FIELDS.items():
        s, t = getattr(student, part), getattr(teacher, part)
        for name in fields:
            a, b = plain(getattr(s, name, None)), plain(getattr(t, name, None))
            if a != b:
                differences.append(f"{part}.{name}: teacher {b!r}, student {a!r}")
    return differences


def check_pair_configs(
    student: MusicgenConfig, teacher: MusicgenConfig, student_name: str, teacher_name: str
) -> None:
    """Raise :class:`IncompatiblePairError` when the pair's codec, vocabulary or T5 architecture differ."""
    differences = pair_differences(student, teacher)
    if differences:
        raise IncompatiblePairError(
            f"model.teacher={teacher_name!r} and model.student={student_name!r} cannot be distilled into one "
            f"another: {'; '.join(differences)}. Distillation compares logits position by position and encodes "
            "text and audio once for both, so they must share the codec (codebooks, vocabulary), the pad token "
            "and the T5 text encoder; pick models of one family (e.g. facebook/musicgen-large -> "
            "facebook/musicgen-small), or set model.teacher=null and train without KD"
        )


def check_model_config(model_cfg: DictConfig) -> None:
    """Start-up checks of ``model.*`` that load no weights: sources exist, dtype is known, the pair fits.

    Reads only config.json (or the tiny recipe), so an incompatible pair fails before minutes of loading.
    """
    if model_cfg.get("student") in (None, ""):
        raise ValueError("model.student is required: `tiny`, a hub id or a save_pretrained directory")
    dtype = model_cfg.get("teacher_dtype", "float32")
    if dtype is not None and str(dtype) not in DTYPES:
        raise ValueError(f"model.teacher_dtype={dtype!r}: unknown dtype; known: {sorted(DTYPES)}")
    checkpointing = model_cfg.get("student_gradient_checkpointing", False)
    if not isinstance(checkpointing, bool):
        raise ValueError(f"model.student_gradient_checkpointing={checkpointing!r}: must be true or false")
    compile_arguments(model_cfg.get("compile_student", False))
    # model.student_init's names and types here; its layer range against the source's config below
    parse_student_init(model_cfg.get("student_init"))
    student = source_config(model_cfg, "student")
    if model_cfg.get("teacher") is not None:
        teacher = source_config(model_cfg, "teacher")
        check_pair_configs(student, teacher, str(model_cfg.student), str(model_cfg.teacher))


def resolve_sources(model_cfg: DictConfig) -> tuple[str, str | None]:
    """Replace ``tiny`` by the shipped world's teacher / student directories (``model.student=teacher``: the
    student's weights come from the teacher's)."""
    teacher = model_cfg.get("teacher")
    student = resolve_tiny(*configured_source(model_cfg, "student"))
    return str(student), (resolve_tiny(str(teacher), "teacher") if teacher is not None else None)


def check_compatible(
    student: MusicgenForConditionalGeneration,
    teacher: MusicgenForConditionalGeneration,
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> None:
    """The loaded pair: the config check again, then T5 weights equal up to bf16 rounding."""
    check_pair_configs(student.config, teacher.config, student_name, teacher_name)
    for (name, a), b in zip(
        student.text_encoder.state_dict().items(), teacher.text_encoder.state_dict().values(), strict=True
    ):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3):  # bf16 ok
            raise IncompatiblePairError(
                f"model.teacher={teacher_name!r} and model.student={student_name!r} have different T5 weights "
                f"(text_encoder.{name}): T5 is encoded once, by the student, for both; use a teacher and a "
                "student that share their text encoder"
            )


def load_teacher_student(model_cfg: DictConfig, load_teacher: bool = True) -> TeacherStudent:
    """Student in fp32 (it trains), teacher frozen in ``model.teacher_dtype``; tokenizer from the student.

    ``load_teacher=False`` (training from the teacher-logit cache) keeps the teacher's source but not its weights.
    ``model.student_init`` builds the student from its source (kept decoder layers; ``weights: random`` re-drawn
    with ``torch.initial_seed()``: the run's ``seed``, which train sets before loading).
    """
    student_source, teacher_source = resolve_sources(model_cfg)
    init = parse_student_init(model_cfg.get("student_init"))
    with quiet_transformers():
        student = load_musicgen(student_source)
        build_student(student, init, student_source, seed=torch.initial_seed())
        prepare_student(student, model_cfg)
        teacher = None
        if teacher_source is not None and load_teacher:
            teacher = freeze(load_musicgen(teacher_source, dtype=model_cfg.get("teacher_dtype", "float32")))
            check_compatible(student, teacher, student_source, teacher_source)
        tokenizer = load_tokenizer(student_source)
    log.info("Student %s (%s); teacher %s", student_source, Path(student_source).name, teacher_source)
    return TeacherStudent(student, teacher, tokenizer, student_source, teacher_source)


def compile_arguments(value: object) -> dict[str, object] | None:
    """``model.compile_student`` as ``torch.compile`` keyword arguments; None when off.

    ``false``/``null`` off, ``true`` torch's defaults (inductor), a mode string (``max-autotune``, ...) or a
    mapping of :data:`COMPILE_ARGUMENTS` (``{backend: aot_eager}``). Anything else raises naming the key.
    """
    key = "model.compile_student"
    value = to_plain(value)
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{key}={value!r}: expected false, true, a torch.compile mode {list(COMPILE_MODES)} or a mapping of "
            f"torch.compile arguments {list(COMPILE_ARGUMENTS)}"
        )
    unknown = sorted(set(value) - set(COMPILE_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"{key}: unknown torch.compile argument(s) {unknown}; known: {list(COMPILE_ARGUMENTS)}"
        )
    if "mode" in value and value["mode"] not in COMPILE_MODES:
        raise ValueError(
            f"{key}: mode={value['mode']!r} is not a torch.compile mode; known: {list(COMPILE_MODES)}"
        )
    if "backend" in value:
        import torch._dynamo  # ~3 s to import: only when a backend is named

        backends = torch._dynamo.list_backends(exclude_tags=())
        if value["backend"] not in backends:
            raise ValueError(
                f"{key}: backend={value['backend']!r} is unknown to torch.compile; known: {backends}"
            )
    return dict(value)


def decoder_layers(model: MusicgenForConditionalGeneration) -> list[torch.nn.Module]:
    """The decoder's repeated transformer blocks (what checkpointing recomputes and compiling reuses)."""
    return [m for m in model.decoder.modules() if isinstance(m, MusicgenDecoderLayer)]


def prepare_student(student: MusicgenForConditionalGeneration, model_cfg: DictConfig) -> None:
    """Gradient checkpointing and ``torch.compile`` of the student's decoder, in place, as ``model.*`` asks.

    Neither touches T5 or EnCodec (frozen, run without gradients) nor the parameters: ``state_dict`` keys,
    Lightning checkpoints and ``save_pretrained`` stay exactly as without.
    """
    if model_cfg.get("student_gradient_checkpointing", False):
        # Hugging Face's own switch: each decoder layer's forward is recomputed in the backward pass by
        # torch.utils.checkpoint (non-reentrant, preserve_rng_state: dropout draws the same masks twice).
        decoder = student.decoder
        # the newer transformers name first; the older one warns as deprecated there
        enable = (
            getattr(decoder, "activation_checkpointing_enable", None) or decoder.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
    arguments = compile_arguments(model_cfg.get("compile_student", False))
    if arguments is not None:
        # Regional compilation: each decoder layer in place (nn.Module.compile keeps parameter names). The
        # layers are identical, so they share one compiled graph and compiling costs one layer's time; a
        # whole-decoder compile breaks its graph at layerdrop's random draw in the layer loop and exhausts
        # dynamo's recompile limit on transformers' shared wrappers, falling back to eager.
        layers = decoder_layers(student)
        for layer in layers:
            layer.compile(**arguments)
        log.info("Student decoder: %d layers compiled with torch.compile(%s)", len(layers), arguments)
