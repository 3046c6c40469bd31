"""Text to music: ``python -m tinymusician.generate "PROMPT" [...] --model MODEL --seconds 10 --out a.wav``.

MODEL is an exported ONNX bundle (a directory with ``manifest.json``: runs on ONNX Runtime, NumPy and
tokenizers only; its graphs are checked against the manifest's sha256 once per file, ``--no-verify`` skips
that) or anything PyTorch loads: a ``save_pretrained`` dir, a quantized bundle (``tinymusician.quantize``),
a hub id, ``tiny`` or a training ``.ckpt``. Bad arguments and unusable models fail before generating, with
``error: ...`` and exit status 2. Both backends use the same decoding (delay pattern, classifier-free guidance, temperature + top-k
sampling, or ``--greedy``), show progress, and report the real-time factor (compute seconds per second of
audio; below 1.0 is faster than real time). Several prompts are generated as one batch and written as
``a.wav``, ``a-1.wav``, ... ``--stream`` (bundles): the WAVs are written chunk by chunk as the codes arrive, so the
first audio is on disk after about ``--first-chunk-seconds`` (0.2 s) of music has been generated, then every
``--chunk-seconds`` (0.5 s).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinymusician.models.generation import GenerationError, torch_generate
from tinymusician.onnx.runtime import STREAM_FIRST_CHUNK_SECONDS, BundleError, TinyMusicianONNX
from tinymusician.zoo.source import add_base_argument, add_guidance_argument

log = logging.getLogger(__name__)


def is_bundle(model: str) -> bool:
    return (Path(model).expanduser() / "manifest.json").is_file()


def output_paths(out: Path, count: int) -> list[Path]:
    return [out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def write_wavs(out: Path, audio: np.ndarray, sample_rate: int) -> list[Path]:
    """``[B, samples]`` float audio -> 16-bit PCM WAVs (clipped to [-1, 1])."""
    import soundfile as sf

    paths = output_paths(out, len(audio))
    for path, clip in zip(paths, audio, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), np.clip(clip, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return paths


def check_output(out: Path) -> None:
    """Fail before generating, not after, when the audio could not be written to ``out``."""
    import soundfile as sf

    formats = sf.available_formats()
    if out.suffix[1:].upper() not in formats:
        raise GenerationError(
            f"--out {out}: unknown audio format {out.suffix or '(no extension)'!r}; name the file .wav "
            f"(or {', '.join('.' + f.lower() for f in ('FLAC', 'OGG') if f in formats)})"
        )
    if out.is_dir():
        raise GenerationError(
            f"--out {out}: is a directory; give a file name such as {out / 'generated.wav'}"
        )
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GenerationError(f"--out {out}: {blocker} is a file, so the directory cannot be created")


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's decoding choices, passed the same way to both backends."""
    return {
        "guidance_scale": args.guidance_scale,
        "do_sample": not args.greedy,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "seed": args.seed,
        "progress": True,
    }


def run_torch(args: argparse.Namespace) -> tuple[np.ndarray, int, dict[str, float]]:
    import torch

    from tinymusician.zoo.source import load_named_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, description = load_named_model(args.model, args.base, key="--model", quantized=True)
    model.eval()
    log.info("PyTorch backend: %s", description)
    codec = model.config.audio_encoder
    frame_rate = int(codec.frame_rate)
    frames = round(args.seconds * frame_rate)
    started = time.perf_counter()
    audio, _ = torch_generate(
        model,
        tokenizer,
        args.prompts,
        frames,
        **decoding_options(args),
    )
    compute = time.perf_counter() - started
    audio_seconds = frames / frame_rate
    return (
        audio,
        int(codec.sampling_rate),
        {"compute_s": compute, "audio_s": audio_seconds, "rtf": compute / audio_seconds},
    )


def load_bundle(args: argparse.Namespace) -> TinyMusicianONNX:
    model = TinyMusicianONNX(
        args.model,
        precision=args.precision,
        threads=args.threads,
        verify=not args.no_verify,
        decoder=args.decoder,
    )
    kernel = f"; int8 products: {model.int8_kernel}" if model.int8_kernel else ""
    log.info(
        "ONNX Runtime backend: %s (%s, %s decoder%s)", args.model, model.precisions, model.decoder, kernel
    )
    return model


def run_stream(args: argparse.Namespace) -> tuple[list[Path], int, dict[str, float]]:
    """``--stream``: each chunk is appended to the WAVs (16-bit PCM, flushed) as soon as it is decoded."""
    import soundfile as sf

    model = load_bundle(args)
    options = {k: v for k, v in decoding_options(args).items() if k != "progress"}
    paths = output_paths(args.out, len(args.prompts))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    files = [sf.SoundFile(str(p), "w", model.sampling_rate, 1, subtype="PCM_16") for p in paths]
    try:
        chunks = model.stream(
            args.prompts,
            args.seconds,
            chunk_seconds=args.chunk_seconds,
            first_chunk_seconds=args.first_chunk_seconds,
            **options,
        )
        for chunk in chunks:
            for handle, clip in zip(files, chunk, strict=True):
                handle.write(np.clip(clip, -1.0, 1.0))
                handle.flush()
    finally:
        for handle in files:
            handle.close()
    return paths, model.sampling_rate, model.last_stats


def run_onnx(args: argparse.Namespace) -> tuple[np.ndarray, int, dict[str, float]]:
    model = load_bundle(args)
    audio = model.generate(
        args.prompts,
        args.seconds,
        **decoding_options(args),
    )
    return audio, model.sampling_rate, model.last_stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinymusician.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("prompts", nargs="+", help="one or more descriptions of the music")
    parser.add_argument(
        "--model",
        required=True,
        help="ONNX bundle dir, save_pretrained dir, quantized bundle dir, hub id, tiny, or .ckpt",
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("generated.wav"))
    add_guidance_argument(parser)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "int8", "int4"],
        help="ONNX graphs to load (bundle only; default fp32 if exported, else the bundle's first precision)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="bundle only: check graph sizes but not their sha256 (hashed once per file and remembered)",
    )
    parser.add_argument(
        "--decoder",
        default="auto",
        choices=["auto", "fast", "merged"],
        help="bundle only: the in-place KV-cache decoder (fast, default when exported) or transformers.js's merged one",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="bundle only: write the WAVs chunk by chunk while generating (first audio within about a second)",
    )
    parser.add_argument(
        "--chunk-seconds", type=float, default=0.5, help="with --stream: audio per chunk (default 0.5 s)"
    )
    parser.add_argument(
        "--first-chunk-seconds",
        type=float,
        default=STREAM_FIRST_CHUNK_SECONDS,
        help=f"with --stream: audio in the first chunk, shorter so it plays sooner (default {STREAM_FIRST_CHUNK_SECONDS} s)",
    )
    add_base_argument(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: ONNX Runtime all cores up to 8, torch's own)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_intermixed_args(argv)  # prompts before, between or after the options
    backend = "onnx" if is_bundle(args.model) else "torch"
    try:
        if not math.isfinite(args.seconds) or args.seconds <= 0:
            raise GenerationError(f"--seconds {args.seconds}: must be a positive number of seconds")
        check_output(args.out)
        if args.stream:
            if backend != "onnx":
                raise GenerationError(
                    f"--stream needs an ONNX bundle; --model {args.model} is a PyTorch model: export it with "
                    f"`python -m tinymusician.export {args.model} --out bundle` or drop --stream"
                )
            for flag, value in (
                ("--chunk-seconds", args.chunk_seconds),
                ("--first-chunk-seconds", args.first_chunk_seconds),
            ):
                if not math.isfinite(value) or value <= 0:  # before any WAV is opened
                    raise GenerationError(f"{flag} {value}: must be a positive number of seconds")
            paths, sample_rate, stats = run_stream(args)
            print(
                f"Streamed {', '.join(map(str, paths))}: {len(paths)} x {stats['audio_s']:.2f} s at {sample_rate} "
                f"Hz in {stats['chunks']} chunks; first audio after {stats['first_audio_s']:.2f} s, compute "
                f"{stats['compute_s']:.2f} s, real-time factor {stats['rtf']:.3f}"
            )
            return 0
        audio, sample_rate, stats = run_onnx(args) if backend == "onnx" else run_torch(args)
    except (BundleError, GenerationError, FileNotFoundError, ValueError, RuntimeError) as err:
        # bad bundle, bad arguments, unknown model dir / hub id (ModelSourceError), wrong checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        paths = write_wavs(args.out, audio, sample_rate)
    except Exception as err:  # soundfile / OS errors: keep the generated audio anyway
        import tempfile

        rescue = Path(tempfile.mkdtemp(prefix="tinymusician-")) / "audio.npy"
        np.save(rescue, audio)
        print(
            f"error: cannot write {args.out} ({err}); the generated audio ([B, samples] float32 at "
            f"{sample_rate} Hz) is saved in {rescue}",
            file=sys.stderr,
        )
        return 1
    speed = "faster than real time" if stats["rtf"] < 1 else "slower than real time"
    print(
        f"Wrote {', '.join(map(str, paths))}: {len(paths)} x {stats['audio_s']:.2f} s at {sample_rate} Hz "
        f"({backend}); compute {stats['compute_s']:.2f} s, real-time factor {stats['rtf']:.3f} ({speed})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
