"""Layout regions to OCR jobs and back: crops, per-region prompts, the SDK's JSON and Markdown, box drawings.

A page's regions (from :mod:`.layout`) become one :class:`~.engine.PageJob` each, cropped from the
page and fitted to the OCR model's grid, with the prompt of its task. Results are assembled as the
GLM-OCR SDK returns them: per page a list of ``{index, label, native_label, content, bbox_2d}``
where ``label`` is the kind (``text``/``table``/``formula``/``image``) and ``native_label`` the
layout class, and Markdown in reading order: titles as headings, formulas as ``$$`` blocks, tables
as the model's HTML, pictures as image links when their crops are saved.
"""

from __future__ import annotations

import re
from typing import Any

from .layout import Region
from .processor import PatchGrid
from .prompts import TASK_PROMPTS

#: Regions whose crop is smaller than this on a side are upscaled to it before fitting (tiny boxes).
MIN_CROP_SIDE = 28


def crop(image: Any, region: Region, grid: PatchGrid) -> Any:
    """The region cut from its page and resized to the OCR grid (the size the model reads it at).

    Raises:
        ValueError: the box is empty or outside the page (a misread region).
    """
    from PIL import Image

    x1, y1, x2, y2 = region.box
    w, h = image.size
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"region {region.index} box {region.box} is outside the {w}x{h} page")
    piece = image.crop((x1, y1, x2, y2))
    return piece.resize(grid.fit(*piece.size), Image.Resampling.BICUBIC)


def region_prompt(task: str) -> str:
    """The exact GLM-OCR prompt a region of ``task`` is read with."""
    return TASK_PROMPTS[task]


def kind(native_label: str, task: str) -> str:
    """The SDK's ``label`` of a region: ``image`` for pictures, else its task."""
    return "image" if task == "skip" else task


def _clean(text: str) -> str:
    text = re.sub(r"^(\\t)+", "", text).lstrip()
    text = re.sub(r"(\\t)+$", "", text).rstrip()
    for ch in (r"\.", "·", "_", r"\\_"):
        text = re.sub(rf"({ch})\1{{2,}}", r"\1\1\1", text)  # leader dots and fill lines: three are enough
    return text.strip()


def format_content(content: str, label: str, native_label: str) -> str:
    """A region's recognised text as it goes into the Markdown (the SDK's formatting rules)."""
    content = content.strip()
    if not (label == "table" and content.startswith("<table") and content.endswith("</table>")):
        content = _clean(content)
    if native_label == "doc_title":
        content = "# " + re.sub(r"^#+\s*", "", content)
    elif native_label == "paragraph_title":
        if content.startswith(("- ", "* ")):
            content = content[2:].lstrip()
        content = "## " + re.sub(r"^#+\s*", "", content).lstrip()
    if label == "formula" and content:
        if content.startswith(("$$", "\\[", "\\(")):
            content = content[2:].strip()
        if content.endswith(("$$", "\\]", "\\)")):
            content = content[:-2].strip()
        content = "$$\n" + content + "\n$$"
    if label == "text":
        if content.startswith("```") and not content.endswith("```"):
            content += "\n```"
        if content.startswith(("·", "•", "* ")):
            content = "- " + content[1:].lstrip()
        content = re.sub(r"(?<!\n)\n(?!\n)", "\n\n", content)
    return content


def _number(text: str) -> str:
    text = text.strip()
    for left, right in (("(", ")"), ("（", "）")):
        if text.startswith(left) and text.endswith(right):
            return text[1:-1].strip()
    return text


def merge_formula_numbers(records: list[dict]) -> list[dict]:
    """A ``formula_number`` next to a formula becomes its ``\\tag{n}``; a lone one is dropped (the SDK's rule)."""
    out: list[dict] = []
    i = 0
    while i < len(records):
        rec = records[i]
        nxt = records[i + 1] if i + 1 < len(records) else None
        if rec["native_label"] == "formula_number":
            if nxt is not None and nxt["label"] == "formula":
                out.append(_tagged(nxt, rec["content"]))
                i += 2
            else:
                i += 1
            continue
        if rec["label"] == "formula" and nxt is not None and nxt["native_label"] == "formula_number":
            out.append(_tagged(rec, nxt["content"]))
            i += 2
            continue
        out.append(rec)
        i += 1
    return out


def _tagged(formula: dict, number: str) -> dict:
    rec = dict(formula)
    if rec["content"].endswith("\n$$"):
        rec["content"] = rec["content"][:-3] + f" \\tag{{{_number(number)}}}\n$$"
    return rec


def assemble(
    regions: list[Region], texts: dict[int, str], image_links: dict[int, str] | None = None
) -> tuple[list[dict], str]:
    """One page's JSON records and Markdown from its regions and their recognised texts.

    Args:
        texts: region index -> recognised text (regions not read, e.g. pictures, are absent).
        image_links: region index -> relative path of the saved crop of a picture region.

    Returns:
        ``(records, markdown)``: records in reading order with fresh indices; regions whose text
        came out empty are left out, as the SDK does (pictures stay), and formula numbers are
        merged into their formulas.
    """
    records: list[dict] = []
    links = image_links or {}
    for region in regions:
        label = kind(region.label, region.task)
        content = format_content(texts.get(region.index, ""), label, region.label) if label != "image" else ""
        if label != "image" and not content:
            continue
        rec = {
            "index": 0,
            "label": label,
            "native_label": region.label,
            "content": content,
            "bbox_2d": list(region.bbox_2d),
        }
        if label == "image" and region.index in links:
            rec["image_path"] = links[region.index]
        records.append(rec)
    records = merge_formula_numbers(records)
    parts: list[str] = []
    for n, rec in enumerate(records):
        rec["index"] = n
        if rec["label"] == "image":
            if "image_path" in rec:
                parts.append(f"![{rec['native_label']}]({rec['image_path']})")
        elif rec["content"]:
            parts.append(rec["content"])
    return records, "\n\n".join(parts)


#: Box colours of the drawing, by kind.
COLOURS = {"text": (31, 119, 180), "table": (44, 160, 44), "formula": (214, 39, 40), "image": (148, 103, 189)}


def draw(image: Any, regions: list[Region]) -> Any:
    """A copy of the page with each region's box, reading-order number and label drawn on it."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    pen = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 400))
    for n, region in enumerate(regions):
        colour = COLOURS.get(kind(region.label, region.task), (127, 127, 127))
        pen.rectangle(region.box, outline=colour, width=width)
        tag = f"{n + 1} {region.label}"
        x, y = region.box[0] + width, region.box[1] + width
        left, top, right, bottom = pen.textbbox((x, y), tag)
        pen.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        pen.text((x, y), tag, fill=(255, 255, 255))
    return out
