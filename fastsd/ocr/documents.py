"""Documents to pages: PDFs (pypdfium2), images (png/jpg/webp/tiff incl. multi-page), folders, globs.

A :class:`Document` lists its :class:`Page` objects without rendering them: each page knows its
size on the model's patch grid up front (from the PDF page box or the image header), so the engine
can group pages of one size into a batch, and renders only when the batch runs. A document that
cannot be read (corrupt or password-protected PDF, no pages, oversized or unknown file) carries an
``error`` and no pages; the run reports it and goes on with the others.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserInputError
from .processor import PatchGrid

log = logging.getLogger(__name__)

PDF_SUFFIXES = {".pdf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
#: Longest side of a rendered PDF page, whatever the dpi (a poster at 200 dpi would be 9000 px).
MAX_RENDER_SIDE = 3500
#: Images above this many pixels are refused rather than decoded (decompression bombs, scans at 1200 dpi).
MAX_IMAGE_PIXELS = 120_000_000


@dataclass
class Page:
    """One page: where it comes from, its 1-based number, its model-grid size, and how to render it."""

    source: str
    number: int
    size: tuple[int, int]
    _render: Callable[[], object] = field(repr=False)

    def render(self, fitted: bool = True):
        """The page as an RGB PIL image of exactly :attr:`size` (``fitted=False``: as rendered/decoded)."""
        image = self._render()
        if fitted and image.size != self.size:
            from PIL import Image

            image = image.resize(self.size, Image.Resampling.BICUBIC)
        return image


@dataclass
class Document:
    """A source file and its selected pages (``error`` set and no pages when it cannot be read)."""

    source: str
    name: str
    kind: str
    pages: list[Page] = field(default_factory=list)
    page_count: int = 0
    error: str | None = None


def parse_page_ranges(spec: str | None) -> list[tuple[int, int | None]] | None:
    """Parse ``1-5,8,10-`` into ``[(1, 5), (8, 8), (10, None)]`` (1-based, inclusive; None = to the end).

    Raises:
        UserInputError: malformed ranges.
    """
    if spec is None or not str(spec).strip():
        return None
    out: list[tuple[int, int | None]] = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d*))?", part)
        if not m:
            raise UserInputError(f"bad page range {part!r} in --pages {spec!r}; use e.g. 1-5,8,10-")
        start = int(m.group(1))
        end: int | None = start if m.group(2) is None else (int(m.group(2)) if m.group(2) else None)
        if start < 1 or (end is not None and end < start):
            raise UserInputError(f"bad page range {part!r} in --pages {spec!r}; pages count from 1, start <= end")
        out.append((start, end))
    return out


def select_pages(ranges: list[tuple[int, int | None]] | None, count: int) -> list[int]:
    """1-based page numbers of a ``count``-page document chosen by ``ranges`` (all when None), in order."""
    if ranges is None:
        return list(range(1, count + 1))
    chosen: set[int] = set()
    for start, end in ranges:
        chosen.update(range(start, min(count, end if end is not None else count) + 1))
    return sorted(chosen)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs``: files as given, folders' supported files (sorted), glob patterns.

    An input that names nothing is kept as is, so :func:`open_document` reports it as a failed
    document while the others run.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in PDF_SUFFIXES | IMAGE_SUFFIXES)
            files.extend(found or [p])
        elif not p.exists() and any(ch in item for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            files.extend(matched or [p])
        else:
            files.append(p)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _pdf_pages(path: Path, grid: PatchGrid, dpi: int, ranges) -> tuple[list[Page], int]:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as err:
        # PDFium's error code can be stale from an earlier document, so look at the file itself
        msg = str(err)
        with open(path, "rb") as fh:
            raw = fh.read(2_000_000)
        if b"/Encrypt" in raw:
            raise ValueError("the PDF is password-protected; decrypt it first (e.g. qpdf --decrypt)") from None
        if re.search(rb"/Count\s+0\b", raw):
            raise ValueError("the document has no pages") from None
        raise ValueError(f"not a readable PDF ({msg}); the file may be damaged") from None
    count = len(pdf)
    pages = []
    for number in select_pages(ranges, count):
        w_pt, h_pt = pdf[number - 1].get_size()
        scale = min(dpi / 72.0, MAX_RENDER_SIDE / max(w_pt, h_pt, 1.0))
        width, height = max(1, round(w_pt * scale)), max(1, round(h_pt * scale))

        def render(number=number, scale=scale):
            bitmap = pdf[number - 1].render(scale=scale, draw_annots=True)
            return bitmap.to_pil().convert("RGB")

        pages.append(Page(str(path), number, grid.fit(width, height), render))
    return pages, count


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator:
    """``PIL.Image.open`` under fastsd's pixel limit instead of PIL's decompression-bomb rules.

    PIL refuses images over twice its ``MAX_IMAGE_PIXELS`` with ``DecompressionBombError`` (not an
    ``OSError``, so it used to abort a whole run) and warns in between with a raw
    ``DecompressionBombWarning``; here the first becomes this document's error and the second is
    silenced, because :func:`_check_pixels` says it in a readable line.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as err:
            m = re.search(r"\((\d+) pixels\)", str(err))
            size = f" ({int(m.group(1)) / 1e6:.0f} MP)" if m else ""
            raise ValueError(
                f"image is too large{size}, over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (a decompression bomb, "
                "or a scan at a very high dpi); downscale it first"
            ) from None
        with im:
            yield im


def _check_pixels(path: Path, width: int, height: int, page: int | None = None) -> None:
    """Refuse a page over :data:`MAX_IMAGE_PIXELS`; say plainly when one is large but allowed."""
    from PIL import Image

    where = f"page {page} " if page else "image "
    pixels = width * height
    if pixels > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{where}is {width}x{height} ({pixels / 1e6:.0f} MP), over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP "
            "limit; downscale it first"
        )
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        log.warning(
            "%s: %s%dx%d (%.0f MP) is very large; decoding it needs about %.1f GB of RAM",
            path.name,
            where,
            width,
            height,
            pixels / 1e6,
            pixels * 4 / 1e9,
        )


def _image_pages(path: Path, grid: PatchGrid, ranges) -> tuple[list[Page], int]:
    from PIL import UnidentifiedImageError

    try:
        with _open_image(path) as im:
            width, height = im.size
            count = getattr(im, "n_frames", 1)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"not a readable image ({err})") from None
    _check_pixels(path, width, height)
    pages = []
    for number in select_pages(ranges, count):

        def render(number=number):
            with _open_image(path) as im:
                im.seek(number - 1)
                im.load()
                return im.convert("RGB")

        if count > 1:  # each frame of a TIFF has its own size, and its own chance to be a bomb
            with _open_image(path) as im:
                im.seek(number - 1)
                width, height = im.size
            _check_pixels(path, width, height, number)
        pages.append(Page(str(path), number, grid.fit(width, height), render))
    return pages, count


def open_document(path: str | Path, grid: PatchGrid, *, dpi: int = 200, pages: str | None = None) -> Document:
    """List the selected pages of one file; problems become ``Document.error``, never exceptions."""
    path = Path(path)
    ranges = parse_page_ranges(pages) if isinstance(pages, str) or pages is None else pages
    suffix = path.suffix.lower()
    kind = "pdf" if suffix in PDF_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else "unknown"
    doc = Document(source=str(path), name=path.stem, kind=kind)
    try:
        if path.is_dir():
            raise ValueError("no PDF or image files in this folder")
        if not path.exists():
            raise ValueError("no such file (or the pattern matches nothing)")
        if kind == "pdf":
            doc.pages, doc.page_count = _pdf_pages(path, grid, dpi, ranges)
        elif kind == "image":
            doc.pages, doc.page_count = _image_pages(path, grid, ranges)
        else:
            raise ValueError(f"unsupported file type {suffix or '(none)'}; use PDF, PNG, JPEG, WebP or TIFF")
        if doc.page_count == 0:
            raise ValueError("the document has no pages")
        if not doc.pages:
            raise ValueError(f"--pages {pages} selects none of its {doc.page_count} pages")
    except ValueError as err:
        doc.pages, doc.error = [], str(err)
    except Exception as err:  # noqa: BLE001 - whatever a crafted file makes a reader raise fails this document only
        doc.pages, doc.error = [], f"could not be read ({type(err).__name__}: {err})"
    return doc


def unique_names(docs: list[Document]) -> None:
    """Give documents with the same file stem distinct output folder names (``a``, ``a-2``, ...)."""
    used: dict[str, int] = {}
    for doc in docs:
        base = re.sub(r"[^\w.\-]+", "_", doc.name).strip("._") or "document"
        n = used.get(base.lower(), 0) + 1
        used[base.lower()] = n
        doc.name = base if n == 1 else f"{base}-{n}"
