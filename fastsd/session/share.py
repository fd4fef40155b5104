"""Bringing a session in and taking it out: :func:`import_session` and :func:`remove_session`.

An import copies every file with the safe-write helper into a temporary folder that becomes the
session in one rename; a removal renames the folder aside first. Either way a session that is
half there never looks like a session.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import UserInputError
from ..locks import GUARD_FILE, LOCK_FILE
from ..paths import fastsd_home
from .core import SUBDIRS, Session
from .info import SESSION_FILE, load_info, normalize_name, remove_entry

log = logging.getLogger(__name__)


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
                    remove_entry(staging, c["path"], "checkpoint")
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
