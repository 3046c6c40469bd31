"""Real-time factor, peak memory and size of PyTorch vs ONNX Runtime generation, side by side in one run.

Model: a random-weight model with MusicGen-Small's architecture (see bench_quant.py; no download), or
``--tiny`` for the embedded tiny student (seconds). It is saved once, exported once (fp32, int8, int4; with the
in-place-KV "fast" decoder graph too when the exporter has ``fast_decoder``), then each backend generates the
same prompt in its own process (so peak RSS is that backend's alone):

- ``torch-fp32``  transformers' ``generate`` (eager PyTorch, fp32)
- ``torch-int8``  the same after TinyMusician's int8 plan (dynamic int8 decoder + T5)
- ``ort-fp32`` / ``ort-int8`` / ``ort-int4``  :class:`TinyMusicianONNX` on the exported graphs, its default
  decoder graph (``decoder="auto"``: the fast graph when the bundle has it)
- ``ort-int8-merged`` (``ort-fp32-merged``, ``ort-int4-merged`` on request)  the same with
  ``decoder="merged"`` (transformers.js's merged graph); skipped, with a note, by a runtime without that option

Every run: ``--seconds`` of audio (10; several lengths: ``--seconds 10 30``, up to 40.9 s for MusicGen-Small,
20.4 s for the tiny student), classifier-free guidance 3, top-k 250 sampling, seed 0, batch 1, ``--threads`` CPU
threads (2). Backends run in turn, ``--rounds`` times round-robin; the best round counts in the table. Exits 0
either way; nothing is asserted on time. Printed per clip length, per backend:

- RTF: seconds of compute (text encoder + decoding + codec decoder) per second of audio; < 1 is faster than
  real time. Targets: ORT int8 RTF <= 1.0, >= 10x faster than PyTorch fp32 eager, its step <= 1.3x the
  floor, int4 >= 1.3x faster than int8.
- step ms: decoding time per step (decoder + sampling); ``x floor``: that over the weight-streaming floor.
- start / end ms: median step over the first and the last 10% of the steps, and end / start (the cost of a
  growing KV cache; target for ort-int8: end within 20% of start).
- peak RSS (VmHWM of the backend's process) and bundle size. Targets: ORT int8 peak <= its bundle + 500 MB, first
  audio with ``--stream`` <= 1.5 s.

With ``--rounds`` > 1, the ratios the targets name are also taken within each round (the floor is measured
again at the start of every round), so each compares runs a few seconds apart on an equally busy machine: the
median and range over the rounds are printed beside the best-of figures (this machine's speed drifts up to ~1.8x
between runs, which best-of-each-separately can turn into a ratio no single moment showed).

Once per run: the weight-streaming floor, the time to read the int8 decoder's weight bytes (the initializers of
onnx/decoder_model_merged_quantized.onnx; its file size is printed beside) once with ``--threads`` threads, in its
own process (bench_onnx_kernels.py): no decoder step can be faster. And the first step's logits of each backend
against ort-fp32's (torch-fp32's if ort-fp32 did not run): max |diff| / the reference's spread (max - min),
check.py's relative error and top-1 agreement, so a fast but wrong kernel shows.

``--int4-variants [accA-bB ...]`` also exports int4 graphs with MatMulNBits ``accuracy_level`` A (0 unset, 1 fp32,
2 fp16, 3 bf16, 4 int8 products: the bundle's int4, blocks of 32) and block size B, each timed as its own backend
``ort-int4-accA-bB`` (default: acc0-b32 acc1-b32 acc2-b32 acc0-b128 acc4-b128); the header names the CPU's SIMD
features (/proc/cpuinfo) the kernels depend on.

``--guidance-scale 1`` times one pass per step instead (no unconditional half: transformers and the runtime
both skip the doubled batch at scale <= 1); ``--decoder-layers N`` keeps only the first N decoder layers (a
shallower student of the same width). ``bench_student_speed.py`` compares both, reusing this script.

``--int8-weights-too`` also exports every int8 graph with uint8 weights (the fast decoder's too: the bundle
format before its int8 weights, U8U8 on every CPU) and times it as ``ort-int8-u8`` beside the bundle's int8
weights (U8S8 where this CPU computes it exactly, else converted to U8U8 at load: tinymusician/onnx/int8_kernel.py),
to show what the U8S8 kernel buys on this CPU.

``--workdir DIR`` keeps the saved model and the exported bundles in DIR; a later run with the same model options
(``--tiny``, ``--decoder-layers``, the comparison precisions its backends name) reuses them instead of exporting
again (MusicGen-Small: about 8 minutes).

    python benchmarks/bench_onnx.py [--seconds 10 [30 ...]] [--rounds 1] [--threads 2] [--tiny] [--workdir DIR]
                                    [--backends ...] [--int4-variants [accA-bB ...]] [--int8-weights-too]
                                    [--guidance-scale 3] [--decoder-layers N] [--batch 1] [--stream]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import bench_onnx_kernels as kernels

BACKENDS = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8", "ort-int4")
MERGED = "-merged"  # backend suffix: decoder="merged" (transformers.js's graph) instead of the default
MERGED_BACKENDS = ("ort-fp32-merged", "ort-int8-merged", "ort-int4-merged")
DEFAULT_MERGED = ("ort-int8-merged",)
PRECISIONS = ("fp32", "int8", "int4")  # what the bundle is exported in
U8 = "int8-u8"  # the comparison-only precision: uint8 weights in every graph, exported as onnx/*_int8.onnx
FLOOR_GRAPH = "onnx/decoder_model_merged_quantized.onnx"  # the int8 decoder: its weights set the floor
STREAM_CHUNKS = "the runtime's default chunks: 0.2 s first, then 0.5 s"


def runtime_has_decoder_option() -> bool:
    """Whether :class:`TinyMusicianONNX` takes ``decoder="auto"|"fast"|"merged"`` (added after this script)."""
    from tinymusician.onnx.runtime import TinyMusicianONNX

    return "decoder" in inspect.signature(TinyMusicianONNX.__init__).parameters


def exporter_has_fast_decoder() -> bool:
    from tinymusician.onnx.export import export_bundle

    return "fast_decoder" in inspect.signature(export_bundle).parameters


def ort_backend(backend: str) -> tuple[str, str | None]:
    """``ort-int8-merged`` -> (``int8``, ``"merged"``); ``ort-int4-acc0-b32`` -> (``int4-acc0-b32``, None)."""
    precision = backend.removeprefix("ort-")
    if precision.endswith(MERGED):
        return precision.removesuffix(MERGED), "merged"
    return precision, None


def register_u8(exporter: bool = True) -> None:
    """Teach this process the comparison precision (each backend loads in its own); ``exporter``: its quantizer
    too (that imports torch)."""
    from tinymusician.onnx import layout

    layout.PRECISIONS[U8] = "_int8"
    if exporter:
        from tinymusician.onnx import export

        export.QUANTIZERS[U8] = export.quantize_int8  # uint8; no FAST_QUANTIZERS entry: the fast graphs too


def split_u8(bundle: Path, manifest: dict) -> dict:
    """Move the comparison graphs into ``<bundle>-u8``, a bundle whose ``int8`` are them (hard links, no copy),
    so the runtime loads both unchanged; the main bundle's manifest is back to fp32, int8, int4."""
    import os
    import shutil

    from tinymusician.onnx.layout import QUANTIZABLE, graph_file

    other = bundle.with_name(f"{bundle.name}-u8")
    shutil.rmtree(other, ignore_errors=True)  # an earlier export's (a --workdir exported again)
    shutil.copytree(bundle, other, copy_function=os.link)
    u8_manifest = json.loads(json.dumps(manifest))
    for graph in QUANTIZABLE:
        legacy, target = f"onnx/{graph}_int8.onnx", graph_file(graph, "int8")
        (other / target).unlink()
        (other / legacy).rename(other / target)
        u8_manifest["files"][target] = {**manifest["files"].pop(legacy), "precision": "int8"}
        del u8_manifest["files"][legacy]
        (bundle / legacy).unlink()
    manifest["precisions"].remove(U8)
    u8_manifest["precisions"] = list(manifest["precisions"])
    u8_manifest["quantization"]["int8"]["fast_decoder"] = {
        "weights": "uint8, asymmetric, per output channel",
        "kernel": "U8U8",
    }
    for path, content in ((bundle, manifest), (other, u8_manifest)):
        (path / "manifest.json").unlink()  # a hard link shared by both bundles until now
        (path / "manifest.json").write_text(json.dumps(content, indent=2))
    return u8_manifest


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


def capture_first_torch_logits(decoder) -> dict:
    """The first decoder call's logits (the first step), like :func:`bench_onnx_kernels.capture_first_logits`."""
    captured: dict = {}

    def hook(module, inputs, output) -> None:
        handle.remove()
        logits = output.logits.detach().float()
        captured["logits"] = logits.reshape(-1, logits.shape[-1]).numpy().copy()

    handle = decoder.register_forward_hook(hook)
    return captured


def worker(args: argparse.Namespace) -> None:
    """One generation in this process; prints one JSON line (and saves the first step's logits if asked)."""
    import numpy as np

    seconds = args.seconds[0]
    if args.backend.startswith("ort"):
        from tinymusician.onnx.runtime import TinyMusicianONNX

        path, (precision, decoder) = args.bundle, ort_backend(args.backend)
        if precision == U8:
            path, precision = f"{args.bundle}-u8", "int8"
        elif kernels.VARIANT.fullmatch(precision):
            path = f"{args.bundle}-{precision}"  # its own bundle (prepare)
            kernels.register_manifest_variants(path)
        options = {"decoder": decoder} if decoder else {}  # main() skips -merged without the option
        model = TinyMusicianONNX(path, precision=precision, threads=args.threads, **options)
        loaded = peak_rss_mb()
        ticks = kernels.step_clock(model)
        first = kernels.capture_first_logits(model)
        audio = model.generate([PROMPT] * args.batch, seconds, guidance_scale=args.guidance_scale, seed=0)
        stats = {**model.last_stats, **kernels.start_end(np.diff(ticks).tolist())}
        if args.stream:  # the same codes again (same seed), streamed: time to first audio, and the seams
            chunks = list(
                model.stream([PROMPT] * args.batch, seconds, guidance_scale=args.guidance_scale, seed=0)
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
        frames = round(seconds * frame_rate)
        times = stage_clock(model)
        first = capture_first_torch_logits(model.decoder)
        started = time.perf_counter()
        torch_generate(
            model, tokenizer, [PROMPT] * args.batch, frames, guidance_scale=args.guidance_scale, seed=0
        )
        finished = time.perf_counter()
        compute, encoded, decoded = finished - started, times["text"][-1], times["steps"][-1]
        begins = times["steps"][0::2]  # one decoder call per step: its start, then its end
        durations = np.diff([*begins, decoded]).tolist()  # the last step: its forward only
        stats = {
            "text_encoder_s": encoded - started,
            "decoder_s": decoded - encoded,
            "decoder_step_ms": 1000 * (decoded - encoded) / (len(times["steps"]) // 2),
            "encodec_decode_s": finished - decoded,  # with the last step's sampling, as the runtime's
            "compute_s": compute,
            "audio_s": frames / frame_rate,
            "rtf": compute * frame_rate / frames,
            **kernels.start_end(durations),
        }
    stats = {**stats, "peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded}
    if args.logits_out and first.get("logits") is not None:
        np.save(args.logits_out, first["logits"])
    print(json.dumps(stats), flush=True)


def run_backend(
    backend: str, args: argparse.Namespace, model_dir: Path, bundle: Path, logits_out: Path | None = None
) -> dict:
    """``backend`` in its own process for ``args.seconds`` (one length) of audio -> its stats."""
    command = [
        sys.executable, __file__, "--worker", backend, "--model-dir", str(model_dir), "--bundle", str(bundle),
        "--seconds", str(args.seconds), "--threads", str(args.threads),
        "--guidance-scale", str(args.guidance_scale), "--batch", str(getattr(args, "batch", 1)),
        *(["--stream"] if getattr(args, "stream", False) else []),
        *(["--logits-out", str(logits_out)] if logits_out else []),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{backend} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_floor(bundle: Path, threads: int) -> dict:
    """The weight-streaming floor of the int8 decoder (its initializer bytes), in its own process."""
    path = bundle / FLOOR_GRAPH
    weights = kernels.initializer_bytes(path)
    command = [sys.executable, kernels.__file__, "floor", str(weights), str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"floor failed:\n{result.stderr[-3000:]}")
    return {
        **json.loads(result.stdout.strip().splitlines()[-1]),
        "weight_bytes": weights,
        "file_bytes": path.stat().st_size,
    }


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
    the manifest is empty), plus the comparison precisions that ``args.backends`` names (ort-int8-u8 in
    ``<bundle>-u8``, each ort-int4-accA-bB in ``<bundle>-int4-accA-bB``) and the fast decoder graphs when the
    exporter writes them. Each export runs in its own process: quantizing MusicGen-Small in several precisions
    holds over 10 GB, which this process would otherwise keep while the backends run."""
    reused = reuse(args, scratch, precisions)
    if reused:
        return reused
    from bench_quant import small_architecture

    from tinymusician.models.musicgen import load_musicgen, load_tokenizer, save_musicgen
    from tinymusician.zoo.tiny import shipped_pair

    tiny = shipped_pair().student
    model = load_musicgen(str(tiny)) if args.tiny else small_architecture()
    if args.decoder_layers:
        keep_decoder_layers(model, args.decoder_layers)
    tokenizer = load_tokenizer(str(tiny))  # token ids only need to be in range; weights are random anyway
    model_dir = save_musicgen(model, tokenizer, scratch / "model")
    del model
    bundle = scratch / "bundle"
    if not precisions:
        return model_dir, bundle, {}
    started = time.perf_counter()
    precisions = [*precisions, *([U8] if f"ort-{U8}" in args.backends else [])]
    manifest = export_in_process(model_dir, bundle, precisions)
    if U8 in precisions:
        register_u8(exporter=False)
        manifest["u8_int8_bytes"] = bundle_mb(split_u8(bundle, manifest), "int8")
    variants = [p for p, _ in map(ort_backend, args.backends) if kernels.VARIANT.fullmatch(p)]
    kernels.register_int4_variants(variants, exporter=False)
    manifest["variant_mb"] = {}
    for variant in variants:
        exported = export_in_process(model_dir, bundle.with_name(f"{bundle.name}-{variant}"), [variant])
        manifest["variant_mb"][variant] = bundle_mb(exported, variant)
    print(f"exported {', '.join(precisions + variants)} in {time.perf_counter() - started:.0f} s", flush=True)
    if args.workdir:
        record = {"options": prepared_options(args, [p for p in precisions if p != U8]), "manifest": manifest}
        (scratch / "prepared.json").write_text(json.dumps(record))
    return model_dir, bundle, manifest


def prepared_options(args: argparse.Namespace, precisions: Sequence[str]) -> dict:
    """What decides the model and the bundles :func:`prepare` makes."""
    variants = sorted(p for p, _ in map(ort_backend, args.backends) if kernels.VARIANT.fullmatch(p))
    return {
        "tiny": args.tiny,
        "decoder_layers": args.decoder_layers,
        "precisions": list(precisions),
        "u8": f"ort-{U8}" in args.backends,
        "int4_variants": variants,
    }


def reuse(
    args: argparse.Namespace, scratch: Path, precisions: Sequence[str]
) -> tuple[Path, Path, dict] | None:
    """``--workdir``: the model and bundles an earlier run with the same options left there, or None."""
    path = scratch / "prepared.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("options") != prepared_options(args, precisions):
        path.unlink(missing_ok=True)
        return None
    print(f"reusing the model and bundles in {scratch} (--workdir)", flush=True)
    manifest = record["manifest"]
    if f"ort-{U8}" in args.backends:
        register_u8(exporter=False)
    kernels.register_int4_variants(manifest.get("variant_mb", {}), exporter=False)
    return scratch / "model", scratch / "bundle", manifest


def export_in_process(model_dir: Path, out: Path, precisions: Sequence[str]) -> dict:
    """``export_bundle`` of the saved model in a child process (see :func:`prepare`) -> the manifest."""
    command = [
        sys.executable, __file__, "--export-to", str(out), "--model-dir", str(model_dir),
        "--precisions", *precisions,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"export of {precisions} failed:\n{result.stderr[-3000:]}")
    print(f"  exported {', '.join(precisions)}: {result.stdout.strip().splitlines()[-1]}", flush=True)
    return json.loads((out / "manifest.json").read_text())


def export_worker(args: argparse.Namespace) -> None:
    """The child of :func:`export_in_process`: prints its time and peak RSS."""
    from tinymusician.models.musicgen import load_musicgen, load_tokenizer
    from tinymusician.onnx.export import export_bundle

    started = time.perf_counter()
    if U8 in args.precisions:
        register_u8()
    kernels.register_int4_variants(args.precisions, exporter=True)
    model = load_musicgen(args.model_dir).eval()
    tokenizer = load_tokenizer(args.model_dir)
    options = {"fast_decoder": True} if exporter_has_fast_decoder() else {}
    export_bundle(model, tokenizer, args.export_to, precisions=args.precisions, source="benchmark", **options)
    print(f"{time.perf_counter() - started:.0f} s, peak RSS {peak_rss_mb() / 1024:.1f} GB", flush=True)


def bundle_mb(manifest: dict, precision: str) -> float:
    from tinymusician.onnx.layout import GRAPHS, graph_file

    return sum(manifest["files"][graph_file(g, precision)]["bytes"] for g in GRAPHS) / 1e6


def cell(stats: dict, key: str, spec: str, width: int) -> str:
    return f"{stats[key]:>{width}{spec}}" if key in stats else f"{'-':>{width}}"


def print_length(
    seconds: float, best: dict[str, dict], sizes: dict[str, float], floor_ms: float | None, args
) -> None:
    """One clip length's table and targets."""
    reference = best.get("torch-fp32", {}).get("rtf")
    guidance = f"CFG {args.guidance_scale:g}" if args.guidance_scale > 1 else "one pass (no CFG)"
    layers = f", {args.decoder_layers} decoder layers" if args.decoder_layers else ""
    print(
        f"\n{seconds:g} s of audio, {guidance}, top-k 250, batch {args.batch}, {args.threads} threads, best of "
        f"{args.rounds} ({'tiny student' if args.tiny else 'MusicGen-Small architecture, random weights'}{layers})"
    )
    print(
        f"{'backend':<19}{'RTF':>7}{'vs torch':>9}{'step ms':>9}{'x floor':>8}{'start ms':>9}{'end ms':>8}"
        f"{'end/start':>10}{'peak RSS MB':>12}{'size MB':>9}"
    )
    for backend, stats in best.items():
        speedup = f"{reference / stats['rtf']:.2f}x" if reference else "-"
        multiple = f"{stats['decoder_step_ms'] / floor_ms:.1f}" if floor_ms else "-"
        print(
            f"{backend:<19}{stats['rtf']:>7.3f}{speedup:>9}{stats['decoder_step_ms']:>9.1f}{multiple:>8}"
            f"{cell(stats, 'step_start_ms', '.1f', 9)}{cell(stats, 'step_end_ms', '.1f', 8)}"
            f"{cell(stats, 'step_end_vs_start', '.2f', 10)}{stats['peak_rss_mb']:>12.0f}"
            f"{sizes.get(backend, float('nan')):>9.1f}"
        )
    for backend, stats in best.items():
        if "first_audio_s" in stats:
            print(
                f"{backend} streamed ({STREAM_CHUNKS}): first audio after {stats['first_audio_s']:.2f} s, RTF "
                f"{stats['stream_rtf']:.3f}, max |streamed - one-shot| {stats['stream_max_diff']:.1e}"
            )
    int8 = best.get("ort-int8")
    if int8 and f"ort-{U8}" in best:
        import onnxruntime as ort

        from tinymusician.onnx.int8_kernel import exact_int8_options

        kernel = exact_int8_options(ort.SessionOptions())  # what the bundle's int8 weights run here
        ratio = best[f"ort-{U8}"]["decoder_step_ms"] / int8["decoder_step_ms"]
        print(f"decoder step, uint8 weights (U8U8) / the bundle's int8 weights ({kernel}): {ratio:.2f}x")
    int4 = [b for b in best if b.startswith("ort-int4")]
    if int8 and int4:
        print(
            "decoder step vs ort-int8 (int4 = acc4-b32): "
            + ", ".join(f"{b} {best[b]['decoder_step_ms'] / int8['decoder_step_ms']:.2f}x" for b in int4)
        )
    if int8 and "step_end_vs_start" in int8:
        ratio = int8["step_end_vs_start"]
        print(
            f"target ORT int8 end step within 20% of start: {ratio:.2f}x {'PASS' if ratio <= 1.2 else 'FAIL'}"
        )
    if int8 and reference:
        rtf, speedup = int8["rtf"], reference / int8["rtf"]
        print(f"target ORT int8 RTF <= 1.0: {rtf:.3f} {'PASS' if rtf <= 1.0 else 'FAIL'}")
        print(f"target ORT int8 >= 10x PyTorch fp32: {speedup:.2f}x {'PASS' if speedup >= 10 else 'FAIL'}")
    if int8 and floor_ms:
        multiple = int8["decoder_step_ms"] / floor_ms
        print(
            f"target ORT int8 step <= 1.3x the floor: {multiple:.2f}x {'PASS' if multiple <= 1.3 else 'FAIL'}"
        )
    if int8 and "ort-int4" in best:
        faster = int8["decoder_step_ms"] / best["ort-int4"]["decoder_step_ms"]
        print(
            f"target ORT int4 >= 1.3x faster than int8: {faster:.2f}x {'PASS' if faster >= 1.3 else 'FAIL'}"
        )
    if int8 and "first_audio_s" in int8:
        first = int8["first_audio_s"]
        print(
            f"target ORT int8 first audio (--stream) <= 1.5 s: {first:.2f} s {'PASS' if first <= 1.5 else 'FAIL'}"
        )
    if int8 and "ort-int8" in sizes:
        peak, limit = int8["peak_rss_mb"], sizes["ort-int8"] + 500
        print(
            f"target ORT int8 peak RSS <= bundle + 500 MB: {peak:.0f} MB (limit {limit:.0f}) "
            f"{'PASS' if peak <= limit else 'FAIL'}"
        )


FLOOR = "floor"  # a round's pseudo-backend: the weight-streaming floor measured at its start
# name, numerator backend, denominator backend, the quantity (or numerator / denominator quantities), target
PAIRED = (
    ("ORT int8 step / floor", "ort-int8", FLOOR, "decoder_step_ms", ("<=", 1.3)),
    ("ORT int8 end / start step", "ort-int8", "ort-int8", ("step_end_ms", "step_start_ms"), ("<=", 1.2)),
    ("PyTorch fp32 / ORT int8 RTF", "torch-fp32", "ort-int8", "rtf", (">=", 10.0)),
    ("ORT int8 / int4 step", "ort-int8", "ort-int4", "decoder_step_ms", (">=", 1.3)),
    ("ORT int8 merged / fast step", "ort-int8-merged", "ort-int8", "decoder_step_ms", None),
)


def paired_ratios(rounds: Sequence[dict[str, dict]]) -> dict[str, list[float]]:
    """Each :data:`PAIRED` ratio within every round that ran both of its sides."""
    ratios: dict[str, list[float]] = {}
    for name, top, bottom, key, _ in PAIRED:
        top_key, bottom_key = key if isinstance(key, tuple) else (key, key)
        for backends in rounds:
            if top_key in backends.get(top, {}) and bottom_key in backends.get(bottom, {}):
                ratios.setdefault(name, []).append(backends[top][top_key] / backends[bottom][bottom_key])
    return ratios


def print_paired(rounds: Sequence[dict[str, dict]]) -> None:
    """The targets' ratios taken within each round: median, range and count; a target judges the median."""
    import statistics

    ratios = paired_ratios(rounds)
    if ratios:
        print(
            f"paired within each of {len(rounds)} rounds (median [min - max] over the rounds that ran both):"
        )
    for name, *_, target in PAIRED:
        if name not in ratios:
            continue
        values = ratios[name]
        median = statistics.median(values)
        verdict = ""
        if target:
            sign, bound = target
            verdict = (
                f"  target {sign} {bound:g}: {'PASS' if (median <= bound) == (sign == '<=') else 'FAIL'}"
            )
        print(f"  {name:<30}{median:>7.2f} [{min(values):.2f} - {max(values):.2f}], n={len(values)}{verdict}")


def print_numerics(logits: dict) -> None:
    """Every backend's first-step logits (arrays) against ort-fp32's (or torch-fp32's)."""
    reference_name = next((b for b in ("ort-fp32", "torch-fp32") if b in logits), None)
    if reference_name is None:
        print("\nfirst-step logits: no fp32 backend ran, nothing to compare with")
        return
    reference = logits[reference_name]
    print(f"\nfirst-step logits vs {reference_name} (max |diff| / spread: over max - min of the reference)")
    print(f"{'backend':<19}{'max|diff|/spread':>17}{'rel. error':>11}{'top-1 agree':>12}")
    for backend, candidate in logits.items():
        if backend == reference_name:
            continue
        if candidate.shape != reference.shape:
            print(f"{backend:<19} shape {candidate.shape} differs from {reference.shape}: not compared")
            continue
        error = kernels.logit_error(reference, candidate)
        print(
            f"{backend:<19}{error['max_vs_spread']:>17.4f}{error['relative_error']:>11.4f}"
            f"{error['top1_agree']:>12.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0], help="clip lengths, each timed")
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
    variants = [f"ort-{kernels.variant_precision(v)}" for v in kernels.ALL_VARIANTS]
    choices = [*BACKENDS, *MERGED_BACKENDS, f"ort-{U8}", *variants]
    parser.add_argument(
        "--backends",
        nargs="+",
        default=[*BACKENDS, *DEFAULT_MERGED],
        choices=choices,
        metavar="BACKEND",
        help=f"default: {' '.join([*BACKENDS, *DEFAULT_MERGED])}; also {' '.join(MERGED_BACKENDS[::2])}, "
        f"ort-{U8}, ort-int4-accA-bB",
    )
    parser.add_argument(
        "--workdir",
        help="keep the saved model and bundles here; a later run with the same DIR and options reuses them",
    )
    parser.add_argument("--int8-weights-too", action="store_true", help=f"also time ort-{U8} (see above)")
    parser.add_argument(
        "--int4-variants",
        nargs="*",
        metavar="accA-bB",
        help=f"also time int4 kernel variants (default: {' '.join(kernels.DEFAULT_VARIANTS)})",
    )
    parser.add_argument("--worker", choices=choices, dest="backend", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", help=argparse.SUPPRESS)
    parser.add_argument("--export-to", help=argparse.SUPPRESS)
    parser.add_argument("--precisions", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        worker(args)
        return
    if args.export_to:
        export_worker(args)
        return
    import numpy as np

    if args.int8_weights_too and f"ort-{U8}" not in args.backends:
        args.backends.append(f"ort-{U8}")
    if args.int4_variants is not None:
        for variant in args.int4_variants or kernels.DEFAULT_VARIANTS:
            backend = f"ort-{kernels.variant_precision(variant)}"
            if backend not in args.backends:
                args.backends.append(backend)
    print(kernels.machine_header(args.threads), flush=True)
    if not runtime_has_decoder_option():
        skipped = [b for b in args.backends if b.endswith(MERGED)]
        args.backends = [b for b in args.backends if not b.endswith(MERGED)]
        if skipped:
            print(f"note: TinyMusicianONNX has no decoder= option yet: {', '.join(skipped)} skipped")
    if not exporter_has_fast_decoder():
        print("note: export_bundle has no fast_decoder= option yet: ort-* use the merged decoder graph")

    with contextlib.ExitStack() as stack:
        if args.workdir:
            scratch = Path(args.workdir).expanduser()
            scratch.mkdir(parents=True, exist_ok=True)
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model_dir, bundle, manifest = prepare(args, scratch)
        facts = manifest["model"]
        if "fast_decoder" in manifest:
            print(
                f"fast decoder's self-attention cache, per precision: {manifest['fast_decoder']['cache_dtype']}"
            )
        longest = facts["max_frames"] / facts["frame_rate"]
        lengths = [s for s in args.seconds if s <= longest]
        if len(lengths) < len(args.seconds):
            print(
                f"note: {[s for s in args.seconds if s > longest]} s skipped: this model stops at {longest:.1f} s"
            )
        floor = run_floor(bundle, args.threads) if (bundle / FLOOR_GRAPH).is_file() else {}
        fp32_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
        (logits_dir := Path(scratch, "logits")).mkdir(exist_ok=True)
        best: dict[float, dict[str, dict]] = {s: {} for s in lengths}
        rounds: dict[float, list[dict[str, dict]]] = {s: [] for s in lengths}  # per round: backend -> stats
        logits: dict[str, np.ndarray] = {}
        floors = [floor] if floor else []  # every time the floor is measured; the fastest counts
        for seconds in lengths:
            options = argparse.Namespace(**{**vars(args), "seconds": seconds})
            for round_index in range(args.rounds):
                rounds[seconds].append({})
                if floor and args.rounds > 1:
                    if round_index or seconds != lengths[0]:  # the first round's is the one just measured
                        floors.append(run_floor(bundle, args.threads))
                    rounds[seconds][-1][FLOOR] = {"decoder_step_ms": floors[-1]["floor_ms"]}
                for backend in args.backends:
                    out = (
                        logits_dir / f"{backend}.npy" if seconds == lengths[0] and round_index == 0 else None
                    )
                    try:
                        stats = run_backend(backend, options, model_dir, bundle, out)
                    except RuntimeError as err:
                        print(f"{seconds:g} s round {round_index + 1} {backend}: {err}", flush=True)
                        continue
                    if out is not None and out.is_file():
                        logits[backend] = np.load(out)
                    print(
                        f"{seconds:g} s round {round_index + 1} {backend:<19} RTF {stats['rtf']:.3f}, step "
                        f"{stats['decoder_step_ms']:.1f} ms",
                        flush=True,
                    )
                    rounds[seconds][-1][backend] = stats
                    if backend not in best[seconds] or stats["rtf"] < best[seconds][backend]["rtf"]:
                        best[seconds][backend] = stats
        if floor:  # again after the backends (another process may share the cores)
            floors.append(run_floor(bundle, args.threads))
            floor = {
                **min(floors, key=lambda f: f["floor_ms"]),
                "floor_runs_ms": [f["floor_ms"] for f in floors],
            }

    sizes = {
        "torch-fp32": fp32_mb,
        "torch-int8": float("nan"),  # see bench_quant.py for PyTorch bundle sizes
        **{f"ort-{p}": bundle_mb(manifest, p) for p in manifest["precisions"]},
        **{f"ort-{p}{MERGED}": bundle_mb(manifest, p) for p in manifest["precisions"]},
        f"ort-{U8}": manifest.get("u8_int8_bytes", float("nan")),
        **{f"ort-{p}": mb for p, mb in manifest.get("variant_mb", {}).items()},
    }
    floor_ms = floor.get("floor_ms")
    if floor:
        print(
            f"\nweight-streaming floor: the int8 decoder's initializers, {floor['weight_bytes'] / 1e6:.1f} MB "
            f"(file {floor['file_bytes'] / 1e6:.1f} MB), read once by {args.threads} threads "
            f"({floor['floor_kernel']}, best of {floor['floor_repeats']}): {floor_ms:.2f} ms "
            f"= {floor['floor_gbs']:.1f} GB/s (each time it ran, first to last: "
            f"{' / '.join(f'{ms:.2f}' for ms in floor['floor_runs_ms'])} ms); 'x floor' = step ms / this"
        )
    for seconds in lengths:
        print_length(seconds, best[seconds], sizes, floor_ms, args)
        if args.rounds > 1:
            print_paired(rounds[seconds])
    if logits:
        print_numerics(logits)
    if len(lengths) > 1:
        print(f"\n{'RTF per clip length':<19}" + "".join(f"{f'{s:g} s':>8}" for s in lengths))
        for backend in args.backends:
            cells = [best[s].get(backend, {}).get("rtf") for s in lengths]
            print(f"{backend:<19}" + "".join(f"{c:>8.3f}" if c is not None else f"{'-':>8}" for c in cells))


if __name__ == "__main__":
    main()
