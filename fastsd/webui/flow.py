"""What generation does differently for the flow-matching families (SD3.5, FLUX.1), beside the A1111 core.

The memory plan (:mod:`fastsd.models.memplan`) is chosen from this machine before the model loads,
so a plan that cannot fit is refused with one line instead of an out-of-memory crash mid-load.
FLUX's pipeline takes no negative prompt at guidance 1 (it is guidance-distilled), schnell reads at
most 256 T5 tokens, and FLUX returns its latents packed in 2x2 patches, unpacked here before the
shared decoder.
"""

from __future__ import annotations

from typing import Any

from ..models import memplan

#: T5 tokens per family/variant (FLUX.1-schnell was distilled at 256; the others read 512; SD3 256).
MAX_SEQUENCE = {("flux", "schnell"): 256, ("flux", "dev"): 512, ("sd3", ""): 256}


def plan_for(path: Any, family: str, variant: str, device: str, want: Any) -> tuple[memplan.MemoryPlan, Any, Any]:
    """(plan, torch dtype, diffusers quantization config or None) for loading the model at ``path`` on ``device``.

    The sizes are measured from a Diffusers folder's headers (a fine-tune or a small test model is
    planned for what it is); a single file is planned as the real model of its variant.

    Raises:
        UserInputError: the plan does not fit (names ``fastsd_memory_plan``).
    """
    import torch

    vram, ram, bf16 = memplan.machine()
    if not device.startswith("cuda"):
        vram = 0.0
    from pathlib import Path

    sizes = memplan.folder_sizes(path, family) if Path(path).is_dir() else None
    want = None if want in (None, "auto") else want
    plan = memplan.choose_plan(family, variant, vram, ram, bf16=bf16, want=want, sizes=sizes)
    quantization = memplan.quantization_config(plan, family) if device.startswith("cuda") else None
    return plan, getattr(torch, plan.compute_dtype), quantization


def adjust_kwargs(kwargs: dict[str, Any], family: str, variant: str, warnings: list[str]) -> None:
    """Make the A1111-shaped call fit the SD3/FLUX pipeline (in place); what was dropped goes to ``warnings``."""
    if family == "flux":
        negative = kwargs.pop("negative_prompt", None)
        if negative and any(negative):
            warnings.append("FLUX.1 is guidance-distilled and takes no negative prompt: it was ignored")
        kwargs["max_sequence_length"] = MAX_SEQUENCE.get((family, variant), 512)


def unpack_latents(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """FLUX's packed ``(batch, tokens, 64)`` latents as ``(batch, 16, h/8, w/8)`` for the VAE."""
    return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
