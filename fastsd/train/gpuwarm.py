"""The GPU settings a training run holds: attention backends that train safely, and libraries loaded early.

Facts measured on lent GPUs (torch 2.11 + cu130; an H200 on 2026-12-02 unless said):

- **cuDNN's attention backward returned NaN gradients** for the tiny FLUX transformer in bf16
  (26 of 50 LoRA tensors after one backward; flash, memory-efficient and math attention: all
  finite on the same inputs). The same backend has open NaN reports at other shapes (pytorch
  #196678, NVIDIA/cudnn-frontend #1072, trl #7181). :func:`training_attention` turns it off for
  the SD3.5/FLUX.1 transformers. The UNet families keep it: no UNet run on an H100/H200 has gone
  NaN with it, and excluding it measured 37.6 it/s against 39.6-40.1 for SD1.5 LoRA (four
  leases). :func:`attention_restored` gives the setting back when the run ends, so a web UI in the
  same notebook keeps cuDNN attention for its inference.
- **The first step on a fresh machine took 8–10 s**, against 1.5–2.5 s for the next run on the
  same machine: the first use of cuDNN, cuBLAS and torch's CUDA kernels reads and initialises
  gigabytes of shared libraries from a cold disk. :func:`start_warmup` does that in a background
  thread while the main thread reads the base model's files.
- **What is left of a UNet's cold first step is in its attention** (H100, 2026-12-08, SD1.5 LoRA under
  cProfile, `benchmarks/results/first-step-profile-h100-2026-12-08.txt`): the three eager warm-up
  steps took 13.4 s, of which 5.1 s inside the UNet's ``scaled_dot_product_attention`` calls and
  7.1 s in backward. Most likely that is cuDNN building its attention kernels for each new shape
  (the tiny warm-up here has other shapes); not proven, as the A/B did not get a machine.
  ``FASTSD_CUDNN_ATTENTION=0`` trades it for the steady speed above; which way pays is not measured
  yet (``benchmarks/first_step.py``; end to end, ``benchmarks/e2e.py``'s ``first-step-lora-cudnn-attn-*`` cases).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from ..models.registry import FLOW_FAMILIES
from ..runtime import env_switch

log = logging.getLogger(__name__)

#: Shared libraries the first step pages in (file-name prefixes, under torch/lib and nvidia/*/lib).
FIRST_STEP_LIBRARIES = ("libtorch_cuda", "libcudnn", "libcublas", "libnvrtc", "libnvJitLink")


#: Families whose training turns cuDNN attention off (its backward gave NaN gradients; see the module).
NO_CUDNN_ATTENTION = frozenset(FLOW_FAMILIES)


@contextlib.contextmanager
def attention_restored() -> Iterator[None]:
    """Whatever :func:`training_attention` changes inside the ``with`` block is undone when it ends."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def cudnn_attention_kept(family: str) -> bool:
    """Whether training ``family`` keeps cuDNN's attention backend (``FASTSD_CUDNN_ATTENTION=0/1`` overrides).

    The override is there to measure the trade the module doc names: a UNet's cold first step against
    its steady speed.
    """
    told = env_switch("FASTSD_CUDNN_ATTENTION")
    return family not in NO_CUDNN_ATTENTION if told is None else told


def training_attention(family: str) -> None:
    """Turn scaled-dot-product attention's cuDNN backend off unless :func:`cudnn_attention_kept` says keep it."""
    if not cudnn_attention_kept(family):
        torch.backends.cuda.enable_cudnn_sdp(False)


def start_warmup(device: torch.device, dtype: torch.dtype) -> threading.Thread | None:
    """Begin loading the GPU libraries the first step needs; returns the thread (None on a CPU).

    The thread asks the kernel to read the libraries ahead (``posix_fadvise(WILLNEED)``, which
    does not block) and runs one small convolution, matmul, norm and attention, forward and
    backward, in the run's ``dtype``: that loads cuDNN's and cuBLAS's engines and torch's kernel
    modules. It allocates a few MiB and frees them. A failure is logged and ignored: the first
    step then loads what it needs itself, as it always did.
    """
    if device.type != "cuda":
        return None
    thread = threading.Thread(target=_warm, args=(device, dtype), name="fastsd-gpu-warmup", daemon=True)
    thread.start()
    return thread


def finish_warmup(thread: threading.Thread | None, timeout: float = 60.0) -> None:
    """Wait for :func:`start_warmup`'s thread, so its work never overlaps the timed steps."""
    if thread is not None:
        thread.join(timeout)


def _warm(device: torch.device, dtype: torch.dtype) -> None:
    try:
        _read_ahead(_library_files())
        with torch.cuda.device(device):
            _tiny_step(device, dtype)
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - a warm-up must never fail the run it speeds up
        log.debug("GPU warm-up skipped: %s", err)


def _library_files() -> list[Path]:
    """The CUDA libraries of this torch install (its own lib folder and the nvidia-* wheels')."""
    torch_lib = Path(torch.__file__).parent / "lib"
    folders = [torch_lib, *sorted((torch_lib.parent.parent / "nvidia").glob("*/lib"))]
    return [f for d in folders if d.is_dir() for f in sorted(d.iterdir()) if f.name.startswith(FIRST_STEP_LIBRARIES)]


def _read_ahead(files: list[Path]) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _tiny_step(device: torch.device, dtype: torch.dtype) -> None:
    """One forward and backward of the layer kinds a UNet and a transformer use, on tiny tensors."""
    import torch.nn.functional as F

    x = torch.randn(1, 8, 16, 16, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, device=device, dtype=dtype, requires_grad=True)
    h = F.silu(F.group_norm(F.conv2d(x, w, padding=1), 4))
    seq = h.flatten(2).transpose(1, 2)  # [1, 256, 8]
    lin = torch.randn(64, 8, device=device, dtype=dtype, requires_grad=True)
    q = F.layer_norm(seq @ lin.t(), (64,)).view(1, 256, 2, 32).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, q, q)
    F.gelu(out).float().square().mean().backward()
