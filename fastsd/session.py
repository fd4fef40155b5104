"""Sessions: one training project kept under ``<home>/sessions/<name>/``.

Layout::

    session.json          base model, family, resolution, token/class, progress, and the manifest of
                          verified checkpoints and exported models (with sha256)
    instance_images/      cropped training images
    captions/<stem>.txt   per-image captions
    class_images/<slug>/  prior-preservation images, reused across runs
    checkpoints/step-000500/   resumable training states (only those in the manifest count)
    models/               exported single-file models and LoRA files
    samples/  logs/

``session.json`` is written with the safe-write helper, and a checkpoint or model enters the
manifest only after every file of it is on disk and hashed, so a runtime that dies mid-write
never leaves a half checkpoint that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .errors import UserInputError
from .images import filename_caption  # noqa: F401 - re-exported: session.filename_caption is public
from .locks import GUARD_FILE, LOCK_FILE, SessionLock, lock_state, read_lock
from .models.registry import MAX_NATIVE, NATIVE_RESOLUTION, check_resolution
from .paths import fastsd_home

if TYPE_CHECKING:
    from .images import AddReport

log = logging.getLogger(__name__)

SESSION_FILE = "session.json"
SUBDIRS = ("instance_images", "captions", "class_images", "checkpoints", "models", "samples", "logs")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
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


@dataclass
class Session:
    """A session folder and its ``session.json`` (``info``)."""

    name: str
    path: Path
    info: dict[str, Any]

    # ---- creating and opening

    @classmethod
    def create(
        cls,
        name: str,
        home: str | os.PathLike[str] | None = None,
        *,
        base_model: str | None = None,
        resolution: int | None = None,
        instance_token: str = "sks",
        class_word: str = "person",
        exist_ok: bool = False,
    ) -> Session:
        """Create a session folder with its subfolders and ``session.json``.

        ``resolution`` None (the default) means the base model's native size, decided when it is
        needed (:meth:`training_size`), so an SDXL session trains at 1024 unless told otherwise.

        Raises:
            UserInputError: a bad name or size, or the session exists and ``exist_ok`` is False.
        """
        name = normalize_name(name)
        if resolution is not None:
            check_resolution(resolution)
        path = fastsd_home(home) / "sessions" / name
        if (path / SESSION_FILE).exists():
            if exist_ok:
                return cls.open(name, home)
            raise UserInputError(f"session {name} already exists at {path}: open it, or choose another name")
        for sub in SUBDIRS:
            (path / sub).mkdir(parents=True, exist_ok=True)
        info = {
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "base_model": base_model,
            "family": None,
            "resolution": resolution,
            "instance_token": instance_token,
            "class_word": class_word,
            "progress": {"step": 0, "total_steps": None},
            "checkpoints": [],
            "models": [],
        }
        session = cls(name, path, info)
        session.save()
        return session

    def training_size(self) -> int:
        """The size images are cropped to and training uses: the one set, else the base model's native size.

        The base model's family decides (:func:`fastsd.models.detect.native_size`); while it is not
        local yet (``hf:``, a URL), the largest native size, which the trainer scales down cleanly;
        with no base model chosen, SD1's 512.
        """
        if self.info.get("resolution"):
            return int(self.info["resolution"])
        base = self.info.get("base_model")
        if not base:
            return NATIVE_RESOLUTION["sd1"]
        from .models.detect import native_size  # reads configs or headers; torch is imported only here

        known = native_size(base)
        return known[1] if known else MAX_NATIVE

    @classmethod
    def open(cls, name: str, home: str | os.PathLike[str] | None = None, *, strict: bool = True) -> Session:
        """Open an existing session; its ``session.json`` is checked (:func:`load_info`).

        Args:
            strict: False only to remove the session: a damaged ``session.json`` then opens as
                an empty one instead of failing (its paths are never used).

        Raises:
            UserInputError: no such session, or its ``session.json`` is unreadable or damaged.
        """
        name = normalize_name(name)
        path = fastsd_home(home) / "sessions" / name
        meta = path / SESSION_FILE
        if not meta.is_file():
            raise UserInputError(
                f"no session named {name} under {path.parent}: create it with 'fastsd session new {name}'"
            )
        try:
            text = meta.read_text(encoding="utf-8")
        except (OSError, ValueError) as err:
            raise UserInputError(
                f"{meta} is unreadable ({err}); restore it from a copy or re-create the session"
            ) from err
        try:
            info = load_info(path, text, label=f"session {name}")
        except UserInputError:
            if strict:
                raise
            return cls(name, path, {})
        for sub in SUBDIRS:
            (path / sub).mkdir(exist_ok=True)
        return cls(name, path, info)

    def save(self) -> None:
        """Write ``session.json`` safely, holding the session's lock.

        A writer that already holds the lock (train, add, import...) just nests; anything else
        takes it for the write, so a second process can never write a session that is in use.

        Raises:
            SessionLockedError: another live process holds the session.
        """
        with self.lock(heartbeat=0, clean=False, command="save session.json"):
            storage.write_json(self.path / SESSION_FILE, self.info)

    def update(self, **fields: Any) -> None:
        """Set top-level fields of ``session.json`` and save."""
        self.info.update(fields)
        self.save()

    # ---- folders

    @property
    def instance_dir(self) -> Path:
        return self.path / "instance_images"

    @property
    def captions_dir(self) -> Path:
        return self.path / "captions"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def class_images_dir(self, class_prompt: str) -> Path:
        """Folder of prior-preservation images for ``class_prompt`` (slugged)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "_", class_prompt).strip("_").lower()[:80] or "class"
        return self.path / "class_images" / slug

    # ---- images and captions

    def images(self) -> list[Path]:
        """Instance images, sorted by name."""
        return sorted(
            p for p in self.instance_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )

    def default_prompt(self) -> str:
        """``<instance token> <class>``, the caption of images that have none."""
        return f"{self.info.get('instance_token', 'sks')} {self.info.get('class_word', '')}".strip()

    def caption(self, image: str | os.PathLike[str]) -> str:
        """The caption of an image: its ``captions/<stem>.txt``, else the default prompt."""
        stem = Path(image).stem
        txt = self.captions_dir / f"{stem}.txt"
        if txt.is_file():
            text = txt.read_text(encoding="utf-8").strip()
            if text:
                return text
        return self.default_prompt()

    def set_caption(self, image: str | os.PathLike[str], text: str) -> None:
        """Set (safely write) the caption of an image, holding the session's lock.

        Raises:
            SessionLockedError: another live process holds the session (training reads the captions).
        """
        with self.lock(heartbeat=0, clean=False, command="edit captions"):
            storage.write_text(self.captions_dir / f"{Path(image).stem}.txt", text.strip() + "\n")

    # ---- checkpoints and models (the manifest)

    def record_checkpoint(self, step: int, source: str | os.PathLike[str]) -> dict[str, Any]:
        """Copy a finished local checkpoint folder into ``checkpoints/step-NNNNNN`` and list it.

        Files are copied (sha256 verified) into a temporary folder that is renamed to its final
        name once complete; the manifest entry is written last. A crash at any point leaves
        either the previous manifest with its complete checkpoints, or leftovers that are not
        listed and that :meth:`clean` removes. Re-recording a step replaces it the same way.

        Returns:
            The manifest entry: ``{"step", "path", "files": {rel: sha256}, "sizes": {rel: bytes}, "time"}``.

        Raises:
            UserInputError: ``source`` is not a folder or holds no files.
            StorageError: a copy failed (disk full...); listed checkpoints are untouched.
        """
        src = Path(source)
        if not src.is_dir():
            raise UserInputError(f"checkpoint source {src} is not a folder")
        sources = sorted(p for p in src.rglob("*") if p.is_file())
        if not sources:
            raise UserInputError(f"checkpoint source {src} is empty: nothing to record")
        dest = self.checkpoints_dir / f"step-{step:06d}"
        rel_dest = dest.relative_to(self.path).as_posix()
        files, sizes = {}, {}
        with storage.building_folder(dest) as staging:
            for f in sources:
                rel = f.relative_to(src).as_posix()
                result = storage.copy_file(f, staging / rel, verify_sha256=True)
                files[rel], sizes[rel] = result["sha256"], result["size"]
            if dest.exists() and any(c["path"] == rel_dest for c in self.info.get("checkpoints", [])):
                # Unlist first, then swap: a crash in between leaves an unlisted folder, never a
                # listed one whose files are not those of its entry.
                self.info["checkpoints"] = [c for c in self.info["checkpoints"] if c["path"] != rel_dest]
                self.save()
        entry = {"step": step, "path": rel_dest, "files": files, "sizes": sizes, "time": time.time()}
        self.info["checkpoints"] = [c for c in self.info.get("checkpoints", []) if c["step"] != step] + [entry]
        self.info["checkpoints"].sort(key=lambda c: c["step"])
        self.save()
        return entry

    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints listed in the manifest whose folders exist, oldest first."""
        return [c for c in self.info.get("checkpoints", []) if (self.path / c["path"]).is_dir()]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest listed checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def verify_checkpoint(self, entry: dict[str, Any], *, quick: bool = False) -> bool:
        """True when every file of a listed checkpoint is present with its recorded sha256.

        Args:
            entry: a manifest entry from :meth:`checkpoints`.
            quick: check presence and sizes only (no re-reading of gigabytes from Drive).
        """
        folder = self.path / entry["path"]
        sizes = entry.get("sizes") or {}
        for rel, sha in entry["files"].items():
            f = folder / rel
            if not f.is_file():
                return False
            if rel in sizes and f.stat().st_size != sizes[rel]:
                return False
            if not quick and storage.sha256_file(f) != sha:
                return False
        return True

    def prune_checkpoints(self, keep: int) -> list[int]:
        """Keep the newest ``keep`` checkpoints; delete the others. Returns the removed steps.

        The manifest is saved before folders are deleted, so a crash never leaves a listed,
        half-deleted checkpoint.
        """
        entries = self.checkpoints()
        drop = entries[:-keep] if keep > 0 else entries
        if not drop:
            return []
        dropped = {c["path"] for c in drop}
        self.info["checkpoints"] = [c for c in self.info.get("checkpoints", []) if c["path"] not in dropped]
        self.save()
        for entry in drop:
            _remove_entry(self.path, entry["path"], "checkpoint")
        return [c["step"] for c in drop]

    def record_model(
        self, path: str | os.PathLike[str], *, kind: str = "full", step: int | None = None
    ) -> dict[str, Any]:
        """List an exported model file that is already complete in ``models/`` (hashes it)."""
        file = Path(path)
        entry = {
            "file": file.relative_to(self.path).as_posix(),
            "kind": kind,
            "step": step,
            "sha256": storage.sha256_file(file),
            "size": file.stat().st_size,
        }
        self.info["models"] = [m for m in self.info.get("models", []) if m["file"] != entry["file"]] + [entry]
        self.save()
        return entry

    def record_eval(self, file: str, scores: dict[str, Any]) -> None:
        """Store an export's likeness scores (:func:`fastsd.eval.evaluate`) on its manifest entry.

        Raises:
            ValueError: ``file`` is not an export listed in the manifest.
            SessionLockedError: another live process holds the session.
        """
        with self.lock(heartbeat=0, clean=False, command="fastsd eval"):
            for m in self.info.get("models", []):
                if m["file"] == file:
                    m["eval"] = scores
                    self.save()
                    return
        raise ValueError(f"{file!r} is not an export of session {self.name}")

    def models(self) -> list[dict[str, Any]]:
        """Exported models listed in the manifest whose files exist."""
        return [m for m in self.info.get("models", []) if (self.path / m["file"]).is_file()]

    def latest_model(self) -> dict[str, Any] | None:
        """The newest exported model entry (highest step, then the last listed), or None."""
        models = self.models()
        if not models:
            return None
        return max(enumerate(models), key=lambda im: (im[1].get("step") or 0, im[0]))[1]

    def clean(self, *, older_than: float | None = None) -> list[Path]:
        """Remove leftovers of interrupted writes: temp files and unlisted checkpoint folders.

        Temps of a process of this host that is still running are kept. Taking the session's
        lock for writing calls this (see :meth:`lock`); call it yourself only while holding it.

        Args:
            older_than: temps of other hosts (or of unknown owner) unchanged since then are
                leftovers; default now (every writer holds the lock, so none is running).
        """
        removed = storage.clean_temp_files(self.path, older_than=time.time() if older_than is None else older_than)
        listed = {c["path"] for c in self.info.get("checkpoints", [])}
        for folder in self.checkpoints_dir.glob("step-*"):
            if folder.relative_to(self.path).as_posix() not in listed:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    # ---- locking

    def lock(
        self, *, force: bool = False, command: str | None = None, clean: bool = True, **kwargs: Any
    ) -> SessionLock:
        """The session's lock, to use as ``with session.lock(): ...`` around writes.

        Args:
            force: break an existing lock (``--force``).
            command: what holds it, shown to a second user (e.g. ``"fastsd train"``).
            clean: once taken, remove leftovers of killed writers (:meth:`clean`, temps older
                than the lock); only a holder may, since a running write looks like a leftover.
            kwargs: ``stale_after`` / ``heartbeat`` seconds for :class:`~fastsd.locks.SessionLock`.

        Raises:
            SessionLockedError: on enter, when another live process holds it.
        """
        on_acquire = self._clean_on_lock if clean else None
        return SessionLock(self.path, name=self.name, force=force, command=command, on_acquire=on_acquire, **kwargs)

    def _clean_on_lock(self, lock: SessionLock) -> None:
        removed = self.clean(older_than=lock.since)
        if removed:
            log.info("session %s: removed %d leftover(s) of interrupted writes", self.name, len(removed))

    def reclaimable(self) -> dict[str, Any]:
        """Space held by leftovers of interrupted writes that the next writer removes (``show``).

        Returns:
            ``{"bytes": n, "items": k}``: stale temp files/folders and unlisted checkpoint folders.
        """
        holder = self.lock_holder()
        older_than = float(holder.get("since") or 0) if holder and holder["state"] == "live" else time.time()
        total, found = storage.reclaimable(self.path, older_than=older_than)
        listed = {c["path"] for c in self.info.get("checkpoints", [])}
        for folder in self.checkpoints_dir.glob("step-*"):
            if folder.relative_to(self.path).as_posix() not in listed and not folder.is_symlink():
                total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                found.append(folder)
        return {"bytes": total, "items": len(found)}

    def lock_holder(self) -> dict[str, Any] | None:
        """The current lock record plus its ``state`` (live/dead/stale), or None when unlocked."""
        record = read_lock(self.path)
        if record is None:
            return None
        return {**record, "state": lock_state(record)}

    # ---- adding images and listing captions

    def add_images(
        self,
        sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        crop: str = "smart",
        size: int | None = None,
        captions: str = "auto",
        force: bool = False,
        progress: bool = True,
    ) -> AddReport:
        """Add instance images from files, folders and zips (see :func:`fastsd.images.add_images`).

        Holds the session lock while adding.

        Raises:
            UserInputError: bad options, or no image files at all.
            SessionLockedError: another process uses the session (``force=True`` breaks the lock).
        """
        from .images import add_images

        with self.lock(force=force, command="fastsd session add"):
            return add_images(self, sources, crop=crop, size=size, captions=captions, progress=progress)

    def captions(self) -> dict[str, str]:
        """Every instance image's file name mapped to its caption (own or default)."""
        return {p.name: self.caption(p) for p in self.images()}

    def has_own_caption(self, image: str | os.PathLike[str]) -> bool:
        """True when the image has a non-empty ``captions/<stem>.txt``."""
        txt = self.captions_dir / f"{Path(image).stem}.txt"
        return txt.is_file() and bool(txt.read_text(encoding="utf-8").strip())

    def remove_image(self, image: str | os.PathLike[str]) -> None:
        """Delete an instance image, its caption and its record.

        Raises:
            UserInputError: no such image in the session.
        """
        name = Path(image).name
        path = self.instance_dir / name
        if not path.is_file():
            raise UserInputError(f"session {self.name} has no image {name}: see 'fastsd session show {self.name}'")
        with self.lock(heartbeat=0, clean=False, command="remove an image"):
            path.unlink()
            (self.captions_dir / f"{path.stem}.txt").unlink(missing_ok=True)
            if self.info.get("images", {}).pop(name, None) is not None:
                self.save()

    # ---- describing

    def summary(self, *, verify: bool = False) -> dict[str, Any]:
        """What the session holds, as data (``show --json``).

        Args:
            verify: re-hash checkpoint files (slow on Drive); otherwise presence and sizes are checked.
        """
        images = self.images()
        own = sum(1 for p in images if self.has_own_caption(p))
        class_dirs = sorted(p for p in (self.path / "class_images").iterdir() if p.is_dir())
        checkpoints = [
            {
                "step": c["step"],
                "path": c["path"],
                "ok": self.verify_checkpoint(c, quick=not verify),
                "bytes": sum((c.get("sizes") or {}).values()),
            }
            for c in self.checkpoints()
        ]
        models = [{**m, "ok": (self.path / m["file"]).stat().st_size == m.get("size")} for m in self.models()]
        progress = self.info.get("progress") or {}
        return {
            "name": self.name,
            "path": str(self.path),
            "created": self.info.get("created"),
            "base_model": self.info.get("base_model"),
            "family": self.info.get("family"),
            "resolution": self.training_size(),
            "resolution_set": self.info.get("resolution") is not None,
            "instance_token": self.info.get("instance_token"),
            "class_word": self.info.get("class_word"),
            "default_prompt": self.default_prompt(),
            "images": len(images),
            "own_captions": own,
            "class_images": {
                p.name: sum(1 for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for p in class_dirs
            },
            "step": progress.get("step", 0),
            "total_steps": progress.get("total_steps"),
            "checkpoints": checkpoints,
            "checkpoints_verified": "sha256" if verify else "size",
            "models": models,
            "lock": self.lock_holder(),
            "reclaimable": self.reclaimable(),
            "space": space_plan(checkpoints, models),
        }

    def describe(self, *, verify: bool = False) -> str:
        """What the session holds, in plain words (``fastsd session show``)."""
        s = self.summary(verify=verify)
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
    K + 1 while a save is under way; exports are never pruned. Sizes are the newest of each kind.
    """
    ckpt = next((c["bytes"] for c in reversed(checkpoints) if c.get("bytes")), 0)
    export = next((m["size"] for m in reversed(models) if m.get("size")), 0)
    used = sum(c.get("bytes") or 0 for c in checkpoints) + sum(m.get("size") or 0 for m in models)
    out: dict[str, Any] = {
        "checkpoint_bytes": ckpt,
        "export_bytes": export,
        "used_bytes": used,
        "drive_bytes": FREE_DRIVE_BYTES,
    }
    parts = []
    if ckpt:
        parts.append(f"each checkpoint {human_size(ckpt)}")
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
            parts.append(f"{drive} holds {n} checkpoint(s) (--keep) plus one export, with room to save the next")
        else:
            parts.append(f"{drive} cannot hold a checkpoint save next to an export: keep states on local disk")
    return {**out, "text": "; ".join(parts)}


def human_size(n: float) -> str:
    """Bytes as ``12.3 MiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _remove_entry(root: Path, rel: str, kind: str) -> None:
    """Delete a listed checkpoint folder, re-checked inside ``root`` at the moment of deletion."""
    try:
        target = entry_path(root, rel, kind)
    except ValueError as err:
        raise UserInputError(f"refusing to delete {rel!r} of {root}: {err}") from err
    if target.is_symlink():
        target.unlink()
    else:
        shutil.rmtree(target, ignore_errors=True)


def list_sessions(home: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the sessions under the fastsd home (in-progress imports and removals excluded)."""
    root = fastsd_home(home) / "sessions"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / SESSION_FILE).is_file())


def remove_session(name: str, home: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Delete a session folder and everything in it.

    The folder is first renamed to a temporary name (one atomic step, so a half-deleted session
    never looks like a session), then deleted.

    Returns:
        The path the session had.

    Raises:
        UserInputError: no such session.
        SessionLockedError: the session is in use (``force=True`` breaks the lock).
    """
    session = Session.open(name, home, strict=False)  # a damaged session.json can still be removed
    # no heartbeat thread: it could re-create the folder by refreshing the lock after the rename
    with session.lock(force=force, command="fastsd session rm", heartbeat=0, clean=False):
        aside = storage.move_aside(session.path, "rm")
    shutil.rmtree(aside, ignore_errors=True)
    return session.path


#: Files never carried over by an import: lock files, sync records, temp files.
_NOT_IMPORTED = (LOCK_FILE, GUARD_FILE, storage.SYNC_STATE)


def _importable(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or rel.startswith("/") or ":" in parts[0]:
        return False
    return not any(p.startswith(storage.TEMP_PREFIX) or p in _NOT_IMPORTED or p == "__MACOSX" for p in parts)


def import_session(
    source: str | os.PathLike[str], home: str | os.PathLike[str] | None = None, *, name: str | None = None
) -> Session:
    """Bring a session in from a folder (a shared Drive folder, a copy) or a zip of one.

    ``source`` is the session folder itself, or a folder/zip holding exactly one session folder.
    Every file is copied with the safe-write helper into a temporary folder that becomes the
    session in one rename. Checkpoints whose files do not match the source manifest (a copy
    interrupted mid-sync) are dropped from the manifest and not copied as complete.

    Args:
        source: folder or ``.zip``.
        home: the fastsd home to import into.
        name: the new session's name (default: the name in its ``session.json``).

    Returns:
        The imported :class:`Session`.

    Raises:
        UserInputError: no session found in ``source``, its ``session.json`` is unreadable, or a
            session of that name already exists (pass ``name``).
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise UserInputError(f"cannot import {src}: no such file or folder")
    if src.is_file() and src.suffix.lower() == ".zip":
        try:
            archive = zipfile.ZipFile(src)
        except (zipfile.BadZipFile, OSError) as err:
            raise UserInputError(f"cannot import {src}: not a readable zip ({err})") from err
        with archive:
            members = {i.filename: i for i in archive.infolist() if not i.is_dir()}
            prefix = _find_session_prefix(src, [m for m in members if m.rsplit("/", 1)[-1] == SESSION_FILE])
            entries = {
                m[len(prefix) :]: (lambda fh, i=info: _copy_member(archive, i, fh))
                for m, info in members.items()
                if m.startswith(prefix) and not _is_zip_symlink(info)
            }
            return _import_entries(src, entries, home, name, fallback=Path(prefix.rstrip("/")).name or src.stem)
    if not src.is_dir():
        raise UserInputError(f"cannot import {src}: give a session folder or a .zip of one")
    found = [p.relative_to(src).as_posix() for p in src.glob(SESSION_FILE)] + [
        p.relative_to(src).as_posix() for p in src.glob(f"*/{SESSION_FILE}")
    ]
    prefix = _find_session_prefix(src, found)
    root = src / prefix if prefix else src
    entries = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            entries[p.relative_to(root).as_posix()] = lambda fh, p=p: _copy_path(p, fh)
    return _import_entries(src, entries, home, name, fallback=root.name)


def _find_session_prefix(src: Path, found: list[str]) -> str:
    if SESSION_FILE in found:
        return ""
    tops = [f for f in found if f.count("/") == 1 and not f.startswith(("__MACOSX/", "."))]
    if len(tops) == 1:
        return tops[0][: -len(SESSION_FILE)]
    if not tops:
        raise UserInputError(f"no session found in {src}: it holds no session.json (at its top or one folder down)")
    raise UserInputError(
        f"{src} holds {len(tops)} sessions ({', '.join(t.split('/')[0] for t in tops)}): import one folder"
    )


def _is_zip_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, fh: Any) -> None:
    with archive.open(info) as inp:
        shutil.copyfileobj(inp, fh, storage.CHUNK)


def _copy_path(path: Path, fh: Any) -> None:
    with open(path, "rb") as inp:
        shutil.copyfileobj(inp, fh, storage.CHUNK)


def _import_entries(
    src: Path, entries: dict[str, Any], home: str | os.PathLike[str] | None, name: str | None, *, fallback: str
) -> Session:
    if SESSION_FILE not in entries:
        raise UserInputError(f"no session found in {src}: it holds no session.json")
    staging_root = fastsd_home(home) / "sessions"
    staging_root.mkdir(parents=True, exist_ok=True)
    storage.clean_temp_files(staging_root, recursive=False)  # earlier imports and removals that were killed
    meta = storage.temp_name(staging_root / SESSION_FILE, "import")
    try:
        storage.write_stream(meta, entries[SESSION_FILE])
        try:
            text = meta.read_text(encoding="utf-8")
        except (OSError, ValueError) as err:
            raise UserInputError(f"cannot import {src}: its session.json is unreadable ({err})") from err
    finally:
        meta.unlink(missing_ok=True)
    # The same checks as opening a session: every path it names must lie inside it, before any
    # of them is used (an incomplete checkpoint is deleted below by its path, checked again).
    info = load_info(storage.temp_name(staging_root / "session", "import"), text, label=f"cannot import {src}")
    new_name = normalize_name(name or str(info.get("name") or fallback))
    final = staging_root / new_name
    if final.exists():
        raise UserInputError(f"a session named {new_name} already exists: import with another name (--name NEW)")
    try:
        with storage.building_folder(final, "import", replace=False) as staging:
            hashes: dict[str, str | None] = {}
            skipped = []
            for rel, produce in sorted(entries.items()):
                if rel == SESSION_FILE:
                    continue
                if not _importable(rel):
                    skipped.append(rel)
                    continue
                hashes[rel] = storage.write_stream(staging / rel, produce, verify_sha256=True)["sha256"]
            if skipped:
                log.info("import skipped %d internal or unsafe entr(ies): %s", len(skipped), ", ".join(skipped[:5]))
            info["name"] = new_name
            kept = []
            for c in info.get("checkpoints", []):
                files = c["files"]
                good = bool(files) and all(hashes.get(f"{c['path']}/{rel}") == sha for rel, sha in files.items())
                if good:
                    kept.append(c)
                else:
                    log.warning("import: checkpoint step %s is incomplete in %s; it is not listed", c["step"], src)
                    _remove_entry(staging, c["path"], "checkpoint")
            info["checkpoints"] = kept
            info["models"] = [m for m in info.get("models", []) if hashes.get(m["file"]) == m.get("sha256")]
            storage.write_json(staging / SESSION_FILE, info)
            for sub in SUBDIRS:
                (staging / sub).mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:  # another import of the same name won the race
        raise UserInputError(f"a session named {new_name} already exists: import with another name") from err
    session = Session.open(new_name, home)
    with session.lock(command="fastsd session import", heartbeat=0):
        pass  # taking the lock cleans what came along unlisted (checkpoint folders of no manifest entry)
    return session
