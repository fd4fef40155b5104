"""Memory settings of the built-in UI for SD1/SD2/SDXL by VRAM: attention slicing, VAE tiling, CPU offload.

(SD3.5 and FLUX.1 get a whole memory *plan*, quantization included, from :mod:`fastsd.models.memplan`.)
"""

from __future__ import annotations

from typing import Any

#: Memory settings by free-VRAM class: (up to GiB, families or () for any, settings). First match wins.
#: Families are :mod:`fastsd.models.detect`'s names.
MEMORY_PRESETS: tuple[tuple[float, tuple[str, ...], dict[str, bool]], ...] = (
    (0, (), {"attention_slicing": False, "vae_tiling": False, "cpu_offload": False}),  # CPU
    (6.5, (), {"attention_slicing": True, "vae_tiling": True, "cpu_offload": True}),
    (12.5, ("sd1", "sd2"), {"attention_slicing": False, "vae_tiling": True, "cpu_offload": False}),
    (12.5, (), {"attention_slicing": False, "vae_tiling": True, "cpu_offload": True}),
    # T4: T5 + the transformer leave little room; their VAEs tile only images over 1024 px (their sample_size)
    (20, ("sd3", "flux"), {"attention_slicing": False, "vae_tiling": True, "cpu_offload": True}),
    (20, ("sdxl",), {"attention_slicing": False, "vae_tiling": True, "cpu_offload": False}),
    (float("inf"), (), {"attention_slicing": False, "vae_tiling": False, "cpu_offload": False}),
)
MEMORY_KEYS = ("attention_slicing", "vae_tiling", "cpu_offload")


def vram_gib() -> float:
    """Total memory of the first CUDA GPU in GiB (0 without one), from :mod:`fastsd.runtime`."""
    from ..runtime import gpus

    found = gpus()
    return found[0].vram_total_gb if found else 0.0


def memory_settings(family: str, vram_gib: float, overrides: dict[str, Any] | None = None) -> dict[str, bool]:
    """Attention slicing / VAE tiling / CPU offload for a model family on a GPU of ``vram_gib``.

    ``overrides`` values of True/False replace the preset's; "auto" or None keep it. With no
    GPU (``vram_gib == 0``) everything is off: those settings only save GPU memory.
    """
    chosen: dict[str, bool] = {}
    for limit, fam, settings in MEMORY_PRESETS:
        if vram_gib <= limit and (not fam or family in fam):
            chosen = dict(settings)
            break
    for key, value in (overrides or {}).items():
        if key in MEMORY_KEYS and isinstance(value, bool):
            chosen[key] = value
    if vram_gib == 0:
        chosen["cpu_offload"] = False
    return chosen
