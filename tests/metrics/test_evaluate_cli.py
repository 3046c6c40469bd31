"""`python -m tinymusician.evaluate`: folders of WAVs, reference statistics files, CLAP from captions, errors."""

from __future__ import annotations

import json
import re

import pytest

from tinymusician.evaluate import main


@pytest.fixture
def folders(tmp_path, write_wav_folder):
    reference = write_wav_folder(tmp_path / "reference", 6, seconds=2.0, sample_rate=16000, seed=1)
    generated = write_wav_folder(tmp_path / "generated", 5, seconds=2.5, sample_rate=32000, seed=2)
    return reference, generated


def test_cli_scores_a_folder_of_wavs_against_a_folder_and_against_saved_statistics(
    folders, tmp_path, tiny_vggish_path, tiny_clap_dir, capsys
):
    reference, generated = folders
    common = f"--no-progress --embedder vggish:{tiny_vggish_path} --embedder clap:{tiny_clap_dir}".split()
    out1, out2, stats = tmp_path / "out1", tmp_path / "out2", tmp_path / "ref.safetensors"
    args = f"--audio-dir {generated} --reference {reference} --clap {tiny_clap_dir} --output-dir {out1}"
    assert main(args.split() + common) == 0
    table = capsys.readouterr().out
    assert (
        "FAD(vggish)" in table
        and "FAD(clap)" in table
        and "CLAP" in table
        and "reference: kind=folder" in table
    )
    report = json.loads((out1 / "report.json").read_text())
    assert report["n_clips"] == 5 and report["clip_seconds"] == pytest.approx(2.5)
    vggish_fad = report["fad"]["vggish"]
    assert vggish_fad["n_frames"] == 10 and vggish_fad["reference"]["n_frames"] == 12
    assert vggish_fad["fad"] >= 0 and report["reference"]["n_clips"] == 6
    assert report["clap"]["n_pairs"] == 5 and -1 <= report["clap"]["score"] <= 1
    assert report["fad"]["clap"]["embedder"]["source"] == str(tiny_clap_dir)

    assert main(f"--reference {reference} --save-stats {stats}".split() + common) == 0
    assert "Saved reference statistics of 6 clips (vggish, clap)" in capsys.readouterr().out
    args = f"--audio-dir {generated} --reference {stats} --fad-inf --inf-min-n 4 --output-dir {out2}"
    assert main(args.split() + common) == 0
    from_stats = json.loads((out2 / "report.json").read_text())
    assert from_stats["fad"]["vggish"]["fad"] == pytest.approx(vggish_fad["fad"], rel=1e-6)
    assert from_stats["reference"]["kind"] == "stats"
    assert "fad_inf" in from_stats["fad"]["vggish"] and "FAD-inf(vggish)" in capsys.readouterr().out


def test_cli_generates_from_a_checkpoint_dir(tiny_pair, folders, tmp_path, capsys):
    reference, _ = folders
    out = tmp_path / "out"
    args = (
        f"--model {tiny_pair.student} --reference {reference} --seconds 0.5 --output-dir {out} --no-progress"
    )
    prompts = ["--prompt", "a slow flute melody", "--prompt", "a fast loud organ tune"]
    assert main(args.split() + prompts) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(tiny_pair.student) and report["n_clips"] == 2
    assert report["fad"]["encodec"]["fad"] >= 0  # default embedder: the checkpoint's own codec
    assert sorted(p.name for p in (out / "wavs").iterdir()) == ["000.wav", "001.wav", "metadata.jsonl"]
    assert "FAD(encodec)" in capsys.readouterr().out


def test_cli_errors_name_the_missing_piece(folders, tmp_path, tiny_vggish_path, tiny_clap_dir, capsys):
    """Every expected error: `error: ...` on stderr and exit status 2 (no traceback)."""
    reference, generated = folders

    def fails(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err.splitlines()[-1]), message

    fails(
        [
            "--audio-dir",
            str(generated),
            "--reference",
            str(reference),
            "--no-progress",
            "--embedder",
            "encodec",
        ],
        "^error: --embedder encodec needs a MusicGen checkpoint",
    )
    fails(
        ["--audio-dir", str(generated), "--embedder", f"vggish:{tiny_vggish_path}"], "FAD needs --reference"
    )
    nope = ["--reference", str(tmp_path / "nope"), "--embedder", "vggish:x"]
    fails(["--audio-dir", str(generated), *nope], "nope' does not exist")
    fails(
        ["--audio-dir", str(generated), "--reference", str(reference), "--embedder", "openl3"],
        "unknown embedder 'openl3'",
    )
    fails(
        ["--audio-dir", str(tmp_path / "missing"), "--clap", str(tiny_clap_dir)], "missing': not a directory"
    )
    (generated / "metadata.jsonl").unlink()
    fails(
        ["--audio-dir", str(generated), "--clap", str(tiny_clap_dir), "--no-progress"],
        "metadata.jsonl is missing",
    )


def test_cli_model_errors_name_the_path(tiny_pair, folders, tmp_path, capsys):
    """A .ckpt file is read as a checkpoint (it was reported as a missing directory); a file that is not one
    is named."""
    reference, _ = folders
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    common = ["--reference", str(reference), "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(["--model", str(checkpoint), "--base", str(tiny_pair.student), *common]) == 2
    err = capsys.readouterr().err
    assert f"error: {checkpoint}: not loaded" in err and "does not exist" not in err
    import torch

    torch.save({"state_dict": {"student.w": torch.zeros(1)}}, checkpoint)
    assert main(["--model", str(checkpoint), *common]) == 2  # no --base and no <run>/student
    assert "cannot tell the architecture" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_refuses_too_short_a_clip(tiny_pair, folders, tmp_path, capsys):
    """The generation's own frame check (models.generation) surfaces as `error: ...`, exit status 2."""
    reference, _ = folders
    args = (
        f"--model {tiny_pair.student} --reference {reference} --seconds 0.02 --output-dir {tmp_path / 'out'}"
    )
    assert main([*args.split(), "--no-progress", "--prompt", "a slow flute melody"]) == 2
    assert re.search(r"^error: 1 frames is too short: at least \d+", capsys.readouterr().err.splitlines()[-1])
    assert not (tmp_path / "out" / "report.json").exists()
