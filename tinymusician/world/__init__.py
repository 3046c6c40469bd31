"""The tiny world: a trained codec, a teacher trained around it, and a tiny CLAP, built from the synthetic corpus.

``python -m tinymusician.world build`` retrains it (``codec``, ``clap``, ``lm``, orchestrated by ``build``) and
``report`` measures it; the result ships in ``tinymusician/assets/world`` (``tinymusician.shipped``).
"""
