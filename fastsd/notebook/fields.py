"""Reading notebook form fields (shared by the notebook modules)."""

from __future__ import annotations


def split_field(text: str) -> list[str]:
    """The items of a form field holding a list: comma- or newline-separated, blanks dropped."""
    return [p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip()]
