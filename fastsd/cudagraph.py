"""Capturing a CUDA graph so that a failed capture gives its memory back (the training step, the web UI's
denoiser and the OCR decoder all capture through :func:`capture`).

A graph allocates from a private memory pool. torch releases that pool when the graph is destroyed,
but only for a capture that finished: when ``capture_end`` fails (a host sync inside the captured
code invalidates the capture), the pool stays referenced for the life of the process, and the
eager fallback that follows runs short of memory (seen on an H200: 196 MiB kept after one failed
training-step capture; under ``--vram-budget 9`` the eager step then ran out). :func:`capture` does
what ``torch.cuda.graph`` does, spelled out, and releases the pool of a capture that did not end.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any


def capture(fn: Callable[[], Any], *, pool: Any = None, stream: Any = None) -> tuple[Any, Any]:
    """``fn()`` captured into a new ``torch.cuda.CUDAGraph`` on a side stream: ``(graph, fn's output)``.

    Args:
        fn: the work to capture (warm it up first: its first calls allocate and set up libraries).
        pool: a memory pool to share with other graphs (``graph.pool()`` of one); default a new one.
        stream: the side stream to capture on (the one ``fn`` was warmed up on); default a new one.

    Raises:
        Whatever the capture raised, once the pool of a capture that did not end is released: its
        blocks go back to the device as soon as the tensors made during the capture are gone and
        ``torch.cuda.empty_cache()`` runs.
    """
    import torch

    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()  # cached blocks go back first: the graph allocates from its own pool
    if pool is None:  # made up front: graph.pool() needs an ended capture
        pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    stream = stream if stream is not None else torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            out = fn()
        finally:
            try:
                graph.capture_end()
            except Exception:
                device = torch.cuda.current_device()
                torch._C._cuda_endAllocateToPool(device, pool)  # stop routing allocations into it
                torch._C._cuda_releasePool(device, pool)  # the reference capture_begin took
                raise
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out
