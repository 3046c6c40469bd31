"""Save the trained student with ``save_pretrained`` the moment fit ends, before any risky post-processing."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from transformers import PreTrainedTokenizerBase

from tinymusician.models.musicgen import save_musicgen

log = logging.getLogger(__name__)


class SaveStudent(L.Callback):
    """Writes ``<dirpath>`` (safetensors + config + tokenizer): loadable with ``from_pretrained``.

    Registered first, so quantization/evaluation callbacks that run after it can never lose the trained
    weights, and they find the full-precision model at :attr:`saved_dir`.
    """

    def __init__(self, dirpath: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
        self.dirpath = Path(dirpath)
        self.tokenizer = tokenizer
        self.saved_dir: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.saved_dir = save_musicgen(pl_module.student, self.tokenizer, self.dirpath)
            log.info("Saved the student to %s", self.saved_dir)
