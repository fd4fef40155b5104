"""Session locks: a second user is told who holds the session; dead and stale locks; --force."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsd.errors import SessionLockedError
from fastsd.locks import LOCK_FILE, SessionLock, lock_state, read_lock
from fastsd.session import Session

REPO = Path(__file__).resolve().parent.parent

HOLDER = r"""
import sys, time
from fastsd.session import Session
s = Session.open(sys.argv[2], sys.argv[1])
with s.lock(command="fastsd train"):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(home):
    """A second process holding the lock of session 'busy'."""
    Session.create("busy", home)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home), "busy"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(folder: Path, **fields) -> None:
    record = {"pid": 4242, "host": "other-colab-vm", "since": time.time(), "heartbeat": time.time(), "token": "t"}
    record.update(fields)
    (folder / LOCK_FILE).write_text(json.dumps(record))


def test_second_process_is_told_who_holds_the_session(home, holder):
    s = Session.open("busy", home)
    host = socket.gethostname()
    with pytest.raises(SessionLockedError) as err, s.lock():
        pass
    msg = str(err.value)
    assert f"session busy is in use by fastsd train (pid {holder.pid} on {host}, since " in msg
    assert msg.endswith("; wait, or pass --force if that process is dead")
    assert s.lock_holder()["state"] == "live"
    # the lock file is untouched by the refused attempt
    assert read_lock(s.path)["pid"] == holder.pid


def test_lock_of_a_killed_process_is_broken_automatically(home, holder, caplog):
    s = Session.open("busy", home)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert s.lock_holder()["state"] == "dead"
    with caplog.at_level("WARNING"), s.lock():
        assert read_lock(s.path)["pid"] == os.getpid()
    assert "its process is gone" in caplog.text
    assert read_lock(s.path) is None


def test_force_breaks_a_live_lock(home, holder):
    s = Session.open("busy", home)
    with s.lock(force=True):
        assert read_lock(s.path)["pid"] == os.getpid()
    assert read_lock(s.path) is None


def test_other_host_lock_is_live_then_stale(home):
    s = Session.create("remote", home)
    _write_lock(s.path)
    with pytest.raises(
        SessionLockedError, match=r"in use by another process \(pid 4242 on other-colab-vm, since .*\); wait"
    ):
        s.lock().acquire()
    old = time.time() - 3600
    _write_lock(s.path, since=old - 600, heartbeat=old)
    assert lock_state(read_lock(s.path)) == "stale"
    # stale from another host: the user decides (that runtime may only be slow to sync Drive)
    with pytest.raises(SessionLockedError, match="silent for 60 min; if that runtime is gone, pass --force"):
        s.lock().acquire()
    with s.lock(force=True):
        assert read_lock(s.path)["host"] == socket.gethostname()
    assert not (s.path / LOCK_FILE).exists()


def test_half_written_lock_counts_as_dead_once_old(home):
    s = Session.create("half", home)
    (s.path / LOCK_FILE).write_text("")
    assert lock_state(read_lock(s.path)) == "live"  # may be being written right now
    old = time.time() - 120
    os.utime(s.path / LOCK_FILE, (old, old))
    assert lock_state(read_lock(s.path)) == "dead"
    with s.lock():
        pass


def test_lock_is_reentrant_and_releases_only_its_own(home):
    s = Session.create("re", home)
    with s.lock():
        with s.lock():  # the library calling itself (add_images inside a locked CLI command)
            pass
        assert read_lock(s.path)["pid"] == os.getpid()
    assert read_lock(s.path) is None
    lock = SessionLock(s.path, heartbeat=0).acquire()
    _write_lock(s.path, token="someone-else")  # broken and re-taken elsewhere meanwhile
    lock.release()
    assert read_lock(s.path)["token"] == "someone-else"


def test_heartbeat_is_refreshed(home):
    s = Session.create("hb", home)
    with s.lock(heartbeat=0.05):
        first = read_lock(s.path)["heartbeat"]
        time.sleep(0.3)
        assert read_lock(s.path)["heartbeat"] > first
        assert read_lock(s.path)["since"] == pytest.approx(first)


def test_add_images_refuses_a_locked_session(home, holder, tmp_path):
    s = Session.open("busy", home)
    with pytest.raises(SessionLockedError, match="in use by fastsd train"):
        s.add_images(tmp_path)
