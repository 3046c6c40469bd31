"""Damaged or hand-edited ONNX bundles fail at load time, naming the file and key (issue 11: D5, D6, D7).

One fp32 bundle of the fast tiny student is exported per session (about 2 s); each test edits a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinymusician.onnx import runtime
from tinymusician.onnx.runtime import BundleError, TinyMusicianONNX

DECODER = "onnx/decoder_fast.onnx"  # the decoder the runtime loads by default


@pytest.fixture(scope="session")
def fault_bundle(tiny_pair, tmp_path_factory) -> Path:
    from tinymusician.models.musicgen import load_musicgen, load_tokenizer
    from tinymusician.onnx.export import export_bundle

    out = tmp_path_factory.mktemp("fault-bundle") / "bundle"
    student = str(tiny_pair.student)
    export_bundle(load_musicgen(student), load_tokenizer(student), out, precisions=["fp32"], source=student)
    return out


@pytest.fixture
def bundle(fault_bundle, tmp_path, monkeypatch) -> Path:
    """A private copy, with a private verification cache."""
    monkeypatch.setenv("TINYMUSICIAN_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(fault_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, **model_facts) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in model_facts.items():
        if key == "format_version":
            manifest[key] = value
        else:
            manifest["model"][key] = value
    path.write_text(json.dumps(manifest))


def corrupt_a_weight(path: Path) -> None:
    """Same size, a valid graph: one byte flipped inside the largest weight tensor."""
    import onnx

    largest = max(onnx.load(path).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data = bytearray(path.read_bytes())
    offset = bytes(data).index(largest) + len(largest) // 2
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def run_generate(bundle: Path, *extra: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINYMUSICIAN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["calm piano", "--model", str(bundle), "--seconds", "0.2", "--greedy", "--threads", "1"]
    return subprocess.run(
        [sys.executable, "-m", "tinymusician.generate", *args, "--out", str(bundle.parent / "a.wav"), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# --- D5: same-size corruption -----------------------------------------------------------------------------
def test_same_size_corruption_of_the_decoder_fails_by_default(bundle, tmp_path):
    corrupt_a_weight(bundle / DECODER)
    with pytest.raises(BundleError, match=r"decoder_fast.onnx: sha256 differs from manifest.json"):
        TinyMusicianONNX(bundle)
    result = run_generate(bundle, cache=tmp_path / "cache")
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "decoder_fast.onnx: sha256" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "a.wav").exists()
    # the documented opt-out: sizes only, so the damaged graph runs
    skipped = run_generate(bundle, "--no-verify", cache=tmp_path / "cache")
    assert skipped.returncode == 0, skipped.stderr


def test_a_verified_file_is_hashed_once_until_it_changes(bundle, tmp_path, monkeypatch):
    TinyMusicianONNX(bundle)  # first load hashes and remembers
    remembered = json.loads((tmp_path / "cache" / runtime.VERIFIED_FILE).read_text())
    assert str((bundle / DECODER).resolve()) in remembered and len(remembered) == 4  # the graphs it loads

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(runtime, "file_sha256", no_hashing)
    TinyMusicianONNX(bundle)  # unchanged files: not hashed again
    monkeypatch.undo()
    monkeypatch.setenv("TINYMUSICIAN_CACHE", str(tmp_path / "cache"))
    corrupt_a_weight(bundle / DECODER)  # a new mtime/ctime: hashed again, and caught
    with pytest.raises(BundleError, match="sha256"):
        TinyMusicianONNX(bundle)
    remembered = json.loads((tmp_path / "cache" / runtime.VERIFIED_FILE).read_text())
    assert str((bundle / DECODER).resolve()) not in remembered


def test_copy_with_preserved_mtime_is_hashed_again(bundle, tmp_path):
    TinyMusicianONNX(bundle)
    damaged = tmp_path / "damaged.onnx"
    shutil.copy2(bundle / DECODER, damaged)
    corrupt_a_weight(damaged)
    os.utime(damaged, ns=((bundle / DECODER).stat().st_atime_ns, (bundle / DECODER).stat().st_mtime_ns))
    os.replace(damaged, bundle / DECODER)  # same size, same mtime, other inode/ctime
    with pytest.raises(BundleError, match="sha256"):
        TinyMusicianONNX(bundle)


def test_unwritable_or_damaged_cache_only_costs_a_rehash(bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("TINYMUSICIAN_CACHE", str(blocker / "cache"))
    TinyMusicianONNX(bundle)
    monkeypatch.setenv("TINYMUSICIAN_CACHE", str(tmp_path / "cache2"))
    (tmp_path / "cache2").mkdir()
    (tmp_path / "cache2" / runtime.VERIFIED_FILE).write_text("{not json")
    TinyMusicianONNX(bundle)
    assert json.loads((tmp_path / "cache2" / runtime.VERIFIED_FILE).read_text())


# --- D6: hand-edited manifest.json ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit,message",
    [
        (
            {"sampling_rate": 44100},
            r"model.sampling_rate=44100 but .*config.json.*audio_encoder.sampling_rate=16000",
        ),
        ({"max_frames": 5000}, r"model.max_frames=5000, but the decoder's position table"),
        ({"max_frames": 0}, r"model.max_frames=0: must be an integer >= 1"),
        ({"min_frames": "7"}, r"model.min_frames='7': must be an integer"),
        ({"min_frames": 2}, r"model.min_frames=2, but .* need at least 7"),
        ({"frame_rate": 25}, r"model.frame_rate=25 but the codec"),
        (
            {"format_version": 3},
            r"format_version=3 is not supported; this tinymusician reads format_version \[1, 2\]",
        ),
        ({"format_version": "1"}, r"format_version='1' is not supported"),
    ],
)
def test_hand_edited_manifest_names_file_and_key(bundle, edit, message):
    edit_manifest(bundle, **edit)
    with pytest.raises(BundleError, match=message) as info:
        TinyMusicianONNX(bundle)
    assert "manifest.json" in str(info.value)


def test_hand_edited_manifest_from_the_command_line(bundle, tmp_path):
    edit_manifest(bundle, sampling_rate=44100)
    result = run_generate(bundle, cache=tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "manifest.json: model.sampling_rate=44100" in result.stderr and not (tmp_path / "a.wav").exists()


def test_manifest_that_is_not_json_or_not_an_object(bundle):
    (bundle / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"manifest.json: format 'list'"):
        TinyMusicianONNX(bundle)
    (bundle / "manifest.json").write_text('{"format": ')
    with pytest.raises(BundleError, match=r"manifest.json: not valid JSON"):
        TinyMusicianONNX(bundle)


# --- D7: damaged tokenizer / config -----------------------------------------------------------------------
@pytest.mark.parametrize("content", ['{"version": "1.0", "model": {"type": "Nope"}}', '{"trunc', "\x00\x01"])
def test_corrupt_tokenizer_json_names_the_file(bundle, content):
    (bundle / "tokenizer.json").write_text(content)
    with pytest.raises(BundleError, match=r"tokenizer.json: not a valid tokenizers file"):
        TinyMusicianONNX(bundle)


def test_corrupt_tokenizer_json_from_the_command_line(bundle, tmp_path):
    (bundle / "tokenizer.json").write_text('{"trunc')
    result = run_generate(bundle, cache=tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bundle / 'tokenizer.json'}: not a valid tokenizers file" in result.stderr


def test_corrupt_config_and_tokenizer_config_name_the_file(bundle):
    (bundle / "tokenizer_config.json").write_text("{")
    with pytest.raises(BundleError, match=r"tokenizer_config.json: not valid JSON"):
        TinyMusicianONNX(bundle)
    (bundle / "config.json").write_text("{")
    with pytest.raises(BundleError, match=r"config.json: not valid JSON"):
        TinyMusicianONNX(bundle)


def test_corrupt_tokenizer_of_a_pytorch_model_names_the_directory(tiny_pair, tmp_path):
    from tinymusician.models.musicgen import ModelSourceError, load_tokenizer

    copy = Path(shutil.copytree(tiny_pair.student, tmp_path / "student"))
    (copy / "tokenizer.json").write_text('{"trunc')
    with pytest.raises(ModelSourceError, match=r"student: its tokenizer cannot be loaded.*tokenizer.json"):
        load_tokenizer(str(copy))


def test_runtime_module_never_imports_torch(fault_bundle, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from tinymusician.onnx.runtime import TinyMusicianONNX\n"
        f"TinyMusicianONNX({str(fault_bundle)!r}, threads=1).generate(['a'], seconds=0.2, seed=0)\n"
        "print('ok')"
    )
    env = {**os.environ, "TINYMUSICIAN_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.stdout.strip() == "ok", result.stderr
