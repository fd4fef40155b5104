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


def square_session(home: Any, model: Any, name: str, *, size: int = 64, images: int = 2) -> Any:
    """A session on ``model`` with ``images`` random square PNGs of ``size`` px (one bucket)."""
    import numpy as np
    from PIL import Image

    from fastsd.session import Session

    s = Session.create(name, home, base_model=str(model), resolution=size, class_word="dog")
    for i in range(images):
        arr = (np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(s.instance_dir / f"img{i}.png")
    return s
