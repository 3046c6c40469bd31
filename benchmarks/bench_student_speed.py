"""What a cheaper student saves per generation (issue 16): one pass vs CFG, and half the decoder layers.

Four variants of MusicGen-Small's architecture with random weights (``--tiny``: the tiny world's student, for a
smoke run in seconds): {all decoder layers (24), the first half (12)} x {CFG ``--guidance-scale`` (3, batch
doubled internally), one pass (scale 1: batch 1, no unconditional half)}. Each depth is saved and exported once
(fp32 + int8, only if an ORT backend is asked for); both guidance settings run on the same bundle. Backends and
the worker processes are bench_onnx.py's: ``torch-fp32`` (transformers' ``generate``), ``ort-fp32`` and
``ort-int8`` (:class:`TinyMusicianONNX`), each generation in its own process, ``--seconds`` of audio, top-k 250
sampling, seed 0, batch ``--batch`` (1), ``--threads`` threads.

All (variant, backend) runs are interleaved in one run, ``--rounds`` times (the order reversed every other
round, so drift on this shared machine hits both sides of a ratio alike); the best round of each counts.
Printed per run: RTF (compute seconds per second of audio: text encoder + decoding + codec decoder) and ms per
decoder step (decoding time / steps, sampling included); then the ratios CFG / one pass (per depth), full /
half depth (per guidance) and full-depth CFG / half-depth one pass, on RTF and on the decoder step. The text
encoder and codec decoder are fixed costs, so RTF ratios are below the step ratios. Exits 0. The defaults take
about 20 minutes on 2 cores (the two exports about 4.5 of them); ``--backends torch-fp32`` skips the exports.
On a 2-core CPU at batch 1 CFG cost only 1.1-1.3x a single pass per step (the step streams every weight either
way) and halving the depth 1.9-2.1x: see the README for the measured table.

    python benchmarks/bench_student_speed.py [--seconds 4] [--rounds 3] [--threads 2] [--tiny] [--backends ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import bench_onnx

BACKENDS = ("torch-fp32", "ort-fp32", "ort-int8")
ONE_PASS = 1.0


def full_depth(args: argparse.Namespace) -> int:
    """The model's decoder layers before any are dropped (24 for MusicGen-Small)."""
    if args.tiny:
        from tinymusician.zoo.tiny import shipped_pair

        config = json.loads((shipped_pair().student / "config.json").read_text())
        return int(config["decoder"]["num_hidden_layers"])
    from tinymusician.models.musicgen import musicgen_small_config

    return musicgen_small_config().decoder.num_hidden_layers


def machine_line(threads: int) -> str:
    import onnxruntime

    from tinymusician.machine import machine

    facts = machine()
    return (
        f"machine: {facts['cpu']}, {facts['cores']} cores; {threads} threads (torch and ORT); torch "
        f"{facts['torch']}, transformers {facts['transformers']}, onnxruntime {onnxruntime.__version__}"
    )


def ratio(numerator: dict, denominator: dict) -> str:
    """``RTF ratio / step ratio`` of two best runs."""
    return (
        f"{numerator['rtf'] / denominator['rtf']:.2f} / "
        f"{numerator['decoder_step_ms'] / denominator['decoder_step_ms']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny world's student (a smoke run)")
    parser.add_argument(
        "--batch", type=int, default=1, help="prompts generated at once (CFG doubles the rows of each step)"
    )
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="the CFG variant's scale")
    parser.add_argument(
        "--layers", type=int, nargs=2, metavar=("FULL", "FEWER"), help="decoder depths (default: all, half)"
    )
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=bench_onnx.BACKENDS)
    args = parser.parse_args()
    full = full_depth(args)
    depths = args.layers or [full, max(1, full // 2)]
    scales = [args.guidance_scale, ONE_PASS]
    precisions = [b.removeprefix("ort-") for b in args.backends if b.startswith("ort-")]
    print(machine_line(args.threads), flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        prepared = {}
        for depth in depths:
            options = argparse.Namespace(**vars(args), decoder_layers=None if depth == full else depth)
            model_dir, bundle, _ = bench_onnx.prepare(options, Path(scratch, f"layers-{depth}"), precisions)
            prepared[depth] = model_dir, bundle
        runs = [(b, d, s) for b in args.backends for d in depths for s in scales]
        best: dict[tuple, dict] = {}
        for round_index in range(args.rounds):
            for backend, depth, scale in runs if round_index % 2 == 0 else reversed(runs):
                options = argparse.Namespace(
                    seconds=args.seconds, threads=args.threads, guidance_scale=scale, batch=args.batch
                )
                stats = bench_onnx.run_backend(backend, options, *prepared[depth])
                print(
                    f"round {round_index + 1} {backend:<11}{depth:>3} layers, guidance {scale:g}: "
                    f"RTF {stats['rtf']:.3f}, step {stats['decoder_step_ms']:.1f} ms",
                    flush=True,
                )
                key = backend, depth, scale
                if key not in best or stats["rtf"] < best[key]["rtf"]:
                    best[key] = stats

    model = "tiny student" if args.tiny else "MusicGen-Small architecture, random weights"
    print(
        f"\n{args.seconds:g} s of audio, top-k 250, batch {args.batch}, {args.threads} threads, best of {args.rounds} "
        f"round(s) ({model}); RTF = compute s / audio s, step = decoding ms / step"
    )
    header = f"{'backend':<12}{'layers':>7}{'guidance':>10}{'RTF':>8}{'step ms':>9}"
    print(f"{header}{'text s':>8}{'decode s':>10}{'codec s':>9}")
    for (backend, depth, scale), stats in best.items():
        print(
            f"{backend:<12}{depth:>7}{scale:>10g}{stats['rtf']:>8.3f}{stats['decoder_step_ms']:>9.1f}"
            f"{stats['text_encoder_s']:>8.2f}{stats['decoder_s']:>10.2f}{stats['encodec_decode_s']:>9.2f}"
        )

    cfg, (deep, few) = f"CFG {args.guidance_scale:g}", depths
    rows = [(f"{cfg} / one pass, {d} layers", (d, scales[0]), (d, ONE_PASS)) for d in depths]
    rows += [
        (f"{deep} / {few} layers, {name}", (deep, s), (few, s))
        for name, s in zip((cfg, "one pass"), scales, strict=True)
    ]
    rows.append((f"{deep} layers {cfg} / {few} layers one pass", (deep, scales[0]), (few, ONE_PASS)))
    width = max(len(name) for name, *_ in rows) + 2
    print(f"\nspeed ratios, RTF / decoder step (> 1: the second is faster)\n{'':<{width}}", end="")
    print("".join(f"{backend:>15}" for backend in args.backends))
    for name, slow, fast in rows:
        cells = [ratio(best[(b, *slow)], best[(b, *fast)]) for b in args.backends]
        print(f"{name:<{width}}" + "".join(f"{cell:>15}" for cell in cells))


if __name__ == "__main__":
    main()
