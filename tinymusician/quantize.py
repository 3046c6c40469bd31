"""Quantize a saved student: ``python -m tinymusician.quantize SOURCE quant=paper [OVERRIDES] [--out DIR]``.

SOURCE is a ``save_pretrained`` directory, a hub id, ``tiny`` (the embedded default student) or a Lightning
``.ckpt`` of a training run. The other ``key=value`` arguments are Hydra overrides of ``conf/train.yaml``,
as for training: ``quant=paper|int8|adaptive`` picks the plan (required), ``quant.search.min_top1_agree=0.9``
tunes it, ``data.*`` chooses the held-out clips the fidelity is measured on. The same job as in training
(:class:`~tinymusician.quant.job.QuantizeJob`) does the work, so the bundle and ``quant_report.json`` are
identical; the bundle is then loaded back and generates a short clip as a check.
Overrides, SOURCE and options may come in any order (``SOURCE --out DIR quant=paper`` works too).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

from tinymusician.quant.config import QUANT_TARGET, quantization_options
from tinymusician.quant.job import QuantizeJob
from tinymusician.quant.plan import PlanError, known_plan_names
from tinymusician.zoo.source import add_base_argument, compose_config, load_source

log = logging.getLogger(__name__)

TEMPLATE = "a calm piano melody with soft drums"


def check_generation(bundle_dir: Path, prompt: str, tokens: int) -> tuple[int, ...]:
    """Load the bundle as a user would and generate; returns the audio shape (raises if not finite)."""
    from tinymusician.models.musicgen import load_tokenizer
    from tinymusician.quant.bundle import load_quantized

    model = load_quantized(bundle_dir)
    tokenizer = load_tokenizer(str(bundle_dir))
    with torch.no_grad():
        audio = model.generate(
            **tokenizer([prompt], return_tensors="pt"), guidance_scale=3.0, max_new_tokens=tokens
        )
    if not torch.isfinite(audio.float()).all():
        raise RuntimeError(f"{bundle_dir}: generated audio is not finite")
    return tuple(audio.shape)


def split_overrides(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Positional tokens -> (sources, Hydra overrides): an override has ``=`` and is not an existing path
    (a multirun directory such as ``.../0_loss=fkl/student`` is a source)."""
    overrides = [t for t in tokens if "=" in t and not Path(t).expanduser().exists()]
    return [t for t in tokens if t not in overrides], overrides


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Options, the source and ``key=value`` overrides in any order (``SRC --out DIR quant=paper`` too)."""
    parser = argparse.ArgumentParser(
        prog="python -m tinymusician.quantize",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s SOURCE quant=PLAN [OVERRIDES ...] [--out DIR] [options]",
        epilog=f"plans: {', '.join(known_plan_names())}. Example: python -m tinymusician.quantize "
        "logs/kd_only/runs/<time>/student quant=int8 --out int8-bundle",
    )
    parser.add_argument(
        "positionals",
        nargs="*",
        metavar="SOURCE | OVERRIDE",
        help="SOURCE: save_pretrained dir, hub id, `tiny`, or a Lightning .ckpt; OVERRIDE: Hydra key=value, "
        "e.g. quant=paper data.num_val=16 (any order, before or after the options)",
    )
    parser.add_argument("--out", type=Path, default=None, help="bundle + report directory")
    add_base_argument(parser)
    parser.add_argument("--prompt", default=TEMPLATE, help="prompt of the generation check")
    parser.add_argument("--check-tokens", type=int, default=16, help="tokens generated as a check (0: skip)")
    args = parser.parse_intermixed_args(argv)
    sources, overrides = split_overrides(args.positionals)
    if len(sources) != 1:
        parser.error(
            f"give exactly one SOURCE (got {sources or 'none'}); overrides are key=value (e.g. quant=paper)"
        )
    args.source = sources[0]
    return args, overrides


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException

    from tinymusician.models.musicgen import ModelSourceError
    from tinymusician.quant.bundle import BundleError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    plan = next((o.split("=", 1)[1] for o in overrides if re.fullmatch(r"\+?quant=.*", o)), None)
    if plan is None:
        return fail(
            f"choose a plan: quant={'|'.join(n for n in known_plan_names() if n != 'fp32')} "
            "(the options of conf/quant/)"
        )
    name = Path(args.source.rstrip("/")).stem or "model"
    output_dir = (args.out or Path("quantized") / f"{name}-{plan}").resolve()
    try:
        cfg = compose_config(overrides, output_dir)
        options = quantization_options(cfg.quant)
    except HydraException as err:
        return fail(f"overrides {overrides}: {err}")
    except PlanError as err:
        return fail(f"quant: {err}")
    if "_target_" not in cfg.quant:
        return fail("quant=none does nothing; choose quant=paper|int8|adaptive")
    if options is None:
        return fail(f"quant._target_={cfg.quant._target_}: this command runs {QUANT_TARGET}'s job only")

    try:
        student, tokenizer, description = load_source(args.source, cfg, args.base)
    except (ModelSourceError, FileNotFoundError) as err:
        return fail(str(err))
    datamodule = instantiate(cfg.data)
    datamodule.attach(student, tokenizer)
    datamodule.setup("validate")
    job = QuantizeJob(options)
    report = job.run(student, tokenizer, datamodule, output_dir, source=description)
    if report["status"] != "ok":
        print(f"Quantization failed: {report['error']} (report: {job.report_path})", file=sys.stderr)
        return 1
    size, fidelity = report["size"], report["fidelity"]
    lines = [
        f"Quantized {description}",
        f"  plan              {report['plan_description']}",
        "  size MB           "
        + ", ".join(
            f"{part} {size['before_mb'][part]:.1f} -> {size['after_mb'][part]:.1f}"
            for part in size["after_mb"]
        ),
        f"  reduction         {100 * size['reduction']['total']:.1f}% (same parts, without the codec encoder: "
        f"{100 * size['reduction']['deployed']:.1f}%)",
        f"  fidelity          top-1 agreement {fidelity['top1_agree']:.4f}, KL {fidelity['kl']:.2e}, "
        f"max |logit diff| {fidelity['max_logit_diff']:.3g} ({fidelity['positions']} held-out positions)",
        f"  bundle            {job.bundle_dir}  (tinymusician.quant.load_quantized(dir))",
        f"  report            {job.report_path}",
    ]
    if args.check_tokens > 0:
        try:
            shape = check_generation(output_dir, args.prompt, args.check_tokens)
        except (BundleError, RuntimeError) as err:
            print("\n".join(lines), flush=True)
            print(f"error: the bundle was written but the generation check failed: {err}", file=sys.stderr)
            return 1
        lines.append(f"  generation check  reloaded and generated audio {shape} from {args.prompt!r}")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
