"""A loss scaler for fp16 steps that never waits for the host, so the T4 preset's step can be a CUDA graph.

``torch.amp.GradScaler`` skips an overflowing step by reading its inf check on the host (``.item()``
in ``step``) and keeps per-step Python state; a CUDA graph can hold neither (a replay reruns the
kernels, not the Python). :class:`DeviceScaler` does GradScaler's arithmetic with the same kernels
and leaves every decision on the device:

- :meth:`~DeviceScaler.scale`: ``loss * scale`` (a 0-dim fp32 tensor, 2**16 at the start);
- :meth:`~DeviceScaler.unscale_`: ``torch._amp_foreach_non_finite_check_and_unscale_`` divides the
  gradients in place by the scale (its reciprocal taken in fp64, as GradScaler does) and sets
  ``found_inf`` to 1 when one of them is inf or NaN; clipping then sees the true gradients.
  fp16 gradients (16-bit weights, ``--master-weights 16bit``), which GradScaler refuses, stay scaled:
  dividing them in fp16 would flush the small ones to zero. Their norm is taken in fp32 (the inf
  check), and ``grad_mult`` = 1/scale is handed to the optimizer, which multiplies in fp32;
  :meth:`~DeviceScaler.clip_` folds the clipping factor into it;
- :meth:`~DeviceScaler.step`: hands ``found_inf`` to the optimizer, whose kernels leave the weights
  and moments untouched when it is 1: fused AdamW natively (the ``optimizer.found_inf`` attribute
  GradScaler sets for it too), :class:`~fastsd.train.lowmem.LowMemAdamW` through ``torch.where``;
- :meth:`~DeviceScaler.update`: ``torch._amp_update_scale_`` (halve on overflow, double after
  ``growth_interval`` clean steps: GradScaler's defaults).

:meth:`~DeviceScaler.state_dict` has GradScaler's keys, so a checkpoint of either resumes in the other.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


def skips_on_overflow(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``optimizer.found_inf`` and skips itself on the device when it is set.

    True for fused Adam/AdamW (``_step_supports_amp_scaling``) and for optimizers that declare
    ``skips_on_found_inf`` (:class:`~fastsd.train.lowmem.LowMemAdamW`); bitsandbytes' and the
    foreach AdamW do not (the foreach one refuses the attribute).
    """
    return bool(
        getattr(optimizer, "_step_supports_amp_scaling", False) or getattr(optimizer, "skips_on_found_inf", False)
    )


class DeviceScaler:
    """GradScaler's dynamic loss scaling with no host synchronisation (see the module doc).

    Args:
        device: where the scale, the growth tracker and ``found_inf`` live (the gradients' device).
        init_scale, growth_factor, backoff_factor, growth_interval: as :class:`torch.amp.GradScaler`
            (and its defaults).
    """

    def __init__(
        self,
        device: torch.device | str,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.device = torch.device(device)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        # static tensors, changed only in place: a captured graph reads and writes these very ones
        self.scale_t = torch.full((), init_scale, dtype=torch.float32, device=self.device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=self.device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        #: 16-bit gradients left scaled: what the optimizer multiplies them by (None: unscaled in place)
        self.grad_mult: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None  # their true (unscaled) global norm, for clip_
        self._unscaled = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the current scale (backward of it gives scaled gradients)."""
        return loss * self.scale_t

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale and set ``found_inf`` (1: one is inf/NaN).

        In place, or, where a gradient is fp16, by setting :attr:`grad_mult` for the optimizer (module doc).

        Raises:
            ValueError: fp16 gradients for an optimizer that cannot take ``grad_mult``.
        """
        inv_scale = self.scale_t.double().reciprocal().float()  # fp64 reciprocal, as GradScaler
        self.found_inf.zero_()
        self.grad_mult = self._norm = None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            if any(g.dtype == torch.float16 for g in grads):
                if not getattr(optimizer, "takes_grad_mult", False):
                    raise ValueError(
                        f"{type(optimizer).__name__} cannot take fp16 gradients: use adamw_lowmem or fp32 master weights"
                    )
                norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
                self._norm = torch.linalg.vector_norm(torch.stack(norms)) * inv_scale
                self.found_inf.copy_(self._norm.isfinite().logical_not())
                self.grad_mult = inv_scale
            else:
                groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
                for g in grads:
                    groups[(g.device, g.dtype)].append(g)
                for same in groups.values():  # the kernel wants one device and dtype per call
                    torch._amp_foreach_non_finite_check_and_unscale_(same, self.found_inf, inv_scale)
        self._unscaled = True

    def clip_(self, params: list[torch.Tensor], max_norm: float, foreach: bool) -> None:
        """Clip the gradients' global norm to ``max_norm`` (after :meth:`unscale_`), as ``clip_grad_norm_`` does.

        Gradients left scaled (:attr:`grad_mult` set) are not touched: the factor joins ``grad_mult``.
        """
        if self.grad_mult is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
            return
        assert self._norm is not None  # set with grad_mult by unscale_
        self.grad_mult = self.grad_mult * (max_norm / (self._norm + 1e-6)).clamp(max=1.0)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` (unscaling first if not done), which skips itself where ``found_inf`` is 1.

        Raises:
            ValueError: the optimizer cannot skip on the device (:func:`skips_on_overflow`).
        """
        if not skips_on_overflow(optimizer):
            raise ValueError(f"{type(optimizer).__name__} cannot skip an overflowing step on the device")
        if not self._unscaled:
            self.unscale_(optimizer)
        optimizer.found_inf = self.found_inf  # type: ignore[attr-defined]
        optimizer.grad_scale = None  # type: ignore[attr-defined]  # gradients are already unscaled (or grad_mult)
        optimizer.grad_mult = self.grad_mult  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale, optimizer.grad_mult  # type: ignore[attr-defined]

    def update(self) -> None:
        """Halve the scale after an overflow; double it after ``growth_interval`` clean steps in a row."""
        torch._amp_update_scale_(
            self.scale_t,
            self.growth_tracker,
            self.found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )
        self._unscaled = False

    def state_dict(self) -> dict[str, Any]:
        """GradScaler's ``state_dict`` keys (reads the device: call it outside a replay, after :meth:`update`)."""
        return {
            "scale": float(self.scale_t.item()),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": int(self.growth_tracker.item()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (this scaler's or GradScaler's), in place."""
        self.scale_t.fill_(float(state["scale"]))
        self.growth_tracker.fill_(int(state["_growth_tracker"]))
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
