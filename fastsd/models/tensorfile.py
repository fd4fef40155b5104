"""Reading and writing tensor files one tensor at a time.

safetensors is a JSON header (names, dtypes, shapes, byte offsets) followed by raw bytes, so a
converter can learn everything about a file from its first few kilobytes, compute the output
header before writing a byte of data, and then copy tensors one by one. We read tensor bytes with
plain positioned reads rather than ``safe_open``'s memory map: pages of a map count toward the
process's resident memory until it is closed, which for a 10 GB UNet defeats the point of
streaming. Pickled checkpoints (``.bin``, ``.ckpt``, ``.pt``) are read only through
``torch.load(weights_only=True)``, which refuses pickles that need code to run.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import ModelFormatError

#: safetensors dtype names <-> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
        DTYPE_NAMES[getattr(torch, _attr)] = _name

#: A header larger than this is not a model file (real ones are well under 10 MB).
MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range (None for pickled sources)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    start: int | None = None
    end: int | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def header_json(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The validated JSON header of a safetensors file and the byte where its data starts.

    This is the one reader of safetensors headers (the converter, ``model detect`` and the web
    UI's model lists all come here), and it trusts nothing in the file: the header's length and
    JSON (one nested too deep for the parser included); every tensor's dtype name, shape
    (non-negative integers) and byte size (``prod(shape) * dtype size``); no name listed twice;
    and the data offsets, which must tile the data section from 0
    without gaps or overlaps and end inside the file. A crafted file is refused here, before a
    byte of tensor data is read, instead of converting into wrong tensors.

    Returns:
        ``(header, data_start)``: the header dict (``__metadata__`` included, as strings), and the
        file offset that ``data_offsets`` count from.

    Raises:
        ModelFormatError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path} is not a safetensors file (too short); check the download")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise ModelFormatError(f"{path} is not a safetensors file or is truncated; download it again")
        raw = fh.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError:
        # json's decoder stops at the interpreter's recursion limit; a real header nests 3 deep.
        raise ModelFormatError(
            f"{path}: the safetensors header is nested thousands of levels deep; it is not a model file"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{path} has a damaged safetensors header; download it again") from err
    except _DuplicateKey as err:
        raise ModelFormatError(f"{path}: tensor {err.args[0]!r} is listed twice; the file is damaged") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path} has a damaged safetensors header; download it again")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ModelFormatError(f"{path}: __metadata__ must map names to strings; the file is damaged")
    spans = sorted((_tensor_span(path, name, info), name) for name, info in header.items() if name != "__metadata__")
    end_of_data = 0
    for (start, end), name in spans:
        if start != end_of_data:
            what = "overlaps the tensor before it" if start < end_of_data else "leaves a gap before it"
            raise ModelFormatError(
                f"{path}: tensor {name!r} at bytes {start}..{end} {what}; the file is damaged or crafted"
            )
        end_of_data = end
    if 8 + n + end_of_data > size:
        raise ModelFormatError(
            f"{path} is truncated ({size} of {8 + n + end_of_data} bytes); download or copy it again"
        )
    return header, 8 + n


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _tensor_span(path: Path, name: str, info: Any) -> tuple[int, int]:
    """``(start, end)`` of one header entry after checking its dtype, shape and size."""

    def bad(what: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: tensor {name!r} {what}; the file is damaged or crafted")

    if not isinstance(info, dict):
        raise bad("has no dtype/shape/data_offsets entry")
    dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"has an unknown dtype {info.get('dtype')!r} (known: {', '.join(DTYPES)})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has shape {shape!r}; a shape is a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
        raise bad(f"has data_offsets {offsets!r}; they are two non-negative integers")
    start, end = offsets
    count = 1
    for d in shape:
        count *= d
    if end - start != count * _itemsize(dtype):
        raise bad(f"spans {end - start} bytes but shape {shape} of {info['dtype']} needs {count * _itemsize(dtype)}")
    return start, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header without reading any tensor data (validated by :func:`header_json`).

    Returns:
        ``(tensors, metadata)``: name -> :class:`TensorInfo`, and the ``__metadata__`` strings.

    Raises:
        ModelFormatError: not a safetensors file, truncated, or a header that does not describe its data.
    """
    path = Path(path)
    header, base = header_json(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {
        name: TensorInfo(
            name,
            DTYPES[info["dtype"]],
            tuple(info["shape"]),
            path,
            base + info["data_offsets"][0],
            base + info["data_offsets"][1],
        )
        for name, info in header.items()
    }
    return tensors, dict(metadata)


def read_tensor(info: TensorInfo, fh: BinaryIO | None = None) -> torch.Tensor:
    """Read one tensor from a safetensors file into fresh memory (no mmap)."""
    if fh is None:
        with open(info.path, "rb") as own:
            return read_tensor(info, own)
    return read_flat(fh, info, info.start, info.end).reshape(info.shape)  # type: ignore[arg-type]


def read_flat(fh: BinaryIO, info: TensorInfo, start: int, end: int) -> torch.Tensor:
    """Bytes ``start:end`` of ``fh`` as a flat tensor of ``info.dtype`` (uninitialised buffer, no zero-fill)."""
    raw = torch.empty(end - start, dtype=torch.uint8)
    if raw.numel() and read_into(fh, memoryview(raw.numpy()), start) != end - start:
        raise ModelFormatError(f"{info.path} ended early while reading {info.name}; the file is truncated")
    return raw.view(info.dtype)


def map_flat(fh: BinaryIO, info: TensorInfo, start: int, end: int) -> torch.Tensor:
    """Bytes ``start:end`` of ``fh`` as a flat read-only tensor backed by a memory map of just that range.

    Casting straight from the page cache saves the copy a read makes. The map lives as long as the
    tensor (torch keeps the mmap object alive) and is unmapped when the tensor is freed, so
    resident memory stays at one chunk, unlike a map of the whole file. Falls back to
    :func:`read_flat` where POSIX ``mmap`` flags are missing (Windows).
    """
    if not hasattr(mmap, "MAP_SHARED") or end <= start:
        return read_flat(fh, info, start, end)
    offset = start - start % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fh.fileno(), end - offset, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "buffer is not writable": we never write to it
        return torch.frombuffer(mm, dtype=info.dtype, count=(end - start) // info.dtype.itemsize, offset=start - offset)


def read_into(fh: BinaryIO, buf: bytearray | memoryview, pos: int) -> int:
    """Fill ``buf`` from byte ``pos`` of ``fh``; returns how many bytes were read (short at end of file)."""
    view = memoryview(buf)
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):  # positioned read: no shared file offset, releases the GIL
            n = os.preadv(fh.fileno(), [view[done:]], pos + done)
        else:
            fh.seek(pos + done)
            n = fh.readinto(view[done:]) or 0
        if not n:
            break
        done += n
    return done


def load_pickle_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a pickled checkpoint with ``torch.load(weights_only=True)``; unwrap ``state_dict``.

    Raises:
        ModelFormatError: the pickle needs code execution (refused), or the file is not a checkpoint.
    """
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # old (non-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad pickle
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise ModelFormatError(
                f"{path} is a pickle that needs code execution to load, which fastsd refuses for safety; "
                "get a .safetensors version of this model"
            ) from err
        raise ModelFormatError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}); check the file"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
        if not tensors:
            raise ModelFormatError(f"{path} holds no tensors; it is not a model checkpoint")
        obj = tensors
    return obj


class TensorSource:
    """Name -> tensor access over one or more files (safetensors, sharded, or pickled ``.bin``).

    safetensors files are read lazily with positioned reads; pickled files are loaded (memory-mapped
    where torch can) when first touched.
    """

    def __init__(self, files: Iterable[str | os.PathLike[str]]) -> None:
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._handles: dict[Path, BinaryIO] = {}
        for f in files:
            path = Path(f)
            if path.suffix in PICKLE_SUFFIXES:
                sd = load_pickle_state_dict(path)
                self._pickled[path] = sd
                for k, v in sd.items():
                    self.infos[k] = TensorInfo(k, v.dtype, tuple(v.shape), path)
            else:
                infos, meta = read_header(path)
                self.infos.update(infos)
                self.metadata.update(meta)

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        if info.start is None:
            return self._pickled[info.path][name]
        return read_tensor(info, self.handle(info.path))

    def handle(self, path: Path) -> BinaryIO:
        """An open read handle on ``path``, kept until :meth:`close`."""
        if path not in self._handles:
            self._handles[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        return self._handles[path]

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        self._pickled.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The bytes that start a safetensors file holding ``entries`` in order (length + padded JSON)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = _itemsize(dtype)
        for d in shape:
            n *= d
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (works for bf16/fp8, which numpy lacks)."""
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def iter_files_sorted(infos: Iterable[TensorInfo]) -> Iterator[TensorInfo]:
    """Tensors in file order (sequential reads are what disks and Drive do best)."""
    return iter(sorted(infos, key=lambda i: (str(i.path), i.start or 0)))
