"""``fastsd ocr``: images and PDFs to Markdown/JSON with GLM-OCR (a thin layer over :func:`fastsd.ocr.ocr`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UserInputError


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("use auto or a positive number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("use auto or a positive number")
    return n


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ocr",
        parents=parents,
        help="OCR images and PDFs with GLM-OCR (Markdown, HTML tables, LaTeX, JSON extraction)",
        description="OCR images and PDFs with GLM-OCR. Results go to one folder per document: page_0001.md, "
        "document.md, document.json. A rerun skips pages already done.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PDF/image files, folders or glob patterns")
    p.add_argument("--task", choices=["text", "table", "formula", "extract"], default="text")
    p.add_argument(
        "--schema", metavar="FILE.json", help="keys to extract (template or JSON Schema), for --task extract"
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: <fastsd home>/ocr)")
    p.add_argument("--dpi", type=int, default=200, help="PDF render resolution (default 200; longest side <= 3500 px)")
    p.add_argument("--pages", metavar="RANGES", help="pages to OCR, e.g. 1-5,8 (default: all)")
    p.add_argument(
        "--batch-size", type=_batch_size, default=None, metavar="auto|N", help="pages per batch (default auto)"
    )
    p.add_argument("--quantize", choices=["none", "8bit", "4bit"], default="none", help="bitsandbytes weights")
    p.add_argument("--engine", choices=["transformers", "openai"], default="transformers")
    p.add_argument("--base-url", metavar="URL", help="OpenAI-compatible server for --engine openai (vLLM/SGLang)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight for --engine openai")
    p.add_argument("--model", metavar="ID_OR_PATH", default="zai-org/GLM-OCR", help="Hub id or local folder")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="cap on generated tokens per page")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ocr import ocr

    if args.task == "extract" and not args.schema:
        raise UserInputError("--task extract needs --schema FILE.json with the keys to extract")
    job = ocr(
        args.inputs,
        task=args.task,
        schema=args.schema,
        out=args.out,
        dpi=args.dpi,
        pages=args.pages,
        batch_size=args.batch_size,
        quantize=args.quantize,
        engine=args.engine,
        base_url=args.base_url,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        device=args.device,
        root=args.root,
    )
    folders: dict[str, str] = {}
    for page in job:
        folders[page.source] = page.folder
        for w in page.warnings:
            print(f"{page.document} page {page.page}: {w}", file=sys.stderr)
    s = job.summary
    for source, reason in s.failed:
        print(f"failed: {source}: {reason}", file=sys.stderr)
    print(
        f"{s.documents} document(s), {s.pages} page(s): {s.done} done, {s.skipped} already done, "
        f"{len(s.failed)} failed; {s.pages_per_second:.2f} pages/s; output in {s.out_dir}"
    )
    return 1 if s.failed else 0
