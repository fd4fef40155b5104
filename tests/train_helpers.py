"""Helpers shared by the training tests."""

from __future__ import annotations

from typing import Any


class ModelsBox(dict):
    """Pass as ``train(..., on_models=box)``: ``box["models"]`` is then the run's
    :class:`fastsd.train.parts.BaseModel`, whose modules are the trained ones after the run."""

    def __call__(self, models: Any) -> None:
        self["models"] = models


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
