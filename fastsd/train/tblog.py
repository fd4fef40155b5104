"""TensorBoard logs of a run, kept where Drive never sees an append.

TensorBoard appends to its event files, which a Drive-backed session must never see: they are
written to a local scratch folder named by its owner (a killed run's is cleaned up by the next
one) and copied into the session's ``logs/`` with every checkpoint and at the end.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import storage

log = logging.getLogger(__name__)


class TrainLog:
    """A TensorBoard writer (rank 0, when tensorboard is installed) on a local scratch folder."""

    def __init__(self, main: bool):
        self.main = main
        self.logdir = storage.temp_name(Path(tempfile.gettempdir()) / "tensorboard", "train")
        self.logdir.mkdir(mode=0o700)
        self.writer: Any = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.logdir))
            except ImportError:
                log.info("tensorboard is not installed: no TensorBoard logs")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def sync(self, dest: Path) -> None:
        """Copy the event files into ``dest`` (safe writes: the session never sees an append)."""
        if self.writer is None:
            return
        self.writer.flush()
        for f in self.logdir.rglob("*"):
            if f.is_file():
                storage.copy_file(f, dest / f.relative_to(self.logdir), verify_sha256=False)

    def close(self, dest: Path) -> None:
        """A last copy into ``dest``, then the scratch folder goes."""
        if self.writer is not None and self.main:
            self.sync(dest)
            self.writer.close()
        shutil.rmtree(self.logdir, ignore_errors=True)
