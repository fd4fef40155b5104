"""A1111 "parameters" infotext, PNG writing with it, and ``<lora:name:weight>`` prompt syntax.

The infotext is the text A1111 stores in a PNG's ``parameters`` chunk and shows under an image:
the prompt, a ``Negative prompt:`` line, then ``Key: value`` pairs. Tools such as A1111's PNG
Info tab, Civitai and ComfyUI read it back, so the layout follows A1111 exactly.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from .. import storage

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
#: zlib level for saved PNGs: ~3x faster than PIL's default 6 at 512 px for ~1% more bytes.
PNG_COMPRESS_LEVEL = 4
#: zlib level for API responses, where encoding is on every client's critical path (~15% more bytes).
PNG_COMPRESS_LEVEL_FAST = 1


def quote(value: Any) -> str:
    """A value as A1111 writes it: floats without a trailing .0, JSON-quoted if it has , : or a newline."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def build(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """The infotext for one image. ``params`` in display order; None values are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


#: A1111's ``re_param``: ``Key: value`` pairs of the last line, values JSON-quoted when they hold , : or newlines.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse(text: str) -> dict[str, str]:
    """An infotext back into fields, as A1111's ``parse_generation_parameters`` returns them.

    ``Prompt`` and ``Negative prompt`` (multi-line), then each ``Key: value`` of the last line as a
    string; a ``WxH`` value becomes ``Key-1``/``Key-2`` (``Size-1: "512"``). A last line with fewer
    than three pairs is part of the prompt, as in A1111.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    out.setdefault("Clip skip", "1")  # A1111 fills the defaults its UI needs
    return out


def png_info(image: Image.Image) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``'s answer for an opened image: its infotext, other text chunks, fields."""
    meta = dict(image.info)
    text = meta.pop("parameters", None)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    items = {k: v for k, v in meta.items() if isinstance(v, (str, int, float))}
    return {"info": text or "", "items": items, "parameters": parse(text) if text else {}}


def parse_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Split ``<lora:name:weight>`` tags off a prompt.

    Returns:
        (the prompt without the tags, [(name, weight)]); a missing weight means 1.0, and a
        name given twice keeps the last weight as A1111 does.

    Raises:
        ValueError: a weight that is not a number.
    """
    found: dict[str, float] = {}
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"LoRA weight {weight!r} in <lora:{name}:{weight}> is not a number")
        found[name] = value
    clean = re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip().strip(",").strip()
    return clean, list(found.items())


def png_bytes(image: Image.Image, infotext: str | None, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of ``image`` with the infotext in the ``parameters`` text chunk (as A1111 writes it)."""
    from ..storage import png_bytes as encode

    return encode(image, {"parameters": infotext} if infotext else None, compress_level=compress_level)


def png_base64(image: Image.Image, infotext: str | None) -> str:
    """Base64 PNG (no ``data:`` prefix), the form A1111's API returns images in."""
    return base64.b64encode(png_bytes(image, infotext, PNG_COMPRESS_LEVEL_FAST)).decode("ascii")


def read_parameters(png: bytes | str | Path) -> str | None:
    """The ``parameters`` infotext of a PNG (bytes or path), or None."""
    src = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(src) as img:
        return img.info.get("parameters")


def save_outputs(images: list[Image.Image], infotexts: list[str], seeds: list[int], outputs_dir: Path) -> list[Path]:
    """Save images under ``outputs_dir/YYYY-MM-DD/NNNNN-SEED.png`` (A1111's numbering), safely.

    The counter continues from the highest number already in today's folder, so names never
    collide with earlier runs.
    """
    folder = outputs_dir / datetime.now().strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    nxt = max(numbers, default=-1) + 1
    paths = []
    for i, (image, text, seed) in enumerate(zip(images, infotexts, seeds, strict=True)):
        path = folder / f"{nxt + i:05d}-{seed}.png"
        storage.write_bytes(path, png_bytes(image, text))
        paths.append(path)
    return paths
