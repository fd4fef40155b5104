"""OCR results on disk: one folder per document, written page by page so a rerun resumes.

```
<out>/<document>/
  page_0001.md     the page's Markdown (HTML tables, $$ LaTeX), written as soon as the page is done
  document.json    per page: source, page, width, height, task, prompt, text, seconds, tokens,
                   finish, warnings (+ data for extract); rewritten after every batch
  document.md      all pages in order, written when the document is complete
```

Every file goes through :mod:`fastsd.storage` (temp + fsync + rename), so a file under its final
name is complete. On a rerun, a page counts as done when document.json records it with the same
task and prompt and its page file exists; everything else is (re)done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import storage

FORMAT_VERSION = 1


def page_file(number: int) -> str:
    return f"page_{number:04d}.md"


class DocumentWriter:
    """Collects one document's page records and writes its files."""

    def __init__(self, out_dir: str | Path, name: str, source: str, page_count: int, meta: dict[str, Any]) -> None:
        self.folder = Path(out_dir) / name
        self.source = source
        self.page_count = page_count
        self.meta = meta
        self.pages: dict[int, dict] = {}
        self._load()

    def _load(self) -> None:
        path = self.folder / "document.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if data.get("source") != self.source:
            return
        for rec in data.get("pages", []):
            if (self.folder / page_file(rec.get("page", 0))).is_file():
                self.pages[int(rec["page"])] = rec

    def done(self, number: int, task: str, prompt: str) -> dict | None:
        """The stored record of page ``number`` if it was done with this task and prompt.

        A page whose reading failed (``finish == "error"``: a server that refused or dropped it) is
        recorded so the user sees why, but is not done: a rerun reads it again.
        """
        rec = self.pages.get(number)
        if rec and rec.get("task") == task and rec.get("prompt") == prompt and rec.get("finish") != "error":
            return rec
        return None

    def add(self, record: dict) -> None:
        """Write the page's Markdown now; its record reaches document.json at the next :meth:`flush`."""
        number = int(record["page"])
        text = record["text"]
        if record.get("task") == "extract" and record.get("data") is not None:
            body = "```json\n" + json.dumps(record["data"], ensure_ascii=False, indent=2) + "\n```\n"
        else:
            body = text + ("\n" if text and not text.endswith("\n") else "")
        storage.write_text(self.folder / page_file(number), body)
        self.pages[number] = record

    def flush(self, errors: list[str] | None = None) -> None:
        """Rewrite document.json with every page recorded so far."""
        data = {
            "format": FORMAT_VERSION,
            "source": self.source,
            "page_count": self.page_count,
            **self.meta,
            "pages": [self.pages[n] for n in sorted(self.pages)],
            "errors": errors or [],
        }
        storage.write_json(self.folder / "document.json", data)

    def finish(self) -> Path:
        """Write document.json and the combined document.md; returns the document folder."""
        self.flush()
        parts = []
        for n in sorted(self.pages):
            body = (self.folder / page_file(n)).read_text(encoding="utf-8").rstrip("\n")
            parts.append(f"<!-- page {n} -->\n\n{body}")
        storage.write_text(self.folder / "document.md", "\n\n".join(parts) + "\n")
        return self.folder
