"""Helpers shared by the training tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def capture_models() -> Iterator[dict[str, Any]]:
    """Record the models object (UNet, text encoders...) of the training runs inside the block.

    ``box["models"]`` is the last run's ``fastsd.train.loop._Models``, to inspect trained weights.
    """
    from fastsd.train import loop

    box: dict[str, Any] = {}
    real = loop._Models

    def spy(*args: Any, **kwargs: Any) -> Any:
        box["models"] = real(*args, **kwargs)
        return box["models"]

    loop._Models = spy
    try:
        yield box
    finally:
        loop._Models = real
