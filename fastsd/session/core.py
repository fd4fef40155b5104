"""The :class:`Session`: one training project's folder and its ``session.json``.

It creates and opens sessions, keeps the manifest of verified checkpoints and exported models,
edits images and captions, and takes the session's lock around every write. What a
``session.json`` may contain is :mod:`.info`'s; import and removal are :mod:`.share`'s; the
``show`` text and the Drive space plan are :mod:`.show`'s.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import storage
from ..errors import UserInputError
from ..images import IMAGE_SUFFIXES
from ..locks import SessionLock, lock_state, read_lock
from ..models.registry import BASE_MODELS, MAX_NATIVE, NATIVE_RESOLUTION, TRAINABLE_FAMILIES, check_resolution
from ..paths import fastsd_home
from .info import SESSION_FILE, load_info, normalize_name, remove_entry
from .show import describe_summary, space_plan

if TYPE_CHECKING:
    from ..images import AddReport

log = logging.getLogger(__name__)

SUBDIRS = ("instance_images", "captions", "class_images", "checkpoints", "models", "samples", "logs")


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
            UserInputError: a bad name or size, a base model fastsd cannot train, or the
                session exists and ``exist_ok`` is False.
        """
        name = normalize_name(name)
        if resolution is not None:
            check_resolution(resolution)
        known = BASE_MODELS.get(str(base_model)) if base_model else None
        if known is not None and known.family not in TRAINABLE_FAMILIES:
            raise UserInputError(
                f"base model {base_model} is a {known.family} model: fastsd trains SD1, SD2, SDXL, SD3.5 and FLUX.1 sessions; "
                f"{base_model} can be generated with (fastsd webui --model {base_model}) and converted, not trained yet"
            )
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
        from ..models.detect import native_size  # reads configs or headers; torch is imported only here

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

        Each file is copied in one pass, hashed as it goes (:func:`fastsd.storage.copy_file` with
        ``reread=False``); the rest is :meth:`write_checkpoint`'s. The trainer writes its states
        with :meth:`write_checkpoint` directly, with no local copy to record.

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
        copies = {f.relative_to(src).as_posix(): partial(storage.copy_file, f, reread=False) for f in sources}
        return self._build_checkpoint(step, copies)

    def write_checkpoint(
        self,
        step: int,
        files: Mapping[str, Callable[[BinaryIO], None]],
        *,
        reuse: Collection[str] = (),
    ) -> dict[str, Any]:
        """Write a checkpoint's files straight into ``checkpoints/step-NNNNNN`` and list it.

        ``files`` maps each relative name to a producer that writes its bytes to the file object
        it is given (:func:`fastsd.storage.write_stream`): every byte is written once, into the
        session, and hashed as it is written; nothing is staged elsewhere or read back (the size
        is checked after fsync; resuming re-hashes the whole checkpoint). The files are built
        in a temporary folder renamed to its final name once complete, and the manifest entry
        is written last: a crash at any point leaves either the previous manifest with its
        complete checkpoints, or unlisted leftovers that :meth:`clean` removes. Re-writing a
        step replaces it the same way.

        Args:
            step: the completed step the state belongs to.
            files: relative name -> producer.
            reuse: names whose content may equal the newest listed checkpoint's file of that
                name (a frozen text encoder): their producer first runs into a hash only, and
                when the hash and size match the file is hard-linked instead of written again.
                Checkpoint files are never changed in place and pruning deletes names, so a
                linked file stays whole while any checkpoint lists it. Where links are refused
                (Drive), or the content differs, it is written.

        Returns:
            The manifest entry: ``{"step", "path", "files": {rel: sha256}, "sizes": {rel: bytes}, "time"}``.

        Raises:
            StorageError: a write failed (disk full...); listed checkpoints are untouched.
        """

        def write(produce: Callable[[BinaryIO], None]) -> Callable[[Path], dict[str, Any]]:
            return lambda target: storage.write_stream(target, produce, verify_sha256=True, reread=False)

        writers = {rel: write(produce) for rel, produce in files.items()}
        linkable = {rel: files[rel] for rel in reuse if rel in files}
        return self._build_checkpoint(step, writers, linkable)

    def _build_checkpoint(
        self,
        step: int,
        writers: Mapping[str, Callable[[Path], dict[str, Any]]],
        linkable: Mapping[str, Callable[[BinaryIO], None]] | None = None,
    ) -> dict[str, Any]:
        """Build ``checkpoints/step-NNNNNN`` from ``writers`` (rel -> write to this path), then list it."""
        dest = self.checkpoints_dir / f"step-{step:06d}"
        rel_dest = dest.relative_to(self.path).as_posix()
        previous = next((c for c in reversed(self.checkpoints()) if c["path"] != rel_dest), None)
        files, sizes = {}, {}
        with storage.building_folder(dest) as staging:

            def link_or_write(rel: str, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
                return self._link_unchanged(previous, rel, linkable or {}, staging / rel) or write(staging / rel)

            results = storage.write_all({rel: partial(link_or_write, rel, write) for rel, write in writers.items()})
            for rel in writers:
                files[rel], sizes[rel] = results[rel]["sha256"], results[rel]["size"]
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

    def _link_unchanged(
        self,
        previous: dict[str, Any] | None,
        rel: str,
        linkable: Mapping[str, Callable[[BinaryIO], None]],
        target: Path,
    ) -> dict[str, Any] | None:
        """``{"sha256", "size"}`` when ``rel`` equals ``previous``'s file and was hard-linked as ``target``."""
        if previous is None or rel not in linkable or rel not in previous["files"]:
            return None
        old = self.path / previous["path"] / rel
        want = (previous["files"][rel], (previous.get("sizes") or {}).get(rel))
        if not old.is_file() or old.stat().st_size != want[1]:
            return None
        if not storage.link_file(old, target):
            return None  # refused (Drive): no hashing pass spent on it
        # The new content must be the old file's, and the old file still what was listed.
        if storage.stream_digest(linkable[rel]) != want or storage.sha256_file(target) != want[0]:
            target.unlink()
            return None
        return {"sha256": want[0], "size": want[1]}

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
            remove_entry(self.path, entry["path"], "checkpoint")
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
        from ..images import add_images

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
        seen: set[tuple[int, int]] = set()
        checkpoints = [
            {
                "step": c["step"],
                "path": c["path"],
                "ok": self.verify_checkpoint(c, quick=not verify),
                "bytes": sum((c.get("sizes") or {}).values()),
                "new_bytes": self._unshared_bytes(c, seen),
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

    def _unshared_bytes(self, entry: dict[str, Any], seen: set[tuple[int, int]]) -> int:
        """Bytes of a checkpoint's files that no earlier checkpoint in ``seen`` holds (hard links count once)."""
        total = 0
        for rel, size in (entry.get("sizes") or {}).items():
            try:
                st = (self.path / entry["path"] / rel).stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += size
        return total

    def describe(self, *, verify: bool = False) -> str:
        """What the session holds, in plain words (``fastsd session show``)."""
        return describe_summary(self.summary(verify=verify), verify=verify)


def list_sessions(home: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the sessions under the fastsd home (in-progress imports and removals excluded)."""
    root = fastsd_home(home) / "sessions"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / SESSION_FILE).is_file())
