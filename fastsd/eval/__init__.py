"""Likeness scores of a trained subject: the DreamBooth paper's DINO, CLIP-I, CLIP-T, PRES and DIV."""

from .run import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
