"""Data-parallel training over processes (``accelerate launch`` / torchrun): joining, and averaging gradients.

Each rank draws its own micro-batches (the step's seed includes the rank) and the gradients are
averaged before every update, in flat buckets. Rank 0 alone writes the session.
"""

from __future__ import annotations

import os

import torch


def distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group that ``accelerate launch``/torchrun describe."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def allreduce_grads(params: list[torch.Tensor], world: int, bucket_bytes: int = 64 * 2**20) -> None:
    """Average gradients over data-parallel ranks, in flat buckets (one collective per ~64 MB)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [*grads, None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            torch.distributed.all_reduce(flat)
            flat /= world
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                dst.copy_(src)
            bucket, size = [], 0
