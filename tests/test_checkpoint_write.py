"""Checkpoint saves: each byte written once into the session, hashed as written; frozen parts linked, not rewritten."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsd import storage
from fastsd.session import Session
from fastsd.train import checkpoint

TE = "weights/text_encoder.safetensors"
UNET = "weights/unet.safetensors"
TE_KEY = "text_encoder.layer0.weight"


def _weights(seed: int, te_frozen: bool) -> dict[str, torch.Tensor]:
    """A UNet that differs per ``seed`` and a text encoder that is the same in every call."""
    g, fixed = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(0)
    unet = {f"unet.block{i}.weight": torch.nn.Parameter(torch.randn(64, 32, generator=g)) for i in range(3)}
    te = {
        f"text_encoder.layer{i}.weight": torch.nn.Parameter(torch.randn(48, 16, generator=fixed), not te_frozen)
        for i in range(2)
    }
    return {**unet, **te}


def _save(s: Session, step: int, weights: dict[str, torch.Tensor], keep: int = 5) -> dict:
    opt = {"state": {0: {"exp_avg": torch.full((4,), float(step))}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    with s.lock():
        return checkpoint.save_to_session(
            s, step, keep, weights=weights, optimizer=opt, state={"step": step}, noise_gen=torch.Generator()
        )


def _inode(s: Session, entry: dict, rel: str) -> int:
    return (s.path / entry["path"] / rel).stat().st_ino


def test_a_state_is_hashed_as_written_and_never_read_back(home, monkeypatch):
    s = Session.create("w", home)
    monkeypatch.setattr(storage, "sha256_file", lambda *a: pytest.fail("a checkpoint save re-read a file"))
    entry = _save(s, 10, _weights(1, te_frozen=False))
    monkeypatch.undo()
    assert set(entry["files"]) == {UNET, TE, checkpoint.RNG, checkpoint.OPTIMIZER, checkpoint.STATE}
    folder = s.path / entry["path"]
    for rel, sha in entry["files"].items():
        assert storage.sha256_file(folder / rel) == sha and (folder / rel).stat().st_size == entry["sizes"][rel]
    loaded = checkpoint.load(folder)
    want = _weights(1, te_frozen=False)
    assert loaded["weights"].keys() == want.keys()
    assert all(torch.equal(loaded["weights"][k], want[k].detach()) for k in want)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.full((4,), 10.0))
    assert loaded["state"]["step"] == 10


def test_a_frozen_component_is_linked_from_the_previous_state_and_survives_its_pruning(home):
    s = Session.create("w", home)
    first = _save(s, 10, _weights(1, te_frozen=True))
    second = _save(s, 20, _weights(2, te_frozen=True), keep=1)  # prunes step 10 after linking
    assert [c["step"] for c in s.checkpoints()] == [20]
    assert second["files"][TE] == first["files"][TE]
    folder = s.path / second["path"]
    assert (folder / TE).stat().st_nlink == 1  # its other name went with step 10: the file is whole
    assert s.verify_checkpoint(second)
    assert torch.equal(load_file(folder / TE)["text_encoder.layer0.weight"], _weights(9, True)[TE_KEY].detach())


def test_only_unchanged_frozen_files_are_linked(home):
    s = Session.create("w", home)
    first = _save(s, 10, _weights(1, te_frozen=True))
    second = _save(s, 20, _weights(2, te_frozen=True))
    assert _inode(s, first, TE) == _inode(s, second, TE)  # same bytes: one file, two names
    assert _inode(s, first, UNET) != _inode(s, second, UNET)  # it trains: written
    changed = _weights(3, te_frozen=True)
    with torch.no_grad():
        changed[TE_KEY].add_(1.0)
    third = _save(s, 30, changed)
    assert _inode(s, third, TE) != _inode(s, second, TE) and third["files"][TE] != second["files"][TE]
    training = _save(s, 40, _weights(4, te_frozen=False))  # the text encoder trains: never even compared
    assert _inode(s, training, TE) != _inode(s, second, TE)
    assert all(s.verify_checkpoint(c) for c in s.checkpoints())


def test_where_links_are_refused_the_file_is_written(home, monkeypatch):
    s = Session.create("w", home)
    first = _save(s, 10, _weights(1, te_frozen=True))

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")  # Drive's FUSE mount

    monkeypatch.setattr(os, "link", refuse)
    second = _save(s, 20, _weights(2, te_frozen=True))
    assert _inode(s, first, TE) != _inode(s, second, TE)
    assert second["files"][TE] == first["files"][TE] and s.verify_checkpoint(second)


def test_a_linked_file_that_changed_on_disk_is_written_afresh(home):
    s = Session.create("w", home)
    first = _save(s, 10, _weights(1, te_frozen=True))
    old = s.path / first["path"] / TE
    data = bytearray(old.read_bytes())
    data[-1] ^= 0xFF  # bit rot in the previous state, same size
    old.write_bytes(bytes(data))
    second = _save(s, 20, _weights(2, te_frozen=True))
    assert _inode(s, first, TE) != _inode(s, second, TE) and s.verify_checkpoint(second)


def test_states_written_before_the_split_still_load(tmp_path):
    folder = tmp_path / "old"
    checkpoint.save_local(folder, weights={"unet.a": torch.ones(2)}, optimizer={}, state={"step": 1},
                          noise_gen=torch.Generator())  # fmt: skip
    for part in (folder / checkpoint.WEIGHTS_DIR).iterdir():
        part.unlink()
    (folder / checkpoint.WEIGHTS_DIR).rmdir()
    save_file({"unet.a": torch.ones(2), "text_encoder.b": torch.zeros(3)}, folder / checkpoint.WEIGHTS)
    loaded = checkpoint.load(folder)
    assert set(loaded["weights"]) == {"unet.a", "text_encoder.b"} and loaded["state"]["step"] == 1


def test_record_checkpoint_copies_in_one_pass(home, tmp_path, monkeypatch):
    src = tmp_path / "state"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w.bin").write_bytes(os.urandom(3 * storage.CHUNK + 5))
    (src / "state.json").write_text("{}")
    s = Session.create("w", home)
    monkeypatch.setattr(storage, "sha256_file", lambda *a: pytest.fail("the copy re-read a file"))
    entry = s.record_checkpoint(7, src)
    monkeypatch.undo()
    assert entry["files"]["unet/w.bin"] == storage.sha256_file(src / "unet" / "w.bin")
    assert s.verify_checkpoint(entry)


def test_show_counts_a_linked_file_once(home):
    s = Session.create("w", home)
    first = _save(s, 10, _weights(1, te_frozen=True))
    second = _save(s, 20, _weights(2, te_frozen=True))
    space = s.summary()["space"]
    te = second["sizes"][TE]
    assert space["checkpoint_bytes"] == sum(second["sizes"].values()) - te  # what the next save adds
    assert space["used_bytes"] == sum(first["sizes"].values()) + sum(second["sizes"].values()) - te
    assert "shared with the one before" in space["text"]


def test_a_states_files_are_written_at_once_and_a_failed_one_lists_nothing(home, monkeypatch):
    """The UNet, text encoder and optimizer files go to the disk side by side; one failing write
    lets the others end, lists no state and leaves no file behind."""
    import threading

    s = Session.create("c", home)
    first = _save(s, 1, _weights(1, te_frozen=False))
    together = threading.Barrier(3, timeout=20)  # passes only when three writes are in flight at once
    real_write = storage.write_stream

    def side_by_side(path, produce, **kw):
        if path.suffix in (".safetensors", ".pt") and path.stem != "rng":
            together.wait()
        return real_write(path, produce, **kw)

    monkeypatch.setattr(storage, "write_stream", side_by_side)
    second = _save(s, 2, _weights(2, te_frozen=False))
    assert sorted(second["files"]) == sorted(first["files"]) and s.verify_checkpoint(second)

    def disk_full(path, produce, **kw):
        if path.name == "optimizer.pt":
            raise storage.StorageError(f"{path}: no space left on the device")
        return real_write(path, produce, **kw)

    monkeypatch.setattr(storage, "write_stream", disk_full)
    with pytest.raises(storage.StorageError, match="no space left"):
        _save(s, 3, _weights(3, te_frozen=False))
    assert [c["step"] for c in s.checkpoints()] == [1, 2]
    assert sorted(p.name for p in s.checkpoints_dir.iterdir()) == ["step-000001", "step-000002"]
