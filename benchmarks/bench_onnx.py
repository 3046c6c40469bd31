"""Real-time factor, peak memory and size of PyTorch vs ONNX Runtime generation, side by side in one run.

Model: a random-weight model with MusicGen-Small's architecture (see bench_quant.py; no download), or
``--tiny`` for the embedded tiny student (seconds). It is saved once, exported once (fp32, int8, int4), then
each backend generates the same prompt in its own process (so peak RSS is that backend's alone):

- ``torch-fp32``  transformers' ``generate`` (eager PyTorch, fp32)
- ``torch-int8``  the same after TinyMusician's int8 plan (dynamic int8 decoder + T5)
- ``ort-fp32`` / ``ort-int8`` / ``ort-int4``  :class:`TinyMusicianONNX` on the exported graphs

Every run: ``--seconds`` of audio (10), classifier-free guidance 3, top-k 250 sampling, seed 0, batch 1,
``--threads`` CPU threads (2). RTF = seconds of compute (text encoder + decoding + codec decoder) per second
of audio; below 1.0 is faster than real time. Backends run in turn, ``--rounds`` times round-robin; the best
round counts. Targets: ORT int8 RTF <= 1.0 and >= 3x faster than PyTorch fp32 eager. Exits 0 either way.

``--guidance-scale 1`` times one pass per step instead (no unconditional half: transformers and the runtime
both skip the doubled batch at scale <= 1); ``--decoder-layers N`` keeps only the first N decoder layers (a
shallower student of the same width). ``bench_student_speed.py`` compares both, reusing this script.

``--int8-weights-too`` also exports ONNX Runtime's default int8 weights (U8S8, the bundle format before
uint8 weights; it saturates on AVX2 CPUs without VNNI, see tinymusician/onnx/export.py) and times it as
``ort-int8-s8`` beside the bundle's uint8 weights, to show what exactness costs on this CPU.

    python benchmarks/bench_onnx.py [--seconds 10] [--rounds 1] [--threads 2] [--tiny] [--backends ...]
                                    [--guidance-scale 3] [--decoder-layers N] [--batch 1] [--stream]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BACKENDS = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8", "ort-int4")
PRECISIONS = ("fp32", "int8", "int4")  # what the bundle is exported in
S8 = "int8-s8"  # the comparison-only precision: int8 (U8S8) weights, exported as onnx/*_int8.onnx


def register_s8() -> None:
    """Teach the exporter the comparison precision (this process only; each backend loads in its own)."""
    from functools import partial

    from tinymusician.onnx import export, layout

    layout.PRECISIONS[S8] = "_int8"
    export.QUANTIZERS[S8] = partial(export.quantize_int8, weights="int8")


def split_s8(bundle: Path, manifest: dict) -> dict:
    """Move the comparison graphs into ``<bundle>-s8``, a bundle whose ``int8`` are them (hard links, no copy),
    so the runtime loads both unchanged; the main bundle's manifest is back to fp32, int8, int4."""
    import os
    import shutil

    from tinymusician.onnx.layout import QUANTIZABLE, graph_file

    other = bundle.with_name(f"{bundle.name}-s8")
    shutil.copytree(bundle, other, copy_function=os.link)
    s8_manifest = json.loads(json.dumps(manifest))
    for graph in QUANTIZABLE:
        legacy, target = f"onnx/{graph}_int8.onnx", graph_file(graph, "int8")
        (other / target).unlink()
        (other / legacy).rename(other / target)
        s8_manifest["files"][target] = {**manifest["files"].pop(legacy), "precision": "int8"}
        del s8_manifest["files"][legacy]
        (bundle / legacy).unlink()
    manifest["precisions"].remove(S8)
    s8_manifest["precisions"] = list(manifest["precisions"])
    s8_manifest["quantization"]["int8"] = {
        **manifest["quantization"]["int8"],
        "weights": "int8",
        "kernel": "U8S8",
    }
    for path, content in ((bundle, manifest), (other, s8_manifest)):
        (path / "manifest.json").unlink()  # a hard link shared by both bundles until now
        (path / "manifest.json").write_text(json.dumps(content, indent=2))
    return s8_manifest


PROMPT = "lo-fi hip hop beat with warm piano chords and vinyl crackle"


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    # read here, not through tinymusician.training.memory: the ORT workers must not import torch
    status = Path("/proc/self/status").read_text(encoding="ascii")
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def stage_clock(model) -> dict[str, list[float]]:
    """Times the text encoder and every decoder step through forward hooks (transformers' ``generate`` is
    untouched), so PyTorch reports the same stages as :class:`TinyMusicianONNX`'s ``last_stats``."""

    times: dict[str, list[float]] = {"text": [], "steps": []}
    for module, key in ((model.text_encoder, "text"), (model.decoder, "steps")):
        module.register_forward_pre_hook(lambda *_, key=key: times[key].append(time.perf_counter()))
        module.register_forward_hook(lambda *_, key=key: times[key].append(time.perf_counter()))
    return times


def worker(args: argparse.Namespace) -> None:
    """One generation in this process; prints one JSON line."""
    if args.backend.startswith("ort"):
        import numpy as np

        from tinymusician.onnx.runtime import TinyMusicianONNX

        path, precision = args.bundle, args.backend.removeprefix("ort-")
        if precision == S8:
            path, precision = f"{args.bundle}-s8", "int8"
        model = TinyMusicianONNX(path, precision=precision, threads=args.threads)
        loaded = peak_rss_mb()
        audio = model.generate(
            [PROMPT] * args.batch, args.seconds, guidance_scale=args.guidance_scale, seed=0
        )
        stats = model.last_stats
        if args.stream:  # the same codes again (same seed), streamed: time to first audio, and the seams
            chunks = list(
                model.stream([PROMPT] * args.batch, args.seconds, guidance_scale=args.guidance_scale, seed=0)
            )
            stats = {
                **stats,
                "first_audio_s": model.last_stats["first_audio_s"],
                "stream_rtf": model.last_stats["rtf"],
                "stream_max_diff": float(np.abs(np.concatenate(chunks, axis=1) - audio).max()),
            }
    else:
        import torch

        from tinymusician.models.generation import torch_generate
        from tinymusician.models.musicgen import load_musicgen, load_tokenizer

        torch.set_num_threads(args.threads)
        model = load_musicgen(args.model_dir).eval()
        if args.backend == "torch-int8":
            from tinymusician.quant import quantize_model, resolve_plan

            model = quantize_model(model, resolve_plan("int8"))
        tokenizer = load_tokenizer(args.model_dir)
        loaded = peak_rss_mb()
        frame_rate = int(model.config.audio_encoder.frame_rate)
        frames = round(args.seconds * frame_rate)
        times = stage_clock(model)
        started = time.perf_counter()
        torch_generate(
            model, tokenizer, [PROMPT] * args.batch, frames, guidance_scale=args.guidance_scale, seed=0
        )
        finished = time.perf_counter()
        compute, encoded, decoded = finished - started, times["text"][-1], times["steps"][-1]
        stats = {
            "text_encoder_s": encoded - started,
            "decoder_s": decoded - encoded,
            "decoder_step_ms": 1000 * (decoded - encoded) / (len(times["steps"]) // 2),
            "encodec_decode_s": finished - decoded,  # with the last step's sampling, as the runtime's
            "compute_s": compute,
            "audio_s": frames / frame_rate,
            "rtf": compute * frame_rate / frames,
        }
    print(json.dumps({**stats, "peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded}), flush=True)


def run_backend(backend: str, args: argparse.Namespace, model_dir: Path, bundle: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", backend, "--model-dir", str(model_dir), "--bundle", str(bundle),
        "--seconds", str(args.seconds), "--threads", str(args.threads),
        "--guidance-scale", str(args.guidance_scale), "--batch", str(getattr(args, "batch", 1)),
        *(["--stream"] if getattr(args, "stream", False) else []),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{backend} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def keep_decoder_layers(model, layers: int) -> None:
    """Drop all but the first ``layers`` decoder layers (in place): the same model, shallower."""
    stack = model.decoder.model.decoder.layers
    if not 1 <= layers <= len(stack):
        raise ValueError(
            f"--decoder-layers {layers}: the model has {len(stack)} decoder layers; choose 1..{len(stack)}"
        )
    del stack[layers:]
    model.config.decoder.num_hidden_layers = model.decoder.config.num_hidden_layers = layers


def prepare(
    args: argparse.Namespace, scratch: Path, precisions: Sequence[str] = PRECISIONS
) -> tuple[Path, Path, dict]:
    """Save the model (the PyTorch backends load it) and export the bundle in ``precisions`` (none: no export,
    the manifest is empty)."""
    from bench_quant import small_architecture

    from tinymusician.models.musicgen import load_musicgen, load_tokenizer, save_musicgen
    from tinymusician.onnx.export import export_bundle
    from tinymusician.zoo.tiny import shipped_pair

    tiny = shipped_pair().student
    model = load_musicgen(str(tiny)) if args.tiny else small_architecture()
    if args.decoder_layers:
        keep_decoder_layers(model, args.decoder_layers)
    tokenizer = load_tokenizer(str(tiny))  # token ids only need to be in range; weights are random anyway
    model_dir = save_musicgen(model, tokenizer, scratch / "model")
    if not precisions:
        return model_dir, scratch / "bundle", {}
    started = time.perf_counter()
    precisions = list(precisions)
    if f"ort-{S8}" in args.backends:
        register_s8()
        precisions.append(S8)
    manifest = export_bundle(model, tokenizer, scratch / "bundle", precisions=precisions, source="benchmark")
    if S8 in precisions:
        manifest["s8_int8_bytes"] = bundle_mb(split_s8(scratch / "bundle", manifest), "int8")
    print(f"exported in {time.perf_counter() - started:.0f} s", flush=True)
    return model_dir, scratch / "bundle", manifest


def bundle_mb(manifest: dict, precision: str) -> float:
    from tinymusician.onnx.layout import GRAPHS, graph_file

    return sum(manifest["files"][graph_file(g, precision)]["bytes"] for g in GRAPHS) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="1: one pass per step, no CFG")
    parser.add_argument("--decoder-layers", type=int, help="keep only the first N decoder layers")
    parser.add_argument(
        "--batch", type=int, default=1, help="prompts generated at once (RTF: per clip length)"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="ORT backends also stream the same clip: time to first audio, and streamed vs one-shot audio",
    )
    choices = [*BACKENDS, f"ort-{S8}"]
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=choices)
    parser.add_argument("--int8-weights-too", action="store_true", help=f"also time ort-{S8} (see above)")
    parser.add_argument("--worker", choices=choices, dest="backend", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.int8_weights_too and f"ort-{S8}" not in args.backends:
        args.backends.append(f"ort-{S8}")
    if args.backend:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as scratch:
        model_dir, bundle, manifest = prepare(args, Path(scratch))
        fp32_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
        best: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for backend in args.backends:
                stats = run_backend(backend, args, model_dir, bundle)
                print(f"round {round_index + 1} {backend:<13} RTF {stats['rtf']:.3f}", flush=True)
                if backend not in best or stats["rtf"] < best[backend]["rtf"]:
                    best[backend] = stats

    sizes = {
        "torch-fp32": fp32_mb,
        "torch-int8": float("nan"),  # see bench_quant.py for PyTorch bundle sizes
        **{f"ort-{p}": bundle_mb(manifest, p) for p in manifest["precisions"]},
        f"ort-{S8}": manifest.get("s8_int8_bytes", float("nan")),
    }
    reference = best.get("torch-fp32", {}).get("rtf")
    guidance = f"CFG {args.guidance_scale:g}" if args.guidance_scale > 1 else "one pass (no CFG)"
    layers = f", {args.decoder_layers} decoder layers" if args.decoder_layers else ""
    print(
        f"\n{args.seconds:g} s of audio, {guidance}, top-k 250, batch {args.batch}, {args.threads} threads "
        f"({'tiny student' if args.tiny else 'MusicGen-Small architecture, random weights'}{layers})"
    )
    print(f"{'backend':<13}{'RTF':>8}{'vs torch-fp32':>15}{'step ms':>9}{'peak RSS MB':>13}{'size MB':>10}")
    for backend, stats in best.items():
        speedup = f"{reference / stats['rtf']:.2f}x" if reference else "-"
        print(
            f"{backend:<13}{stats['rtf']:>8.3f}{speedup:>15}{stats['decoder_step_ms']:>9.1f}"
            f"{stats['peak_rss_mb']:>13.0f}{sizes[backend]:>10.1f}"
        )
    for backend, stats in best.items():
        if "first_audio_s" in stats:
            print(
                f"{backend} streamed (0.5 s chunks): first audio after {stats['first_audio_s']:.2f} s, RTF "
                f"{stats['stream_rtf']:.3f}, max |streamed - one-shot| {stats['stream_max_diff']:.1e}"
            )
    if "ort-int8" in best and f"ort-{S8}" in best:
        ratio = best["ort-int8"]["decoder_step_ms"] / best[f"ort-{S8}"]["decoder_step_ms"]
        print(f"decoder step, uint8 weights (exact everywhere) / int8 weights (U8S8): {ratio:.2f}x")
    if "ort-int8" in best and reference:
        rtf = best["ort-int8"]["rtf"]
        print(f"target ORT int8 RTF <= 1.0: {rtf:.3f} {'PASS' if rtf <= 1.0 else 'FAIL'}")
        print(
            f"target ORT int8 >= 3x PyTorch fp32: {reference / rtf:.2f}x {'PASS' if reference / rtf >= 3 else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
