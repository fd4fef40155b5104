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

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import storage
from .errors import UserInputError
from .paths import fastsd_home

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


def filename_caption(stem: str) -> str:
    """Caption from a file name as Colab users know it: ``my_dog (3)`` -> ``my dog``."""
    text = re.sub(r"\(\d+\)", " ", stem)
    text = re.sub(r"[_\-]+", " ", text)
    text = re.sub(r"\d+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


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
        resolution: int = 512,
        instance_token: str = "sks",
        class_word: str = "person",
        exist_ok: bool = False,
    ) -> Session:
        """Create a session folder with its subfolders and ``session.json``.

        Raises:
            UserInputError: a bad name, or the session exists and ``exist_ok`` is False.
        """
        name = normalize_name(name)
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

    @classmethod
    def open(cls, name: str, home: str | os.PathLike[str] | None = None) -> Session:
        """Open an existing session.

        Raises:
            UserInputError: no such session, or its ``session.json`` is unreadable.
        """
        import json

        name = normalize_name(name)
        path = fastsd_home(home) / "sessions" / name
        meta = path / SESSION_FILE
        if not meta.is_file():
            raise UserInputError(
                f"no session named {name} under {path.parent}: create it with 'fastsd session new {name}'"
            )
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError) as err:
            raise UserInputError(
                f"{meta} is unreadable ({err}); restore it from a copy or re-create the session"
            ) from err
        for sub in SUBDIRS:
            (path / sub).mkdir(exist_ok=True)
        return cls(name, path, info)

    def save(self) -> None:
        """Write ``session.json`` safely."""
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
        """Set (safely write) the caption of an image."""
        storage.write_text(self.captions_dir / f"{Path(image).stem}.txt", text.strip() + "\n")

    # ---- checkpoints and models (the manifest)

    def record_checkpoint(self, step: int, source: str | os.PathLike[str]) -> dict[str, Any]:
        """Copy a finished local checkpoint folder into ``checkpoints/step-NNNNNN`` and list it.

        Every file is copied with a verified sha256; the manifest entry is written last, so a
        crash before it leaves an unlisted folder that :meth:`clean` removes.
        """
        dest = self.checkpoints_dir / f"step-{step:06d}"
        if dest.exists():
            shutil.rmtree(dest)
        files = {}
        src = Path(source)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = f.relative_to(src).as_posix()
            files[rel] = storage.copy_file(f, dest / rel, verify_sha256=True)["sha256"]
        entry = {"step": step, "path": dest.relative_to(self.path).as_posix(), "files": files, "time": time.time()}
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

    def verify_checkpoint(self, entry: dict[str, Any]) -> bool:
        """True when every file of a listed checkpoint is present with its recorded sha256."""
        folder = self.path / entry["path"]
        return all(
            (folder / rel).is_file() and storage.sha256_file(folder / rel) == sha for rel, sha in entry["files"].items()
        )

    def prune_checkpoints(self, keep: int) -> list[int]:
        """Keep the newest ``keep`` checkpoints; delete the others. Returns the removed steps."""
        entries = self.checkpoints()
        drop = entries[:-keep] if keep > 0 else entries
        for entry in drop:
            shutil.rmtree(self.path / entry["path"], ignore_errors=True)
        self.info["checkpoints"] = [c for c in self.info.get("checkpoints", []) if c not in drop]
        self.save()
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

    def models(self) -> list[dict[str, Any]]:
        """Exported models listed in the manifest whose files exist."""
        return [m for m in self.info.get("models", []) if (self.path / m["file"]).is_file()]

    def clean(self) -> list[Path]:
        """Remove leftovers of interrupted writes: temp files and unlisted checkpoint folders."""
        removed = storage.clean_temp_files(self.path)
        listed = {c["path"] for c in self.info.get("checkpoints", [])}
        for folder in self.checkpoints_dir.glob("step-*"):
            if folder.relative_to(self.path).as_posix() not in listed:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed


def list_sessions(home: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the sessions under the fastsd home."""
    root = fastsd_home(home) / "sessions"
    return sorted(p.name for p in root.iterdir() if (p / SESSION_FILE).is_file())
