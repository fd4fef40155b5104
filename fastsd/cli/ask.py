"""``fastsd ask PATH "question"``: ask a vision-language model about an image or a document page."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .caption import add_engine_args, engine_from


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ask",
        parents=parents,
        help="ask a vision-language model about an image or a PDF page (text or JSON answers)",
        description="Visual question answering: document Q&A, chart reading, checking instance photos. PDF pages "
        "are rendered as 'fastsd ocr' renders them. With --schema the answer is one JSON object with its keys.",
    )
    p.add_argument("path", metavar="PATH", help="an image or a PDF")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--page", type=int, default=1, help="PDF page, from 1 (default 1)")
    p.add_argument("--dpi", type=int, default=200, help="PDF render resolution (default 200)")
    p.add_argument("--schema", metavar="FILE.json", help="answer as JSON with these keys (template or JSON Schema)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="cap on the answer's tokens (default 512)")
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="print the answer as a JSON object (text, data, warnings)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ocr.prompts import load_schema
    from ..vlm.ask import ask, load_page

    if args.schema:
        load_schema(args.schema)  # a bad schema fails before a model loads
    load_page(args.path, page=args.page, dpi=args.dpi)  # so does a bad file or page
    engine = engine_from(args)
    try:
        answer = ask(
            engine,
            args.path,
            args.question,
            schema=args.schema,
            page=args.page,
            dpi=args.dpi,
            max_new_tokens=args.max_new_tokens,
        )
    finally:
        engine.close()
    for w in answer.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(answer.to_dict(), ensure_ascii=False))
    elif args.schema and answer.data is not None:
        print(json.dumps(answer.data, ensure_ascii=False, indent=2))
    else:
        print(answer.text)
    return 0
