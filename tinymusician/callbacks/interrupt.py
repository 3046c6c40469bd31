"""Save a resumable checkpoint when training is stopped by SIGTERM (a scheduler, ``timeout``) or Ctrl-C.

Lightning stops gracefully on SIGTERM (at the end of the current batch) but saves nothing and exits 0;
this callback writes the full training state, and ``tinymusician.train`` turns the stop into exit code 143.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

INTERRUPTED_FILE = "interrupted.ckpt"


class CheckpointOnInterrupt(L.Callback):
    """On SIGTERM / KeyboardInterrupt during fit, write ``<dirpath>/interrupted.ckpt`` (resume: ``ckpt_path=``).

    Only those two: SIGTERM is raised between batches, so the state is consistent; other exceptions may come
    from the middle of a step. Nothing is written before the first optimizer step (nothing to resume).
    A separate file from ModelCheckpoint's ``last.ckpt``, whose bookkeeping it would otherwise confuse.
    """

    def __init__(self, dirpath: str | Path, filename: str = INTERRUPTED_FILE) -> None:
        self.path = Path(dirpath) / filename
        self.saved_path: Path | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        self.saved_path = self.path
        log.warning(
            "%s at step %d: saved %s (resume with ckpt_path=%s)",
            "SIGTERM" if isinstance(exception, SIGTERMException) else "KeyboardInterrupt",
            trainer.global_step,
            self.path,
            self.path,
        )
