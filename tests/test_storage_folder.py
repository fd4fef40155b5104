"""storage.building_folder: a folder under its final name is always a complete one.

A build that raises, or a process killed mid-build (kill -9), must leave no folder under the final
name and an older folder intact; a finished build replaces the old folder in one swap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastsd import storage
from fastsd.errors import StorageError


def _old(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"old" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text('{"v": 1}')
    return folder


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(storage.TEMP_PREFIX))


def test_a_finished_build_replaces_the_old_folder(tmp_path):
    dest = _old(tmp_path / "model")
    with storage.building_folder(dest) as tmp:
        assert tmp.is_dir() and tmp.parent == dest.parent and tmp.name.startswith(storage.TEMP_PREFIX)
        assert (dest / "weights.bin").read_bytes() == b"old" * 100  # the old one serves until the swap
        (tmp / "weights.bin").write_bytes(b"new")
    assert sorted(p.name for p in dest.iterdir()) == ["weights.bin"]  # nothing of the old one is mixed in
    assert (dest / "weights.bin").read_bytes() == b"new"
    assert _temps(tmp_path) == []  # old folder removed after the swap, temp gone


def test_a_failed_build_leaves_the_old_folder_and_no_temp(tmp_path):
    dest = _old(tmp_path / "model")
    with pytest.raises(RuntimeError, match="half way"), storage.building_folder(dest) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("half way")
    assert (dest / "weights.bin").read_bytes() == b"old" * 100
    assert (dest / "sub" / "config.json").read_text() == '{"v": 1}'
    assert _temps(tmp_path) == []

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt), storage.building_folder(fresh) as tmp:
        (tmp / "a").write_text("x")
        raise KeyboardInterrupt
    assert not fresh.exists() and _temps(tmp_path) == []


def test_no_replace_keeps_what_is_there(tmp_path):
    dest = _old(tmp_path / "made-by-another")
    with pytest.raises(FileExistsError), storage.building_folder(dest, replace=False) as tmp:
        (tmp / "weights.bin").write_bytes(b"mine")
    assert (dest / "weights.bin").read_bytes() == b"old" * 100 and _temps(tmp_path) == []


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = _old(tmp_path / "model")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(storage.TEMP_PREFIX) and Path(dst) == dest and "old" not in Path(src).name:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StorageError, match="could not write"), storage.building_folder(dest) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert (dest / "weights.bin").read_bytes() == b"old" * 100 and _temps(tmp_path) == []


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from fastsd import storage
dest = Path(sys.argv[1])
with storage.building_folder(dest) as tmp:
    (tmp / "weights.bin").write_bytes(b"new-but-incomplete")
    print("building", flush=True)
    time.sleep(60)
"""


def test_kill_9_mid_build_leaves_the_old_folder(tmp_path):
    dest = _old(tmp_path / "model")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILD, str(dest)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert proc.stdout.readline().strip() == b"building"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert (dest / "weights.bin").read_bytes() == b"old" * 100  # the final name still holds the old folder
    left = _temps(tmp_path)
    assert len(left) == 1 and (tmp_path / left[0] / "weights.bin").is_file()
    assert storage.is_stale_temp(tmp_path / left[0])  # its owner is dead: a leftover
    # the next build of the same folder removes the leftover and succeeds
    with storage.building_folder(dest) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert (dest / "weights.bin").read_bytes() == b"new" and _temps(tmp_path) == []


def test_move_aside_and_remove_folder(tmp_path):
    dest = _old(tmp_path / "session")
    aside = storage.move_aside(dest, "rm")
    assert not dest.exists() and aside.name.startswith(storage.TEMP_PREFIX) and "rm-session" in aside.name
    assert (aside / "weights.bin").is_file()
    storage.remove_folder(_old(tmp_path / "other"))
    assert not (tmp_path / "other").exists() and _temps(tmp_path) == [aside.name]


def test_scratch_folder_is_private_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    dead = storage.temp_name(tmp_path / "ckpt-1", "train").name.split("-")
    dead[3] = "999999999"  # the pid field: no such process
    leftover = tmp_path / "-".join(dead)
    leftover.mkdir()
    with storage.scratch_folder("ckpt-2", "train") as scratch:
        assert scratch.parent == tmp_path and (scratch.stat().st_mode & 0o777) == 0o700
        assert not leftover.exists()  # a killed run's scratch went first
        (scratch / "state.json").write_text("{}")
    assert not scratch.exists()
