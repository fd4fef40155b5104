"""DreamBooth training (full and LoRA) from a session: ``train(session, TrainConfig(...)) -> TrainResult``.

``train`` and ``TrainResult`` live in :mod:`fastsd.train.loop`, which imports torch; they are
loaded on first use, so ``fastsd.train.config`` (the CLI's flags and their choices) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import PRESETS, TrainConfig, resolve

if TYPE_CHECKING:
    from .loop import TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "resolve", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "train"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
