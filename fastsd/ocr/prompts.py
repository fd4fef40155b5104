"""GLM-OCR's prompts, the extraction schema, parsing of extracted JSON, and the repetition guard.

The model was trained on exactly these prompts (model card, "Prompt Limited"): three recognition
prompts, and for key-information extraction a fixed Chinese instruction followed by a JSON template
whose values are empty. Anything else degrades output, so the prompts are data here, not options.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserInputError

#: task -> prompt, exactly as the model card lists them.
TASK_PROMPTS: dict[str, str] = {
    "text": "Text Recognition:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
}

#: The extraction instruction ("output the information in the image in the following JSON format:").
EXTRACT_PREFIX = "请按下列JSON格式输出图中信息:"

TASKS = (*TASK_PROMPTS, "extract")


def _template_from_json_schema(schema: dict) -> Any:
    """A JSON Schema (``type``/``properties``) turned into the empty-valued template the model wants."""
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {
            k: _template_from_json_schema(v if isinstance(v, dict) else {}) for k, v in schema["properties"].items()
        }
    if kind == "array":
        items = schema.get("items")
        return [_template_from_json_schema(items)] if isinstance(items, dict) and items.get("properties") else []
    return ""


def _blank(template: Any) -> Any:
    """The template with every leaf value emptied (lists keep the shape of their first element)."""
    if isinstance(template, dict):
        return {str(k): _blank(v) for k, v in template.items()}
    if isinstance(template, list):
        return [_blank(template[0])] if template and isinstance(template[0], dict) else []
    return ""


def load_schema(path: str | Path) -> dict:
    """Read ``--schema FILE.json``: a template (``{"name": "", "address": {"city": ""}}``) or a JSON Schema.

    Returns:
        The empty-valued template (a dict with at least one key).

    Raises:
        UserInputError: missing file, invalid JSON, or not an object with keys.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"schema file not found: {p}; pass a JSON file with the keys to extract") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserInputError(f"schema {p} is not valid JSON ({err}); fix the file and retry") from None
    return schema_template(data, source=str(p))


def schema_template(data: Any, source: str = "schema") -> dict:
    """Validate a schema object (template or JSON Schema) and return the empty-valued template."""
    if isinstance(data, dict) and isinstance(data.get("properties"), dict):
        template = _template_from_json_schema(data)
    elif isinstance(data, dict):
        template = _blank(data)
    else:
        template = None
    if not isinstance(template, dict) or not template:
        raise UserInputError(
            f'{source}: a schema must be a JSON object with at least one key, e.g. {{"total": "", "date": ""}}'
        )
    return template


def build_prompt(task: str, schema: dict | None = None) -> str:
    """The exact prompt for ``task`` (``text``/``table``/``formula``/``extract`` with ``schema``)."""
    if task in TASK_PROMPTS:
        return TASK_PROMPTS[task]
    if task == "extract":
        if not schema:
            raise UserInputError("--task extract needs --schema FILE.json with the keys to extract")
        return EXTRACT_PREFIX + "\n" + json.dumps(schema, ensure_ascii=False, indent=4)
    raise UserInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_extraction(text: str, template: dict) -> tuple[dict | None, list[str]]:
    """Parse the model's JSON answer and check it against the template's keys.

    Returns:
        ``(data, warnings)``: data is None when no JSON object could be parsed; warnings name keys
        that are missing or not in the schema (nested objects checked too).
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    data = None
    for cand in candidates:
        start, end = cand.find("{"), cand.rfind("}")
        if start < 0 or end <= start:
            continue
        try:
            data = json.loads(cand[start : end + 1])
            break
        except ValueError:
            continue
    if not isinstance(data, dict):
        return None, ["extraction: the output is not a JSON object"]
    warnings: list[str] = []

    def check(want: dict, got: dict, prefix: str) -> None:
        for key, sub in want.items():
            if key not in got:
                warnings.append(f"extraction: missing key {prefix}{key}")
            elif isinstance(sub, dict) and sub and isinstance(got[key], dict):
                check(sub, got[key], f"{prefix}{key}.")
        for key in got:
            if key not in want:
                warnings.append(f"extraction: unexpected key {prefix}{key}")

    check(template, data, "")
    return data, warnings


def repetition(text: str, min_repeats: int = 8, min_chars: int = 160) -> int | None:
    """Where a runaway repetition starts in ``text``, or None.

    A page is runaway when its last lines are one and the same non-empty line ``min_repeats`` times
    in a row, or (no newlines: tables, long formulas) when the tail is one short unit repeated to at
    least ``min_chars`` characters and ``min_repeats`` copies. Returns the offset just after the
    first copy, so cutting there keeps one instance.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) >= min_repeats:
        last = lines[-1].strip()
        if last:
            run = 0
            for line in reversed(lines):
                if line.strip() != last:
                    break
                run += 1
            if run >= min_repeats:
                first = len(lines) - run
                return len("\n".join(lines[: first + 1]))
    tail = text[-1024:]
    for unit in range(1, 65):
        copies = len(tail) // unit
        if copies < min_repeats or copies * unit < min_chars:
            continue
        piece = tail[-unit:]
        if not piece.strip():
            continue
        n = 1
        while n * unit + unit <= len(tail) and tail[-(n + 1) * unit : -n * unit] == piece:
            n += 1
        if n >= min_repeats and n * unit >= min_chars:
            return len(text) - n * unit + unit
    return None


def settled(text: str, sent: int = 0, max_unit: int = 64) -> int:
    """How much of ``text`` no continuation can take back from the guarded, stripped answer.

    The final answer is ``text + more`` cut by :func:`repetition` and stripped. A streamed prefix
    must never exceed it, so this keeps back what a repetition could still remove (what follows
    the first of a run of equal lines when the unfinished line may repeat it, and what follows the
    first copy of a repeated unit of up to ``max_unit`` characters, partial last copy included) and
    trailing whitespace. ``sent`` (already settled) bounds the search, so a call costs the new text.
    """
    hold = len(text)
    nl = text.rfind("\n")
    if nl >= 0:
        start = text.rfind("\n", 0, nl) + 1
        last = text[start:nl].strip()
        if last and last.startswith(text[nl + 1 :].strip()):  # the open line may become a copy of it
            hold = nl
            while start > 0:  # back to the first line of the run of copies
                prev = text.rfind("\n", 0, start - 1) + 1
                if text[prev : start - 1].strip() != last:
                    break
                hold, start = start - 1, prev
    for unit in range(1, min(max_unit, len(text) - 1) + 1):
        if text[-1] != text[-1 - unit]:
            continue  # not periodic at all with this unit (most units: one compare)
        # the longest suffix whose every character equals the one ``unit`` before it (binary search:
        # a shorter suffix of a periodic one is periodic); a repetition cuts no earlier than its start
        lo, hi = 1, max(1, min(len(text) - unit, len(text) - sent))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text[len(text) - mid :] == text[len(text) - mid - unit : len(text) - unit]:
                lo = mid
            else:
                hi = mid - 1
        hold = min(hold, len(text) - lo)
    return max(sent, len(text[:hold].rstrip()))
