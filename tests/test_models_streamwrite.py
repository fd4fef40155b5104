"""The fast conversion path (kernel copies of unchanged bytes) writes exactly the reference tensors."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsd.errors import StorageError
from fastsd.models import convert as conv
from fastsd.models.streamwrite import Span, merged
from fastsd.storage import write_stream


def _reference(src: Path, half: bool) -> dict[str, torch.Tensor]:
    """Every output tensor built in memory, one torch op per tensor (the path ``--format ckpt`` takes)."""
    plans = conv._plans(src, conv.detect(src))
    try:
        return {op.out: conv._build(op, s, conv._out_meta(op, s, half)[0]) for s, ops in plans for op in ops}
    finally:
        for s, _ in plans:
            s.close()


def _fp16_copy(folder: Path, dst: Path) -> Path:
    """``folder`` with every safetensors file stored in fp16, like the SD checkpoints people download."""
    shutil.copytree(folder, dst)
    for f in dst.rglob("*.safetensors"):
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, f)
    return dst


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize(("kind", "half", "fp16_input"), [("sd1", True, True), ("sdxl", False, False)])
def test_fast_path_gives_the_reference_tensors(kind, half, fp16_input, request, tmp_path):
    src = request.getfixturevalue(f"tiny_{kind}")
    if fp16_input:
        src = _fp16_copy(src, tmp_path / "fp16")
    out = conv.diffusers_to_single_file(src, tmp_path / "m.safetensors", half=half)
    _assert_same(load_file(out), _reference(src, half))


def test_unchanged_bytes_become_a_few_long_copies(tiny_sdxl):
    plans = conv._plans(tiny_sdxl, conv.detect(tiny_sdxl))
    try:
        n_tensors = sum(len(ops) for _, ops in plans)
        pieces = list(merged(conv._pieces(plans, half=False)))
    finally:
        for s, _ in plans:
            s.close()
    spans = [p for p in pieces if isinstance(p, Span)]
    computed = [p for p in pieces if not isinstance(p, Span)]
    # fp32 -> fp32: only OpenCLIP's transposed projection and CLIP's position ids are computed
    assert len(computed) == 2
    assert len(spans) < n_tensors / 10, (len(spans), n_tensors)


def test_without_sendfile_the_file_is_byte_identical(tiny_sd1, tmp_path, monkeypatch):
    fast = conv.diffusers_to_single_file(tiny_sd1, tmp_path / "fast" / "m.safetensors")  # same name: same title

    def refuse(*args):
        raise OSError(errno.EINVAL, "sendfile not supported here")

    monkeypatch.setattr(os, "sendfile", refuse)
    slow = conv.diffusers_to_single_file(tiny_sd1, tmp_path / "slow" / "m.safetensors")
    assert fast.read_bytes() == slow.read_bytes()


def test_copy_range_hashes_on_the_way_and_refuses_a_short_source(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        result = write_stream(
            tmp_path / "out.bin",
            lambda fh: (fh.write(b"head"), fh.copy_range(fd, 5, len(data) - 5)),
            verify_sha256=True,
        )
        assert result["sha256"] == hashlib.sha256(b"head" + data[5:]).hexdigest()
        assert (tmp_path / "out.bin").read_bytes() == b"head" + data[5:]
        with pytest.raises(StorageError, match="ended early"):
            write_stream(tmp_path / "short.bin", lambda fh: fh.copy_range(fd, 0, len(data) + 1))
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "src.bin"]  # no temp, no short.bin


def test_cli_converts_an_fp16_folder_to_the_reference(tiny_sd1, tmp_path, cli):
    src = _fp16_copy(tiny_sd1, tmp_path / "fp16")
    out = tmp_path / "cli.safetensors"
    r = cli("convert", str(src), str(out), "--half")
    assert r.returncode == 0, r.stderr
    _assert_same(load_file(out), _reference(src, True))
