"""The parallel PNG encoder: files every decoder reads back pixel for pixel, with A1111's text chunks."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from fastsd import pngencode, storage
from fastsd.webui import infotext


def _image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    w, h = size
    smooth = np.add.outer(np.arange(h), np.arange(w))[..., None] % 256  # compressible, with detail from noise
    arr = (smooth + rng.randint(0, 12, (h, w, channels))).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(512, 512), (301, 517), (700, 97)])
def test_every_part_joins_into_one_png_that_decodes_exactly(mode, size, monkeypatch):
    monkeypatch.setattr(pngencode, "workers", lambda: 3)  # three parts even on a one-core runner
    image = _image(mode, size)
    data = pngencode.encode(image, {"parameters": "a photo of sks dog\nSteps: 20"}, level=6)
    back = Image.open(io.BytesIO(data))
    back.load()  # Pillow checks every chunk's CRC and the zlib stream's Adler-32
    assert back.mode == mode and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert back.info["parameters"] == "a photo of sks dog\nSteps: 20"
    # the IDAT is one valid zlib stream (independently decompressed, not just what Pillow tolerates)
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    h = size[1]
    assert len(zlib.decompress(idat)) == h * (1 + size[0] * len(mode))


def test_text_that_is_not_latin1_is_kept_as_itxt(monkeypatch):
    monkeypatch.setattr(pngencode, "workers", lambda: 2)
    text = {"parameters": "un chien sks, 夜の街, emoji ✓", "plain": "naïve café"}
    data = pngencode.encode(_image("RGB", (320, 320)), text)
    assert b"iTXt" in data and b"tEXt" in data
    assert Image.open(io.BytesIO(data)).info == text


def test_the_api_png_goes_through_the_parallel_encoder_and_reads_back(monkeypatch):
    """What an A1111 client gets: base64 PNG whose pixels and infotext survive the round trip."""
    import base64

    monkeypatch.setattr(pngencode, "workers", lambda: 4)
    calls = []
    real = pngencode.encode
    monkeypatch.setattr(pngencode, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = _image("RGB", (512, 512), seed=3)
    b64 = infotext.png_base64(image, "a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    back = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert calls, "a 512 px image should take the parallel path"
    assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(image))
    assert back.info["parameters"].startswith("a cat\nSteps: 20")


def test_small_images_and_other_modes_keep_pillows_encoder(monkeypatch):
    monkeypatch.setattr(pngencode, "workers", lambda: 4)
    assert not pngencode.can_encode(_image("RGB", (64, 64)))  # small: threads cost more than they save
    assert not pngencode.can_encode(Image.new("P", (512, 512)))  # palette: Pillow's job
    monkeypatch.setattr(pngencode, "workers", lambda: 1)
    assert not pngencode.can_encode(_image("RGB", (512, 512)))  # one core: nothing to gain
    png = storage.png_bytes(Image.new("P", (512, 512)), {"k": "v"})
    assert Image.open(io.BytesIO(png)).info["k"] == "v"


def test_noise_is_stored_and_images_with_structure_are_compressed(monkeypatch):
    """A random-weight model's noise does not deflate: its parts are stored (what deflate would cost is saved, the
    file is as large either way); an image with structure still compresses. Both read back exactly."""
    monkeypatch.setattr(pngencode, "workers", lambda: 3)
    rng = np.random.RandomState(0)
    noise = Image.fromarray(rng.randint(0, 256, (512, 512, 3)).astype(np.uint8))
    image = _image("RGB", (512, 512))
    for picture, stored in ((noise, True), (image, False)):
        data = pngencode.encode(picture, None, level=1)
        back = Image.open(io.BytesIO(data))
        back.load()
        assert np.array_equal(np.asarray(back), np.asarray(picture))
        raw = 512 * (1 + 512 * 3)
        assert (len(data) > raw) == stored  # stored blocks: the rows plus a few bytes per 64 KiB block
        if not stored:
            assert len(data) < 0.8 * raw
    # a noise image's deflate at level 1 is barely smaller than storing it: nothing is lost by storing
    assert len(zlib.compress(noise.tobytes(), 1)) > 0.99 * len(noise.tobytes())
