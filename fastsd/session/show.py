"""A session described for people: ``fastsd session show`` text and what fits in free Drive.

:meth:`fastsd.session.Session.summary` gathers the facts as data; this module only words them
(:func:`describe_summary`) and plans the space (:func:`space_plan`).
"""

from __future__ import annotations

import time
from typing import Any


def describe_summary(s: dict[str, Any], *, verify: bool = False) -> str:
    """A :meth:`~fastsd.session.Session.summary` in plain words, one line per fact.

    Args:
        s: the summary.
        verify: whether the summary re-hashed checkpoint files (the text says how they were checked).
    """
    lines = [f"session {s['name']}  ({s['path']})"]
    family = f" ({s['family']})" if s["family"] else ""
    size = f"{s['resolution']}" if s["resolution_set"] else f"{s['resolution']} (the base model's native size)"
    lines.append(f"  base model   {s['base_model'] or 'not chosen yet'}{family}, training size {size}")
    lines.append(f'  subject      "{s["default_prompt"]}" (token {s["instance_token"]}, class {s["class_word"]})')
    if s["images"]:
        rest = s["images"] - s["own_captions"]
        caps = f"{s['own_captions']} with their own caption"
        if rest:
            caps += f', {rest} captioned "{s["default_prompt"]}"'
        lines.append(f"  images       {s['images']} instance image(s): {caps}")
    else:
        lines.append(f"  images       none yet: add some with 'fastsd session add {s['name']} PHOTOS'")
    for slug, count in s["class_images"].items():
        lines.append(f"  class images {count} in class_images/{slug}")
    total = s["total_steps"]
    if s["step"]:
        of = f" of {total} ({100 * s['step'] // total}%)" if total else ""
        lines.append(f"  training     step {s['step']}{of}")
    else:
        lines.append("  training     not started")
    if s["checkpoints"]:
        how = "sha256 checked" if verify else "sizes checked; --verify re-hashes"
        good = [c for c in s["checkpoints"] if c["ok"]]
        bad = [c for c in s["checkpoints"] if not c["ok"]]
        text = ", ".join(f"step {c['step']}" for c in good) or "none"
        lines.append(f"  checkpoints  {len(good)} complete ({how}): {text}")
        if bad:
            lines.append(
                "  damaged      " + ", ".join(f"step {c['step']}" for c in bad) + " (files missing or changed)"
            )
    else:
        lines.append("  checkpoints  none yet")
    if s["models"]:
        for m in s["models"]:
            step = f", step {m['step']}" if m.get("step") is not None else ""
            size = human_size(m["size"]) if m.get("size") is not None else "size not recorded"
            flag = "" if m["ok"] else " (size differs from the manifest!)"
            lines.append(f"  model        {m['file']} ({m.get('kind') or 'model'}{step}, {size}){flag}")
            scores = m["eval"].get("metrics") if isinstance(m.get("eval"), dict) else None
            scores = scores if isinstance(scores, dict) else {}
            numbers = {k: v for k, v in (scores or {}).items() if isinstance(v, (int, float))}
            if numbers:
                text = ", ".join(f"{k.upper().replace('_', '-')} {v:.3f}" for k, v in numbers.items())
                lines.append(f"    eval       {text}")
    else:
        lines.append("  models       none exported yet")
    space = s["space"]
    if space["checkpoint_bytes"] or space["export_bytes"]:
        lines.append(f"  space        {space['text']}")
    spare = s["reclaimable"]
    if spare["items"]:
        lines.append(
            f"  leftovers    {human_size(spare['bytes'])} reclaimable in {spare['items']} leftover(s) of "
            "interrupted writes (the next train, add or import removes them)"
        )
    lock = s["lock"]
    if lock:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lock.get("since") or 0)))
        state = {"live": "in use", "dead": "left locked by a process that is gone", "stale": "locked, looks stale"}
        lines.append(
            f"  lock         {state[lock['state']]}: pid {lock.get('pid')} on host {lock.get('host')} since {since}"
        )
    return "\n".join(lines)


#: Free Google Drive: what a session on Drive has to fit in.
FREE_DRIVE_BYTES = 15 * 10**9


def space_plan(checkpoints: list[dict[str, Any]], models: list[dict[str, Any]]) -> dict[str, Any]:
    """What the session's files take and how many fit in free Drive (:data:`FREE_DRIVE_BYTES`).

    A checkpoint is written before the oldest one is pruned, so keeping K of them needs room for
    K + 1 while a save is under way; exports are never pruned. Sizes are the newest of each kind,
    as they are on disk: a checkpoint's ``new_bytes`` leaves out the files it shares with an older
    one (a frozen text encoder, hard-linked where the file system allows it; never on Drive), and
    is what each further save costs.
    """
    ckpt = next((_own(c) for c in reversed(checkpoints) if _own(c)), 0)
    export = next((m["size"] for m in reversed(models) if m.get("size")), 0)
    used = sum(_own(c) for c in checkpoints) + sum(m.get("size") or 0 for m in models)
    shared = next((c["bytes"] - _own(c) for c in reversed(checkpoints) if _own(c)), 0)
    out: dict[str, Any] = {
        "checkpoint_bytes": ckpt,
        "export_bytes": export,
        "used_bytes": used,
        "drive_bytes": FREE_DRIVE_BYTES,
    }
    parts = []
    if ckpt:
        more = f" (plus {human_size(shared)} shared with the one before)" if shared else ""
        parts.append(f"each checkpoint {human_size(ckpt)}{more}")
    if export:
        parts.append(f"each export {human_size(export)}")
    parts.append(f"{human_size(used)} in use")
    if ckpt:
        # with one export kept: how many checkpoints can be kept (each save needs one more transiently)
        fit = max(0, int((FREE_DRIVE_BYTES - export) // ckpt) - 1)
        out["checkpoints_that_fit"] = fit
        drive = f"{FREE_DRIVE_BYTES / 1e9:.0f} GB of free Drive"
        if fit:
            n = "more than 50" if fit > 50 else str(fit)
            beside = "plus one export" if export else "before any export (none made yet)"
            parts.append(f"{drive} holds {n} checkpoint(s) (--keep) {beside}, with room to save the next")
        else:
            parts.append(f"{drive} cannot hold a checkpoint save next to an export: keep states on local disk")
    return {**out, "text": "; ".join(parts)}


def _own(checkpoint: dict[str, Any]) -> int:
    """Bytes a checkpoint adds on disk: ``new_bytes`` where known, else all of its ``bytes``."""
    own = checkpoint.get("new_bytes")
    return int(own if own is not None else checkpoint.get("bytes") or 0)


def human_size(n: float) -> str:
    """Bytes as ``12.3 MiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
