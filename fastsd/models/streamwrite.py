"""Writing a planned single-file checkpoint at the disk's speed, in constant memory.

A Diffusers -> single-file conversion of an fp16 model changes names, not bytes: almost every
output tensor is an input tensor's bytes (or a few inputs' bytes one after the other, see
:data:`fastsd.models.keymap.BYTE_COPY_KINDS`), and the plan keeps the input files' order. So the
output is mostly a handful of long byte ranges of the input files. Those are copied file to file
inside the kernel (:meth:`fastsd.storage._HashingWriter.copy_range`, ``sendfile``), adjacent
tensors merged into one range: no tensor object, no page of the model in this process. Only the
few tensors that really change (a cast, a transpose, a made-up buffer) pass through torch.

While the copy runs, the kernel is asked every :data:`WRITEBACK_BYTES` to start writing the
dirty pages to disk, so the disk works during the copy instead of all at the final fsync.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from . import keymap
from .tensorfile import TensorSource, tensor_bytes

#: Bytes per copy call: large, so per-call cost vanishes; small enough to start writeback often.
COPY_STEP = 64 * 1024 * 1024
#: Start writeback of the output after this many bytes (see the module docstring).
WRITEBACK_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Span:
    """Bytes ``start .. end`` of a safetensors file, copied to the output unchanged."""

    path: Path
    start: int
    end: int


def byte_spans(op: keymap.Op, source: TensorSource, dtype: torch.dtype) -> list[Span] | None:
    """The input byte ranges that are ``op``'s output as they stand, or None when it must be computed.

    None for kinds that change bytes (a transpose, a made-up tensor), a dtype change, and pickled
    inputs (which have no byte ranges).
    """
    if op.kind not in keymap.BYTE_COPY_KINDS or not op.sources:
        return None
    infos = [source.infos[s] for s in op.sources]
    if any(i.start is None or i.end is None or i.dtype != dtype for i in infos):
        return None
    return [Span(i.path, i.start, i.end) for i in infos]  # type: ignore[arg-type]


def merged(pieces: Iterable[Span | torch.Tensor]) -> Iterator[Span | torch.Tensor]:
    """``pieces`` with runs of adjacent spans of one file joined into one span (fewer, longer copies)."""
    run: Span | None = None
    for piece in pieces:
        if isinstance(piece, Span):
            if run is not None and run.path == piece.path and run.end == piece.start:
                run = Span(run.path, run.start, piece.end)
                continue
            if run is not None:
                yield run
            run = piece
            continue
        if run is not None:
            yield run
            run = None
        yield piece
    if run is not None:
        yield run


def _start_writeback(fh: Any, start: int, end: int) -> None:
    """Ask the kernel to start writing output bytes ``start .. end`` to disk, while we go on copying.

    Without this the whole file would sit dirty in the page cache until the final fsync, which
    would then wait for all of it (and fill a small Colab's RAM with cache). The range given
    also covers the window before, by now on disk: its clean pages are dropped from the cache.
    Bounded ranges keep each call's cost flat however large the file grows.
    """
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fh.flush()
            os.posix_fadvise(fh.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)


def write_pieces(fh: BinaryIO, header: bytes, pieces: Iterable[Span | torch.Tensor]) -> None:
    """Write ``header`` then every piece, in order, to ``fh`` (a :func:`fastsd.storage.write_stream` file).

    Spans are copied in the kernel; tensors are written from their memory. A second thread does
    the writing while this one computes the next tensor (casts and transposes release the GIL, so
    two cores work on an fp32 -> fp16 conversion); the queue is short, so memory stays at a few
    chunks whatever the model size.
    """
    copy_range = getattr(fh, "copy_range", None)
    if copy_range is None:
        raise TypeError("write_pieces needs a file from fastsd.storage.write_stream (it has copy_range)")
    fds: dict[Path, int] = {}
    pending: queue.Queue = queue.Queue(maxsize=3)
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            offset, kicked, window = 0, 0, 0  # bytes written; where the last two writeback windows start

            def wrote(n: int) -> None:
                nonlocal offset, kicked, window
                offset += n
                if offset - kicked >= WRITEBACK_BYTES:
                    _start_writeback(fh, window, offset)
                    window, kicked = kicked, offset

            while (item := pending.get()) is not None:
                if isinstance(item, Span):
                    fd = fds.get(item.path)
                    if fd is None:  # our own descriptor: nothing else moves its offset
                        fd = fds[item.path] = os.open(item.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    for pos in range(item.start, item.end, COPY_STEP):
                        n = min(COPY_STEP, item.end - pos)
                        copy_range(fd, pos, n)
                        wrote(n)
                else:
                    fh.write(item[1])
                    wrote(len(item[1]))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            failure.append(err)
            while pending.get() is not None:  # drain so the producer never blocks
                pass

    thread = threading.Thread(target=writer, name="fastsd-convert-writer", daemon=True)
    thread.start()
    try:
        pending.put((None, header))
        for piece in merged(pieces):
            if failure:
                break
            pending.put(piece if isinstance(piece, Span) else (piece, tensor_bytes(piece)))
    finally:
        pending.put(None)
        thread.join()
        for fd in fds.values():
            os.close(fd)
    if failure:
        raise failure[0]
