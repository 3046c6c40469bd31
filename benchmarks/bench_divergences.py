"""Cost of each divergence and of the stage_mixed loss relative to forward KL, measured side by side.

Shapes are MusicGen-Small-sized logits (B=4, K=4, T=500, V=2048, fp32) on CPU. Reported per method:
- time: median wall time of forward + backward over ``--repeats`` runs, methods interleaved round-robin so
  drift (thermal, other load) hits all of them alike; "x fkl" is the median over rounds of the ratio to the
  fkl run of the same round (neighbours in time), which this noisy 2-core machine disturbs least;
- peak: how far one forward + backward raises the process's resident memory above its level just before
  (VmHWM after resetting it via /proc/self/clear_refs, Linux), in a fresh subprocess per method after the
  inputs exist and one warm-up step: every temporary counts, not just what autograd keeps, and so does
  the student's gradient itself (one logits-sized tensor, 62.5 MiB);
- cpu: median process CPU time of the same runs (all threads summed); less sensitive than wall time to
  other load on the machine, which it does not count;
- saved: bytes autograd keeps for the backward pass (saved_tensors_hooks), the memory that stays alive
  between the forward and backward passes of a training step.
stage_mixed is measured at progress 0.45 (inside the transition), the only stage that needs both terms.
The target is stage_mixed <= 2x forward KL time; the script prints PASS/FAIL but always exits 0.

    python benchmarks/bench_divergences.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from tinymusician.distill import divergences as div
from tinymusician.distill.losses import build_loss
from tinymusician.training.memory import peak_resident_increase

SHAPE = (4, 4, 500, 2048)
TARGET = 2.0


def _autograd_fkl(student, teacher, valid):
    """Textbook forward KL through plain autograd, for context only."""
    log_q = torch.log_softmax(student.float(), -1)
    log_p = torch.log_softmax(teacher.float(), -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1) * valid
    return per_position.sum() / valid.sum()


def _methods() -> dict:
    stage_mixed = build_loss("stage_mixed")
    methods = {name: fn for name, fn in div.DIVERGENCES.items()}
    methods["skl + srkl (2 calls)"] = lambda s, t, v: (
        div.skewed_forward_kl(s, t, v) + div.skewed_reverse_kl(s, t, v)
    )
    methods["stage_mixed"] = lambda s, t, v: stage_mixed(s, t, v, 0.45).value
    methods["fkl (plain autograd)"] = _autograd_fkl
    return methods


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(SHAPE, generator=g) * 3).requires_grad_()
    teacher = torch.randn(SHAPE, generator=g) * 3
    valid = torch.rand(SHAPE[:-1], generator=g) > 0.1
    return student, teacher, valid


def _step(fn, student, teacher, valid) -> None:
    student.grad = None
    fn(student, teacher, valid).backward()


def _saved_bytes(fn, student, teacher, valid) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        # Views of the inputs (e.g. the student logits saved by a plain op) cost nothing extra.
        if t.untyped_storage().data_ptr() not in (student.untyped_storage().data_ptr(),):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(student, teacher, valid)
    out.backward()
    student.grad = None
    return sum(seen.values())


def _peak_child(name: str) -> None:
    """Subprocess entry: print how far one forward + backward of ``name`` raises resident memory (bytes)."""
    fn = _methods()[name]
    student, teacher, valid = _inputs()
    _step(fn, student, teacher, valid)  # warm-up: lazy initialisation is not the method's cost
    student.grad = None
    with peak_resident_increase() as peak:  # VmHWM reset to the current RSS first (Linux)
        _step(fn, student, teacher, valid)
    print(json.dumps({"peak": peak.increase}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(args.peak_child)
        return

    methods = _methods()
    student, teacher, valid = _inputs()
    for fn in methods.values():  # warm-up (allocator, thread pool)
        _step(fn, student, teacher, valid)
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(fn, student, teacher, valid)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    saved = {name: _saved_bytes(fn, student, teacher, valid) for name, fn in methods.items()}
    peak = {}
    for name in methods:
        cmd = [sys.executable, __file__, "--peak-child", name]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        # Every allocation >= 64 KiB gets its own mapping, returned on free: resident memory then tracks
        # live tensors instead of whatever the heap happened to keep from earlier steps.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        peak[name] = json.loads(out.strip().splitlines()[-1])["peak"]

    ref = "fkl"
    median = {name: statistics.median(t) for name, t in times.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu.items()}

    def paired(samples: dict[str, list[float]], name: str) -> float:
        return statistics.median(a / b for a, b in zip(samples[name], samples[ref], strict=True))

    mb = 2**20
    print(
        f"logits {SHAPE} fp32 ({student.numel() * 4 / mb:.1f} MiB each), {torch.get_num_threads()} threads, "
        f"median of {args.repeats}, forward+backward"
    )
    header = (
        f"{'method':<22}{'time ms':>9}{'x fkl':>7}{'cpu ms':>9}{'x fkl':>7}"
        f"{'peak MiB':>10}{'x fkl':>7}{'saved MiB':>10}{'x fkl':>7}"
    )
    print(header)
    print("-" * len(header))
    for name in methods:
        print(
            f"{name:<22}{median[name] * 1e3:>9.1f}{paired(times, name):>7.2f}"
            f"{median_cpu[name] * 1e3:>9.1f}{paired(cpu, name):>7.2f}"
            f"{peak[name] / mb:>10.0f}{peak[name] / max(peak[ref], 1):>7.2f}"
            f"{saved[name] / mb:>10.0f}{saved[name] / max(saved[ref], 1):>7.2f}"
        )
    ratio = paired(times, "stage_mixed")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"\nstage_mixed / fkl time = {ratio:.2f} (target <= {TARGET:.1f}): {verdict}")


if __name__ == "__main__":
    main()
