"""Questions about an image or a document page, answered by a vision-language model (``fastsd ask``).

A PDF page is rendered exactly as OCR renders it (:func:`fastsd.ocr.documents.open_document`:
same DPI rule, same pixel limits, same refusals of broken or encrypted files). With a schema (a
JSON template or a JSON Schema, as ``fastsd ocr --schema`` takes) the model is asked for one JSON
object with those keys; endpoints get the schema as structured output too, and the answer is
parsed and checked key by key (:func:`fastsd.ocr.prompts.parse_extraction`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FastsdError, UserInputError

#: Pages are rendered to at most this many pixels (the local engine shrinks further, to its own bound).
ASK_GRID_MAX_PIXELS = 2 * 1536 * 1536


@dataclass
class Answer:
    """The model's answer: its text, the parsed JSON when a schema was given, and warnings."""

    source: str
    page: int
    text: str
    data: Any = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "page": self.page,
            "text": self.text,
            "data": self.data,
            "warnings": self.warnings,
        }


def load_page(path: str | Path, *, page: int = 1, dpi: int = 200) -> Any:
    """Page ``page`` (1-based) of a PDF or image file as an RGB PIL image.

    Raises:
        UserInputError: the file cannot be read or has no such page (the message says which).
    """
    from ..ocr.documents import open_document
    from ..ocr.processor import PatchGrid

    if page < 1:
        raise UserInputError(f"--page {page}: pages are numbered from 1")
    doc = open_document(path, PatchGrid(max_pixels=ASK_GRID_MAX_PIXELS), dpi=dpi, pages=str(page))
    if doc.error:
        raise UserInputError(f"{path}: {doc.error}")
    return doc.pages[0].render()


def schema_prompt(question: str, template: dict) -> str:
    """The question plus the instruction to answer as one JSON object shaped like ``template``."""
    return (
        f"{question.strip()}\n\nAnswer with only one JSON object with exactly these keys (fill in the values, "
        f"use null when the image does not show it):\n{json.dumps(template, ensure_ascii=False, indent=2)}"
    )


def ask(
    engine: Any,
    path: str | Path,
    question: str,
    *,
    schema: str | Path | None = None,
    page: int = 1,
    dpi: int = 200,
    max_new_tokens: int = 512,
) -> Answer:
    """Ask ``question`` about ``path`` (page ``page`` of a PDF) with ``engine``.

    Raises:
        UserInputError: empty question, unreadable file or schema.
        FastsdError: the engine failed (the reason is in the message).
    """
    from ..ocr.prompts import load_schema, parse_extraction
    from .engines import VlmRequest

    if not question.strip():
        raise UserInputError('ask needs a question, e.g. fastsd ask photo.jpg "is the face visible?"')
    template = load_schema(schema) if schema else None
    raw_schema = json.loads(Path(schema).read_text(encoding="utf-8")) if schema else None
    image = load_page(path, page=page, dpi=dpi)
    prompt = schema_prompt(question, template) if template else question.strip()
    json_schema = raw_schema if isinstance(raw_schema, dict) and "properties" in raw_schema else None
    (reply,) = engine.answer([VlmRequest(image, prompt, max_new_tokens=max_new_tokens, json_schema=json_schema)])
    if reply.error:
        raise FastsdError(f"{path}: no answer: {reply.error}")
    answer = Answer(str(path), page, reply.text.strip())
    if reply.finish == "length":
        answer.warnings.append(f"truncated: reached the {max_new_tokens}-token cap (raise --max-new-tokens)")
    if template is not None:
        answer.data, warns = parse_extraction(reply.text, template)
        answer.warnings += warns
    return answer
