"""The OCR notebook: the documents (paths or an upload), the OCR run, and a Markdown preview."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..paths import fastsd_home
from ..runtime import environment
from .fields import split_field
from .widgets import colab_files, save_uploads, upload_folder, upload_widget


def ocr_inputs(source: str = "") -> Any:
    """The files to OCR: ``source`` paths (comma-separated files, folders, globs), else an upload.

    Returns:
        The input paths; outside Colab with no ``source``, the upload widget shown instead, whose
        button saves the files and prints the folder to put in the documents field.
    """
    paths = split_field(source)
    if paths:
        missing = [p for p in paths if not any(c in p for c in "*?[") and not Path(p).expanduser().exists()]
        if missing:
            raise UserInputError(f"not found: {', '.join(missing)}: check the paths (is Drive connected?)")
        return [Path(p).expanduser() for p in paths]
    if environment() == "colab":
        entries = colab_files()
        if not entries:
            raise UserInputError("nothing was uploaded: choose files in the dialog, or give a path")
        folder = upload_folder("ocr")
        files = save_uploads(entries, folder)
        print(f"uploaded {len(files)} file(s): {', '.join(p.name for p in files)}")
        return [folder]

    def saved(entries: list[tuple[str, bytes]]) -> None:
        folder = upload_folder("ocr")
        save_uploads(entries, folder)
        print(
            f"saved {len(entries)} file(s) in {folder}: put this folder in the documents field and run the cell again"
        )

    return upload_widget(saved, ".pdf,image/*,.tif,.tiff", "Save files")


def ocr(
    inputs: Sequence[str | os.PathLike[str]] | None,
    *,
    task: str = "text",
    schema: str = "",
    pages: str = "",
    dpi: int = 200,
    quantize: str = "none",
    model: str = "",
    batch_size: int = 0,
    max_tokens: int = 0,
    out: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """Run OCR with a progress bar; results are written page by page under ``<home>/ocr`` (Drive).

    Args:
        inputs: from :func:`ocr_inputs`.
        task: ``text`` (Markdown), ``table`` (HTML), ``formula`` (LaTeX) or ``extract`` (JSON).
        schema: for ``extract``: JSON text (a template such as ``{"total": ""}`` or a JSON Schema)
            or the path of a JSON file.
        pages: page ranges such as ``1-5,8``; blank: all.
        dpi: PDF render resolution.
        quantize: ``none``, ``8bit`` or ``4bit``.
        model: GLM-OCR Hub id or local folder; blank: the default model.
        batch_size: pages per batch; 0 sizes batches from free VRAM.
        max_tokens: most tokens generated per page (0: the default); a cap on runaway pages.
        out: output folder (default ``<home>/ocr``).

    Returns:
        The :class:`fastsd.ocr.PageResult` of every page (skipped ones: done by an earlier run).
    """
    from ..ocr import ocr as run_ocr

    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise UserInputError("no input files: run the Documents cell first (a path, or the folder of an upload)")
    options: dict[str, Any] = {
        "task": task,
        "schema": _schema(schema),
        "pages": pages.strip() or None,
        "dpi": int(dpi),
        "quantize": quantize,
        "batch_size": int(batch_size) or None,
        "out": out,
        "root": str(fastsd_home(home)),
    }
    if model.strip():
        options["model"] = model.strip()
    if max_tokens:
        options["max_new_tokens"] = int(max_tokens)
    run = run_ocr([str(p) for p in inputs], **options)
    results = list(run)
    s = run.summary
    print(
        f"OCR: {s.documents} document(s), {s.pages} page(s): {s.done} done, {s.skipped} already done earlier, "
        f"{s.warnings} with warnings, in {s.seconds:.1f} s; results in {s.out_dir}"
    )
    for source, reason in s.failed:
        print(f"  failed: {source}: {reason}")
    return results


def _schema(text: str) -> Any:
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as err:
            raise UserInputError(f"the schema is not valid JSON ({err}): fix it, or give a .json file") from err
    return text


def preview_markdown(result: Any) -> str:
    """A page result as Markdown: text as is, tables (HTML) as is, formulas in ``$$``, JSON in a code block."""
    head = f"**{result.document}, page {result.page}**" + (" (from an earlier run)" if result.skipped else "")
    if result.task == "formula":
        body = f"$$\n{result.text.strip()}\n$$"
    elif result.task == "extract":
        data = result.data if result.data is not None else result.text
        body = "```json\n" + (json.dumps(data, indent=2, ensure_ascii=False) if not isinstance(data, str) else data)
        body += "\n```"
    else:
        body = result.text
    warn = "".join(f"\n\n> warning: {w}" for w in result.warnings)
    return f"{head}\n\n{body}{warn}"


def preview_ocr(results: Sequence[Any] | None, pages: int = 3) -> None:
    """Show the first ``pages`` results inline as Markdown, with where the files are."""
    from IPython.display import Markdown, display

    if not results:
        print("nothing to preview: run the OCR cell first")
        return
    for result in list(results)[: max(1, int(pages))]:
        display(Markdown(preview_markdown(result)))
    folders = sorted({r.folder for r in results if r.folder})
    print("files: " + ", ".join(folders))
