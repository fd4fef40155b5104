"""Document OCR with GLM-OCR: images and PDFs to Markdown and JSON, batched and resumable.

``fastsd.ocr.ocr(inputs, task=...)`` is the entry point (the ``fastsd ocr`` command calls it):
:mod:`.documents` turns files into pages on the model's patch grid, :mod:`.engine` recognises
batches (transformers in process, with :mod:`.fast` decoding, or an OpenAI-compatible server),
:mod:`.prompts` holds the model's exact prompts, schema handling and the repetition guard, and
:mod:`.output` writes one folder per document page by page.
"""

from __future__ import annotations

from .run import OcrRun, PageResult, Summary, ocr

__all__ = ["OcrRun", "PageResult", "Summary", "ocr"]
