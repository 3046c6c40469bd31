"""Export to ONNX: ``python -m tinymusician.export MODEL --out bundle/ [--precision fp32 int8 int4]``.

MODEL is a ``save_pretrained`` dir (e.g. a run's ``student/``), a hub id, ``tiny`` or a training ``.ckpt``.
The bundle has the Hugging Face / transformers.js layout (see :mod:`tinymusician.onnx.export`), is checked
after writing (greedy generation from a fresh load against transformers' ``generate``: fp32 must give the
same codes, every precision finite audio; exit status 1 otherwise), and runs with ``python -m tinymusician.generate "..." --model bundle/`` or in transformers.js.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tinymusician.onnx.export import DEFAULT_OPSET, ExportError, export_bundle
from tinymusician.onnx.layout import PRECISIONS
from tinymusician.zoo.source import add_base_argument

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinymusician.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model", help="save_pretrained dir, hub id, `tiny`, or a Lightning .ckpt")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (created)")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS), help="graph precisions to write"
    )
    add_base_argument(parser)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--max-text-tokens", type=int, default=256, help="longer prompts are truncated")
    parser.add_argument(
        "--no-fast-decoder",
        action="store_true",
        help="skip the in-place KV-cache decoder graphs (ONNX Runtime's fast path; transformers.js ignores them)",
    )
    parser.add_argument(
        "--cache-dtype",
        choices=["auto", "float32", "float16", "int8"],
        default="auto",
        help="what the fast decoder's self-attention cache stores (auto: float32 for fp32 graphs, int8 for "
        "int8/int4 ones, a quarter of the bytes a late step reads; float16: half)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the parity and generation check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from tinymusician.onnx.check import check_bundle
    from tinymusician.zoo.source import load_named_model

    try:
        model, tokenizer, description = load_named_model(args.model, args.base, key="MODEL")
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        manifest = export_bundle(
            model,
            tokenizer,
            args.out,
            precisions=args.precision,
            opset=args.opset,
            source=description,
            max_text_tokens=args.max_text_tokens,
            fast_decoder=not args.no_fast_decoder,
            cache_dtype=args.cache_dtype,
        )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = [
        f"Exported {description} -> {args.out} (opset {manifest['opset']}, {manifest['export_seconds']} s)"
    ]
    for relative, entry in manifest["files"].items():
        lines.append(f"  {relative:<45} {entry['precision']:<5} {entry['bytes'] / 1e6:9.1f} MB")
    if "fast_decoder" in manifest:
        caches = ", ".join(f"{p} {d}" for p, d in manifest["fast_decoder"]["cache_dtype"].items())
        lines.append(f"  fast decoder's self-attention cache: {caches}")
    status = 0
    if not args.no_check:
        for precision, (line, ok) in check_bundle(model, args.out, manifest["precisions"]).items():
            lines.append(f"  check {precision:<10} {line}{'' if ok else '  FAILED'}")
            status = status if ok else 1
    print("\n".join(lines))
    if status:
        print("error: the exported bundle does not reproduce PyTorch (see the check lines)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
