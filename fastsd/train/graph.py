"""The whole training step (forward, backward, gradient clipping, optimizer) as one CUDA graph replay.

At batch 1 the SD UNet step is bound by kernel launches and Python, not by the GPU's arithmetic:
an H100 idles between ~3000 small kernels. Capturing the step once and replaying it removes that
overhead. What varies between steps lives in *static* device buffers that the replay reads:

- the step's inputs (noised latents, noise, timesteps, text embeddings or token ids), drawn
  eagerly from the same seeded generator as the eager path and copied in before each replay;
- the learning rate and the optimizer's step counter (device tensors, ``capturable`` optimizers);
- the weights and optimizer state, updated in place.

So a replayed step is the eager step's math. The first :data:`WARMUP_STEPS` real steps run
eagerly on a side stream (lazy initialisation, cuDNN autotuning, torch.compile), then the step is
captured and every later step (including the one that triggered the capture) is a replay.
Gradients are set to ``None`` before capture, so the captured backward *writes* them (no
accumulation) into the graph's private memory pool.

fp16 (the T4 preset) is captured with :class:`~fastsd.train.scaler.DeviceScaler` in place of
GradScaler (whose inf check syncs with the host): the scale, the inf check and the skipped step
stay on the device, so the optimizer must be one that skips itself (``optim.SKIPS_ON_DEVICE``).
Not capturable, so never used with: gradient accumulation, several processes, aspect-ratio
buckets (changing shapes), bitsandbytes.
If capture fails anyway, :class:`GraphStep` logs a warning and the run continues eagerly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..cudagraph import capture

log = logging.getLogger(__name__)

#: Eager steps before capture (the CUDA docs recommend a few; torch.compile compiles in the first).
WARMUP_STEPS = 3


def blockers(
    *,
    device: torch.device,
    precision: str,
    grad_accum: int,
    world: int,
    bucketed: bool,
    optimizer: str,
) -> list[str]:
    """Why this run can't use a CUDA-graph step (empty: it can)."""
    from .optim import CAPTURABLE, SKIPS_ON_DEVICE

    out = []
    if device.type != "cuda":
        out.append(f"the device is {device.type}")
    if precision == "fp16" and optimizer in CAPTURABLE and optimizer not in SKIPS_ON_DEVICE:
        out.append(f"fp16 overflow skips on the device need {' or '.join(SKIPS_ON_DEVICE)}, not {optimizer}")
    if grad_accum > 1:
        out.append("gradient accumulation")
    if world > 1:
        out.append("several processes")
    if bucketed:
        out.append("aspect-ratio buckets change shapes")
    if optimizer not in CAPTURABLE:
        out.append(f"optimizer {optimizer} (use {', '.join(CAPTURABLE)})")
    return out


def decide(mode: str, reasons: list[str], *, warn: bool = True) -> bool:
    """``cuda_graph`` setting + blockers -> whether to capture; ``on`` with blockers warns and runs eagerly."""
    if mode == "off":
        return False
    if reasons:
        if mode == "on" and warn:
            log.warning("cuda_graph on ignored: %s", "; ".join(reasons))
        return False
    return True


class GraphStep:
    """Run ``step_fn(inputs) -> loss`` eagerly for a few steps, then capture it and replay it.

    Args:
        step_fn: does one whole training step on a dict of input tensors and returns the loss
            (detached); it must not synchronise with the host or change tensor shapes.
        clear_grads: sets the trained tensors' ``.grad`` to ``None`` (before each eager step and
            before capture).
        warmup: eager steps before capture.
        capture: ``False`` runs every step eagerly through the same static buffers (the CPU tests
            check with it that the graph path's step is the eager path's math).
    """

    def __init__(self, step_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], clear_grads: Callable[[], None],
                 warmup: int = WARMUP_STEPS, capture: bool = True):  # fmt: skip
        self.step_fn = step_fn
        self.clear_grads = clear_grads
        self.warmup = warmup
        self.capture = capture
        self.calls = 0
        self.failed: str | None = None
        self.graph: Any = None
        self.static_in: dict[str, torch.Tensor] = {}
        self.static_loss: torch.Tensor | None = None
        self.side: Any = None  # the one stream of the warm-up steps and the capture
        self.captures = 0  # captures that ended (a released graph is captured again)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if not self.capture:
            if not self.static_in:
                self.static_in = {k: v.clone() for k, v in inputs.items()}
            for k, v in inputs.items():
                self.static_in[k].copy_(v)
            return self._eager(self.static_in)
        if self.failed:
            return self._eager(inputs)
        if self.graph is None and self.calls <= self.warmup:
            return self._side_stream(inputs)
        if self.graph is None:
            try:
                self._capture(inputs)
            except Exception as err:  # noqa: BLE001 - any capture failure: keep training eagerly
                self.failed = f"{type(err).__name__}: {err}"
                log.warning("CUDA graph capture failed, continuing without it (%s)", self.failed[:300])
            if self.failed:
                # outside the except block: the live exception's traceback still holds the
                # half-captured graph, and with it the graph's memory pool (seen on an H200)
                self._free_failed_capture()
                return self._eager(inputs)
        for k, v in inputs.items():
            self.static_in[k].copy_(v, non_blocking=True)
        self.graph.replay()
        assert self.static_loss is not None
        return self.static_loss

    def _free_failed_capture(self) -> None:
        """Give back what a failed capture took before the eager fallback needs the memory.

        The gradients (and optimizer scratch) written during capture live in the graph's private
        pool; while any tensor holds a block of it, the pool stays reserved and the eager step
        that follows runs out of memory under a tight budget (seen: ``unet+te`` at 9 GiB).
        """
        with contextlib.suppress(RuntimeError):  # an invalidated capture can leave an error behind
            torch.cuda.synchronize()
        self._drop()  # the failed capture's pool was released by cudagraph.capture

    def _eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.clear_grads()
        return self.step_fn(inputs)

    def release(self) -> None:
        """Drop the graph and its memory pool (activations, gradients) until the next step captures again.

        The pool stays reserved between replays, so an eager phase between steps (sample images, an
        export) would need its memory on top of it; released, they reuse it. The next call captures at
        once: the libraries were set up by the warm-up steps.
        """
        if self.graph is not None:
            self._drop()

    def _drop(self) -> None:
        """Forget the graph, its buffers and the gradients in its pool, and hand the freed blocks back."""
        self.graph = None
        self.static_in, self.static_loss = {}, None
        self.clear_grads()
        gc.collect()
        torch.cuda.empty_cache()

    def _side_stream(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # One stream for every warm-up step: the allocator reuses a freed block only on the stream that
        # allocated it, so a new stream per step would cache each step's activations anew (seen on an
        # H200 under a 14.5 GiB cap: SDXL LoRA's warm-up reserved 14.5 GiB for 9.3 GiB allocated).
        if self.side is None:
            self.side = torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss = self._eager(inputs)
        torch.cuda.current_stream().wait_stream(self.side)
        return loss

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        # static buffers live outside the graph's pool; the first replay reads this step's inputs
        self.static_in = {k: v.clone() for k, v in inputs.items()}
        self.clear_grads()
        # the warm-up steps' activations stay cached on the side stream, where only eager steps could reuse
        # them; the graph allocates its own pool, so hand them back first (else both stay reserved). No
        # gc.collect(): the steps' tensors are freed by reference count, and a collection costs ~0.4 s
        torch.cuda.empty_cache()
        self.graph, self.static_loss = capture(lambda: self.step_fn(self.static_in), stream=self.side)
        self.captures += 1
        log.info("captured the training step in a CUDA graph")
