"""Safe writes: a file under its final name is always complete.

Google Drive in Colab is a FUSE mount that can drop or truncate writes when the runtime dies.
Every file fastsd keeps goes through one of these helpers: write to a temporary name in the
target folder, fsync, verify the size (and sha256 when asked), then ``os.replace`` to the final
name. A crash leaves at most a ``.fastsd-tmp-*`` file, which :func:`clean_temp_files` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import StorageError

TEMP_PREFIX = ".fastsd-tmp-"
CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _temp_name(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{final.name}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems (and Windows) cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_stream(
    path: str | os.PathLike[str],
    produce: Callable[[BinaryIO], None],
    *,
    verify_sha256: bool = False,
) -> dict[str, Any]:
    """Write a file safely by letting ``produce(fh)`` fill a temporary file.

    Args:
        path: the final file name.
        produce: writes the content to the binary file object it is given.
        verify_sha256: re-read the file after fsync and return its sha256 (for checkpoints and
            models: catches a write that Drive silently dropped).

    Returns:
        ``{"path", "size", "sha256"}`` (sha256 None unless verified).

    Raises:
        StorageError: the write failed (disk full, I/O error); the final name is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw, digest)
            produce(writer)  # type: ignore[arg-type]
            raw.flush()
            os.fsync(raw.fileno())
            written = writer.count
        size = tmp.stat().st_size
        if size != written:
            raise StorageError(f"{final}: wrote {written} bytes but {size} reached the disk; try again")
        sha = None
        if verify_sha256:
            sha = sha256_file(tmp)
            if sha != digest.hexdigest():
                raise StorageError(f"{final}: the file read back differs from what was written; try again")
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return {"path": str(final), "size": size, "sha256": sha}
    except OSError as err:
        _unlink_quiet(tmp)
        raise StorageError(f"could not write {final}: {err.strerror or err}; nothing was replaced") from err
    except BaseException:
        _unlink_quiet(tmp)
        raise


class _HashingWriter:
    """File wrapper that counts and hashes what passes through it."""

    def __init__(self, raw: BinaryIO, digest: Any) -> None:
        self.raw, self.digest, self.count = raw, digest, 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self.raw.write(data)
        self.digest.update(data)
        self.count += len(data)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, verify_sha256: bool = False) -> dict[str, Any]:
    """Write ``data`` to ``path`` safely (see :func:`write_stream`)."""
    return write_stream(path, lambda fh: fh.write(data), verify_sha256=verify_sha256)


def write_text(path: str | os.PathLike[str], text: str) -> dict[str, Any]:
    """Write UTF-8 text to ``path`` safely."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> dict[str, Any]:
    """Write ``obj`` as indented JSON to ``path`` safely."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def copy_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, verify_sha256: bool = True
) -> dict[str, Any]:
    """Copy ``src`` to ``dst`` safely; with ``verify_sha256`` the copy is checked against the source.

    Raises:
        StorageError: the copy failed or does not match the source.
    """
    src_path = Path(src)
    src_sha = sha256_file(src_path) if verify_sha256 else None

    def produce(fh: BinaryIO) -> None:
        with open(src_path, "rb") as inp:
            shutil.copyfileobj(inp, fh, CHUNK)

    result = write_stream(dst, produce, verify_sha256=verify_sha256)
    if verify_sha256 and result["sha256"] != src_sha:
        _unlink_quiet(Path(dst))
        raise StorageError(f"copy of {src_path} to {dst} does not match the source; try again")
    return result


def clean_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove leftovers of interrupted safe writes under ``folder``; returns what was removed."""
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for tmp in root.rglob(f"{TEMP_PREFIX}*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _unlink_quiet(tmp)
        removed.append(tmp)
    return removed


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
