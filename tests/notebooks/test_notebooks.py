"""The notebooks in notebooks/: committed without outputs, and each one runs top to bottom on this venv's kernel."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
ABLATION_RUNS = ROOT / "experiments" / "results" / "ablation" / "data"
KERNEL = "tinymusician-tests"
CELL_TIMEOUT = 300  # seconds per cell: generous for a busy 2-core machine; the slowest cell takes a few
# The notebooks' parameters: each execution sets the ones it needs and unsets the rest.
PARAMETERS = ("TINYMUSICIAN_RUNS_DIR", "TINYMUSICIAN_EVAL_DIR", "TINYMUSICIAN_STUDENT")
# What nbstripout (the pre-commit hook) removes besides outputs and counts.
NOTEBOOK_METADATA_OF_A_RUN = {"signature", "widgets"}
CELL_METADATA_OF_A_RUN = {"collapsed", "ExecuteTime", "execution", "heading_collapsed", "hidden", "scrolled"}


def unstripped(nb: nbformat.NotebookNode) -> list[str]:
    """What a committed notebook must not carry: outputs, execution counts, widget state, timing metadata."""
    problems = [f"notebook metadata {key!r}" for key in sorted(NOTEBOOK_METADATA_OF_A_RUN & set(nb.metadata))]
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.get("outputs"):
            problems.append(f"cell {index} has outputs")
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            problems.append(f"cell {index} has an execution count")
        for key in sorted(CELL_METADATA_OF_A_RUN & set(cell.metadata)):
            problems.append(f"cell {index} has metadata {key!r}")
    return problems


def test_the_three_notebooks_are_there() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_ablation_report.ipynb",
        "02_divergences_and_schedule.ipynb",
        "03_listen.ipynb",
    ], "a notebook added to notebooks/ needs an execution test below"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert unstripped(nb) == [], f"{path.name}: strip it (`nbstripout {path.relative_to(ROOT)}`)"


# --- execution ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec that runs this very interpreter (not whichever ``python`` a PATH or another spec names),
    found first through JUPYTER_PATH; the kernel's Jupyter and IPython state goes to temporary folders."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(root))
        env.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
        env.setenv("IPYTHONDIR", str(root / "ipython"))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TINYMUSICIAN_CACHE", str(root / "cache"))
        env.setenv("OMP_NUM_THREADS", "1")  # toy tensors and tiny models: threads only wait for each other
        yield KERNEL


def execute(name: str, **parameters: str) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` in notebooks/ (as Jupyter does) with the given parameters; fails on any error."""
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    before = sorted(NOTEBOOKS_DIR.rglob("*"))
    with pytest.MonkeyPatch.context() as env:
        for key in PARAMETERS:
            env.delenv(key, raising=False)
        for key, value in parameters.items():
            env.setenv(key, value)
        client = NotebookClient(
            nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
        )
        client.execute()
    assert sorted(NOTEBOOKS_DIR.rglob("*")) == before, "executing the notebook wrote into notebooks/"
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in outputs(nb) if o.output_type == "stream" and o.name == "stdout")


def displayed(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o.data[mime] for o in outputs(nb) if mime in o.get("data", {})]


def markdown_rows(text: str) -> dict[str, list[str]]:
    """A markdown table's body as {first cell: the other cells}."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()]
    return {row[0]: row[1:] for row in rows[2:]}


def test_the_kernel_runs_this_interpreter(kernel: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT).execute()
    assert Path(stdout(nb).strip()).resolve() == Path(sys.executable).resolve()


def write_run(root: Path, arm: str, seed: int, val_ce: float | None) -> None:
    """A run directory as ``python -m tinymusician.train`` leaves it (the files the report reads); None: failed."""
    directory = root / f"{arm}_seed{seed}"
    (directory / ".hydra").mkdir(parents=True)
    (directory / "csv").mkdir()
    (directory / ".hydra" / "overrides.yaml").write_text(f"- +experiment={arm}\n- seed={seed}\n")
    summary = {"task": arm, "seed": seed, "status": "finished" if val_ce is not None else "failed"}
    if val_ce is None:
        summary["error"] = "RuntimeError: the loss diverged"
    else:
        summary["after"] = {"val/ce": val_ce, "val/kl_to_teacher": val_ce / 4}
        summary["post_training"] = {"eval/clap": 0.5 + seed / 100}
        (directory / "csv" / "metrics.csv").write_text(f"step,val/ce\n10,{val_ce + 1}\n20,{val_ce}\n")
    (directory / "summary.json").write_text(json.dumps(summary))


def test_ablation_report_has_a_row_per_arm(kernel: str, tmp_path: Path) -> None:
    for arm, seed, val_ce in [
        ("baseline", 0, 3.0),
        ("baseline", 1, 3.2),
        ("kd_only", 0, 2.6),
        ("kd_only", 1, 2.8),
        ("kd_only", 2, None),
    ]:
        write_run(tmp_path, arm, seed, val_ce)
    nb = execute("01_ablation_report.ipynb", TINYMUSICIAN_RUNS_DIR=str(tmp_path))

    table, per_seed = displayed(nb, "text/markdown")[0], displayed(nb, "text/markdown")[-1]
    rows = markdown_rows(table)
    assert list(rows) == ["baseline", "kd_only"]
    columns = table.splitlines()[0].strip("|").split("|")
    val_ce = next(i for i, title in enumerate(columns) if "val CE" in title) - 1
    assert rows["baseline"][0] == "2" and rows["baseline"][val_ce].startswith("3.100 ± 0.141")
    assert rows["kd_only"][0].startswith("2") and rows["kd_only"][val_ce].startswith("2.700 ± 0.141")
    assert "not finished" in rows["kd_only"][0]  # the failed seed is named, not averaged
    assert len(displayed(nb, "image/png")) >= 2  # the bars per metric and the validation curves
    assert len(per_seed.splitlines()) == 2 + 5 and "failed" in per_seed


def test_ablation_report_on_the_committed_runs(kernel: str) -> None:
    if not ABLATION_RUNS.is_dir():
        pytest.skip(f"{ABLATION_RUNS.relative_to(ROOT)} is not in the checkout")
    from tinymusician.results import load_runs

    nb = execute("01_ablation_report.ipynb")  # the notebook's default runs directory
    assert set(markdown_rows(displayed(nb, "text/markdown")[0])) == {r.arm for r in load_runs(ABLATION_RUNS)}


def test_divergences_notebook_fits_cover_and_seek(kernel: str) -> None:
    nb = execute("02_divergences_and_schedule.ipynb")
    assert unstripped(nb)  # the committed-notebook check does catch an executed notebook
    line = next(line for line in stdout(nb).splitlines() if line.startswith("FITS_JSON "))
    fits = json.loads(line.removeprefix("FITS_JSON "))
    covering, seeking = fits["FKL"], fits["RKL"]
    assert covering["sigma"] > 2 * seeking["sigma"]  # forward KL spreads over both modes ...
    assert 12.0 < covering["mu"] < 28.0
    assert min(abs(seeking["mu"] - mode) for mode in (12.0, 28.0)) < 1.0  # ... reverse KL sits on one
    assert all(fit["value"] >= 0 for fit in fits.values())
    assert re.search(r"logged w: 1\.00 -> 0\.20, T: 2\.00 -> 1\.00", stdout(nb))  # conf/loss/stage_mixed.yaml
    assert len(displayed(nb, "image/png")) >= 6


def audio_players(nb: nbformat.NotebookNode) -> int:
    return sum("<audio" in html for html in displayed(nb, "text/html"))


def test_listen_notebook_generates_and_shows_clips(kernel: str) -> None:
    nb = execute("03_listen.ipynb")
    assert audio_players(nb) == 3 * 3  # three captions: reference, teacher, student
    assert "teacher: 3 clips of 2.00 s" in stdout(nb) and "student: 3 clips of 2.00 s" in stdout(nb)
    assert len(displayed(nb, "image/png")) == 1  # the spectrogram grid


def test_listen_notebook_reads_an_eval_folder(kernel: str, tmp_path: Path) -> None:
    import torch

    from tinymusician.data.synthetic import heldout_clips
    from tinymusician.metrics.audio import write_wav

    clips = heldout_clips(4, seconds=1.0, sample_rate=16000)  # as evaluation writes them: held-out captions
    folder = tmp_path / "eval" / "final" / "student"
    folder.mkdir(parents=True)
    rows = []
    for index, clip in enumerate(clips):
        write_wav(folder / f"{index:03d}.wav", torch.from_numpy(clip.audio), 16000)
        rows.append(json.dumps({"file_name": f"{index:03d}.wav", "caption": clip.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    nb = execute("03_listen.ipynb", TINYMUSICIAN_EVAL_DIR=str(folder.parent))
    assert "student: 4 clips" in stdout(nb)
    assert audio_players(nb) == 3 * 2  # three captions: the reference and the folder's clip
    assert "no held-out clip has this caption" not in stdout(nb)
