"""Safe writes: a file under its final name is always complete.

Google Drive in Colab is a FUSE mount that can drop or truncate writes when the runtime dies.
Every file fastsd keeps goes through one of these helpers: write to a temporary name in the
target folder, fsync, verify the size (and sha256 when asked), then ``os.replace`` to the final
name. A crash leaves at most a ``.fastsd-tmp-*`` file. A temp name says who made it (a hash of
the host name and the pid), so a leftover of a dead process can be told from a write in progress:
:func:`clean_temp_files` removes leftovers, and every write removes the stale temps of earlier,
killed writes of the same target before it starts (a killed conversion left gigabytes on Drive).

Files, streams (with in-kernel copies of other files' byte ranges), folders built under a temp
name and swapped in, scratch folders and PNG bytes all live here, past the usual ~600 lines, on
purpose: they share one temp-name and cleanup rule, and a second module would be a second owner.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .errors import StorageError

K = TypeVar("K")
T = TypeVar("T")

TEMP_PREFIX = ".fastsd-tmp-"
CHUNK = 8 * 1024 * 1024
#: Record of verified copies kept in a sync destination; lets an interrupted sync resume cheaply.
SYNC_STATE = ".fastsd-sync.json"

log = logging.getLogger(__name__)


def _storage_error(final: Path, err: OSError) -> StorageError:
    """One-line StorageError for a failed write; disk full gets its own advice."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = ""
        with contextlib.suppress(OSError):
            free = f", {shutil.disk_usage(final.parent).free // (1024 * 1024)} MiB free"
        return StorageError(
            f"disk full while writing {final}{free}: free some space (or Drive quota) and run again; "
            "files already complete were not touched"
        )
    return StorageError(f"could not write {final}: {err.strerror or err}; nothing was replaced")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


#: Seconds without a change after which a temp file of another host (or of unknown owner) is a leftover.
TEMP_STALE_AFTER = 60 * 60
#: ``.fastsd-tmp-<host hash>-<pid>-<random>-<name>``: the owner of a temp file, in its name.
_OWNED_TEMP = re.compile(r"^" + re.escape(TEMP_PREFIX) + r"([0-9a-f]{8})-(\d+)-([0-9a-f]{8})-(.*)$", re.S)
#: The older naming, ``.fastsd-tmp-<12 hex>-<name>``: owner unknown, judged by age.
_LEGACY_TEMP = re.compile(r"^" + re.escape(TEMP_PREFIX) + r"([0-9a-f]{12})-(.*)$", re.S)


def _host_tag(host: str | None = None) -> str:
    return hashlib.sha256((host or socket.gethostname()).encode()).hexdigest()[:8]


def temp_name(final: str | os.PathLike[str], tag: str = "") -> Path:
    """A temporary name beside ``final`` that names its owner (host hash and pid).

    Every temp file or folder fastsd makes is named here, so :func:`is_stale_temp` can tell the
    leftover of a killed process from a write that is still running.

    Args:
        final: the name the temp will become (or the thing it belongs to).
        tag: an optional word for what the temp is (``import``, ``rm``...), kept in the name.
    """
    final = Path(final)
    label = f"{tag}-{final.name}" if tag else final.name
    return final.with_name(f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{label}")


def pid_alive(pid: int) -> bool:
    """True when a process of this host has that pid (a live owner of a temp file or lock)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _newest_mtime(path: Path) -> float:
    """The newest change in a temp file or folder (a folder being filled changes inside)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for sub in path.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, sub.lstat().st_mtime)
    return newest


def is_stale_temp(
    path: str | os.PathLike[str], *, older_than: float | None = None, max_age: float = TEMP_STALE_AFTER
) -> bool:
    """True when a ``.fastsd-tmp-*`` file or folder is a leftover that may be deleted.

    - made on this host: a leftover when its process is gone (never while it runs);
    - made on another host, or named before temp names said their owner: a leftover when it has
      not changed since ``older_than`` (e.g. when the current lock was taken: every writer of a
      session holds its lock, so nothing older belongs to a running write) or for ``max_age``.
    """
    p = Path(path)
    if not p.name.startswith(TEMP_PREFIX):
        return False
    owned = _OWNED_TEMP.match(p.name)
    if owned and owned.group(1) == _host_tag():
        return not pid_alive(int(owned.group(2)))
    try:
        changed = _newest_mtime(p)
    except OSError:
        return False  # already gone
    if older_than is not None and changed < older_than:
        return True
    return time.time() - changed > max_age


def _remove_temp(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        _unlink_quiet(tmp)


def clean_stale_temps_beside(final: str | os.PathLike[str]) -> list[Path]:
    """Remove stale temps of earlier writes of ``final`` (same folder, same target name).

    Called when a write of ``final`` starts: a killed conversion or copy of the same target left
    them, and nothing else will ever reuse them. Temps of a write still running are kept.
    """
    final = Path(final)
    removed: list[Path] = []
    try:
        siblings = list(final.parent.glob(f"{TEMP_PREFIX}*"))
    except OSError:
        return removed
    for tmp in siblings:
        match = _OWNED_TEMP.match(tmp.name) or _LEGACY_TEMP.match(tmp.name)
        if match and match.group(match.lastindex or 0) == final.name and is_stale_temp(tmp):
            _remove_temp(tmp)
            removed.append(tmp)
    if removed:
        log.info("removed %d leftover temp file(s) of earlier writes of %s", len(removed), final)
    return removed


def reclaimable(folder: str | os.PathLike[str], *, older_than: float | None = None) -> tuple[int, list[Path]]:
    """Bytes held by stale temps under ``folder`` (what :func:`clean_temp_files` would free), and them."""
    total, found = 0, []
    for tmp in _temp_candidates(Path(folder)):
        if not is_stale_temp(tmp, older_than=older_than):
            continue
        found.append(tmp)
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                total += sum(f.lstat().st_size for f in tmp.rglob("*") if f.is_file())
            else:
                total += tmp.lstat().st_size
    return total, found


def _temp_candidates(root: Path, *, recursive: bool = True) -> list[Path]:
    """Outermost ``.fastsd-tmp-*`` entries under ``root`` (not those inside a temp folder).

    Other processes create and remove folders while this looks (a shared temp folder, a
    session being written): a folder that vanishes mid-walk is skipped, never an error.
    """
    found: list[Path] = []
    for here, dirs, files in os.walk(root, onerror=lambda err: None):
        base = Path(here)
        found += [base / f for f in files if f.startswith(TEMP_PREFIX)]
        temps = [d for d in dirs if d.startswith(TEMP_PREFIX)]
        found += [base / d for d in temps]
        dirs[:] = [d for d in dirs if d not in temps] if recursive else []  # never inside a temp
    return sorted(found)


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (best effort: not every filesystem can)."""
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
    reread: bool = True,
) -> dict[str, Any]:
    """Write a file safely by letting ``produce(fh)`` fill a temporary file.

    Args:
        path: the final file name.
        produce: writes the content to the binary file object it is given. Besides ``write``, that
            object has ``copy_range(fd, offset, count)``, which appends a byte range of another
            open file inside the kernel (see :meth:`_HashingWriter.copy_range`).
        verify_sha256: hash the bytes as they are written and return their sha256 (for
            checkpoints and models); the file's size is checked after fsync either way.
        reread: with ``verify_sha256``, also re-read the file and compare (catches a write that
            the file system changed after taking it). False for checkpoints: the re-read costs a
            second pass over gigabytes right after the write, from the cache that the write just
            filled, while a truncated or dropped write already fails the size check and a
            checkpoint is re-hashed in full when a run resumes from it
            (:func:`fastsd.train.checkpoint.latest`).

    Returns:
        ``{"path", "size", "sha256"}`` (sha256 None unless ``verify_sha256``).

    Raises:
        StorageError: the write failed (disk full, I/O error); the final name is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps_beside(final)
    tmp = temp_name(final)
    try:
        # Hash while writing only when the caller wants a verified file (checkpoints, models):
        # hashing a multi-GB conversion costs a core for nothing otherwise.
        digest = hashlib.sha256() if verify_sha256 else None
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw, digest)
            produce(writer)  # type: ignore[arg-type]
            raw.flush()
            os.fsync(raw.fileno())
            written = writer.count
        size = tmp.stat().st_size
        if size != written:
            raise StorageError(f"{final}: wrote {written} bytes but {size} reached the disk; try again")
        sha = digest.hexdigest() if digest is not None else None
        if verify_sha256 and reread and sha256_file(tmp) != sha:
            raise StorageError(f"{final}: the file read back differs from what was written; try again")
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return {"path": str(final), "size": size, "sha256": sha}
    except OSError as err:
        _unlink_quiet(tmp)
        raise _storage_error(final, err) from err
    except BaseException:
        _unlink_quiet(tmp)
        raise


#: Files one :func:`write_all` writes at once. A resumable state is three large files (UNet, text
#: encoder, optimizer); each write is hashed on its own thread beside it, so a state goes at the
#: disk's speed rather than at one core's sha256.
WRITE_THREADS = 3


def write_all(jobs: Mapping[K, Callable[[], T]]) -> dict[K, T]:
    """Run independent file writes (each a :func:`write_stream` call) at once; their results by key.

    Every job runs to its end before this returns, so no write is left going into a folder the
    caller is about to remove; the first job's error (in ``jobs``' order) is then raised.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="fastsd-write") as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        wait(futures.values())
    return {key: future.result() for key, future in futures.items()}


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``folder`` (best effort), so a rename of it publishes complete data."""
    root = Path(folder)
    for here, _dirs, files in os.walk(root):
        for name in files:
            path = Path(here) / name
            if path.is_symlink():
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        fsync_dir(Path(here))


def move_aside(path: str | os.PathLike[str], tag: str = "old") -> Path:
    """Rename ``path`` to an owner-named temp beside it in one atomic step; returns the new name.

    What is moved aside no longer looks like the thing it was (a session, a model folder), and
    :func:`clean_temp_files` removes it if the process dies before deleting it.
    """
    path = Path(path)
    aside = temp_name(path, tag)
    os.rename(path, aside)
    fsync_dir(path.parent)
    return aside


def remove_folder(path: str | os.PathLike[str], tag: str = "rm") -> None:
    """Delete a folder so that it never exists half-deleted under its name: move aside, then delete."""
    _remove_temp(move_aside(path, tag))


@contextlib.contextmanager
def building_folder(final: str | os.PathLike[str], tag: str = "", *, replace: bool = True) -> Iterator[Path]:
    """Build a folder under an owner-named temp name, then swap it in as ``final``: the one folder builder.

    ``with building_folder(dest) as tmp:`` yields the empty temp folder (beside ``final``, so the
    swap is a rename on one file system). When the block ends normally every file in it is
    fsynced and it is renamed to ``final``; when it raises, the temp folder is removed and
    ``final`` is untouched. A crash at any point leaves ``final`` as it was (or, for the instant
    between the two renames of a replacement, absent with the old folder still complete under a
    temp name) and at most a ``.fastsd-tmp-*`` leftover for :func:`clean_temp_files`.

    Args:
        final: the folder to create or replace.
        tag: a word kept in the temp name (``import``, ``ckpt``...).
        replace: an existing ``final`` is moved aside, and deleted only after the new folder is in
            place. False: an existing ``final`` is kept and :class:`FileExistsError` raised (e.g.
            another process made it first).

    Raises:
        FileExistsError: ``replace`` is False and ``final`` exists when the build ends.
        StorageError: the build could not be renamed into place (disk or permission problem).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps_beside(final)
    tmp = temp_name(final, tag)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if not replace and final.exists():
            raise FileExistsError(f"{final} already exists")
        old = move_aside(final, "old") if replace and (final.exists() or final.is_symlink()) else None
        try:
            os.rename(tmp, final)
        except OSError as err:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.rename(old, final)  # put the old folder back: nothing lost
            if not replace and final.exists():
                raise FileExistsError(f"{final} already exists") from err
            raise _storage_error(final, err) from err
        fsync_dir(final.parent)
        if old is not None:
            _remove_temp(old)
    except BaseException:
        _remove_temp(tmp)
        raise


@contextlib.contextmanager
def scratch_folder(name: str, tag: str = "") -> Iterator[Path]:
    """A private owner-named folder on local temp disk for the block, removed after it.

    Leftovers of killed runs in the temp folder (this host's dead pids, old ones of others) are
    removed first, so scratch saves never fill a runtime's disk over restarts.
    """
    import tempfile

    root = Path(tempfile.gettempdir())
    clean_temp_files(root, recursive=False)
    scratch = temp_name(root / name, tag)
    scratch.mkdir(mode=0o700)
    try:
        yield scratch
    finally:
        _remove_temp(scratch)


#: errno values meaning "sendfile cannot do this pair of files" (macOS: only to sockets); a buffer copies instead.
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EBADF, errno.ENOTSOCK}


def _pread_into(fd: int, buf: memoryview, pos: int) -> int:
    """Read up to ``len(buf)`` bytes at ``pos`` of ``fd`` into ``buf``; how many were read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], pos)
    os.lseek(fd, pos, os.SEEK_SET)
    data = os.read(fd, len(buf))
    buf[: len(data)] = data
    return len(data)


#: Writes of at least this many bytes are hashed on a helper thread while they are written.
HASH_BESIDE_WRITE_BYTES = 1 << 20
_hash_pool: Any = None


def _hasher() -> Any:
    """The threads that hash large writes: one per file :func:`write_all` writes, and an export's beside them."""
    global _hash_pool
    if _hash_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _hash_pool = ThreadPoolExecutor(max_workers=WRITE_THREADS + 1, thread_name_prefix="fastsd-hash")
    return _hash_pool


class _HashingWriter:
    """File wrapper that counts and hashes what passes through it.

    A large write is hashed on a helper thread while it is written (both release the GIL), so a
    checkpoint is written at the speed of the slower of the two, not of their sum: a 1.5 GB fp32
    state file, hashed and fsynced, took 2.20 s instead of 2.57 s (medians of 5) on the 2-core dev VM,
    whose sha256 runs at 1.1 GB/s.
    """

    def __init__(self, raw: BinaryIO, digest: Any) -> None:
        self.raw, self.digest, self.count = raw, digest, 0
        self._sendfile = hasattr(os, "sendfile")
        self._buffer: memoryview | None = None
        self._beside = digest is not None and not isinstance(raw, _Discard)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = memoryview(data).nbytes
        if self._beside and size >= HASH_BESIDE_WRITE_BYTES:
            hashing = _hasher().submit(self.digest.update, data)
            try:
                n = self.raw.write(data)
            finally:
                hashing.result()  # the caller may reuse the buffer once this returns
        else:
            n = self.raw.write(data)
            if self.digest is not None:
                self.digest.update(data)
        self.count += size
        return n

    def copy_range(self, src_fd: int, offset: int, count: int) -> None:
        """Append bytes ``offset .. offset + count`` of the open file ``src_fd``.

        Unhashed copies go file to file inside the kernel (``sendfile``): no pass through Python,
        no page of it in this process's memory, which is what lets a converter copy at the disk's
        speed. When the write is hashed, or the filesystem pair refuses ``sendfile`` (some FUSE
        mounts), the bytes pass once through a reused buffer and are hashed on the way (never
        re-read). Where positioned reads are missing (Windows) the source offset moves: give an fd
        that nothing else reads at the same time.

        Raises:
            OSError: a read or write failed, or the source ended before ``offset + count``
                (changed while copying); :func:`write_stream` turns it into a StorageError.
        """
        done = 0
        if self._sendfile and self.digest is None and count:
            self.raw.flush()
            out = self.raw.fileno()
            try:
                while done < count:
                    n = os.sendfile(out, src_fd, offset + done, count - done)
                    if not n:
                        raise OSError(errno.EIO, "the source file ended early (was it changed while copying?)")
                    done += n
                    self.count += n
            except OSError as err:
                if err.errno not in _NO_SENDFILE:
                    raise
                self._sendfile = False  # go on through the buffer from where sendfile stopped
            finally:
                self.raw.seek(0, os.SEEK_END)  # the buffered file learns where sendfile left the fd
        if done < count:
            if self._buffer is None:
                self._buffer = memoryview(bytearray(CHUNK))
            while done < count:
                want = min(len(self._buffer), count - done)
                n = _pread_into(src_fd, self._buffer[:want], offset + done)
                if not n:
                    raise OSError(errno.EIO, "the source file ended early (was it changed while copying?)")
                self.write(self._buffer[:n])
                done += n

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


class _Discard:
    """A file that keeps nothing: :func:`stream_digest` counts and hashes what a producer writes."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def stream_digest(produce: Callable[[BinaryIO], None]) -> tuple[str, int]:
    """(sha256, size) of what ``produce(fh)`` writes, without writing it anywhere.

    Tells whether a file is the same as one already on disk before paying for the write (a
    checkpoint's frozen text encoder). ``produce`` must not use ``copy_range``.
    """
    writer = _HashingWriter(_Discard(), hashlib.sha256())  # type: ignore[arg-type]
    writer._sendfile = False
    produce(writer)  # type: ignore[arg-type]
    return writer.digest.hexdigest(), writer.count


def link_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> bool:
    """Hard-link ``src`` as ``dst`` (a new name, in a folder being built); False where links are refused.

    Only for files nobody changes in place (safe writes replace, never modify), so two names of
    one file always hold the same bytes and deleting either leaves the other whole. Drive's FUSE
    mount and some other file systems refuse links: the caller then writes a copy.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


def png_bytes(image: Any, text: dict[str, str] | None = None, *, compress_level: int | None = None) -> bytes:
    """The PNG encoding of a PIL ``image``, with ``text`` as PNG text chunks: the one PNG encoder.

    Training images (their source hash), generated images (A1111's ``parameters`` infotext),
    samples, thumbnails and OCR page images are all encoded here. ``compress_level`` None keeps
    Pillow's default (6). Images of 256x256 px and more go through :mod:`fastsd.pngencode` when
    several cores are free (the same file format, made in parallel parts).
    """
    import io

    from PIL import PngImagePlugin

    from . import pngencode

    if pngencode.can_encode(image):  # large images: deflated on several cores (see pngencode)
        return pngencode.encode(image, text, 6 if compress_level is None else compress_level)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    extra = {} if compress_level is None else {"compress_level": compress_level}
    image.save(buf, format="PNG", pnginfo=info, **extra)
    return buf.getvalue()


def copy_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, verify_sha256: bool = True, reread: bool = True
) -> dict[str, Any]:
    """Copy ``src`` to ``dst`` safely; with ``verify_sha256`` the copy is checked against the source.

    Args:
        verify_sha256: hash the source first, then check the copy's hash against it.
        reread: False for one pass (checkpoints): the bytes are hashed as they are copied, the
            source's size is checked after the copy, and neither file is read a second time
            (see :func:`write_stream`'s ``reread``). The returned sha256 is the copied bytes'.

    Raises:
        StorageError: the copy failed or does not match the source.
    """
    src_path = Path(src)
    if verify_sha256 and not reread:
        return _copy_once(src_path, Path(dst))
    src_sha = sha256_file(src_path) if verify_sha256 else None

    def produce(fh: BinaryIO) -> None:
        with open(src_path, "rb") as inp:
            shutil.copyfileobj(inp, fh, CHUNK)

    result = write_stream(dst, produce, verify_sha256=verify_sha256)
    if verify_sha256 and result["sha256"] != src_sha:
        _unlink_quiet(Path(dst))
        raise StorageError(f"copy of {src_path} to {dst} does not match the source; try again")
    return result


def _copy_once(src: Path, dst: Path) -> dict[str, Any]:
    """:func:`copy_file` in one pass: read once, hashed on the way, written once (no re-reads)."""
    with open(src, "rb") as inp:
        size = os.fstat(inp.fileno()).st_size
        result = write_stream(dst, lambda fh: fh.copy_range(inp.fileno(), 0, size), verify_sha256=True, reread=False)
        if os.fstat(inp.fileno()).st_size != size:
            _unlink_quiet(dst)
            raise StorageError(f"{src} changed while it was copied to {dst}; try again")
    return result


def clean_temp_files(
    folder: str | os.PathLike[str], *, older_than: float | None = None, recursive: bool = True
) -> list[Path]:
    """Remove leftovers of interrupted safe writes under ``folder``; returns what was removed.

    Only stale temps go (see :func:`is_stale_temp`): a write still running in this or another
    live process of this host keeps its temp file.

    Args:
        older_than: also count temps of other hosts (or of unknown owner) unchanged since this
            time as stale; a caller holding the lock passes the time it took it (or now).
    """
    removed = []
    for tmp in _temp_candidates(Path(folder), recursive=recursive):
        if is_stale_temp(tmp, older_than=older_than):
            _remove_temp(tmp)
            removed.append(tmp)
    return removed


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _is_internal(rel: Path) -> bool:
    """Temp files of interrupted writes and the sync record are never synced."""
    return any(part.startswith(TEMP_PREFIX) for part in rel.parts) or rel.name == SYNC_STATE


def sync_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    delete: bool = False,
    save_every: float = 10.0,
) -> dict[str, Any]:
    """Copy a local work folder to Drive (or anywhere) safely; an interrupted sync resumes.

    Every file is copied with :func:`copy_file` (temp name, fsync, sha256 verified, atomic
    rename), so the destination never holds a partial file under a final name. What was verified
    is recorded in ``dst/.fastsd-sync.json`` (source size, mtime and sha256); a file whose source
    is unchanged and whose copy still has the recorded size is skipped without re-reading it.
    Without that record (first run, or a copy made by hand) a destination file with the same
    size and sha256 as its source is also skipped, so a re-run after a crash only copies what is
    missing or different.

    Args:
        src: the folder to copy from (usually on local disk).
        dst: the folder to copy into (usually on Drive); created when missing.
        delete: also remove destination files that are no longer in ``src``.
        save_every: seconds between saves of the sync record (it is also saved at the end and
            when a write fails).

    Returns:
        ``{"copied": [rel...], "skipped": [rel...], "deleted": [rel...], "bytes": n}``.

    Raises:
        UserInputError: ``src`` is not a folder.
        StorageError: a copy failed (disk full, I/O error). Files copied before it stay complete
            and recorded; run the sync again to resume.
    """
    from .errors import UserInputError

    src_root, dst_root = Path(src), Path(dst)
    if not src_root.is_dir():
        raise UserInputError(f"cannot sync {src_root}: it is not a folder")
    dst_root.mkdir(parents=True, exist_ok=True)
    state_path = dst_root / SYNC_STATE
    try:
        state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (OSError, ValueError):
        state = {}  # a lost record only costs re-hashing
    files: dict[str, Any] = state.get("files", {}) if isinstance(state.get("files"), dict) else {}
    report: dict[str, Any] = {"copied": [], "skipped": [], "deleted": [], "bytes": 0}
    last_save = time.monotonic()

    def save_state() -> None:
        with contextlib.suppress(StorageError):  # the record is an optimisation, never a reason to fail
            write_json(state_path, {"version": 1, "files": files})

    seen: set[str] = set()
    try:
        for path in sorted(p for p in src_root.rglob("*") if p.is_file() and not p.is_symlink()):
            rel_path = path.relative_to(src_root)
            if _is_internal(rel_path):
                continue
            rel = rel_path.as_posix()
            seen.add(rel)
            st = path.stat()
            target = dst_root / rel_path
            known = files.get(rel)
            if (
                known
                and known.get("size") == st.st_size
                and known.get("mtime_ns") == st.st_mtime_ns
                and target.is_file()
                and target.stat().st_size == st.st_size
            ):
                report["skipped"].append(rel)
                continue
            sha = sha256_file(path)
            if target.is_file() and target.stat().st_size == st.st_size and sha256_file(target) == sha:
                report["skipped"].append(rel)
            else:
                copy_file(path, target, verify_sha256=True)
                report["copied"].append(rel)
                report["bytes"] += st.st_size
            files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
            if time.monotonic() - last_save > save_every:
                save_state()
                last_save = time.monotonic()
    except StorageError as err:
        save_state()
        done = len(report["copied"]) + len(report["skipped"])
        raise StorageError(f"{err} (sync of {src_root} stopped after {done} files; run it again to resume)") from err
    if delete:
        for path in sorted(p for p in dst_root.rglob("*") if p.is_file()):
            rel_path = path.relative_to(dst_root)
            if _is_internal(rel_path) or rel_path.as_posix() in seen:
                continue
            _unlink_quiet(path)
            files.pop(rel_path.as_posix(), None)
            report["deleted"].append(rel_path.as_posix())
    for rel in [r for r in files if r not in seen]:
        files.pop(rel)
    save_state()
    return report


def flush(*, unmount: bool = False) -> bool:
    """Push written data to the storage below; with ``unmount`` also flush and unmount Colab's Drive.

    ``os.sync()`` asks the kernel to write its caches (for Drive's FUSE mount that hands the data
    to the Drive client). Colab's ``drive.flush_and_unmount()`` is the only call that waits until
    Drive has uploaded everything, but it unmounts Drive, so it runs only when asked (at the very
    end of a notebook).

    Returns:
        True when Drive was flushed and unmounted, False otherwise (not asked, or not on Colab).
    """
    if hasattr(os, "sync"):
        os.sync()
    if not unmount:
        return False
    from .colab import unmount_drive  # colab.py is the one module that talks to Colab

    return unmount_drive()
