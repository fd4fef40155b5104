"""Layout-mode recognition of a batch of pages: detect regions on all pages, read all regions together.

Regions of every page in the batch are pooled, sorted by size and sent to the OCR engine in
batches as large as it allows, each with the prompt of its task, so a page of 30 small paragraphs
costs a share of a few decoder batches rather than 30 calls. A page the layout model fails on is
read whole (with a warning); a region that cannot be cut or read gets an empty text and a warning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .engine import PageJob
from .layout import LayoutDetector, Region
from .regions import crop, region_prompt

log = logging.getLogger(__name__)


@dataclass
class LayoutPage:
    """One page's layout-mode outcome: regions in reading order, their texts, and what went wrong."""

    regions: list[Region]
    texts: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    finish: str = "eos"
    warnings: list[str] = field(default_factory=list)


def _whole_page(image: Any) -> Region:
    w, h = image.size
    return Region(0, "text", "text", 1.0, (0, 0, w, h), [0, 0, 1000, 1000])


def detect_pages(detector: LayoutDetector, images: list) -> list[tuple[list[Region], str | None]]:
    """Regions per page; when the batch fails, pages one by one, and a failing page is one text region."""
    try:
        return [(r, None) for r in detector.detect(images)]
    except Exception as err:  # noqa: BLE001 - narrowed to the page below
        if len(images) == 1:
            log.debug("layout failed: %s", err)
            return [([_whole_page(images[0])], f"layout detection failed ({err}); the page was read whole")]
    return [detect_pages(detector, [im])[0] for im in images]


def recognise(engine: Any, detector: LayoutDetector, images: list) -> list[LayoutPage]:
    """Detect and read the regions of ``images`` (PIL pages); one :class:`LayoutPage` per image, in order."""
    start = time.perf_counter()
    pages: list[LayoutPage] = []
    jobs: list[PageJob] = []
    for p, (image, (regions, problem)) in enumerate(zip(images, detect_pages(detector, images), strict=True)):
        page = LayoutPage(regions=regions, warnings=[problem] if problem else [])
        pages.append(page)
        for region in regions:
            if region.task not in ("text", "table", "formula"):
                continue
            try:
                jobs.append(PageJob((p, region.index), crop(image, region, engine.grid), region_prompt(region.task)))
            except (ValueError, OSError) as err:
                page.warnings.append(f"region {region.index} ({region.label}) skipped: {err}")
    t_layout = time.perf_counter()
    jobs.sort(key=lambda j: j.image.size[0] * j.image.size[1])
    pos = 0
    finishes: dict[int, set[str]] = {}
    while pos < len(jobs):
        n = max(1, engine.batch_size_for(jobs[pos].image.size))
        largest = jobs[min(len(jobs), pos + n) - 1].image.size  # sorted: the chunk's last is its largest
        n = max(1, min(n, engine.batch_size_for(largest)))
        chunk = jobs[pos : pos + n]
        pos += n
        try:
            gens = engine.run(chunk)
        except Exception as err:  # noqa: BLE001 - these regions fail, the other batches go on
            for job in chunk:
                p, idx = job.key
                pages[p].warnings.append(f"region {idx} could not be read: {err}")
            continue
        for gen in gens:
            p, idx = gen.key
            page = pages[p]
            page.texts[idx] = gen.text
            page.tokens += gen.tokens
            finishes.setdefault(p, set()).add(gen.finish)
            page.warnings += [f"region {idx}: {w}" for w in gen.warnings]
    elapsed = time.perf_counter() - start
    for p, page in enumerate(pages):
        page.seconds = elapsed / max(1, len(pages))
        got = finishes.get(p, set())
        page.finish = next((f for f in ("error", "repetition", "length") if f in got), "eos")
    log.debug("layout %.2fs, %d regions read in %.2fs", t_layout - start, len(jobs), elapsed - (t_layout - start))
    return pages
