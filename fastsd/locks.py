"""Session locks: one process at a time writes a session.

A lock is a small JSON file (``.fastsd-lock.json``) in the session folder, created with
``O_CREAT | O_EXCL`` so two processes cannot both take it. It records who holds it (pid, host,
since) and a heartbeat the holder refreshes from a background thread. That is what lets a new
Colab runtime tell a live lock from one left behind by a runtime that died:

- same host, pid no longer running: the lock is stale and is broken automatically (with a warning);
- another host, no heartbeat for ``stale_after`` seconds: it *looks* stale, but the other runtime
  may only be slow to sync Drive, so the user decides: ``force=True`` (``--force``) breaks it;
- otherwise the session is in use and :class:`~fastsd.errors.SessionLockedError` says by whom.

Taking, breaking, refreshing and releasing the lock happen under a per-host ``flock`` (the guard),
so two processes that find the same dead lock cannot both break it and both end up holding it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import SessionLockedError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".fastsd-lock.json"
#: Empty file whose ``flock`` serializes lock changes on one host (see :func:`_host_guard`); never deleted.
GUARD_FILE = ".fastsd-lock.guard"
#: Seconds without a heartbeat after which a lock from another host looks stale.
DEFAULT_STALE_AFTER = 15 * 60
#: Seconds between heartbeats of a held lock.
DEFAULT_HEARTBEAT = 60.0
#: Seconds after which an unreadable (half-written) lock file counts as left by a dead process.
CORRUPT_GRACE = 30.0

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    from .storage import pid_alive

    return pid_alive(pid)


@contextlib.contextmanager
def _host_guard(folder: Path) -> Iterator[None]:
    """Serialize lock changes (take, break, refresh, release) among the processes of this host.

    ``O_EXCL`` makes taking a free lock safe, but breaking a dead one is a read, a decision and a
    removal: two contenders that both read the dead lock could each remove it, the second one
    removing the fresh lock the first had just written, and both would hold the session. Under
    this ``flock`` the read, decision and change are one step for every process of this host.
    The kernel releases a ``flock`` when its process dies, so a killed contender never leaves the
    guard taken. Contenders on other hosts never break a lock on their own (another host's lock
    is only broken with ``--force``), so a per-host guard is enough. Where ``flock`` is missing
    (Windows, a filesystem without it) the lock works as before, without the guard.
    """
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(folder / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # no flock on this filesystem
            log.debug("no flock on %s (%s): session lock changes are not serialized", folder, err)
        yield
    finally:
        os.close(fd)  # also releases the flock


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def read_lock(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock record of ``folder`` (pid, host, since, heartbeat, token, command), or None when unlocked."""
    return _read_record(Path(folder) / LOCK_FILE)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # A lock file that cannot be read was cut short while being written (its writer died):
        # report it with the file's age so staleness can still be judged.
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        return {"pid": -1, "host": "?", "since": mtime, "heartbeat": mtime, "token": None, "corrupt": True}
    return data if isinstance(data, dict) else None


def lock_state(record: dict[str, Any], *, stale_after: float = DEFAULT_STALE_AFTER) -> str:
    """``"live"``, ``"dead"`` (same host, process gone: safe to break) or ``"stale"`` (another host, silent)."""
    if record.get("corrupt"):
        # Unreadable: its writer died between creating and filling it (or is doing so right now).
        return "dead" if time.time() - float(record.get("since") or 0) > CORRUPT_GRACE else "live"
    if record.get("host") == socket.gethostname():
        return "live" if _pid_alive(int(record.get("pid", -1))) else "dead"
    age = time.time() - float(record.get("heartbeat") or record.get("since") or 0)
    return "stale" if age > stale_after else "live"


class SessionLock:
    """Context manager holding the lock of one session folder.

    Re-entrant within a process: opening it again in the same process (the CLI calling the
    library, the trainer calling ``Session`` methods) nests instead of deadlocking.

    Example:
        >>> with SessionLock(session.path, name=session.name):
        ...     session.record_checkpoint(500, "/content/work/step-500")

    Args:
        folder: the session folder.
        name: the session name, for messages.
        force: break any existing lock (the CLI's ``--force``).
        stale_after: seconds without a heartbeat after which another host's lock looks stale.
        heartbeat: seconds between heartbeats; 0 disables the background thread.
        command: a short description of what holds the lock (shown to the second user).

    Raises:
        SessionLockedError: on enter, when another live process holds the lock.
    """

    _held: dict[str, int] = {}  # lock path -> nesting depth in this process (owned by this class)
    _held_guard = threading.Lock()

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        name: str | None = None,
        force: bool = False,
        stale_after: float = DEFAULT_STALE_AFTER,
        heartbeat: float = DEFAULT_HEARTBEAT,
        command: str | None = None,
        on_acquire: Callable[[SessionLock], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.name = name or self.folder.name
        self.force = force
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.command = command
        self.on_acquire = on_acquire
        self.token = uuid.uuid4().hex
        self.since: float | None = None
        self._nested = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- acquire / release

    def acquire(self) -> SessionLock:
        """Take the lock (see the class doc). Returns self.

        ``on_acquire(lock)`` runs once the lock is taken (not when nested): the session uses it to
        clean leftovers of killed writers, which only the holder may do.
        """
        key = str(self.path.resolve())
        with self._held_guard:
            if self._held.get(key):
                self._held[key] += 1
                self._nested = True
                return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(20):
            with _host_guard(self.folder):
                if self._try_create():
                    break
                record = read_lock(self.folder)
                if record is None:
                    continue  # released between our attempt and the read: try again
                state = lock_state(record, stale_after=self.stale_after)
                busy = record.get("corrupt") and state == "live" and not self.force
                if not busy:
                    if state == "dead" or self.force:
                        why = "forced" if self.force else "its process is gone"
                        log.warning("breaking the lock of session %s (%s): %s", self.name, why, self._describe(record))
                        self._break(record)
                        continue
                    raise SessionLockedError(self._locked_message(record, state))
            time.sleep(0.2)  # a lock file being written right now: look again outside the guard
        else:
            raise SessionLockedError(f"could not lock session {self.name} at {self.path}: it keeps changing; try again")
        with self._held_guard:
            self._held[key] = 1
        if self.heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, name=f"fastsd-lock-{self.name}", daemon=True)
            self._thread.start()
        if self.on_acquire is not None:
            try:
                self.on_acquire(self)
            except BaseException:
                self.release()
                raise
        return self

    def release(self) -> None:
        """Release the lock (only if it is still ours: a lock broken by ``--force`` elsewhere is left alone)."""
        key = str(self.path.resolve())
        with self._held_guard:
            depth = self._held.get(key, 0)
            if depth > 1 or self._nested:
                self._held[key] = max(depth - 1, 0)
                return
            self._held.pop(key, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.folder.is_dir():
            return  # the folder went away with the lock in it (a removed session)
        with _host_guard(self.folder):
            record = read_lock(self.folder)
            if record and record.get("token") == self.token:
                with contextlib.suppress(OSError):
                    self.path.unlink()

    def __enter__(self) -> SessionLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def refresh(self) -> None:
        """Write a new heartbeat now (the background thread does this every ``heartbeat`` seconds)."""
        if not self.folder.is_dir():
            return  # never re-create a removed session folder
        from . import storage

        with _host_guard(self.folder):
            record = read_lock(self.folder)
            if not record or record.get("token") != self.token:
                return  # broken by someone else; do not resurrect it
            record["heartbeat"] = time.time()
            with contextlib.suppress(Exception):
                storage.write_json(self.path, record)

    # ---- internals

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": now,
            "heartbeat": now,
            "token": self.token,
            "command": self.command,
        }

    def _try_create(self) -> bool:
        """Create the lock file atomically, complete from its first moment when the filesystem allows."""
        from .storage import temp_name

        record = self._record()
        data = json.dumps(record).encode()
        # Preferred: write a temp file, then hard-link it to the lock name (fails if it exists),
        # so nobody ever reads a half-written lock. Drive's FUSE mount has no hard links: there
        # the lock is created with O_EXCL and filled, and a lock found empty is judged by its age.
        tmp = temp_name(self.path, "new")
        created = False
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)
                created = True
            except FileExistsError:
                return False
            except OSError:
                pass  # no hard links here
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if not created:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        self.since = record["since"]
        return True

    def _break(self, record: dict[str, Any]) -> None:
        """Remove the lock ``record`` judged dead (or forced); called under the host guard.

        The lock is renamed aside and checked: if what moved is not the lock that was judged (a
        process of another host, outside our guard, took the session meanwhile), it is put back
        (``link`` never replaces), so a live lock is never deleted.
        """
        from .storage import temp_name

        aside = temp_name(self.path, "broken")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read_record(aside)
        if moved is not None and moved.get("token") != record.get("token") and not record.get("corrupt"):
            log.warning("session %s was locked again while breaking a stale lock: leaving that lock", self.name)
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            aside.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.refresh()

    def _describe(self, record: dict[str, Any]) -> str:
        what = record.get("command") or "another process"
        return (
            f"{what} (pid {record.get('pid')} on {record.get('host')}, since {_when(float(record.get('since') or 0))})"
        )

    def _locked_message(self, record: dict[str, Any], state: str) -> str:
        base = f"session {self.name} is in use by {self._describe(record)}"
        if state == "stale":
            silent = int((time.time() - float(record.get("heartbeat") or record.get("since") or 0)) // 60)
            return f"{base}, silent for {silent} min; if that runtime is gone, pass --force to break the lock"
        return f"{base}; wait, or pass --force if that process is dead"
