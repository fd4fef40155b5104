"""VRAM planning: turn gradient checkpointing and the in-backward optimizer step on only when the budget needs them.

The estimate is parameters and optimizer state (exact, from the loaded models) plus activations
(a per-family table measured at the native resolution, batch 1, 16-bit, scaled by pixels and batch).
The loop also retries the first step with full checkpointing if it runs out of memory anyway.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any

import torch

GIB = 1024**3

#: Activation memory of one training step, GiB, at the family's native resolution, batch 1, bf16, no
#: checkpointing. Measured on an H100 (torch 2.11): SD1.5 full at 512 px peaked 13.27 GiB with fused
#: AdamW (3.2 masters + 6.4 state + 3.6 = 16-bit weight casts 1.6 + activations 2.0); SDXL LoRA at
#: 1024 px peaked 17.74 GiB (4.8 frozen bf16 weights + 12.9, of which ~1.2 GiB were peft's fp32
#: copies of every adapted layer's input, no longer made: see lora.add_lora). SD3.5 Medium LoRA at
#: 1024 px, fp16, eager, on an H200 under a T4's cap (2026-12-04): the steps allocated 12.71 GiB over
#: the 4.73 of the frozen transformer and the adapters, 7.98 GiB of activations. flux: still a rough
#: guess at 1024 px LoRA, so that the planner checkpoints on small GPUs.
ACTIVATIONS_GIB = {"sd1": 2.0, "sd2": 2.0, "sd2-v": 4.5, "sdxl": 11.7, "sd3": 8.0, "flux": 18.0}

#: What the allocator reserves beyond what is allocated, kept out of the budget the planner fills: max of
#: this many GiB and :data:`FRAGMENTATION_SHARE` of the budget. Measured as reserved less allocated over a
#: first (eager) step on an H200 (2026-12-03): SD1.5 LoRA 0.24, SDXL LoRA 0.34, SD1.5 full 0.56 GiB.
FRAGMENTATION_GIB = 0.5
FRAGMENTATION_SHARE = 0.05
#: VRAM (GiB) one sample image takes beside the training state at the family's native resolution,
#: batch 1: the denoiser's inference activations and the VAE decode (fp32 where the VAE must be).
#: Measured on an H200 as the sample phase's allocated peak less the steps': SD1.5 LoRA 0.76 at 512 px
#: (2026-12-03), SDXL LoRA on the T4 preset 5.1 at 1024 px with the whole decode, 1.5 with it tiled
#: (2026-12-04; :mod:`.sampling` tiles on budgets of 20 GiB and less). sd2-v/sd3/flux: scaled guesses.
IMAGE_GIB = {"sd1": 0.8, "sd2": 0.8, "sd2-v": 1.8, "sdxl": 5.1, "sd3": 5.1, "flux": 6.0}
#: Fraction of activation memory that remains with every block checkpointed.
CHECKPOINTED_FRACTION = 0.2
#: Optimizer state bytes per trainable parameter.
STATE_BYTES = {"adamw8bit": 2, "adamw_lowmem": 2, "adamw_fused": 8, "adamw": 8}


def plan(
    *,
    budget_gb: float | None,
    family_key: str,
    pixels_ratio: float,
    batch: int,
    trainable: int,
    frozen_bytes: int,
    optimizer: str,
    low_precision: bool,
    allow_in_backward: bool,
    checkpointing: str,
    fused_backward: bool | None,
    graphed: bool = False,
    master_bytes: int = 4,
) -> dict[str, Any]:
    """Choose checkpointing fraction (0..1) and in-backward stepping for a VRAM budget.

    ``master_bytes``: bytes per trained weight, 4 for fp32 masters, 2 for 16-bit weights (whose
    gradients are 16-bit too, and which autocast uses as they are, with no casts).

    ``graphed``: the step is a CUDA graph replay, whose pool keeps every block the step ever held
    (the casts and activations freed in backward are not reused for the gradients), so the peak
    counts the gradients in full.

    Returns:
        ``{"checkpoint_fraction", "fused_backward", "estimate_gb"}``; with no budget (CPU) nothing
        is turned on that was not asked for.
    """
    act = ACTIVATIONS_GIB.get(family_key, 2.0) * pixels_ratio * batch * GIB
    # autocast's 16-bit copies of fp32 masters live until backward (16-bit weights are used as they are)
    casts = trainable * 2 if low_precision and master_bytes == 4 else 0

    def fixed(in_backward: bool) -> float:
        # the 16-bit weight casts are freed as backward consumes them while the gradients appear, so
        # (measured) the peak holds either casts + activations or the full gradients, not both
        # (eager: measured; a graph's pool holds both: the SD1.5 full T4 preset reserved 13.7 GiB where the
        # either-or estimate said 9.3, H200 2026-12-04)
        full_grads = trainable * master_bytes
        grads = 0 if in_backward else full_grads if graphed else max(0.0, full_grads - casts - act)
        return trainable * (master_bytes + STATE_BYTES.get(optimizer, 8)) + grads + casts + frozen_bytes

    in_backward = bool(fused_backward) and allow_in_backward
    fraction = {"on": 1.0, "off": 0.0}.get(checkpointing, 0.0)
    if budget_gb is not None:
        budget = budget_gb * GIB - fragmentation_gib(budget_gb) * GIB
        if fused_backward is None and allow_in_backward and fixed(False) + act > budget:
            in_backward = True
        if checkpointing == "auto":
            room = budget - fixed(in_backward)
            if act > room:
                saved_per_unit = act * (1 - CHECKPOINTED_FRACTION)
                fraction = min(1.0, max(0.0, (act - room) / saved_per_unit) + 0.1)
                fraction = round(min(1.0, fraction), 2)
    estimate = fixed(in_backward) + act * (1 - fraction * (1 - CHECKPOINTED_FRACTION))
    return {"checkpoint_fraction": fraction, "fused_backward": in_backward, "estimate_gb": round(estimate / GIB, 2)}


def fragmentation_gib(budget_gb: float) -> float:
    """The part of a VRAM budget the allocator's fragmentation takes (planned for nothing else)."""
    return max(FRAGMENTATION_GIB, FRAGMENTATION_SHARE * budget_gb)


def room_for_images(*, estimate_gb: float, budget_gb: float | None, family_key: str, pixels_ratio: float) -> bool:
    """Whether sample images (or an export) between steps fit beside a CUDA graph's pool.

    A captured step keeps its activations' pool reserved between replays, so what runs between two
    steps needs its memory on top of the steps' (with eager steps it reuses their freed blocks).
    Without the room the loop releases the graph first and captures again after.
    """
    if budget_gb is None:
        return True
    need = estimate_gb + IMAGE_GIB.get(family_key, 1.0) * pixels_ratio
    return need <= budget_gb - fragmentation_gib(budget_gb)


def _level_weights(unet: Any) -> list[tuple[float, Any]]:
    """(activation weight, module) for every module that supports checkpointing, biggest first."""
    out: list[tuple[float, Any]] = []
    n = len(unet.down_blocks)
    levels = [(b, i) for i, b in enumerate(unet.down_blocks)] + [(b, n - 1 - i) for i, b in enumerate(unet.up_blocks)]
    levels.append((unet.mid_block, n - 1))
    for block, level in levels:
        if block is None:
            continue
        area = 4.0**-level
        resnets = getattr(block, "resnets", [])
        if hasattr(block, "gradient_checkpointing") and resnets:
            out.append((resnets[0].out_channels * len(resnets) * area * 2, block))
        for attn in getattr(block, "attentions", []) or []:
            if hasattr(attn, "gradient_checkpointing"):
                depth = len(getattr(attn, "transformer_blocks", [1]))
                out.append((attn.config.in_channels * depth * area * 4, attn))
    out.sort(key=lambda t: -t[0])
    return out


def apply_checkpointing(unet: Any, fraction: float) -> int:
    """Checkpoint the blocks holding the largest activations until ``fraction`` of them is covered.

    An SD3/FLUX transformer checkpoints all of its blocks or none (diffusers gates it per model).

    Returns:
        How many blocks are checkpointed.
    """
    if not hasattr(unet, "down_blocks"):
        return _checkpoint_transformer(unet, fraction)
    if fraction <= 0:
        if getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        return 0
    # no RNG stash/restore around recomputation: SD UNets draw no random numbers in forward (dropout
    # 0), and reading the CUDA RNG state is not allowed while a CUDA graph is being captured
    unet.enable_gradient_checkpointing(
        gradient_checkpointing_func=functools.partial(_checkpoint, use_reentrant=False, preserve_rng_state=False)
    )
    weights = _level_weights(unet)
    total = sum(w for w, _ in weights) or 1.0
    covered = 0.0
    count = 0
    for w, module in weights:
        keep = covered < fraction * total - 1e-9
        module.gradient_checkpointing = keep
        if keep:
            covered += w
            count += 1
    return count


def _checkpoint_transformer(transformer: Any, fraction: float) -> int:
    """Every block of an SD3/FLUX transformer recomputed in backward when ``fraction`` > 0; the block count."""
    if fraction <= 0:
        if getattr(transformer, "is_gradient_checkpointing", False):
            transformer.disable_gradient_checkpointing()
        return 0
    transformer.enable_gradient_checkpointing()
    blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]
    return len(blocks)


def _checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated memory on a CUDA device in GiB (None elsewhere)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2)


class PhaseMeter:
    """Wall time and peak VRAM (allocated and reserved) of each phase of a run, for the whole process.

    ``fastsd train`` reports these so a user sees what the whole command costs, not only the loop:
    model load, latent and embedding caching, the first step (autotuning, capture), the steps,
    checkpoints, sampling and export. Times of a phase entered several times (checkpoints) add up;
    peaks are the maximum over its entries. On a CUDA device a phase ends with a synchronisation,
    so its time is the GPU's too (phases are few: this costs nothing per step).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._t = 0.0

    def start(self, name: str) -> None:
        """End the current phase (if any) and start ``name``."""
        import time

        self.stop()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._name, self._t = name, time.perf_counter()

    def stop(self) -> None:
        """End the current phase: add its time and fold its peak into the phase's."""
        import time

        if self._name is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        name, self._name = self._name, None
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - self._t, 3)
        if self.device.type == "cuda":
            now = {
                "allocated_gb": round(torch.cuda.max_memory_allocated(self.device) / GIB, 2),
                "reserved_gb": round(torch.cuda.max_memory_reserved(self.device) / GIB, 2),
            }
            old = self.peaks.get(name, {})
            self.peaks[name] = {k: max(v, old.get(k, 0.0)) for k, v in now.items()}

    @contextlib.contextmanager
    def phase(self, name: str) -> Any:
        """Measure a nested phase (a checkpoint inside the steps) and go back to the outer one."""
        outer = self._name
        self.start(name)
        try:
            yield
        finally:
            self.stop()
            if outer is not None:
                self.start(outer)

    def process_peak(self) -> dict[str, float]:
        """The whole run's peak: the maximum over all phases."""
        out: dict[str, float] = {}
        for p in self.peaks.values():
            for k, v in p.items():
                out[k] = max(v, out.get(k, 0.0))
        return out


def oom_outside_steps(err: Exception) -> Exception:
    """CUDA out of memory outside the training steps (there :func:`oom_error` says more) as one line.

    Seen under a hard 10 GiB cap for SDXL LoRA after the step's CUDA graph took its pool (issue 16).
    """
    from ..errors import FastsdError

    asked = re.search(r"Tried to allocate [\d.]+ [KMG]iB", str(err))
    return FastsdError(
        f"CUDA out of memory outside the training steps{f' ({asked.group(0)})' if asked else ''}: lower "
        "--vram-budget (the planner then leaves more room), or try --method lora or a lower --resolution"
    )


def oom_error(c: Any, step: int, device: torch.device, save: Any) -> Exception:
    """After CUDA out of memory: save what can be saved (``save(step)``, or None) and say which setting to lower."""
    from ..errors import FastsdError

    peak = peak_gb(device)
    torch.cuda.empty_cache()
    saved = ""
    if save is not None and step > 0:
        save(step)
        saved = f"; state saved at step {step} (continue with --resume)"
    tips = []
    if c.batch_size > 1:
        tips.append("--batch-size 1")
    if c.gradient_checkpointing != "on":
        tips.append("--gradient-checkpointing on")
    if c.optimizer != "adamw8bit":
        tips.append("--optimizer adamw8bit")
    if c.method == "full":
        tips.append("--method lora")
    tips.append(f"a lower --resolution than {c.resolution}")
    return FastsdError(f"CUDA out of memory at step {step} (peak {peak} GiB){saved}: try {', or '.join(tips)}")
