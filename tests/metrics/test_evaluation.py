"""Library side of the evaluation (metrics/evaluation.py): prompts files, and a whole run from Python."""

from __future__ import annotations

import pytest

from tinymusician.metrics import VGGishEmbedder
from tinymusician.metrics.embedders import EmbedderError
from tinymusician.metrics.evaluation import EvaluationError, build_embedders, read_prompts, run_evaluation


def test_prompts_from_text_and_csv_files(tmp_path):
    assert len(read_prompts(prompts_file="data/prompts/default.txt")) == 8  # resolves from the repo root
    (tmp_path / "caps.csv").write_text('ytid,caption\na,"a calm piano, soft"\nb,\nc,loud drums\n')
    assert read_prompts(prompts_file=tmp_path / "caps.csv") == ["a calm piano, soft", "loud drums"]
    assert read_prompts(["x", " y "], prompts_file=tmp_path / "ignored.txt", limit=1) == ["x"]
    (tmp_path / "bad.csv").write_text("ytid,text\na,b\n")
    with pytest.raises(EvaluationError, match="'caption' column"):
        read_prompts(prompts_file=tmp_path / "bad.csv")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(EvaluationError, match="no prompts in"):
        read_prompts(prompts_file=tmp_path / "empty.txt")


def test_run_evaluation_scores_a_folder_from_python(tmp_path, write_wav_folder, tiny_vggish_path):
    reference = write_wav_folder(tmp_path / "reference", 4, seconds=2.0, sample_rate=16000, seed=1)
    clips = write_wav_folder(tmp_path / "clips", 3, seconds=2.0, sample_rate=16000, seed=2)
    done = run_evaluation(
        [VGGishEmbedder(tiny_vggish_path)],
        audio_dir=clips,
        reference=reference,
        output_dir=tmp_path / "out",
        save_stats_to=tmp_path / "ref.safetensors",
        progress=False,
    )
    assert done.reference["n_clips"] == 4 and done.stats_path.is_file()
    assert done.report["audio_dir"] == str(clips) and done.report["n_clips"] == 3
    assert done.result["fad"]["vggish"]["fad"] >= 0 and done.report_path == tmp_path / "out" / "report.json"
    only_stats = run_evaluation(
        [VGGishEmbedder(tiny_vggish_path)], reference=reference, progress=False, output_dir=tmp_path / "out2"
    )
    assert only_stats.report is None and only_stats.reference["n_clips"] == 4


def test_build_embedders_uses_the_models_own_codec_only_where_asked():
    own = object()
    calls = []

    def own_codec():
        calls.append(1)
        return own

    specs = [{"name": "encodec"}, {"name": "encodec", "source": "student"}]
    built = build_embedders(specs, device="cpu", own_codec=own_codec, own_codec_sources=("", "student"))
    assert built == [own, own] and len(calls) == 2
    with pytest.raises(EmbedderError, match="needs a MusicGen checkpoint when scoring a folder"):
        build_embedders([{"name": "encodec"}], device="cpu")
