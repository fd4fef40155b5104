"""The OCR run: documents -> batched pages -> engine -> files, yielding one result per page.

Pending pages of all documents are grouped by their size on the model grid (one prompt per run),
so a folder of single-page scans still fills a batch; results are routed back to each document's
writer, which writes every page as it lands and the combined files when the document is complete.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..paths import fastsd_home
from .documents import Document, Page, expand_inputs, open_document, parse_page_ranges, unique_names
from .engine import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL, OpenAIEngine, PageJob, TransformersEngine
from .output import DocumentWriter
from .processor import PatchGrid
from .prompts import TASKS, build_prompt, load_schema, parse_extraction, schema_template

log = logging.getLogger(__name__)


@dataclass
class PageResult:
    """One page's outcome (``skipped``: already done by an earlier run with the same task)."""

    document: str
    source: str
    page: int
    width: int
    height: int
    task: str
    text: str
    seconds: float
    tokens: int
    finish: str
    warnings: list[str] = field(default_factory=list)
    data: Any = None
    skipped: bool = False
    folder: str = ""
    regions: list[dict] | None = None


@dataclass
class Summary:
    """Counts of a finished run, plus the documents that failed and why."""

    documents: int = 0
    pages: int = 0
    done: int = 0
    skipped: int = 0
    warnings: int = 0
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    out_dir: str = ""

    @property
    def pages_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


class OcrRun:
    """Iterate to run; :attr:`summary` is complete once iteration ends. Built by :func:`ocr`."""

    def __init__(self, inputs: list[str], **options: Any) -> None:
        self.inputs = [str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
        self.o = options
        self.summary = Summary()

    def _engine(self, grid_only: bool = False):
        o = self.o
        if o.get("engine_obj") is not None:
            return o["engine_obj"]
        if o["engine"] == "openai":
            from ..vlm.client import api_key

            # fastsd ocr serve's key, else the usual OpenAI-compatible one (vLLM, SGLang, hosted)
            key = api_key("FASTSD_OCR_API_KEY") or api_key()
            return OpenAIEngine(
                o["base_url"],
                model=o["model"],
                max_new_tokens=o["max_new_tokens"],
                concurrency=o["concurrency"],
                api_key=key,
            )
        return TransformersEngine(
            o["model"],
            device=o["device"],
            quantize=o["quantize"],
            batch_size=o["batch_size"],
            max_new_tokens=o["max_new_tokens"],
            local_files_only=o["local_files_only"],
        )

    def __iter__(self) -> Iterator[PageResult]:
        from tqdm.auto import tqdm

        o, summary = self.o, self.summary
        start = time.perf_counter()
        task, template = o["task"], o["template"]
        prompt = build_prompt(task, template)
        settings = o.get("layout_settings")
        if o.get("layout"):
            task, prompt = "layout", f"layout {settings.fingerprint()}"
        ranges = parse_page_ranges(o["pages"])
        out_dir = Path(o["out"]) if o["out"] else fastsd_home(o["root"]) / "ocr"
        summary.out_dir = str(out_dir)
        files = expand_inputs(self.inputs)
        _require_some_file(files)  # before the model: a typo must not wait for a multi-GB download
        engine = self._engine()
        grid: PatchGrid = engine.grid
        detector = self._detector_obj = self._detector() if o.get("layout") else None

        docs: list[Document] = [open_document(p, grid, dpi=o["dpi"], pages=ranges) for p in files]
        unique_names(docs)
        summary.documents = len(docs)
        meta = {"model": getattr(engine, "model_id", o["model"]), "engine": engine.name, "task": task}
        if detector is not None:
            meta["layout_model"] = detector.model_id
        writers: dict[int, DocumentWriter] = {}
        remaining: dict[int, int] = {}
        pending: dict[tuple[int, int], list[tuple[int, Page]]] = defaultdict(list)
        for i, doc in enumerate(docs):
            if doc.error:
                summary.failed.append((doc.source, doc.error))
                log.debug("%s: %s", doc.source, doc.error)
                continue
            w = writers[i] = DocumentWriter(out_dir, doc.name, doc.source, doc.page_count, meta)
            summary.pages += len(doc.pages)
            for page in doc.pages:
                rec = w.done(page.number, task, prompt)
                if rec is not None:
                    summary.skipped += 1
                    yield self._result(doc, rec, skipped=True, folder=w.folder)
                else:
                    pending[page.size].append((i, page))
            remaining[i] = sum(1 for p in doc.pages if w.done(p.number, task, prompt) is None)
            if remaining[i] == 0:
                w.finish()
        failed_docs: set[int] = set()
        bar = tqdm(total=sum(len(v) for v in pending.values()), unit="page", desc="OCR", disable=not o["progress"])
        try:
            for size in sorted(pending, key=lambda s: -len(pending[s])):
                items = pending[size]
                pos = 0
                while pos < len(items):
                    n = max(1, engine.batch_size_for(size))
                    batch = [(i, p) for i, p in items[pos : pos + n] if i not in failed_docs]
                    pos += n
                    jobs = []
                    for i, page in batch:
                        try:
                            jobs.append(PageJob((i, page), page.render(fitted=detector is None), prompt))
                        except Exception as err:  # noqa: BLE001 - a page that will not render fails its document
                            failed_docs.add(i)
                            summary.failed.append((docs[i].source, f"page {page.number} did not render: {err}"))
                    jobs = [j for j in jobs if j.key[0] not in failed_docs]
                    if not jobs:
                        continue
                    touched = set()
                    records = self._layout_records(engine, jobs, docs, writers) if detector else None
                    for gen in records if records is not None else engine.run(jobs):
                        if records is not None:
                            i, rec = gen
                        else:
                            i, rec = gen.key[0], self._page_record(docs, gen, task, prompt, template)
                        writers[i].add(rec)
                        touched.add(i)
                        if rec["finish"] == "error":  # recorded with its reason; a rerun reads it again
                            why = "; ".join(rec["warnings"]) or "the engine gave no text"
                            summary.failed.append((docs[i].source, f"page {rec['page']} could not be read: {why}"))
                        else:
                            summary.done += 1
                        summary.warnings += bool(rec["warnings"])
                        remaining[i] -= 1
                        bar.update(1)
                        yield self._result(docs[i], rec, folder=writers[i].folder)
                    for i in touched:
                        if remaining[i] == 0:
                            writers[i].finish()
                        else:
                            writers[i].flush()
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - start

    def _detector(self):
        o = self.o
        if o.get("layout_obj") is not None:
            return o["layout_obj"]
        from .layout import LayoutDetector

        return LayoutDetector(
            o["layout_model"], device=o["device"], settings=o["layout_settings"], local_files_only=o["local_files_only"]
        )

    @staticmethod
    def _page_record(docs: list[Document], gen: Any, task: str, prompt: str, template: Any) -> dict:
        """The document.json record of a page read whole."""
        i, page = gen.key
        rec = {
            "source": docs[i].source,
            "page": page.number,
            "width": page.size[0],
            "height": page.size[1],
            "task": task,
            "prompt": prompt,
            "text": gen.text,
            "seconds": round(gen.seconds, 3),
            "tokens": gen.tokens,
            "finish": gen.finish,
            "warnings": list(gen.warnings),
        }
        if template is not None:
            data, warns = parse_extraction(gen.text, template)
            rec["data"] = data
            rec["warnings"] += warns
        return rec

    def _layout_records(self, engine: Any, jobs: list[PageJob], docs: list[Document], writers: dict) -> list:
        """Layout mode: (document index, record) per page of ``jobs``; crops and drawings written beside."""
        from .. import storage
        from .layout_run import recognise
        from .regions import assemble, draw

        o = self.o
        out = []
        pages = recognise(engine, self._detector_obj, [j.image for j in jobs])
        for job, lp in zip(jobs, pages, strict=True):
            i, page = job.key
            folder = writers[i].folder
            links: dict[int, str] = {}
            for region in lp.regions:
                if region.task == "skip" or o.get("save_crops"):
                    piece = job.image.crop(region.box)
                    name = f"page_{page.number:04d}_r{region.index:02d}_{region.label}.png"
                    sub = "imgs" if region.task == "skip" else "regions"
                    storage.write_bytes(folder / sub / name, storage.png_bytes(piece))
                    if region.task == "skip":
                        links[region.index] = f"{sub}/{name}"
            if o.get("draw_boxes"):
                storage.write_bytes(
                    folder / f"layout_{page.number:04d}.png", storage.png_bytes(draw(job.image, lp.regions))
                )
            records, markdown = assemble(lp.regions, lp.texts, links)
            rec = {
                "source": docs[i].source,
                "page": page.number,
                "width": job.image.size[0],
                "height": job.image.size[1],
                "task": "layout",
                "prompt": f"layout {o['layout_settings'].fingerprint()}",
                "text": markdown,
                "regions": records,
                "seconds": round(lp.seconds, 3),
                "tokens": lp.tokens,
                "finish": lp.finish,
                "warnings": list(lp.warnings),
            }
            out.append((i, rec))
        return out

    @staticmethod
    def _result(doc: Document, rec: dict, *, skipped: bool = False, folder: Path | str = "") -> PageResult:
        return PageResult(
            document=doc.name,
            source=rec["source"],
            page=rec["page"],
            width=rec["width"],
            height=rec["height"],
            task=rec["task"],
            text=rec["text"],
            seconds=rec["seconds"],
            tokens=rec["tokens"],
            finish=rec["finish"],
            warnings=rec.get("warnings", []),
            data=rec.get("data"),
            skipped=skipped,
            folder=str(folder),
            regions=rec.get("regions"),
        )


def _require_some_file(files: list[Path]) -> None:
    """Refuse a run in which no input names a file (a missing one among others fails on its own).

    Raises:
        UserInputError: the first input and why it is not a file.
    """
    if any(f.is_file() for f in files):
        return
    first = files[0] if files else Path("")
    why = "no PDF or image files in this folder" if first.is_dir() else "no such file (or the pattern matches nothing)"
    more = f" (nor {len(files) - 1} other input(s))" if len(files) > 1 else ""
    raise UserInputError(f"{first}: {why}{more}")


def ocr(
    inputs: str | Path | list[str | Path],
    *,
    task: str = "text",
    schema: str | Path | dict | None = None,
    out: str | Path | None = None,
    dpi: int = 200,
    pages: str | None = None,
    batch_size: int | None = None,
    quantize: str = "none",
    engine: str = "transformers",
    base_url: str | None = None,
    model: str = DEFAULT_MODEL,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    concurrency: int = 16,
    device: str | None = None,
    root: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
    engine_obj: Any = None,
    layout: bool = False,
    layout_model: str | None = None,
    layout_settings: str | Path | dict | Any = None,
    save_crops: bool = False,
    draw_boxes: bool = False,
    layout_obj: Any = None,
) -> OcrRun:
    """OCR images and PDFs with GLM-OCR; iterate the result to run it, one :class:`PageResult` per page.

    Args:
        inputs: files, folders or glob patterns (PDF, PNG, JPEG, WebP, TIFF incl. multi-page).
        task: ``text`` (Markdown), ``table`` (HTML), ``formula`` (LaTeX) or ``extract`` (JSON by ``schema``).
        schema: for ``extract``: a JSON file or dict, either a template ``{"total": "", ...}`` or a JSON Schema.
        out: output folder (default ``<fastsd home>/ocr``); one subfolder per document.
        dpi: PDF render resolution (longest side capped at 3500 px).
        pages: page ranges such as ``1-5,8`` (applies to every document).
        batch_size: pages per batch; None sizes batches from free VRAM.
        quantize: ``none``, ``8bit`` or ``4bit`` (bitsandbytes).
        engine: ``transformers`` (in process) or ``openai`` (server at ``base_url``).
        model: Hub id or local folder of the GLM-OCR checkpoint.
        engine_obj: an already built engine to reuse across calls (skips loading).
        layout: find regions with PP-DocLayoutV3 first and read each with its task's prompt (as the
            GLM-OCR SDK does); pages then get ``regions`` ({index, label, native_label, content,
            bbox_2d}) and Markdown in reading order. Only with ``task="text"``.
        layout_model: Hub id or folder of PP-DocLayoutV3 (default PaddlePaddle/PP-DocLayoutV3_safetensors).
        layout_settings: a JSON file or dict overriding :class:`~.layout.LayoutSettings`, or one.
        save_crops: also save every region's crop under ``regions/`` (pictures always go to ``imgs/``).
        draw_boxes: save ``layout_NNNN.png``, the page with its regions drawn, for checking.
        layout_obj: an already built :class:`~.layout.LayoutDetector` to reuse.

    Returns:
        An :class:`OcrRun`; its ``summary`` holds counts and failed documents after iteration.

    Raises:
        UserInputError: unknown task, invalid schema, malformed page ranges.

    Example:
        >>> for page in ocr(["scan.pdf"], pages="1-3"):  # doctest: +SKIP
        ...     print(page.page, page.text[:80])
    """
    from ..errors import UserInputError

    if task not in TASKS:
        raise UserInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if engine not in ("transformers", "openai"):
        raise UserInputError(f"unknown engine {engine!r}; choose transformers or openai")
    if dpi < 36 or dpi > 1200:
        raise UserInputError(f"--dpi {dpi} is out of range; use 72-600 (200 is the default)")
    parse_page_ranges(pages)  # fail fast on malformed ranges
    template = None
    if task == "extract":
        if schema is None:
            raise UserInputError("--task extract needs --schema FILE.json with the keys to extract")
        template = schema_template(schema) if isinstance(schema, dict) else load_schema(schema)
    build_prompt(task, template)
    settings = None
    if layout:
        from .layout import DEFAULT_LAYOUT_MODEL, LayoutSettings

        if task != "text":
            raise UserInputError(f"--layout reads regions with their own prompts; use it with --task text, not {task}")
        if layout_obj is not None:
            settings = layout_obj.settings
        elif isinstance(layout_settings, LayoutSettings):
            settings = layout_settings
        else:
            settings = LayoutSettings.load(layout_settings)
        layout_model = layout_model or DEFAULT_LAYOUT_MODEL
    return OcrRun(
        inputs,
        task=task,
        template=template,
        out=out,
        dpi=dpi,
        pages=pages,
        batch_size=batch_size,
        quantize=quantize,
        engine=engine,
        base_url=base_url,
        model=model,
        max_new_tokens=max_new_tokens,
        concurrency=concurrency,
        device=device,
        root=root,
        local_files_only=local_files_only,
        progress=progress,
        engine_obj=engine_obj,
        layout=layout,
        layout_model=layout_model,
        layout_settings=settings,
        save_crops=save_crops,
        draw_boxes=draw_boxes,
        layout_obj=layout_obj,
    )
