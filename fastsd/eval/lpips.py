"""LPIPS (Zhang et al. 2018), the ``lpips`` package's v0.1 AlexNet metric, in plain torch (no torchvision).

The DreamBooth paper's DIV is LPIPS between images of one prompt, so fastsd computes LPIPS exactly
as ``lpips.LPIPS(net="alex", version="0.1")`` does, from the same two files:

* torchvision's ImageNet AlexNet (``alexnet-owt-7be5be79.pth``): only its ``features`` are used, in
  torchvision's layer layout, so the published file loads as it is (``features.0.weight`` ...;
  the classifier's keys are ignored). LPIPS taps the five ReLU outputs (layers 1, 4, 7, 9, 11).
* lpips' v0.1 ``alex.pth``: five 1x1 convolutions without bias (``lin0.model.1.weight`` ...), one per
  tap, mapping squared feature differences to a distance.

The distance of images ``x`` and ``y`` (RGB in [-1, 1], as lpips expects): both are shifted and
scaled by lpips' ``ScalingLayer`` constants, run through AlexNet; each tap's features are divided
by their channel norm (plus 1e-10); the squared difference goes through that tap's 1x1 conv, is
averaged over height and width, and the five averages are summed. Identical images are at 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelFormatError

#: lpips' ``ScalingLayer``: the input in [-1, 1] becomes ``(x - SHIFT) / SCALE`` per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
#: Indices in ``features`` whose outputs (after ReLU) LPIPS compares, and their channels.
TAPS = (1, 4, 7, 9, 11)
CHANNELS = (64, 192, 384, 256, 256)
#: lpips' ``normalize_tensor`` epsilon, added to the channel norm.
EPS = 1e-10


def alexnet_features() -> nn.Sequential:
    """torchvision's ``AlexNet().features``: the same layers at the same indices (so the same keys)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class LPIPS(nn.Module):
    """The LPIPS v0.1 AlexNet distance; load weights with :func:`load_lpips` (random until then)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = alexnet_features()
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def load_weights(self, alexnet: dict[str, torch.Tensor], lin: dict[str, torch.Tensor]) -> None:
        """Take torchvision's AlexNet state dict (``features.*``; other keys ignored) and lpips' ``lin*`` one.

        Raises:
            ModelFormatError: a key missing or a shape that is not AlexNet's.
        """
        features = {k[len("features.") :]: v for k, v in alexnet.items() if k.startswith("features.")}
        lins = {f"{k}.weight": lin.get(f"lin{k}.model.1.weight") for k in range(len(CHANNELS))}
        if missing := [f"lin{k.split('.')[0]}.model.1.weight" for k, v in lins.items() if v is None]:
            raise ModelFormatError(f"the LPIPS linear weights lack {', '.join(missing)}: not lpips' v0.1 alex.pth")
        try:
            self.features.load_state_dict(features)
            self.lin.load_state_dict(lins)
        except RuntimeError as err:  # missing keys or wrong shapes
            raise ModelFormatError(f"not torchvision's AlexNet and lpips' alex.pth weights: {err}") from None

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised feature maps of ``images`` (N, 3, H, W) in [-1, 1]."""
        h = (images - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS))
        return out

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS between the :meth:`taps` of two batches of the same size (or broadcastable): shape (N,)."""
        return sum(lin((fa - fb).pow(2)).mean(dim=(1, 2, 3)) for lin, fa, fb in zip(self.lin, a, b, strict=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS of ``x[i]`` and ``y[i]``, shape (N,); inputs (N, 3, H, W) RGB in [-1, 1]."""
        return self.distance(self.taps(x), self.taps(y))


def _state_dicts(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The AlexNet and linear-layer state dicts among the folder's ``.pth`` files, told apart by their keys."""
    from ..models.tensorfile import load_pickle_state_dict

    alexnet = lin = None
    for file in sorted(folder.glob("*.pth")):
        sd = load_pickle_state_dict(file)
        if "features.0.weight" in sd:
            alexnet = sd
        elif "lin0.model.1.weight" in sd:
            lin = sd
    if alexnet is None or lin is None:
        raise ModelFormatError(
            f"{folder} needs torchvision's alexnet-owt-7be5be79.pth and lpips' v0.1 alex.pth "
            f"(found {'the AlexNet' if alexnet else 'no AlexNet'} and {'the linear' if lin else 'no linear'} weights)"
        )
    return alexnet, lin


def load_lpips(folder: str | os.PathLike[str], device: str = "cpu") -> LPIPS:
    """The LPIPS network from a folder holding the two weight files (see the module docstring), in eval mode.

    Raises:
        ModelFormatError: a file is missing, is an unsafe pickle, or holds other weights.
    """
    model = LPIPS()
    model.load_weights(*_state_dicts(Path(folder)))
    return model.eval().requires_grad_(False).to(device)


def image_tensor(images: list[Any]) -> torch.Tensor:
    """PIL images (of one size) as an (N, 3, H, W) float tensor in [-1, 1], as lpips' ``im2tensor``."""
    import numpy as np

    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def within_group_lpips(model: LPIPS, images: list[Any], group_size: int) -> float:
    """Mean LPIPS over the pairs of distinct images of each group (consecutive images), averaged over groups.

    The DreamBooth paper's DIV: each group is one prompt's images. Each image goes through AlexNet
    once; the pairs are compared on the stored features.
    """
    if group_size < 2 or len(images) % group_size:
        raise ValueError("diversity needs groups of at least 2 images")
    device = model.shift.device
    means = []
    with torch.inference_mode():
        for start in range(0, len(images), group_size):
            feats = model.taps(image_tensor(images[start : start + group_size]).to(device))
            pairs = [(i, j) for i in range(group_size) for j in range(i + 1, group_size)]
            first, second = [i for i, _ in pairs], [j for _, j in pairs]
            d = model.distance([f[first] for f in feats], [f[second] for f in feats])
            means.append(float(d.double().mean()))
    return sum(means) / len(means)
