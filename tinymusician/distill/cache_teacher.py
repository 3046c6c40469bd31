"""``python -m tinymusician.distill.cache_teacher``: the issue's spelling of ``python -m tinymusician.cache_teacher``
(the command lives with the other CLIs, above the layers it composes)."""

if __name__ == "__main__":
    from tinymusician.cache_teacher import main

    main()
