"""Safe writes under failure, resumable local->Drive sync, disk full, flush."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pytest

from fastsd import storage
from fastsd.errors import StorageError, UserInputError
from fastsd.session import Session


def _fill(folder: Path) -> dict[str, bytes]:
    content = {
        "unet/diffusion_pytorch_model.safetensors": os.urandom(200_000),
        "text_encoder/model.safetensors": os.urandom(50_000),
        "optimizer.bin": os.urandom(120_000),
        "state.json": b'{"step": 500}',
    }
    for rel, data in content.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return content


def _enospc_after(monkeypatch, n_ok_writes: int) -> list[int]:
    """Make safe writes fail with ENOSPC after ``n_ok_writes`` chunks have been written."""
    real = storage._HashingWriter.write
    count = [0]

    def write(self, data):
        count[0] += 1
        if count[0] > n_ok_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(storage._HashingWriter, "write", write)
    return count


def _temp_files(root: Path) -> list[Path]:
    return list(root.rglob(f"{storage.TEMP_PREFIX}*"))


def test_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "session.json"
    storage.write_json(target, {"step": 1})
    _enospc_after(monkeypatch, 0)
    with pytest.raises(StorageError, match=r"disk full while writing .*session\.json.*MiB free"):
        storage.write_json(target, {"step": 2})
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert _temp_files(tmp_path) == []


def test_producer_crash_leaves_nothing_under_the_final_name(tmp_path):
    def produce(fh):
        fh.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        storage.write_stream(tmp_path / "model.safetensors", produce)
    assert list(tmp_path.iterdir()) == []


def test_session_disk_full_during_checkpoint(home, tmp_path, monkeypatch):
    s = Session.create("full", home)
    _fill(tmp_path / "a")
    s.record_checkpoint(100, tmp_path / "a")
    _enospc_after(monkeypatch, 1)
    with pytest.raises(StorageError, match="disk full"):
        s.record_checkpoint(200, tmp_path / "a")
    with pytest.raises(StorageError, match="disk full"):
        s.update(progress={"step": 200, "total_steps": None})
    monkeypatch.undo()
    again = Session.open("full", home)
    assert [c["step"] for c in again.checkpoints()] == [100]
    assert again.verify_checkpoint(again.latest_checkpoint())
    assert again.info["progress"]["step"] == 0
    assert _temp_files(s.path) == []


def test_sync_copies_then_skips_verified_files(tmp_path):
    src, dst = tmp_path / "work", tmp_path / "drive" / "sess"
    content = _fill(src)
    first = storage.sync_folder(src, dst)
    assert sorted(first["copied"]) == sorted(content) and first["skipped"] == []
    for rel, data in content.items():
        assert (dst / rel).read_bytes() == data
    second = storage.sync_folder(src, dst)
    assert second["copied"] == [] and sorted(second["skipped"]) == sorted(content)
    # a changed source file is copied again, nothing else
    (src / "state.json").write_bytes(b'{"step": 600}')
    third = storage.sync_folder(src, dst)
    assert third["copied"] == ["state.json"]
    assert (dst / "state.json").read_bytes() == b'{"step": 600}'


def test_sync_repairs_a_damaged_copy_and_ignores_leftovers(tmp_path):
    src, dst = tmp_path / "work", tmp_path / "drive"
    _fill(src)
    storage.sync_folder(src, dst)
    (src / f"{storage.TEMP_PREFIX}x-half.bin").write_bytes(b"partial")
    target = dst / "optimizer.bin"
    target.write_bytes(b"\0" * 10)  # a copy cut short by hand
    report = storage.sync_folder(src, dst)
    assert report["copied"] == ["optimizer.bin"]
    assert storage.sha256_file(target) == storage.sha256_file(src / "optimizer.bin")
    assert not any(p.name.endswith("half.bin") for p in dst.rglob("*"))
    # without the sync record, files already there are verified by hash and skipped
    (dst / storage.SYNC_STATE).unlink()
    assert storage.sync_folder(src, dst)["copied"] == []


def test_sync_resumes_after_disk_full(tmp_path, monkeypatch):
    src, dst = tmp_path / "work", tmp_path / "drive"
    content = _fill(src)
    _enospc_after(monkeypatch, 2)  # each file here is one chunk: two files fit
    with pytest.raises(StorageError, match=r"disk full.*stopped after 2 files; run it again to resume"):
        storage.sync_folder(src, dst)
    monkeypatch.undo()
    # (the disk is full, so even the sync record may be missing: resuming then verifies by hash)
    done = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file() and p.name != storage.SYNC_STATE)
    assert len(done) == 2 and _temp_files(dst) == []
    for rel in done:
        assert (dst / rel).read_bytes() == content[rel]
    resumed = storage.sync_folder(src, dst)
    assert sorted(resumed["skipped"]) == done
    assert sorted(resumed["copied"]) == sorted(set(content) - set(done))


def test_sync_delete_and_bad_source(tmp_path):
    src, dst = tmp_path / "work", tmp_path / "drive"
    _fill(src)
    storage.sync_folder(src, dst)
    (src / "optimizer.bin").unlink()
    assert storage.sync_folder(src, dst)["deleted"] == []
    assert storage.sync_folder(src, dst, delete=True)["deleted"] == ["optimizer.bin"]
    assert not (dst / "optimizer.bin").exists()
    with pytest.raises(UserInputError, match="not a folder"):
        storage.sync_folder(tmp_path / "missing", dst)


def test_flush_unmounts_only_when_asked(monkeypatch):
    calls = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(flush_and_unmount=lambda: calls.append("unmount"))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert storage.flush() is False and calls == []
    assert storage.flush(unmount=True) is True and calls == ["unmount"]


def test_flush_outside_colab_is_harmless(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", None)  # import fails
    assert storage.flush(unmount=True) is False


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root; skipped elsewhere): a real full disk."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk(small_tmpfs, tmp_path):
    s = Session.create("tiny", small_tmpfs / "home")
    small = tmp_path / "small"
    (small / "a.bin").parent.mkdir(parents=True)
    (small / "a.bin").write_bytes(os.urandom(100_000))
    s.record_checkpoint(100, small)
    big = tmp_path / "big"
    big.mkdir()
    (big / "unet.bin").write_bytes(os.urandom(2_000_000))
    with pytest.raises(StorageError, match="disk full"):
        s.record_checkpoint(200, big)
    again = Session.open("tiny", small_tmpfs / "home")
    assert [c["step"] for c in again.checkpoints()] == [100]
    assert again.verify_checkpoint(again.latest_checkpoint())
    assert _temp_files(again.path) == []
    again.update(progress={"step": 100, "total_steps": 1000})  # space was given back
    assert Session.open("tiny", small_tmpfs / "home").info["progress"]["step"] == 100


def test_temp_cleanup_of_a_shared_folder_stays_at_its_top(tmp_path, monkeypatch):
    """The trainer cleans the machine's temp folder before each checkpoint: only its top level
    (other programs' folders are not walked), and a leftover there is removed."""
    dead = f"{storage.TEMP_PREFIX}{storage._host_tag()}-999999999-00000000-ckpt-2"
    (tmp_path / dead).mkdir()
    nested = tmp_path / "other-program" / dead
    nested.mkdir(parents=True)
    assert storage.clean_temp_files(tmp_path, recursive=False) == [tmp_path / dead]
    assert nested.exists()


def test_temp_cleanup_survives_a_folder_removed_while_it_looks(tmp_path, monkeypatch):
    """Another process (a second training rank, a session writer) removes a folder mid-walk."""
    dead = tmp_path / "a" / f"{storage.TEMP_PREFIX}{storage._host_tag()}-999999999-00000000-x"
    dead.mkdir(parents=True)
    vanishing = tmp_path / "b"
    (vanishing / "deep").mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path="."):  # "b" is listed at the top and gone when the walk enters it
        if isinstance(path, (str, os.PathLike)) and Path(path) == vanishing and vanishing.exists():
            (vanishing / "deep").rmdir()
            vanishing.rmdir()
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert storage.clean_temp_files(tmp_path) == [dead]


def test_large_writes_are_hashed_beside_the_write_and_the_hash_is_the_files(tmp_path, monkeypatch):
    """A checkpoint's big tensors are hashed on a helper thread while written: the recorded sha256 is still
    the file's, in order, for writes above and below the size that goes to the thread, and through copy_range."""
    import hashlib

    big, small = os.urandom(3 * storage.HASH_BESIDE_WRITE_BYTES + 7), os.urandom(1000)
    src = tmp_path / "src.bin"
    src.write_bytes(big)
    threads = []
    real = storage._hasher().submit

    def watched(fn, *args):
        threads.append(len(args[0]) if args else 0)
        return real(fn, *args)

    monkeypatch.setattr(storage._hasher(), "submit", watched)

    def produce(fh):
        fh.write(small)
        fh.write(memoryview(bytearray(big)))
        with open(src, "rb") as f:
            fh.copy_range(f.fileno(), 5, len(big) - 5)

    out = storage.write_stream(tmp_path / "x.bin", produce, verify_sha256=True)
    data = (tmp_path / "x.bin").read_bytes()
    assert data == small + big + big[5:] and out["size"] == len(data)
    assert out["sha256"] == hashlib.sha256(data).hexdigest() == storage.sha256_file(tmp_path / "x.bin")
    assert threads and all(n >= storage.HASH_BESIDE_WRITE_BYTES for n in threads)  # the small write stayed inline
