"""What the teacher-logit cache keeps and what it saves, on the embedded default (the shipped tiny world).

1. Error of the sparse top-k teacher against the dense one, per divergence, for k = 8, 32, 128 and V (256),
   both tail treatments, the cache's storage format (fp16 log-probs, int16 ids), at T = 1 and T = 2: relative
   error of the loss value and of the gradient w.r.t. the student logits (L2), on N validation segments of the
   synthetic corpus; student = the shipped untrained one (what training starts from) or ``--student DIR``.
2. Training-step time relative to a CE-only step of the same student on the same batch: KD (the kd_only
   experiment's loss, stage_mixed) with a live fp32 teacher, a live bf16 teacher, the teacher's logits already in
   memory (the floor of any teacher source: the KD term alone), and from the cache (k = 32). ``--scale wide``
   times a random pair with V = 2048 and wider decoders instead of the tiny world.
   Methods run interleaved round-robin; "x ce" is the median over rounds of the ratio to the CE step of the same
   round. Peak memory: how far one step raises resident memory (VmHWM after a reset), in a fresh subprocess per
   method, plus the resident size of the loaded models.
3. The cache build's throughput (positions per second: segments x codebooks x delayed steps).

    python benchmarks/bench_teacher_cache.py [--repeats 15] [--threads 2] [--student DIR] [--scale wide]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from tinymusician.data.segments import CaptionCollator
from tinymusician.distill import divergences as div
from tinymusician.distill.losses import build_loss
from tinymusician.distill.module import DistillationModule
from tinymusician.distill.sparse import SparseTeacher
from tinymusician.distill.teacher_cache import TeacherCacheError
from tinymusician.machine import machine
from tinymusician.models.musicgen import teacher_forcing
from tinymusician.training.checks import check_config
from tinymusician.training.memory import peak_resident_increase, resident_bytes
from tinymusician.training.teacher_logits import build_for_run, open_for_run
from tinymusician.zoo.pair import load_teacher_student
from tinymusician.zoo.source import compose_config
from tinymusician.zoo.tiny import DecoderSize, TinySpec, build_untrained_pair

KS = (8, 32, 128, 256)
STEP_METHODS = ("ce", "kd live fp32", "kd live bf16", "kd logits in memory", "kd cache k=32")
# --scale wide: a random pair with MusicGen's vocabulary (2048) and wider decoders, so the student's own compute
# weighs against the KD term the way it does at MusicGen scale (the tiny student is so small that the KD
# divergence alone costs half its step)
WIDE = {"codebook_size": 2048, "teacher": (512, 8, 8, 2048), "student": (256, 4, 4, 1024)}


class LogitsInMemory:
    """The floor of any teacher source: the teacher's dense logits of the benchmark's batch, already computed."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def lookup(self, split: str, indices: torch.Tensor, vocab: int) -> torch.Tensor:
        return self.logits


TARGET_CACHE = 1.15


def compose_cfg(overrides: list[str], cache_dir: str):
    # distill.cache.dir follows paths.cache_dir (conf/train.yaml)
    return compose_config(["+experiment=kd_only", "eval=none", f"paths.cache_dir={cache_dir}", *overrides])


def batch_of(datamodule, split: str, n: int) -> dict:
    dataset = datamodule.dataset(split)
    return CaptionCollator(datamodule.tokenizer, datamodule.max_text_tokens)([dataset[i] for i in range(n)])


# --- 1. sparse vs dense --------------------------------------------------------------------------------------
def sparse_errors(cache_dir: str, n: int, student: str) -> list[dict]:
    cfg = compose_cfg([f"data.num_val={max(n, 8)}", f"model.student={student}"], cache_dir)
    _, datamodule, _ = check_config(cfg)
    models = load_teacher_student(cfg.model)
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    batch = batch_of(datamodule, "val", n)
    forcing = teacher_forcing(models.student, batch)
    with torch.no_grad():
        student, teacher = forcing.logits(models.student), forcing.logits(models.teacher)
    valid = forcing.delayed.valid
    stage_mixed = build_loss("stage_mixed")
    losses = {
        **{name: fn for name, fn in div.DIVERGENCES.items()},
        "stage_mixed@0.45": lambda s, t, v, temperature: stage_mixed(s, t, v, 0.45).value,
    }
    rows = []
    for name, fn in losses.items():
        for temperature in (1.0, 2.0):
            kwargs = {"temperature": temperature}

            def value_grad(target, fn=fn, kwargs=kwargs):
                s = student.clone().requires_grad_(True)
                value = fn(s, target, valid, **kwargs)
                value.backward()
                return float(value), s.grad

            dense_value, dense_grad = value_grad(teacher)
            for tail in ("bucket", "spread"):
                for k in KS:
                    sparse = SparseTeacher.from_logits(teacher, k, tail=tail).compact()
                    value, grad = value_grad(sparse)
                    rows.append(
                        {
                            "loss": name,
                            "T": temperature,
                            "tail": tail,
                            "k": k,
                            "dense": dense_value,
                            "value_rel_err": abs(value - dense_value) / abs(dense_value),
                            "grad_rel_err": float((grad - dense_grad).norm() / dense_grad.norm()),
                        }
                    )
    return rows


# --- 2. step time and memory -------------------------------------------------------------------------------
def build_module(method: str, cache_dir: str, pair: list[str]) -> tuple[DistillationModule, dict]:
    overrides = ["data.num_train=64", "data.num_val=16", "cond_dropout=0.0", *pair]
    if method == "ce":
        overrides += ["loss=ce", "model.teacher=null"]
    elif method == "kd live bf16":
        overrides += ["model.teacher_dtype=bfloat16"]
    elif method.startswith("kd cache"):
        overrides += ["distill.teacher_source=cache", "distill.cache.k=32"]
    cfg = compose_cfg(overrides, cache_dir)
    loss, datamodule, _ = check_config(cfg)
    cached = method.startswith("kd cache")
    models = load_teacher_student(cfg.model, load_teacher=not cached)
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    teacher_cache = None
    batch = batch_of(datamodule, "train", int(cfg.data.batch_size))
    if method == "kd logits in memory":
        with torch.no_grad():
            teacher_cache = LogitsInMemory(teacher_forcing(models.student, batch).logits(models.teacher))
        models.teacher = None
    if cached:
        try:
            teacher_cache, _ = open_for_run(cfg, datamodule)
        except TeacherCacheError:  # build it once (the teacher loaded just for that), then train without it
            build_for_run(cfg, load_teacher_student(cfg.model).teacher, datamodule, progress=False)
            teacher_cache, _ = open_for_run(cfg, datamodule)
    module = DistillationModule(
        student=models.student,
        teacher=models.teacher,
        loss=loss,
        optimizer=instantiate(cfg.optim.optimizer),
        teacher_cache=teacher_cache,
    )
    module.train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    return module, {"batch": batch, "optimizer": optimizer}


def step(module: DistillationModule, state: dict) -> None:
    loss, _ = module.training_loss(state["batch"])
    loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad(set_to_none=True)


def peak_child(method: str, cache_dir: str, pair: list[str]) -> None:
    """Subprocess entry: one warm-up step, then the peak resident increase of one step (bytes)."""
    module, state = build_module(method, cache_dir, pair)
    step(module, state)
    loaded = resident_bytes()[0]
    with peak_resident_increase() as peak:
        step(module, state)
    print(json.dumps({"peak": peak.increase, "resident": loaded}))


def step_times(cache_dir: str, repeats: int, pair: list[str]) -> dict:
    modules = {method: build_module(method, cache_dir, pair) for method in STEP_METHODS}
    for module, state in modules.values():
        step(module, state)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in STEP_METHODS}
    for _ in range(repeats):
        for method, (module, state) in modules.items():
            start = time.perf_counter()
            step(module, state)
            times[method].append(time.perf_counter() - start)
    return times


def wide_pair(root: Path) -> list[str]:
    """Save a random pair of WIDE's shapes (shared T5 and codec, random decoders); its model overrides."""
    spec = TinySpec(
        codebook_size=WIDE["codebook_size"],
        teacher=DecoderSize(*WIDE["teacher"]),
        student=DecoderSize(*WIDE["student"]),
    )
    teacher, student, tokenizer = build_untrained_pair(spec)
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return [f"model.teacher={root / 'teacher'}", f"model.student={root / 'student'}"]


# --- 3. cache build throughput -------------------------------------------------------------------------------
def build_throughput(cache_dir: str) -> dict:
    cfg = compose_cfg(["distill.cache.k=32"], cache_dir)
    _, datamodule, _ = check_config(cfg)
    models = load_teacher_student(cfg.model)
    datamodule.attach(models.student, models.tokenizer)
    datamodule.setup("fit")
    _, report = build_for_run(cfg, models.teacher, datamodule, progress=False)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--segments", type=int, default=16, help="validation segments for the error table")
    parser.add_argument(
        "--student",
        default="tiny",
        help="student of the error table (default: the shipped untrained one; a trained save_pretrained dir "
        "shows the errors later in training)",
    )
    parser.add_argument(
        "--scale",
        choices=("tiny", "wide"),
        default="tiny",
        help="pair of the step timing: the shipped tiny world, or a random wide pair with V=2048 (see WIDE)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--pair", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child:
        peak_child(args.peak_child, args.cache_dir, args.pair)
        return
    cache_dir = tempfile.mkdtemp(prefix="tm-bench-cache-")
    os.environ["TINYMUSICIAN_CACHE"] = cache_dir

    errors = sparse_errors(cache_dir, args.segments, args.student)
    print(
        f"1. sparse top-k teacher vs dense, relative error of the loss value / of its gradient: N={args.segments} "
        f"val segments, the shipped tiny teacher (V=256), student {args.student}, fp16 storage"
    )
    print(f"{'loss':<17}{'T':>4}{'tail':>8}" + "".join(f"{'k=' + str(k):>16}" for k in KS))
    print(f"{'':<29}" + "".join(f"{'value / grad':>16}" for _ in KS))
    for name in dict.fromkeys(r["loss"] for r in errors):
        for temperature in (1.0, 2.0):
            for tail in ("bucket", "spread"):
                cells = {
                    r["k"]: r for r in errors if (r["loss"], r["T"], r["tail"]) == (name, temperature, tail)
                }
                print(
                    f"{name:<17}{temperature:>4.0f}{tail:>8}"
                    + "".join(
                        f"{cells[k]['value_rel_err'] * 100:>8.2f}%{cells[k]['grad_rel_err'] * 100:>7.1f}%"
                        for k in KS
                    )
                )

    pair = wide_pair(Path(cache_dir) / "wide") if args.scale == "wide" else []
    times = step_times(cache_dir, args.repeats, pair)
    peaks = {}
    for method in STEP_METHODS:
        cmd = [
            sys.executable,
            __file__,
            "--peak-child",
            method,
            "--cache-dir",
            cache_dir,
            "--threads",
            str(args.threads),
            "--pair",
            *pair,
        ]
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": "65536",
        }  # freed tensors leave the heap: RSS tracks live data
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        peaks[method] = json.loads(out.strip().splitlines()[-1])

    def paired(method: str) -> float:
        return statistics.median(a / b for a, b in zip(times[method], times["ce"], strict=True))

    mib = 2**20
    print(
        f"\n2. training step (forward + backward + AdamW), batch 16 x 2 s, {args.threads} threads, median of "
        f"{args.repeats} interleaved rounds; pair: "
        + ("the shipped tiny world (V=256)" if args.scale == "tiny" else f"random wide {WIDE}")
    )
    print(f"{'method':<20}{'ms':>9}{'x ce':>7}{'step peak MiB':>15}{'resident MiB':>14}")
    for method in STEP_METHODS:
        print(
            f"{method:<20}{statistics.median(times[method]) * 1e3:>9.1f}{paired(method):>7.2f}"
            f"{peaks[method]['peak'] / mib:>15.1f}{peaks[method]['resident'] / mib:>14.1f}"
        )
    cache_ratio = paired("kd cache k=32")
    print(
        f"cache / ce = {cache_ratio:.2f} (target <= {TARGET_CACHE}): "
        f"{'PASS' if cache_ratio <= TARGET_CACHE else 'FAIL'}; cache / logits in memory = "
        f"{cache_ratio / paired('kd logits in memory'):.2f} (what the cache itself adds); "
        f"bf16 teacher / fp32 teacher = {paired('kd live bf16') / paired('kd live fp32'):.2f} "
        f"(CPU: {machine()['cpu']})"
    )

    report = build_throughput(cache_dir) if args.scale == "tiny" else None
    if report is not None:
        print(
            f"\n3. cache build: {report['computed_positions']:,} positions (512 + 64 segments x 4 codebooks x delayed steps) "
            f"in {report['seconds']:.1f} s = {report['positions_per_second']:,.0f} positions/s; "
            f"{report['megabytes']:.2f} MB on disk at k=32"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(threads=args.threads),
                    "errors": errors,
                    "times": times,
                    "peaks": peaks,
                    "build": report,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
