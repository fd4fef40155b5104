"""What fastsd accepts from a session's name and its ``session.json`` (the hostile-input rules).

Every ``session.json`` fastsd reads (its own, a copied or imported one) is parsed and checked
here (:func:`load_info`) before any path in it is used, and every path it names is checked
against the form of its kind and resolved inside the session folder (:func:`entry_path`), so a
crafted file is refused by entry name and nothing outside a session is ever read or deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import UserInputError

SESSION_FILE = "session.json"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_NAME = 64


def normalize_name(name: str) -> str:
    """Validate a session name (spaces become ``_``) and return it.

    Raises:
        UserInputError: empty, too long, a path, ``..``, or characters other than letters,
            digits, ``-`` and ``_``.
    """
    cleaned = name.strip().replace(" ", "_")
    if not cleaned:
        raise UserInputError("session name is empty: use letters, digits, '-' and '_' (e.g. my_dog)")
    if len(cleaned) > MAX_NAME:
        raise UserInputError(f"session name is {len(cleaned)} characters long: use at most {MAX_NAME}")
    if "/" in cleaned or "\\" in cleaned or ".." in cleaned or not NAME_RE.match(cleaned):
        raise UserInputError(
            f"session name {name!r} is not allowed: use only letters, digits, '-' and '_' (no paths, no '..')"
        )
    return cleaned


#: What each kind of path read from ``session.json`` must look like (relative to the session folder).
_CHECKPOINT_PATH = re.compile(r"^checkpoints/step-[0-9]{6,}$")
_KINDS = {
    "checkpoint": ("checkpoints", "a checkpoint folder inside the session (checkpoints/step-NNNNNN)"),
    "model": ("models", "a model file inside the session (models/FILE)"),
    "image": ("instance_images", "an image file name inside the session's instance_images/"),
}


def _plain_name(name: str) -> bool:
    """A single file name: no folders, no '..', nothing hidden (temp files, lock files)."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and not name.startswith(".")


def entry_path(root: Path, rel: Any, kind: str) -> Path:
    """The real path of a ``session.json`` entry of ``kind`` (checkpoint, model, image), checked.

    Every path fastsd reads from a ``session.json`` (its own or an imported one) goes through
    here before anything reads, deletes or writes it: it must have the form of its kind and
    resolve (symlinks followed) inside the session folder. This is what keeps a crafted
    ``{"path": "../../.."}`` from deleting the fastsd home.

    Args:
        root: the session folder.
        rel: the path as found in ``session.json`` (relative to the session folder; for an
            image: its file name in ``instance_images/``).
        kind: ``checkpoint``, ``model`` or ``image``.

    Raises:
        ValueError: the entry is not of its kind inside the session (the message says what it must be).
    """
    folder, what = _KINDS[kind]
    if kind == "image":
        ok = isinstance(rel, str) and _plain_name(rel)
        rel = f"{folder}/{rel}" if ok else rel
    elif kind == "checkpoint":
        ok = isinstance(rel, str) and bool(_CHECKPOINT_PATH.match(rel))
    else:
        ok = isinstance(rel, str) and rel.startswith(f"{folder}/") and _plain_name(rel[len(folder) + 1 :])
    if ok:
        real_root = root.resolve()
        target = (root / rel).resolve()
        ok = target.parent == (real_root / folder).resolve() and (real_root / folder).resolve().parent == real_root
    if not ok:
        raise ValueError(f"{rel!r} is not {what}")
    return root / rel


class _Schema:
    """Checks one ``session.json`` object; each problem names its entry (``checkpoints[0].path``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def check(self, info: Any) -> dict[str, Any]:
        if not isinstance(info, dict):
            raise ValueError(f"expected a JSON object, got {_type(info)}")
        for key in ("name", "created", "base_model", "family", "instance_token", "class_word"):
            self.typed(info.get(key), key, str, optional=True)
        if info.get("resolution") is not None:
            self.count(info["resolution"], "resolution", positive=True)
        progress = info.get("progress")
        if progress is not None:
            self.typed(progress, "progress", dict)
            if progress.get("step") is not None:
                self.count(progress["step"], "progress.step")
            if progress.get("total_steps") is not None:
                self.count(progress["total_steps"], "progress.total_steps", positive=True)
        for i, c in enumerate(self.typed(info.get("checkpoints", []), "checkpoints", list)):
            where = f"checkpoints[{i}]"
            self.typed(c, where, dict)
            self.count(self.required(c, "step", where), f"{where}.step")
            self.inside(self.required(c, "path", where), f"{where}.path", "checkpoint")
            files = self.typed(self.required(c, "files", where), f"{where}.files", dict)
            for rel, sha in files.items():
                if not _safe_relative(rel):
                    raise ValueError(f"{where}.files: {rel!r} is not a file inside the checkpoint folder")
                self.typed(sha, f"{where}.files[{rel!r}]", str)
            for rel, size in self.typed(c.get("sizes", {}), f"{where}.sizes", dict).items():
                self.count(size, f"{where}.sizes[{rel!r}]")
        for i, m in enumerate(self.typed(info.get("models", []), "models", list)):
            where = f"models[{i}]"
            self.typed(m, where, dict)
            self.inside(self.required(m, "file", where), f"{where}.file", "model")
            self.typed(m.get("kind"), f"{where}.kind", str, optional=True)
            self.typed(m.get("sha256"), f"{where}.sha256", str, optional=True)
            for key in ("step", "size"):
                if m.get(key) is not None:
                    self.count(m[key], f"{where}.{key}")
        for fname, rec in self.typed(info.get("images", {}), "images", dict).items():
            where = f"images[{fname!r}]"
            self.inside(fname, where, "image")
            self.typed(rec, where, dict)
            self.typed(rec.get("sha256"), f"{where}.sha256", str, optional=True)
            self.typed(rec.get("source"), f"{where}.source", str, optional=True)
        return info

    @staticmethod
    def required(entry: dict[str, Any], key: str, where: str) -> Any:
        if key not in entry:
            raise ValueError(f"{where}.{key}: missing")
        return entry[key]

    @staticmethod
    def typed(value: Any, where: str, kind: type, *, optional: bool = False) -> Any:
        if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)):
            return value
        want = {str: "text", dict: "an object", list: "a list"}[kind]
        raise ValueError(f"{where}: expected {want}, got {_type(value)}")

    @staticmethod
    def count(value: Any, where: str, *, positive: bool = False) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if positive else 0):
            raise ValueError(f"{where}: expected a whole number{' above 0' if positive else ''}, got {value!r}")

    def inside(self, rel: Any, where: str, kind: str) -> None:
        try:
            entry_path(self.root, rel, kind)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _type(value: Any) -> str:
    return {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "text"}.get(
        type(value), {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
    )


def _safe_relative(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return not any(p in ("", ".", "..") for p in rel.split("/"))


def load_info(root: Path, text: str, *, label: str) -> dict[str, Any]:
    """Parse and check a ``session.json`` (the one place that does, for open, list, import, train).

    Args:
        root: the session folder its paths are relative to.
        text: the file's content.
        label: how messages name the session (``session my_dog``).

    Raises:
        UserInputError: not JSON, or a structural problem, named by entry:
            ``session X: session.json: checkpoints[0].path: missing``.
    """
    try:
        info = json.loads(text)
    except ValueError as err:
        raise UserInputError(
            f"{label}: {SESSION_FILE} is unreadable, not valid JSON ({err}); restore it from a copy or re-create the session"
        ) from err
    try:
        return _Schema(root).check(info)
    except ValueError as err:
        raise UserInputError(f"{label}: {SESSION_FILE}: {err}") from err


def remove_entry(root: Path, rel: str, kind: str) -> None:
    """Delete a listed checkpoint folder, re-checked inside ``root`` at the moment of deletion."""
    try:
        target = entry_path(root, rel, kind)
    except ValueError as err:
        raise UserInputError(f"refusing to delete {rel!r} of {root}: {err}") from err
    if target.is_symlink():
        target.unlink()
    else:
        shutil.rmtree(target, ignore_errors=True)
