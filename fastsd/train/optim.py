"""Optimizers: 8-bit AdamW (bitsandbytes or :mod:`.lowmem`), fused AdamW, and the step fused into backward.

:class:`Optim` wraps one ordinary optimizer. :class:`BackwardStepOptim` gives every trainable
tensor its own optimizer and steps it from a post-accumulate-grad hook, then frees that gradient:
the full set of gradients never exists at once, which saves 4 bytes per trainable parameter
(3.4 GB for the SD1.5 UNet) at the cost of no global gradient clipping, accumulation or GradScaler.
Learning rates are ``base_lr * factor(step)`` set by the loop (:func:`lr_factor`), so no scheduler
object needs saving: the step is the scheduler's state.

With ``device_lr`` (CUDA graphs) every group's learning rate is a 0-dim device tensor that
:meth:`Optim.set_lr` fills in place, and the optimizers are built ``capturable``: the step counter
and the rate are read by the kernels from device memory, so a captured step replays correctly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

log = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-2


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warmup, then constant/linear/cosine)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_kind(kind: str, device: torch.device) -> str:
    """The optimizer that can run here: 8-bit AdamW needs bitsandbytes and a CUDA device."""
    if kind == "adamw8bit":
        if device.type != "cuda":
            log.info("note: 8-bit AdamW needs a CUDA GPU; using AdamW on %s", device.type)
            return "adamw"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("note: bitsandbytes is not installed; using fused AdamW instead of 8-bit AdamW (more VRAM)")
            return "adamw_fused"
    return kind


#: Optimizers a CUDA graph can capture (bitsandbytes passes the step count as a host scalar).
CAPTURABLE = ("adamw_fused", "adamw", "adamw_lowmem")
#: Of those, the ones that skip an overflowing fp16 step on the device (:mod:`.scaler`): what a
#: graphed fp16 step needs (the foreach AdamW skips only through GradScaler's host read).
SKIPS_ON_DEVICE = ("adamw_fused", "adamw_lowmem")


#: The layout of each optimizer's saved state: a state loads into an optimizer of the same layout only
#: (torch's AdamW and fused AdamW share theirs; 8-bit moments are stored differently by each 8-bit one).
STATE_LAYOUT = {"adamw": "adamw", "adamw_fused": "adamw", "adamw_lowmem": "lowmem", "adamw8bit": "bitsandbytes"}


def saved_layout(state_dict: dict[str, Any]) -> tuple[str | None, bool]:
    """(layout, stepped inside backward) of an :class:`Optim` or :class:`BackwardStepOptim` state.

    For states whose optimizer was not recorded: read from the per-weight keys (None: no weight has state,
    or none this module writes). A state of ``adamw_lowmem`` over small tensors only has AdamW's keys and
    AdamW's layout, which is what it then is.
    """
    per = state_dict.get("per_tensor")
    parts = per if isinstance(per, list) else [state_dict]
    keys: set[str] = set()
    for part in parts:
        for weight_state in (part.get("state") or {}).values() if isinstance(part, dict) else ():
            keys.update(weight_state if isinstance(weight_state, dict) else ())
    layout = (
        "lowmem" if "m_q" in keys else "bitsandbytes" if "state1" in keys else "adamw" if "exp_avg" in keys else None
    )
    return layout, isinstance(per, list)


def fits_saved(record: Any, saved: dict[str, Any], opt: Any) -> bool:
    """Whether a checkpoint's optimizer state loads into ``opt``; if not, says once that the moments start afresh.

    ``record`` is the state's ``{"kind", "in_backward"}`` (None in states written before 2026-12-04, whose
    layout :func:`saved_layout` reads from ``saved``'s keys). A session resumed on another GPU class can
    get another preset's optimizer (a T4's ``adamw_lowmem``, an A100's fused AdamW) or step inside
    backward where it did not, and a state of another :data:`STATE_LAYOUT` cannot be loaded.
    """
    kind = record.get("kind") if isinstance(record, dict) else None
    if isinstance(kind, str):
        layout, inside = STATE_LAYOUT.get(kind), record.get("in_backward")
    else:
        layout, inside = saved_layout(saved)
        if layout is None:  # no weight had state yet: nothing to lose
            return inside == opt.in_backward
    if (layout, inside) == (STATE_LAYOUT.get(opt.kind), opt.in_backward):
        return True
    how = {True: " inside backward"}
    what = kind if isinstance(kind, str) else f"{layout or 'an unknown'} layout"
    hint = f" (pass --optimizer {kind} to continue them)" if isinstance(kind, str) else ""
    log.warning(
        "the checkpoint's optimizer state is %s's%s and this run steps %s%s: the weights are the checkpoint's, "
        "the optimizer's moments start afresh%s",
        what, how.get(inside, ""), opt.kind, how.get(opt.in_backward, ""), hint,
    )  # fmt: skip
    return False


def _build(kind: str, groups: list[dict[str, Any]], capturable: bool = False) -> torch.optim.Optimizer:
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=WEIGHT_DECAY)
    if kind == "adamw_lowmem":
        from .lowmem import LowMemAdamW

        return LowMemAdamW(groups, weight_decay=WEIGHT_DECAY)
    if kind == "adamw_fused":
        return torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY, fused=True, capturable=capturable)
    return torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY, foreach=True, capturable=capturable)


def _lr_value(lr: float, params: list[torch.nn.Parameter], device_lr: bool) -> float | torch.Tensor:
    """The group's rate: a float, or (``device_lr``) a 0-dim fp32 tensor on the parameters' device."""
    if not device_lr:
        return lr
    return torch.tensor(float(lr), dtype=torch.float32, device=params[0].device)


def _set_group_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)  # in place: a captured graph reads this very tensor
    else:
        group["lr"] = value


class Optim:
    """One optimizer over parameter groups ``[(params, base_lr), ...]``."""

    in_backward = False

    def __init__(self, kind: str, groups: list[tuple[list[torch.nn.Parameter], float]], device_lr: bool = False):
        self.kind = kind
        self.opt = _build(
            kind,
            [{"params": p, "lr": _lr_value(lr, p, device_lr), "base_lr": lr} for p, lr in groups if p],
            capturable=device_lr,
        )
        self._lrs = [g["lr"] for g in self.opt.param_groups]

    def set_lr(self, factor: float) -> None:
        for g in self.opt.param_groups:
            _set_group_lr(g, g["base_lr"] * factor)

    def step(self, scaler: Any = None) -> None:
        if scaler is not None:
            scaler.step(self.opt)
        else:
            self.opt.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)
        _keep_lr_tensors(self.opt, self._lrs)

    def close(self) -> None:
        pass


def _keep_lr_tensors(opt: torch.optim.Optimizer, lrs: list[Any]) -> None:
    """After ``load_state_dict`` put back the shared device LR tensors (loading replaces the groups' values)."""
    for group, own in zip(opt.param_groups, lrs, strict=True):
        if isinstance(own, torch.Tensor):
            loaded = group["lr"]
            own.fill_(float(loaded) if not isinstance(loaded, torch.Tensor) else loaded.item())
            group["lr"] = own


class BackwardStepOptim:
    """Per-tensor optimizers stepped inside backward as each gradient is ready (see module doc)."""

    in_backward = True

    def __init__(self, kind: str, groups: list[tuple[list[torch.nn.Parameter], float]], device_lr: bool = False):
        self.kind = kind
        self.opts: list[torch.optim.Optimizer] = []
        self.handles = []
        self._lrs: list[Any] = []
        for params, lr in groups:
            if not params:
                continue
            shared = _lr_value(lr, params, device_lr)  # one tensor per group: set_lr is one fill per group
            for p in params:
                opt = _build(kind, [{"params": [p], "lr": shared, "base_lr": lr}], capturable=device_lr)
                self.opts.append(opt)
                self._lrs.append(shared)
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook(opt)))

    @staticmethod
    def _hook(opt: torch.optim.Optimizer):
        def run(_param: torch.Tensor) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    def set_lr(self, factor: float) -> None:
        done: set[int] = set()
        for opt in self.opts:
            for g in opt.param_groups:
                if isinstance(g["lr"], torch.Tensor):
                    if id(g["lr"]) in done:
                        continue
                    done.add(id(g["lr"]))
                _set_group_lr(g, g["base_lr"] * factor)

    def step(self, scaler: Any = None) -> None:
        """Nothing to do: every tensor was already stepped during backward."""

    def zero_grad(self) -> None:
        """Gradients were freed by the hooks."""

    def state_dict(self) -> dict[str, Any]:
        return {"per_tensor": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt, sd, lr in zip(self.opts, state["per_tensor"], self._lrs, strict=True):
            opt.load_state_dict(sd)
            _keep_lr_tensors(opt, [lr])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def make_optim(
    kind: str, groups: list[tuple[list[torch.nn.Parameter], float]], in_backward: bool, device_lr: bool = False
) -> Optim | BackwardStepOptim:
    """An :class:`Optim`, or a :class:`BackwardStepOptim` when ``in_backward``.

    Args:
        kind: ``adamw8bit`` (bitsandbytes), ``adamw_lowmem`` (:mod:`.lowmem`), ``adamw_fused``, ``adamw``.
        groups: ``[(params, base_lr), ...]``.
        in_backward: step each tensor from its post-accumulate-grad hook (no full gradient set).
        device_lr: learning rates as device tensors and capturable optimizers (CUDA graphs).
    """
    if device_lr and kind not in CAPTURABLE:
        raise ValueError(f"optimizer {kind} cannot run inside a CUDA graph")
    cls = BackwardStepOptim if in_backward else Optim
    return cls(kind, groups, device_lr=device_lr)
