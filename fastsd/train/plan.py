"""The run's memory and speed plan: what the loop turns on, decided once before the first step.

:func:`make_plan` asks :func:`fastsd.train.memory.plan` for gradient checkpointing and the
in-backward optimizer step under the VRAM budget, applies the checkpointing, resolves the
optimizer, decides the CUDA-graph step (:mod:`.graph`) and the memory layout. The result is a
:class:`TrainPlan`; ``TrainResult.plan`` keeps it and ``fastsd train --json`` prints
:meth:`TrainPlan.to_dict` (keys read by ``benchmarks/e2e.py``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from ..errors import UserInputError
from ..models.registry import FLOW_FAMILIES
from ..runtime import env_switch
from . import graph, memory, optim

log = logging.getLogger(__name__)

#: below this many eager steps the autotuning's cold-start cost is not repaid
AUTOTUNE_MIN_STEPS = 200


@dataclass
class TrainPlan:
    """What the run does to fit and to go fast (the JSON keys of ``fastsd train --json``'s ``plan``)."""

    checkpoint_fraction: float  # share of UNet blocks recomputed in backward (0..1)
    fused_backward: bool  # optimizer step inside backward
    estimate_gb: float  # the planner's VRAM estimate
    checkpointed_blocks: int = 0
    optimizer: str = "adamw"  # the optimizer kind actually used
    precision: str = "fp32"
    master_weights: str = "fp32"  # a full fine-tune's trained weights: fp32 masters or 16-bit (stochastic rounding)
    bucketed: bool = False  # aspect-ratio buckets
    cuda_graph: bool = False  # the step is a CUDA graph replay
    channels_last: bool = False
    cuda_graph_captured: bool | None = None  # after the run, when cuda_graph: whether capture happened
    cuda_graph_captures: int | None = None  # after the run: captures (more than 1 when released for images)
    cuda_graph_failed: str | None = None  # why capture failed (the run went on eagerly)
    checkpoints_in_background: int | None = None  # after the run: states written on a thread (the rest in place)
    images_beside_graph: bool = True  # mid-run samples/exports fit beside the graph's pool (else it is released)
    notes: list[str] = field(default_factory=list)  # choices the plan made for the user, and why
    qlora: bool = False  # SD3/FLUX: the frozen transformer is NF4 (bitsandbytes)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready keys; the after-the-run keys only once the run has ended."""
        out = asdict(self)
        for key in ("cuda_graph_captured", "cuda_graph_captures", "cuda_graph_failed", "checkpoints_in_background"):
            if out[key] is None:
                del out[key]
        return out

    def in_words(self, c: Any, device: str) -> str:
        """The plan as one sentence a person reads."""
        what = f"LoRA rank {c.lora_rank}" if c.method == "lora" else "full fine-tune"
        parts = [f"plan: {what} on {device} in {self.precision} with the {self.optimizer} optimizer"]
        if self.master_weights == "16bit":
            parts.append(f"{self.precision} weights updated with stochastic rounding (no fp32 copy)")
        blocks = self.checkpointed_blocks
        parts.append(f"gradient checkpointing on {blocks} UNet block(s)" if blocks else "no gradient checkpointing")
        if self.qlora:
            parts.append("the frozen transformer in NF4 (QLoRA)")
        if self.fused_backward:
            parts.append("optimizer step inside backward (saves the gradients' memory)")
        if self.cuda_graph:
            parts.append("the whole step replayed as a CUDA graph")
        if self.bucketed:
            parts.append("aspect-ratio buckets")
        if self.channels_last:
            parts.append("channels-last layout")
        if device == "cuda" and self.estimate_gb:
            parts.append(f"about {self.estimate_gb:.1f} GiB of VRAM")
        parts += self.notes
        return "; ".join(parts)


def make_plan(
    c: Any,
    facts: dict[str, Any],
    unet: Any,
    *,
    trainable: int,
    device: torch.device,
    world: int,
    bucketed: bool,
    scaler: Any,
) -> TrainPlan:
    """Plan the run and apply its gradient checkpointing to ``unet`` (LoRA already added: its size counts).

    The optimizer is the one asked for, except: the T4 preset's bitsandbytes AdamW becomes
    ``adamw_lowmem`` to graph its step (:func:`_lowmem_for_graph`), and a preset's fp32-state AdamW
    (8 bytes per weight) becomes ``adamw_lowmem`` (2) when the budget cannot hold it otherwise.

    Raises:
        UserInputError: the run cannot fit its VRAM budget even so (one line naming what to change).
    """
    full = c.method == "full"
    frozen_bytes = sum(p.numel() * p.element_size() for p in unet.parameters() if not full)
    family_key = "sd2-v" if facts["native_resolution"] == 768 else facts["family"]
    budget = c.vram_budget_gb if device.type == "cuda" else None
    ratio = (c.resolution / facts["native_resolution"]) ** 2
    blockers = partial(graph.blockers, device=device, precision=c.precision, grad_accum=c.grad_accum, world=world,
                       bucketed=bucketed)  # fmt: skip

    def estimate_with(kind: str) -> dict[str, Any]:
        return memory.plan(
            budget_gb=budget,
            family_key=family_key,
            pixels_ratio=ratio,
            batch=c.batch_size * (2 if c.prior_preservation else 1),
            trainable=trainable,
            frozen_bytes=frozen_bytes,
            optimizer=kind,
            low_precision=c.precision != "fp32",
            allow_in_backward=scaler is None and c.grad_accum == 1 and world == 1,
            checkpointing=c.gradient_checkpointing,
            fused_backward=c.fused_backward,
            graphed=graph.decide(c.cuda_graph, blockers(optimizer=kind), warn=False),
            master_bytes=2 if c.master_weights == "16bit" else 4,
        )

    notes = []
    kind = optim.resolve_kind(c.optimizer, device)
    if _lowmem_for_graph(c, kind, blockers):
        kind = "adamw_lowmem"
        notes.append(
            "adamw_lowmem instead of bitsandbytes' adamw8bit (same 8-bit moments), which cannot be replayed in "
            "a CUDA graph (host step counter) nor skip an fp16 overflow on the device; --cuda-graph off keeps it"
        )
    estimate = estimate_with(kind)
    if budget and estimate["estimate_gb"] > budget and facts.get("optimizer_from_preset") and kind in FP32_STATE:
        lean = estimate_with("adamw_lowmem")
        notes.append(
            f"adamw_lowmem (8-bit moments) instead of the preset's {kind}, whose 8 bytes of state per weight do not "
            f"fit --vram-budget {budget:g} (about {estimate['estimate_gb']:.1f} GiB)"
        )
        kind, estimate = "adamw_lowmem", lean
    if budget and estimate["estimate_gb"] > budget:
        raise UserInputError(_over_budget(c, kind, estimate["estimate_gb"], budget))
    p = TrainPlan(**estimate, notes=notes)
    p.checkpointed_blocks = memory.apply_checkpointing(unet, p.checkpoint_fraction)
    p.optimizer = kind
    p.precision = c.precision
    p.master_weights = c.master_weights
    p.bucketed = bucketed
    p.cuda_graph = graph.decide(c.cuda_graph, blockers(optimizer=p.optimizer))
    if p.cuda_graph:
        p.images_beside_graph = memory.room_for_images(
            estimate_gb=p.estimate_gb, budget_gb=budget, family_key=family_key, pixels_ratio=ratio
        )
        if not p.images_beside_graph and (c.sample_every or c.export_every):
            p.notes.append(
                "the graph is released for mid-run samples and exports (no room beside it) and captured again"
            )
    p.channels_last = c.channels_last and facts["family"] not in FLOW_FAMILIES  # a transformer has no conv stack
    if p.channels_last and c.compile == "blocks":
        # compiled blocks + channels_last weights crashed on the H100 (inductor's stride asserts
        # saw contiguous weights); compiling the whole UNet handles the layout, blocks do not
        p.channels_last = False
        log.info("channels_last is off with compile=blocks")
    return p


#: Optimizers keeping fp32 moments (8 bytes per trained weight).
FP32_STATE = ("adamw_fused", "adamw")


def _over_budget(c: Any, kind: str, need_gb: float, budget_gb: float) -> str:
    """The one line for a run that cannot fit its budget, naming the settings that would make it fit."""
    tips = []
    if c.gradient_checkpointing == "off":
        tips.append("--gradient-checkpointing auto")
    if kind in FP32_STATE:
        tips.append("--optimizer adamw_lowmem")
    if c.method == "full" and c.master_weights != "16bit" and c.precision != "fp32":
        tips.append("--master-weights 16bit" + (" --optimizer adamw_lowmem" if kind != "adamw_lowmem" else ""))
    if c.batch_size > 1:
        tips.append("--batch-size 1")
    if c.method == "full":
        tips.append("--method lora")
    tips.append(f"a lower --resolution than {c.resolution}")
    return (
        f"this run needs about {need_gb:.1f} GiB of VRAM, over its --vram-budget of {budget_gb:g} GiB "
        f"(with {kind}{', every block checkpointed' if c.gradient_checkpointing != 'off' else ''}): "
        f"try {', or '.join(tips)}"
    )


def _lowmem_for_graph(c: Any, kind: str, blockers: Any) -> bool:
    """Whether an fp16 run (the T4 preset) swaps bitsandbytes' 8-bit AdamW for ``adamw_lowmem`` to graph its step.

    The T4 preset's 8-bit AdamW is the one thing that keeps its step eager: bitsandbytes steps with
    a host step counter and ignores ``found_inf``. ``adamw_lowmem`` keeps the same 2 bytes of state
    per weight and does both on the device. Only when nothing else blocks the graph, and not with
    ``cuda_graph=off``.
    """
    return (
        c.precision == "fp16"
        and kind == "adamw8bit"
        and c.cuda_graph != "off"
        and not blockers(optimizer="adamw_lowmem")
    )


def autotune(steps: int, graphed: bool) -> bool:
    """Whether to let cuDNN autotune the loop's convolutions (``FASTSD_CUDNN_BENCHMARK=0/1`` overrides).

    Autotuning tries every algorithm for each of the UNet's convolution shapes on the first step
    (forward and both backward passes). Measured on an H200 (SD1.5 UNet, bf16, CUDA graph): the
    first step took 14.5 s with it and 2.5 s without, and the replayed steps ran at the same
    26.5 it/s, so a graphed run never autotunes. An eager run autotunes only when its
    steps are many enough to repay a cold start.
    """
    told = env_switch("FASTSD_CUDNN_BENCHMARK")
    return (not graphed and steps >= AUTOTUNE_MIN_STEPS) if told is None else told
