"""Layer-dropped students (model.student_init): kept layers copied exactly, the rest unchanged, the architecture
and provenance saved, bad values caught from config.json alone, a seeded random arm, a kd_layerdrop run, the plan."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import MusicgenForConditionalGeneration

from tests.conftest import compose_train_cfg
from tinymusician.models.musicgen import load_musicgen, save_musicgen
from tinymusician.train import train
from tinymusician.training.memory import plan_memory
from tinymusician.zoo.pair import check_model_config, load_teacher_student, resolve_sources, source_config
from tinymusician.zoo.source import compose_config
from tinymusician.zoo.student_init import StudentInit, reinitialise_decoder
from tinymusician.zoo.tiny import (
    DecoderSize,
    TinySpec,
    build_tokenizer,
    configure_generation,
    musicgen_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = "decoder.model.decoder.layers."
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> str:
    """A 4-layer tiny MusicGen (decoder 48 wide, so it has enc_to_dec_proj) with every weight perturbed, so no two
    tensors share an init value (norms not all ones, biases not zero), saved with save_pretrained."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    size = DecoderSize(hidden_size=48, num_layers=NUM_LAYERS, num_heads=4, ffn_dim=96)
    model = MusicgenForConditionalGeneration(musicgen_config(TinySpec(), size, len(tokenizer)))
    configure_generation(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    directory = tmp_path_factory.mktemp("layerdrop-source")
    save_musicgen(model, tokenizer, directory)
    return str(directory)


@pytest.fixture(scope="module")
def source(source_dir) -> MusicgenForConditionalGeneration:
    return load_musicgen(source_dir)


def model_cfg(student: str, layers=None, weights: str = "pretrained", **extra):
    return OmegaConf.create(
        {"student": student, "teacher": None, "student_init": {"layers": layers, "weights": weights}, **extra}
    )


def build(
    student: str, layers=None, weights: str = "pretrained", seed: int = 0
) -> MusicgenForConditionalGeneration:
    torch.manual_seed(seed)  # as train's seed_everything before the models load
    return load_teacher_student(model_cfg(student, layers, weights)).student


def layer_state(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"{LAYERS}{index}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def outside_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(LAYERS)}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.parametrize(
    ("layers", "kept"),
    [("every_other", [0, 2]), ("first_half", [0, 1]), ([0, 3], [0, 3]), ([1, 2, 3], [1, 2, 3])],
)
def test_kept_layers_are_the_sources_and_everything_else_is_unchanged(source_dir, source, layers, kept):
    student = build(source_dir, layers)
    assert student.config.decoder.num_hidden_layers == len(kept) == len(student.decoder.model.decoder.layers)
    state, original = student.state_dict(), source.state_dict()
    for new, old in enumerate(kept):
        assert_states_equal(layer_state(state, new), layer_state(original, old))
    assert not any(k.startswith(f"{LAYERS}{len(kept)}.") for k in state)
    # embeddings, lm_heads, final norm, enc_to_dec_proj, T5, EnCodec
    assert "enc_to_dec_proj.weight" in outside_layers(state)
    assert_states_equal(outside_layers(state), outside_layers(original))
    assert student.config.decoder.student_init == {
        "source": source_dir,
        "source_layers": NUM_LAYERS,
        "layers": kept,
        "weights": "pretrained",
    }
    # each attention indexes its own KV-cache slot: the new position, not the source's
    for index, layer in enumerate(student.decoder.model.decoder.layers):
        assert layer.self_attn.layer_idx == layer.encoder_attn.layer_idx == index


def test_save_pretrained_round_trip_loads_the_dropped_student(source_dir, tmp_path):
    student = build(source_dir, "every_other").eval()
    save_musicgen(student, build_tokenizer(), tmp_path)
    reloaded = load_musicgen(str(tmp_path))
    assert reloaded.config.decoder.num_hidden_layers == 2
    assert reloaded.config.decoder.student_init == student.config.decoder.student_init
    assert_states_equal(reloaded.state_dict(), student.state_dict())
    # cached generation: the in-place dropped model and one built fresh from config.json agree step by step
    tokenizer = build_tokenizer()
    text = tokenizer(["a calm piano melody", "slow organ chords"], padding=True, return_tensors="pt")
    generated = [
        model.generate(
            **text, do_sample=False, guidance_scale=1.0, max_new_tokens=6, return_dict_in_generate=True
        )
        for model in (student, reloaded)
    ]
    assert torch.equal(generated[0].sequences, generated[1].sequences)


def test_default_student_init_loads_the_source_as_it_is(source_dir, source):
    student = build(source_dir)
    assert_states_equal(student.state_dict(), source.state_dict())
    assert not hasattr(student.config.decoder, "student_init")


@pytest.mark.parametrize(
    ("student_init", "match"),
    [
        (
            {"layers": [0, 9]},
            r"model\.student_init\.layers=\[0, 9\]: index 9 is out of range: .* 4 decoder layers",
        ),
        ({"layers": [-1, 2]}, r"model\.student_init\.layers=\[-1, 2\]: index -1 is out of range"),
        ({"layers": [0, 0, 2]}, r"model\.student_init\.layers=\[0, 0, 2\]: an index appears twice"),
        ({"layers": [2, 0]}, r"model\.student_init\.layers=\[2, 0\]: indices must increase.*\[0, 2\]"),
        ({"layers": []}, r"model\.student_init\.layers=\[\]: keeps no layer of the 4"),
        (
            {"layers": "every_third"},
            r"model\.student_init\.layers='every_third': unknown choice.*every_other",
        ),
        ({"layers": 2}, r"model\.student_init\.layers=2: expected null"),
        ({"layers": ["0", "2"]}, r"model\.student_init\.layers=\['0', '2'\]: expected null"),
        (
            {"weights": "foo"},
            r"model\.student_init\.weights='foo': unknown; known: \['pretrained', 'random'\]",
        ),
        ({"layer": [0]}, r"model\.student_init: unknown key\(s\) \['layer'\]"),
    ],
)
def test_bad_values_fail_from_config_json_alone(source_dir, monkeypatch, student_init, match):
    def no_weights(*args, **kwargs):
        raise AssertionError("check_model_config loaded weights")

    monkeypatch.setattr(MusicgenForConditionalGeneration, "from_pretrained", no_weights)
    cfg = OmegaConf.create({"student": source_dir, "teacher": None, "student_init": student_init})
    with pytest.raises(ValueError, match=match) as err:
        check_model_config(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("student", ["teacher", "${model.teacher}"])
def test_the_teacher_as_student_source_means_the_teachers_weights_also_for_tiny(tmp_path, tiny_pair, student):
    cfg = compose_config([f"model.student={student}"], tmp_path).model
    assert resolve_sources(cfg) == (str(tiny_pair.teacher), str(tiny_pair.teacher))
    assert source_config(cfg, "student").decoder.hidden_size == 128
    plain = compose_config([], tmp_path).model  # `tiny` as the student is still the shipped student
    assert resolve_sources(plain)[0] == str(tiny_pair.student)


def test_student_from_teacher_needs_a_teacher():
    with pytest.raises(
        ValueError, match="model.student=teacher builds the student from model.teacher, which is"
    ):
        check_model_config(OmegaConf.create({"student": "teacher", "teacher": None}))


def test_random_weights_redraw_the_decoder_and_keep_t5_and_encodec(source_dir, source):
    student = build(source_dir, "every_other", "random", seed=3)
    state, original = student.state_dict(), source.state_dict()
    assert student.config.decoder.num_hidden_layers == 2
    assert student.config.decoder.student_init["weights"] == "random"
    frozen = ("text_encoder.", "audio_encoder.")
    assert_states_equal(
        {k: v for k, v in state.items() if k.startswith(frozen)},
        {k: v for k, v in original.items() if k.startswith(frozen)},
    )
    for new, old in enumerate([0, 2]):  # every tensor of the kept layers re-drawn
        mine, theirs = layer_state(state, new), layer_state(original, old)
        assert all(not torch.equal(mine[k], theirs[k]) for k in mine)
    decoder_side = [k for k in outside_layers(state) if not k.startswith(frozen)]
    assert "enc_to_dec_proj.weight" in decoder_side and "decoder.lm_heads.0.weight" in decoder_side
    assert all(not torch.equal(state[k], original[k]) for k in decoder_side)
    # transformers' init: normal(0, initializer_factor) linears, unit norms
    std = student.config.decoder.initializer_factor
    assert student.decoder.lm_heads[0].weight.std().item() == pytest.approx(std, rel=0.1)
    assert student.enc_to_dec_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert torch.equal(student.decoder.model.decoder.layer_norm.weight, torch.ones(48))
    # deterministic per seed, different across seeds
    assert_states_equal(build(source_dir, "every_other", "random", seed=3).state_dict(), state)
    other = build(source_dir, "every_other", "random", seed=4).state_dict()
    assert not torch.equal(other["decoder.lm_heads.0.weight"], state["decoder.lm_heads.0.weight"])


def test_reinitialising_leaves_the_global_rng_alone(source_dir):
    model = load_musicgen(source_dir)
    before = torch.random.get_rng_state()
    reinitialise_decoder(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert StudentInit(layers=None, weights="random").kept(4, "x") == [0, 1, 2, 3]


def test_kd_layerdrop_trains_a_two_layer_student_of_the_teachers_width(tmp_path, tiny_pair):
    cfg = compose_train_cfg(
        ["+experiment=kd_layerdrop", "trainer.max_steps=2", "validate_before_fit=false"], tmp_path
    )
    assert cfg.model.student == "tiny" and cfg.loss.name == "stage_mixed"  # ${model.teacher}
    metrics, objects = train(cfg)
    assert objects["summary"]["steps"] == 2 and math.isfinite(metrics["train/loss"])
    student = load_musicgen(objects["summary"]["student_dir"])
    assert student.config.decoder.num_hidden_layers == 2 and student.config.decoder.hidden_size == 128
    assert student.config.decoder.student_init["layers"] == [0, 2]
    assert student.config.decoder.student_init["source"] == str(tiny_pair.teacher)
    teacher = load_musicgen(str(tiny_pair.teacher))  # frozen parts are the teacher's own
    assert_states_equal(student.text_encoder.state_dict(), teacher.text_encoder.state_dict())


def test_plan_memory_counts_the_dropped_student(tmp_path):
    full = plan_memory(compose_config([], tmp_path)).setup
    dropped = plan_memory(compose_config(["model.student_init.layers=every_other"], tmp_path)).setup
    assert dropped["student_params"] < full["student_params"]
    built = load_teacher_student(compose_config(["model.student_init.layers=every_other"], tmp_path).model)
    assert dropped["student_params"] == sum(p.numel() for p in built.student.parameters())
    arm = plan_memory(compose_config(["+experiment=kd_layerdrop"], tmp_path)).setup
    assert arm["student_params"] < arm["teacher_params"]
    assert "tiny (the teacher's), decoder layers every_other" in arm["student"]
