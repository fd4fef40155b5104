"""Cropping instance photos to the training square, over the subject.

- ``smart`` (default): the square is placed over the subject. Faces come first (OpenCV's Haar
  cascade, when the installed OpenCV ships it); without a face, the square that holds the most
  *saliency* wins, saliency being edge strength plus colour contrast against the image's
  dominant colour, so an off-centre dog on a lawn stays in the picture.
- ``center``: the middle square, the classic behaviour.
- ``none``: the aspect ratio is kept (for aspect-ratio buckets): the image is scaled to about
  ``size * size`` pixels and its sides trimmed to multiples of 64.

The size is the session's, checked by :func:`fastsd.models.registry.check_resolution`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserInputError
from .models.registry import RESOLUTION_STEP, check_resolution

if TYPE_CHECKING:
    from PIL import Image

CROP_MODES = ("smart", "center", "none")
SIZE_STEP = RESOLUTION_STEP
#: How much (0..1) saliency at the image's edge is discounted against its centre in smart crops.
CENTER_PRIOR = 0.3


@functools.lru_cache(maxsize=1)
def _face_cascade() -> Any:
    """OpenCV's frontal-face Haar cascade, or None when this OpenCV does not ship it (OpenCV 5 moved it out)."""
    try:
        import cv2
    except ImportError:
        return None
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not folder or not hasattr(cv2, "CascadeClassifier"):
        return None
    path = Path(folder) / "haarcascade_frontalface_default.xml"
    if not path.is_file():
        return None
    cascade = cv2.CascadeClassifier(str(path))
    return None if cascade.empty() else cascade


def face_detection_available() -> bool:
    """True when OpenCV's Haar face cascade can be loaded here."""
    return _face_cascade() is not None


def detect_faces(img: Image.Image) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` in ``img`` coordinates, largest first; [] without face detection."""
    cascade = _face_cascade()
    if cascade is None:
        return []
    import cv2
    import numpy as np

    scale = min(1.0, 640 / max(img.size))
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(small), cv2.COLOR_RGB2GRAY))
    side = max(24, min(gray.shape) // 12)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=6, minSize=(side, side))
    boxes = [tuple(int(round(v / scale)) for v in box) for box in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)  # type: ignore[return-value]


def saliency_map(img: Image.Image, *, max_side: int = 256) -> Any:
    """A small float map of where the subject probably is: edge strength plus colour contrast.

    Both terms are normalised to [0, 1] and blurred. Colour contrast is the Lab distance from the
    image's median colour, which is usually the background (sky, wall, lawn).

    Returns:
        ``(map, scale)``: a 2-D float32 numpy array and the factor from ``img`` to map pixels.
    """
    import cv2
    import numpy as np

    scale = min(1.0, max_side / max(img.size))
    small = np.asarray(img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale)))))
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    edges = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    contrast = np.linalg.norm(lab - np.median(lab.reshape(-1, 3), axis=0), axis=2)
    k = max(3, (min(gray.shape) // 16) | 1)

    def norm(a: Any) -> Any:
        a = cv2.GaussianBlur(a, (k, k), 0)
        top = float(a.max())
        return a / top if top > 0 else a

    return norm(edges) + norm(contrast), scale


def focal_point(img: Image.Image, crop_side: int | None = None) -> tuple[float, float, str]:
    """Where a square crop of ``img`` should be centred, and how that was decided.

    Faces first: the centre of all faces when they fit in one crop, else of the largest face.
    Otherwise the square of side ``crop_side`` (default: the short side) holding the most saliency.

    Returns:
        ``(x, y, method)`` in ``img`` pixels; method is ``"face"``, ``"saliency"`` or ``"center"``.
    """
    import numpy as np

    w, h = img.size
    side = crop_side or min(w, h)
    faces = detect_faces(img)
    if faces:
        x0 = min(b[0] for b in faces)
        y0 = min(b[1] for b in faces)
        x1 = max(b[0] + b[2] for b in faces)
        y1 = max(b[1] + b[3] for b in faces)
        if x1 - x0 > side or y1 - y0 > side:
            x0, y0, fw, fh = faces[0]
            x1, y1 = x0 + fw, y0 + fh
        return (x0 + x1) / 2, (y0 + y1) / 2, "face"
    if w == h and side >= w:
        return w / 2, h / 2, "center"
    sal, scale = saliency_map(img)
    if float(sal.max()) <= 0:
        return w / 2, h / 2, "center"
    # Best window along each axis via cumulative sums of the map's column/row totals.
    win = max(1, round(side * scale))

    def best_center(profile: Any, full: int) -> float:
        if win >= len(profile):
            return full / 2
        # A mild centre prior: photographers centre their subject more often than not, so
        # scattered texture (foliage, a busy wall) should not drag the crop to an edge.
        pos = np.linspace(-1.0, 1.0, len(profile))
        profile = profile * (1.0 - CENTER_PRIOR * pos * pos)
        sums = np.convolve(profile, np.ones(win), mode="valid")
        best = np.flatnonzero(sums >= sums.max() * 0.999)
        start = float(best[len(best) // 2])  # the middle of equally good windows
        return (start + win / 2) / scale

    return best_center(sal.sum(axis=0), w), best_center(sal.sum(axis=1), h), "saliency"


def crop_box(size: tuple[int, int], center: tuple[float, float], side: int) -> tuple[int, int, int, int]:
    """The ``side`` x ``side`` box centred as near ``center`` as the image allows."""
    w, h = size
    left = min(max(0, round(center[0] - side / 2)), w - side)
    top = min(max(0, round(center[1] - side / 2)), h - side)
    return left, top, left + side, top + side


def crop_image(img: Image.Image, mode: str = "smart", size: int = 512) -> tuple[Image.Image, dict[str, Any]]:
    """Crop and resize one image for training.

    Args:
        img: an RGB image.
        mode: ``smart``, ``center`` or ``none`` (see the module doc).
        size: the training size (see :func:`fastsd.models.registry.check_resolution`).

    Returns:
        ``(image, info)``; info has ``focus`` (face/saliency/center/none), ``box`` (the crop in
        the input's pixels) and ``upscaled`` (True when the input was smaller than needed).

    Raises:
        UserInputError: an unknown mode or size.
    """
    from PIL import Image

    check_resolution(size)
    if mode not in CROP_MODES:
        raise UserInputError(f"crop mode {mode!r} is unknown: use one of {', '.join(CROP_MODES)}")
    w, h = img.size
    if mode == "none":
        scale = math.sqrt(size * size / (w * h))
        rw, rh = max(SIZE_STEP, round(w * scale)), max(SIZE_STEP, round(h * scale))
        tw, th = rw // SIZE_STEP * SIZE_STEP, rh // SIZE_STEP * SIZE_STEP
        resized = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
        left, top = (rw - tw) // 2, (rh - th) // 2
        out = resized.crop((left, top, left + tw, top + th))
        return out, {"focus": "none", "box": (0, 0, w, h), "upscaled": scale > 1.0}
    side = min(w, h)
    if mode == "center":
        cx, cy, focus = w / 2, h / 2, "center"
    else:
        cx, cy, focus = focal_point(img, side)
    box = crop_box((w, h), (cx, cy), side)
    out = img.crop(box)
    if side != size:
        out = out.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return out, {"focus": focus, "box": box, "upscaled": side < size}
