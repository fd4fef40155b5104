"""DreamBooth training (full and LoRA) from a session: ``train(session, TrainConfig(...)) -> TrainResult``."""

from __future__ import annotations

from .config import PRESETS, TrainConfig, resolve
from .loop import TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "resolve", "train"]
