"""``python -m tinymusician.world build [--budget small|full]``: retrain the tiny world and write its report."""

from tinymusician.world.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
