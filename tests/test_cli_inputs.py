"""Wrong files and arguments given to the command lines (issue 11: D4, D8, P3): one clear `error:` line
naming the path and what is expected, a non-zero exit, no traceback, and a crafted pickle never runs."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinymusician.models.musicgen import ModelSourceError
from tinymusician.zoo.source import load_named_model, read_student_state


class RunsCode:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint does when loaded as a full pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad_inputs(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """A crafted pickle, random bytes, checkpoints without student weights, an ONNX bundle, a quantized bundle."""
    from tinymusician.models.musicgen import load_musicgen, load_tokenizer
    from tinymusician.quant import quantize_model, resolve_plan, save_quantized

    root = tmp_path_factory.mktemp("bad-inputs")
    files = {name: root / f"{name}.ckpt" for name in ("crafted", "random", "no_state_dict", "no_student")}
    with files["crafted"].open("wb") as handle:
        pickle.dump({"state_dict": RunsCode(root / "PWNED")}, handle)
    files["random"].write_bytes(random.Random(0).randbytes(4096))  # fixed: random bytes fail in several ways
    torch.save({"weights": torch.zeros(2)}, files["no_state_dict"])
    torch.save({"state_dict": {"teacher.w": torch.zeros(2)}}, files["no_student"])
    student = load_musicgen(str(tiny_pair.student))
    tokenizer = load_tokenizer(str(tiny_pair.student))
    files["quantized"] = save_quantized(quantize_model(student, resolve_plan("int8")), root / "q8", tokenizer)
    onnx_bundle = (
        root / "onnx-bundle"
    )  # only what makes it look like one: check_model_source stops before loading
    onnx_bundle.mkdir()
    (onnx_bundle / "manifest.json").write_text('{"format": "tinymusician-onnx", "source": "the student"}')
    (onnx_bundle / "config.json").write_text("{}")
    files["onnx"] = onnx_bundle
    files["weights_only_dir"] = root / "no-weights"
    files["weights_only_dir"].mkdir()
    (files["weights_only_dir"] / "config.json").write_text((tiny_pair.student / "config.json").read_text())
    files["wav"] = root / "clip.wav"
    files["wav"].write_bytes(b"RIFF0000WAVE")
    files["marker"] = root / "PWNED"
    return files


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"tinymusician.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in error[-1], (fragment, error[-1])


# --- D4: the library path every CLI shares -----------------------------------------------------------------
@pytest.mark.parametrize(
    "name,message",
    [
        ("crafted", r"crafted.ckpt: not loaded: it is not a TinyMusician checkpoint"),
        ("random", r"random.ckpt: not loaded: it is not a TinyMusician checkpoint"),
        ("no_state_dict", r"no_state_dict.ckpt: has no 'state_dict' \(found \['weights'\]\)"),
        ("no_student", r"no_student.ckpt: no 'student.\*' weights \(its state_dict has \['teacher'\]\)"),
    ],
)
def test_checkpoints_that_are_not_training_checkpoints(bad_inputs, name, message):
    with pytest.raises(ModelSourceError, match=message) as info:
        read_student_state(bad_inputs[name])
    assert "python -m tinymusician.train" in str(info.value)  # what is expected
    assert not bad_inputs["marker"].exists()  # the crafted pickle did not run


@pytest.mark.parametrize(
    "name,message",
    [
        (
            "quantized",
            r"is a quantized bundle( \(made from .*\))?, which cannot be quantized or exported again",
        ),
        ("onnx", r"is an ONNX bundle \(made from the student\), not a PyTorch model"),
        ("weights_only_dir", r"has config.json but no weights \(model.safetensors or pytorch_model.bin\)"),
        ("wav", r"is a file, not a model directory"),
    ],
)
def test_directories_and_files_that_are_not_students(bad_inputs, name, message):
    with pytest.raises(ModelSourceError, match=message) as info:
        load_named_model(str(bad_inputs[name]), key="MODEL")
    assert str(bad_inputs[name]) in str(info.value) and "save_pretrained" in str(info.value)


def test_checkpoint_from_another_architecture(bad_inputs, tiny_pair, tmp_path):
    from tinymusician.models.musicgen import load_musicgen

    state = {f"student.{k}": v for k, v in load_musicgen(str(tiny_pair.teacher)).state_dict().items()}
    checkpoint = tmp_path / "teacher-shaped.ckpt"
    torch.save({"state_dict": state}, checkpoint)
    with pytest.raises(ModelSourceError, match=r"student weights do not fit the architecture of .*--base"):
        load_named_model(str(checkpoint), base=str(tiny_pair.student))


def test_quantized_bundle_is_accepted_where_only_generation_is_needed(bad_inputs):
    from tinymusician.quant.ptq import PLAN_ATTRIBUTE

    model, _, description = load_named_model(str(bad_inputs["quantized"]), quantized=True)
    assert getattr(model, PLAN_ATTRIBUTE).name == "int8" and "quantized bundle" in description


def test_damaged_quantized_bundle_names_its_state_file(bad_inputs, tmp_path):
    import shutil

    from tinymusician.quant.bundle import BundleError, load_quantized

    copy = Path(shutil.copytree(bad_inputs["quantized"], tmp_path / "q8"))
    (copy / "quantized_state.pt").write_bytes(bad_inputs["crafted"].read_bytes())
    with pytest.raises(BundleError, match=r"quantized_state.pt: not a state dict of tensors"):
        load_quantized(copy)
    (copy / "quantized_state.pt").unlink()
    with pytest.raises(BundleError, match=r"quantized_state.pt: missing"):
        load_quantized(copy)
    assert not bad_inputs["marker"].exists()


# --- D4: each command line --------------------------------------------------------------------------------
def test_quantize_refuses_a_crafted_pickle_without_running_it(bad_inputs, tiny_pair, tmp_path):
    # P3 too: the override comes after --out
    result = run_cli(
        "quantize", bad_inputs["crafted"], "--base", tiny_pair.student, "--out", tmp_path / "q", "quant=int8"
    )
    assert_clean_error(result, "crafted.ckpt: not loaded", "python -m tinymusician.train")
    assert not bad_inputs["marker"].exists() and not (tmp_path / "q").exists()


def test_export_refuses_a_quantized_bundle(bad_inputs, tmp_path):
    result = run_cli("export", bad_inputs["quantized"], "--out", tmp_path / "b")
    assert_clean_error(result, str(bad_inputs["quantized"]), "is a quantized bundle", "save_pretrained")


def test_generate_refuses_random_bytes(bad_inputs, tiny_pair, tmp_path):
    result = run_cli(
        "generate", "a calm piano", "--model", bad_inputs["random"], "--base", tiny_pair.student,
        "--out", tmp_path / "a.wav",
    )  # fmt: skip
    assert_clean_error(result, "random.ckpt: not loaded")


def test_evaluate_reads_an_existing_checkpoint_file_as_a_checkpoint(bad_inputs, tiny_pair, tmp_path):
    """It used to say that the directory does not exist."""
    reference = tmp_path / "ref"
    reference.mkdir()
    result = run_cli(
        "evaluate", "--model", bad_inputs["no_student"], "--base", tiny_pair.student, "--reference", reference,
        "--output-dir", tmp_path / "eval", "--no-progress",
    )  # fmt: skip
    assert_clean_error(result, "no_student.ckpt: no 'student.*' weights")
    assert "does not exist" not in result.stderr


# --- D8: the PyTorch backend checks the longest clip too ---------------------------------------------------
def test_generate_refuses_too_many_seconds_before_generating(tiny_pair, tmp_path):
    result = run_cli(
        "generate",
        "a calm piano",
        "--model",
        tiny_pair.student,
        "--seconds",
        "100000",
        "--out",
        tmp_path / "a.wav",
    )
    assert_clean_error(result, "5000000 frames", "at most 2045 frames", "ask for fewer seconds")
    assert not (tmp_path / "a.wav").exists()


def test_torch_generate_limits_match_the_onnx_manifest(student, tokenizer):
    from tinymusician.models.generation import torch_generate
    from tinymusician.models.musicgen import max_frames
    from tinymusician.onnx.export import model_facts
    from tinymusician.onnx.runtime import GenerationError

    assert max_frames(student) == model_facts(student)["max_frames"]
    with pytest.raises(GenerationError, match="too long"):
        torch_generate(student, tokenizer, ["a tune"], max_frames(student) + 1)


def test_generate_checks_seconds_and_output_name_before_loading(tiny_pair, tmp_path):
    from tinymusician.generate import main

    for seconds in ("nan", "-1", "0"):
        assert main(["a tune", "--model", str(tiny_pair.student), "--seconds", seconds]) == 2
    assert main(["a tune", "--model", str(tiny_pair.student), "--out", str(tmp_path / "noext")]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["a tune", "--model", str(tiny_pair.student), "--out", str(tmp_path / "file" / "a.wav")]) == 2


# --- P3: overrides anywhere --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["SRC", "--out", "DIR", "quant=paper", "data.num_val=4"],
        ["quant=paper", "SRC", "--out", "DIR", "data.num_val=4"],
        ["--out", "DIR", "quant=paper", "SRC", "data.num_val=4"],
        ["SRC", "quant=paper", "--out=DIR", "data.num_val=4", "--check-tokens", "0"],
    ],
)
def test_quantize_accepts_overrides_anywhere(argv):
    from tinymusician.quantize import parse_args

    args, overrides = parse_args(argv)
    assert args.source == "SRC" and args.out == Path("DIR") and overrides == ["quant=paper", "data.num_val=4"]


def test_quantize_source_paths_with_equals_signs_and_wrong_counts(tmp_path, capsys):
    from tinymusician.quantize import parse_args

    run = tmp_path / "0_loss=fkl" / "student"  # a multirun job directory
    run.mkdir(parents=True)
    args, overrides = parse_args([str(run), "quant=int8"])
    assert args.source == str(run) and overrides == ["quant=int8"]
    for argv in (["quant=int8"], ["a", "b", "quant=int8"]):
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 2 and "exactly one SOURCE" in capsys.readouterr().err


def test_quantize_overrides_after_out_reach_hydra(tiny_pair, tmp_path):
    """Through the real command line: parsed (no 'unrecognized arguments'), composed, a wrong key named."""
    result = run_cli(
        "quantize", tiny_pair.student, "--out", tmp_path / "q", "quant=int8", "quant.no_such_key=1"
    )
    assert_clean_error(result, "quant.no_such_key")
    assert "unrecognized arguments" not in result.stderr


def test_generate_accepts_prompts_after_options(tmp_path):
    from tinymusician.generate import build_parser

    args = build_parser().parse_intermixed_args(["--model", "m", "first", "--seconds", "2", "second"])
    assert args.prompts == ["first", "second"] and args.seconds == 2.0


def test_damaged_bytes_that_break_the_unpickler_are_a_clear_error(tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(random.Random(2).randbytes(4096))  # the weights-only unpickler fails with IndexError
    with pytest.raises(ModelSourceError, match=r"damaged.ckpt: not a readable PyTorch checkpoint"):
        read_student_state(damaged)
