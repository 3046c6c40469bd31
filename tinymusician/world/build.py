"""Build the tiny world from scratch: codec -> teacher (one process) next to CLAP (another), then the report.

Every stage is bounded by steps, seeded and single-threaded, so a rebuild on the same software gives the same
models. The two chains run in parallel processes (one CPU thread each); ``full`` is the shipped budget.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinymusician.data.synthetic import heldout_clips
from tinymusician.machine import machine
from tinymusician.world.clap import ClapRecipe
from tinymusician.world.codec import SAMPLE_RATE, CodecRecipe
from tinymusician.world.lm import TeacherRecipe

log = logging.getLogger(__name__)

CODEC_HELDOUT_CLIPS = 48
CODEC_HANDOFF = "codec"  # the trained codec, handed from the codec chain to the CLAP chain (not shipped)


@dataclass(frozen=True)
class Budget:
    codec: CodecRecipe = field(default_factory=CodecRecipe)
    clap: ClapRecipe = field(default_factory=ClapRecipe)
    teacher: TeacherRecipe = field(default_factory=TeacherRecipe)
    eval_clips: int = 64  # held-out prompts / reference clips of the world report


BUDGETS = {
    "full": Budget(),
    # the slow test's rebuild: minutes, and still every ordering the report checks
    "small": Budget(
        codec=CodecRecipe(steps=240, autoencoder_steps=80, spectral_after=100, corpus_clips=128),
        clap=ClapRecipe(steps=300, train_clips=512, warmup_steps=30, codec_clips=96),
        teacher=TeacherRecipe(clips=1024, steps=500, warmup_steps=30),
        eval_clips=24,
    ),
}


class Stage:
    """One stage's progress bar and training curve: ``on_step(step, row)`` advances one and samples the other."""

    def __init__(self, total: int, desc: str, position: int, enabled: bool, every: int | None = 10) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, position=position, disable=not enabled, mininterval=2.0)
        self.every, self.curve = every, []

    def on_step(self, step: int, row: dict) -> None:
        self.bar.update(1)
        if self.every and step % self.every == 0:
            self.curve.append({"step": step, **row})

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def codec_and_teacher(budget: Budget, out: Path, progress: bool) -> dict:
    """Stage chain 1: train and evaluate the codec, build the pair around it, train the teacher, save both."""
    from tinymusician.models.musicgen import save_musicgen
    from tinymusician.world.codec import evaluate_codec, train_codec, untrained_codec
    from tinymusician.world.lm import build_pair, train_teacher

    torch.set_num_threads(1)
    report: dict = {}
    start = time.perf_counter()
    with Stage(budget.codec.steps, "codec", 0, progress, every=20) as codec_stage:
        codec = train_codec(budget.codec, codec_stage.on_step)
    report["codec_train_seconds"] = round(time.perf_counter() - start, 1)
    heldout = torch.from_numpy(
        np.stack([c.audio for c in heldout_clips(CODEC_HELDOUT_CLIPS, sample_rate=SAMPLE_RATE)])
    )
    report["codec"] = {
        "recipe": asdict(budget.codec),
        "trained": evaluate_codec(codec, heldout),
        "untrained": evaluate_codec(untrained_codec(budget.codec), heldout),
        "curve": codec_stage.curve,
    }
    codec.save_pretrained(out / CODEC_HANDOFF)  # the CLAP chain trains on its reconstructions
    (out / CODEC_HANDOFF / "DONE").touch()
    teacher, student, tokenizer = build_pair(codec)
    save_musicgen(student, tokenizer, out / "student")
    start = time.perf_counter()
    with Stage(
        budget.teacher.steps, "teacher", 0, progress, every=None
    ) as stage:  # train_teacher keeps the curve
        with tempfile.TemporaryDirectory(prefix="world-codes-") as cache:
            result = train_teacher(teacher, tokenizer, budget.teacher, Path(cache), stage.on_step)
    save_musicgen(teacher, tokenizer, out / "teacher")
    report["teacher"] = {"recipe": asdict(budget.teacher), **result}
    report["teacher_train_seconds"] = round(time.perf_counter() - start, 1)
    return report


def clap_chain(budget: Budget, out: Path, progress: bool) -> dict:
    """Stage chain 2: render the CLAP's clips, wait for the codec, train the tiny CLAP, save it."""
    from transformers import EncodecModel

    from tinymusician.world.clap import clap_pool, train_clap

    torch.set_num_threads(1)
    pool = clap_pool(budget.clap)
    while not (out / CODEC_HANDOFF / "DONE").exists():
        if (out / "FAILED").exists():
            raise RuntimeError("the codec chain failed; the CLAP needs its codec")
        time.sleep(2)
    codec = EncodecModel.from_pretrained(out / CODEC_HANDOFF).eval()
    start = time.perf_counter()
    with Stage(budget.clap.steps, "clap", 1, progress) as stage:
        model, processor = train_clap(budget.clap, stage.on_step, pool=pool, codec=codec)
    model.save_pretrained(out / "clap")
    processor.save_pretrained(out / "clap")
    return {
        "clap": {"recipe": asdict(budget.clap), "curve": stage.curve},
        "clap_train_seconds": round(time.perf_counter() - start, 1),
    }


def build_world(out: Path, budget_name: str = "full", *, progress: bool = True, jobs: int = 2) -> dict:
    """Train every part into ``out`` (written to a staging directory, moved in place when all succeeded)."""
    if budget_name not in BUDGETS:
        raise ValueError(f"--budget {budget_name!r}: unknown; choose one of {sorted(BUDGETS)}")
    budget = BUDGETS[budget_name]
    out = Path(out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, 2)), mp_context=context) as pool:
        chains = [
            pool.submit(codec_and_teacher, budget, staging, progress),
            pool.submit(clap_chain, budget, staging, progress),
        ]
        report: dict = {}
        try:
            for chain in chains:
                report.update(chain.result())
        except BaseException:
            (staging / "FAILED").touch()  # the CLAP chain stops waiting for a codec that will not come
            raise
    shutil.rmtree(staging / CODEC_HANDOFF)
    report["budget"] = budget_name
    report["eval_clips"] = budget.eval_clips
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    report["machine"] = machine(threads_per_stage=1)
    (staging / "build.json").write_text(json.dumps(report, indent=1))
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return report
