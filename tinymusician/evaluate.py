"""Score generated music with FAD and the CLAP score: checkpoint (or WAV folder) -> audio -> report.

    python -m tinymusician.evaluate --model DIR_OR_HUB_ID --reference REF_WAV_DIR_OR_STATS
    python -m tinymusician.evaluate --audio-dir WAVS --reference REF --embedder vggish:/path/vggish-10086976.pth
    python -m tinymusician.evaluate --reference REF_WAV_DIR --embedder vggish:/path/... --save-stats ref.safetensors

The work is :func:`tinymusician.metrics.evaluation.run_evaluation`, which training's
:class:`tinymusician.callbacks.evaluate.EvaluateCallback` shares; this module parses, checks flags and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tinymusician.metrics.embedders import EmbedderError, EncodecEmbedder
from tinymusician.metrics.evaluation import (
    DEFAULT_PROMPTS,
    EvaluationError,
    build_embedders,
    clap_embedder,
    format_table,
    parse_embedder,
    resolve_path,
    run_evaluation,
)
from tinymusician.zoo.source import add_base_argument, add_guidance_argument

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinymusician.evaluate",
        description="FAD and CLAP score of a MusicGen checkpoint (generates from prompts) or of a folder of WAVs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--model",
        help="MusicGen to generate with: save_pretrained dir, hub id, `tiny`, a training .ckpt, or a quantized bundle",
    )
    what.add_argument("--audio-dir", help="folder of WAVs to score (CLAP needs its metadata.jsonl captions)")
    add_base_argument(parser, "a .ckpt --model")
    parser.add_argument(
        "--reference", help="reference: folder of WAVs, or a statistics file from --save-stats"
    )
    parser.add_argument(
        "--max-reference-clips", type=int, default=None, help="use only the first N reference files"
    )
    parser.add_argument(
        "--embedder",
        action="append",
        default=None,
        metavar="NAME[:SOURCE]",
        help="FAD embedder, repeatable: encodec[:musicgen id/dir] (default: the --model's own codec), "
        "vggish:/path/vggish-10086976.pth, clap[:hub id/dir]",
    )
    parser.add_argument(
        "--clap", metavar="SOURCE", help="CLAP model for the CLAP score, e.g. laion/larger_clap_music"
    )
    parser.add_argument(
        "--fad-inf", action="store_true", help="also report FAD-infinity (fit over 1/N, intercept)"
    )
    parser.add_argument("--inf-min-n", type=int, default=None, help="smallest FAD-inf subset (frames)")
    parser.add_argument(
        "--prompts-file", default=None, help=f"one prompt per line (default with --model: {DEFAULT_PROMPTS})"
    )
    parser.add_argument("--prompt", action="append", default=None, help="inline prompt, repeatable")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seconds", type=float, default=10.0, help="generated clip length")
    add_guidance_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="generation and embedding batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default="evaluation", help="report.json (and generated WAVs) go here")
    parser.add_argument(
        "--save-stats", metavar="FILE", help="write the reference's statistics (safetensors) here"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0; 2 with ``error: ...`` on stderr for a setting, file or model that cannot work."""
    from tinymusician.models.generation import GenerationError
    from tinymusician.models.musicgen import ModelSourceError
    from tinymusician.quant.bundle import BundleError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (
        EvaluationError,
        EmbedderError,
        GenerationError,
        ModelSourceError,
        BundleError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.model is None and args.audio_dir is None and not args.save_stats:
        raise EvaluationError("give --model or --audio-dir to score, or --reference with --save-stats")
    if args.save_stats and not args.reference:
        raise EvaluationError("--save-stats needs --reference: the folder of WAVs whose statistics to save")
    reference = resolve_path(args.reference) if args.reference else None
    if reference is not None and not reference.exists():
        raise EvaluationError(f"--reference {args.reference!r} does not exist")
    if args.save_stats and reference is not None and not reference.is_dir():
        raise EvaluationError("--save-stats embeds a folder of WAVs: --reference must be a directory")
    specs = [parse_embedder(s) for s in (args.embedder or (["encodec"] if args.model else []))]
    if reference is not None and not specs:
        raise EvaluationError(
            "FAD needs an embedder: --embedder vggish:/path/vggish-10086976.pth (or encodec:..., clap)"
        )
    if not specs and not args.clap:
        raise EvaluationError(
            "nothing to compute: give --reference (+ --embedder) for FAD and/or --clap for the CLAP score"
        )
    if specs and reference is None:
        raise EvaluationError("FAD needs --reference (a folder of WAVs or a statistics file)")
    if args.audio_dir is not None and not resolve_path(args.audio_dir).is_dir():
        raise EvaluationError(f"--audio-dir {args.audio_dir!r}: not a directory of audio files")

    model = tokenizer = None
    if args.model:
        from tinymusician.quant.ptq import PLAN_ATTRIBUTE
        from tinymusician.zoo.source import load_named_model

        model, tokenizer, description = load_named_model(args.model, args.base, key="--model", quantized=True)
        log.info("evaluating %s", description)
        model = model.to(args.device)

        def own_codec() -> EncodecEmbedder:
            if getattr(model, PLAN_ATTRIBUTE, None) is not None:
                raise EvaluationError(
                    f"--model {args.model} is a quantized bundle: it keeps no EnCodec encoder, so it cannot be "
                    "its own FAD embedder. Give --embedder encodec:<the student directory it was quantized from> "
                    "(the same embedder as the student's score)"
                )
            return EncodecEmbedder(args.model, codec=model.audio_encoder, device=args.device)

    embedders = build_embedders(specs, device=args.device, own_codec=own_codec if model is not None else None)
    done = run_evaluation(
        embedders,
        model=model,
        tokenizer=tokenizer,
        model_name=args.model,
        audio_dir=args.audio_dir,
        reference=reference,
        max_reference_clips=args.max_reference_clips,
        clap=clap_embedder(embedders, args.clap, device=args.device) if args.clap else None,
        prompts=args.prompt,
        prompts_file=args.prompts_file,
        num_prompts=args.num_prompts,
        seconds=args.seconds,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        fad_inf=args.fad_inf,
        inf_min_n=args.inf_min_n,
        output_dir=args.output_dir,
        save_stats_to=args.save_stats,
        progress=not args.no_progress,
    )
    if done.stats_path is not None:
        names = ", ".join(e.name for e in embedders)
        print(
            f"Saved reference statistics of {done.reference['n_clips']} clips ({names}) to {done.stats_path}"
        )
    if done.report is None:
        return 0
    print(format_table({"model" if model is not None else "audio": done.result}))
    print(f"Report: {done.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
