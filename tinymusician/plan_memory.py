"""Memory per GPU of a training run before renting the GPUs: ``python -m tinymusician.plan_memory model=musicgen``.

The arguments are the same Hydra overrides as ``python -m tinymusician.train`` (composed from conf/train.yaml);
only config.json files are read (MusicGen's released sizes are known offline). Examples::

    python -m tinymusician.plan_memory model=musicgen data=musiccaps trainer=fsdp trainer.devices=4
    python -m tinymusician.plan_memory model=musicgen trainer.precision=bf16-mixed --k 8 --json
    python -m tinymusician.plan_memory --measure    # the embedded default: the estimate against one real step
"""

from __future__ import annotations

import argparse
import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from tinymusician.models.musicgen import ModelSourceError
from tinymusician.training.memory import GIB, estimate_factor, measure_training_step, plan_memory
from tinymusician.zoo.source import compose_config

CONFIG_EXIT_CODE = 2  # like train: a config the plan cannot read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinymusician.plan_memory",
        description="Memory per GPU (teacher, student, gradients, optimizer, activations) of a training run, "
        "and the teacher-logit cache's disk size per hour of audio.",
        epilog="Example: python -m tinymusician.plan_memory model=musicgen trainer=fsdp trainer.devices=4",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, as for train")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes and GiB)")
    parser.add_argument(
        "--k", type=int, default=None, help="top-k of the logit cache (default distill.cache.k, 32)"
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also run one training step here and compare (small models only: it loads them)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = compose_config(args.overrides)
        plan = plan_memory(cfg, k=args.k)
    except (HydraException, OmegaConfBaseException, ValueError, ModelSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    result = plan.to_dict()
    if args.measure:
        measured = measure_training_step(cfg)
        result["measured"] = {
            "step_bytes": measured.step_bytes,
            "total_bytes": measured.total,
            "estimate_over_measured": estimate_factor(plan, measured),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(plan.format())
    if args.measure:
        factor = result["measured"]["estimate_over_measured"]
        print(
            f"  measured here (one step, peak RSS): step {measured.step_bytes / GIB:.3f} GiB, total "
            f"{measured.total / GIB:.3f} GiB; estimate / measured: step {factor['step']:.2f}x, "
            f"total {factor['total']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
