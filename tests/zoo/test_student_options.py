"""The student's run options: gradient checkpointing and torch.compile of its decoder, switched on by model.*."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import MusicgenConfig

from tests.conftest import compose_train_cfg
from tinymusician.distill.module import per_codebook_ce
from tinymusician.models.musicgen import load_musicgen, load_tokenizer, save_musicgen, teacher_forcing
from tinymusician.train import train
from tinymusician.training.checks import ConfigError, check_config
from tinymusician.zoo.pair import check_model_config, decoder_layers, load_teacher_student

pytestmark = pytest.mark.usefixtures("single_thread")

DROPOUT = 0.2


def student_cfg(student: str = "tiny", **options):
    return OmegaConf.create({"student": student, "teacher": None, **options})


def checkpointing_flags(module: torch.nn.Module) -> set[bool]:
    return {bool(m.gradient_checkpointing) for m in module.modules() if hasattr(m, "gradient_checkpointing")}


@pytest.fixture(scope="module")
def dropout_student(tiny_pair, tmp_path_factory) -> str:
    """The shipped student saved with dropout in its decoder (the shipped one has none), via save_pretrained."""
    directory = tmp_path_factory.mktemp("dropout-student")
    save_musicgen(load_musicgen(str(tiny_pair.student)), load_tokenizer(str(tiny_pair.student)), directory)
    config = MusicgenConfig.from_pretrained(directory)
    config.decoder.dropout = config.decoder.attention_dropout = config.decoder.activation_dropout = DROPOUT
    config.save_pretrained(directory)
    return str(directory)


def training_step(student, batch, seed: int) -> tuple[float, dict[str, torch.Tensor], int]:
    """CE loss, the decoder's gradients and the bytes autograd saved for backward, on one train-mode step."""
    student.decoder.train()
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(seed)
    forcing = teacher_forcing(student, batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = forcing.logits(student)
    loss = per_codebook_ce(logits, forcing.delayed.labels, forcing.delayed.valid).mean()
    student.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.decoder.named_parameters() if p.grad is not None}
    return loss.detach().item(), grads, sum(saved)


def assert_same_step(a, b, atol: float) -> None:
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    assert loss_a == pytest.approx(loss_b, abs=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (
            "student_gradient_checkpointing",
            "yes",
            r"model.student_gradient_checkpointing='yes'.*true or false",
        ),
        ("compile_student", "fastest", r"model.compile_student: mode='fastest'.*max-autotune"),
        ("compile_student", 3, r"model.compile_student=3: expected false, true"),
        ("compile_student", {"backend": "nope"}, r"model.compile_student: backend='nope'.*aot_eager"),
        ("compile_student", {"speed": 1}, r"model.compile_student: unknown torch.compile argument.*speed"),
    ],
)
def test_bad_student_options_fail_at_startup_naming_the_key(key, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        check_model_config(student_cfg(**{key: value}))
    cfg = compose_train_cfg([], tmp_path)
    cfg.model[key] = value
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


def test_options_default_off_and_valid_values_pass(tmp_path):
    cfg = compose_train_cfg([], tmp_path)
    assert cfg.model.student_gradient_checkpointing is False and cfg.model.compile_student is False
    for value in (True, False, None, "max-autotune", {"backend": "aot_eager", "dynamic": False}):
        check_model_config(student_cfg(compile_student=value, student_gradient_checkpointing=True))


def test_gradient_checkpointing_is_on_for_the_decoder_only_and_changes_no_number(
    dropout_student, batch_maker
):
    plain = load_teacher_student(student_cfg(dropout_student)).student
    checkpointed = load_teacher_student(
        student_cfg(dropout_student, student_gradient_checkpointing=True)
    ).student
    assert checkpointing_flags(plain.decoder) == {False}
    assert checkpointing_flags(checkpointed.decoder) == {True}
    assert checkpointing_flags(checkpointed.text_encoder) <= {False}  # frozen: never recomputed
    assert checkpointing_flags(checkpointed.audio_encoder) <= {False}
    batch = batch_maker(plain, load_tokenizer(dropout_student), count=1)[0]
    reference = training_step(plain, batch, seed=0)
    assert reference[0] != pytest.approx(training_step(plain, batch, seed=1)[0], abs=1e-4)  # dropout is on
    # the recomputed forward replays the RNG state (torch.utils.checkpoint preserve_rng_state): same masks
    recomputed = training_step(checkpointed, batch, seed=0)
    assert_same_step(recomputed, reference, atol=1e-6)
    # and the decoder layers' activations were not kept: far fewer bytes saved for backward
    assert recomputed[2] < 0.5 * reference[2], (recomputed[2], reference[2])
    plain.eval()
    checkpointed.eval()


def test_compiled_student_matches_eager_and_keeps_its_parameter_names(tiny_pair, batch_maker, tmp_path):
    eager = load_teacher_student(student_cfg()).student
    compiled = load_teacher_student(student_cfg(compile_student={"backend": "aot_eager"})).student
    layers = decoder_layers(compiled)
    assert len(layers) == eager.config.decoder.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(eager))
    tokenizer = load_tokenizer(str(tiny_pair.student))
    for batch in batch_maker(eager, tokenizer, count=2):  # two batches: the second runs the compiled graph
        assert_same_step(training_step(compiled, batch, seed=0), training_step(eager, batch, seed=0), 1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    saved = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        save_musicgen(model, tokenizer, tmp_path / name)
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as weights:
            saved[name] = sorted(weights.keys())
    assert saved["compiled"] == saved["eager"]


def test_train_with_checkpointing_and_compile(tmp_path, tiny_pair):
    """Both switches through `train`: the run trains and saves a student with the shipped student's tensors."""
    cfg = compose_train_cfg(
        [
            "+experiment=kd_only",
            "model.student_gradient_checkpointing=true",
            "model.compile_student={backend:eager}",
            "trainer.max_steps=2",
            "validate_before_fit=false",
        ],
        tmp_path,
    )
    metrics, objects = train(cfg)
    student = objects["models"].student
    assert checkpointing_flags(student.decoder) == {True}
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(student))
    assert objects["summary"]["steps"] == 2 and math.isfinite(metrics["train/loss"])
    with (
        safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as saved,
        safe_open(str(tiny_pair.student / "model.safetensors"), "pt") as shipped,
    ):
        assert sorted(saved.keys()) == sorted(shipped.keys())
