"""Old name of ``python -m tinymusician.prepare`` (the token-cache CLI), kept so existing commands work."""

if __name__ == "__main__":
    import sys

    from tinymusician.prepare import (
        main,  # a CLI shim, the one import of a CLI under data/ (tests/test_layering.py)
    )

    sys.exit(main())
