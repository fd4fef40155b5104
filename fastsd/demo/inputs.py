"""What the demo feeds the real commands: generated photos and a generated one-page PDF.

Nothing is downloaded: the photos are procedural (a gradient sky, a ground and a round "subject"
in a different place and colour in each), the PDF is text drawn with PIL and saved as a PDF page.
Both are written through :mod:`fastsd.storage`, like every file fastsd keeps.
"""

from __future__ import annotations

import io
from pathlib import Path

from .. import storage

#: The text on the demo's PDF page (the tiny OCR model reads it as gibberish; a real one reads it).
PAGE_TEXT = ("fastsd demo", "This page was drawn by PIL and saved as a PDF.", "GLM-OCR turns it into Markdown.")


def write_photos(folder: Path, count: int = 4, size: tuple[int, int] = (576, 640), seed: int = 0) -> list[Path]:
    """Write ``count`` procedural RGB photos (PNG, ``size`` = width x height) to ``folder``; returns their paths.

    Each is different (so de-duplication keeps them all) and larger than the 512 px training size,
    so ``session add`` crops them as it crops real photos.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for i in range(count):
        sky, ground, subject = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3))
        rows = np.linspace(0.0, 1.0, height)[:, None, None]
        pixels = (1 - rows) * np.array(sky) + rows * np.array(ground)
        pixels = pixels + rng.normal(0, 8, (height, width, 3))  # sensor-like noise
        image = Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))
        draw = ImageDraw.Draw(image)
        cx, cy = int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(height // 3, 2 * height // 3))
        r = int(rng.integers(width // 8, width // 4))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=subject, outline=(0, 0, 0), width=4)
        path = folder / f"photo-{i + 1}.png"
        storage.write_bytes(path, storage.png_bytes(image))
        paths.append(path)
    return paths


def write_pdf_page(path: Path, lines: tuple[str, ...] = PAGE_TEXT) -> Path:
    """Write a one-page PDF with ``lines`` of black text on white (6 x 8 inches at 100 dpi)."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (600, 800), "white")
    draw = ImageDraw.Draw(page)
    try:
        font = ImageFont.load_default(size=20)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        font = ImageFont.load_default()
    y = 40
    for line in lines:
        draw.text((30, y), line, fill="black", font=font)
        y += 36
    buf = io.BytesIO()
    page.save(buf, "PDF", resolution=100.0)
    storage.write_bytes(path, buf.getvalue())
    return path
