"""Memory plans for SD3.5 and FLUX.1 generation: which weights in which precision, and what stays on the CPU.

:func:`choose_plan` is a pure function of (family, variant, VRAM GiB, RAM GiB, bf16 support): it
estimates each plan's resident VRAM and RAM from the parameter counts of the real models and takes
the first that fits, best quality first:

=========  ===========  ==========  =================================================
plan       transformer  T5          placement
=========  ===========  ==========  =================================================
fp16       fp16         fp16        everything on the GPU
fp16-t5i8  fp16         8-bit       on the GPU (T5 is 4.8 B parameters: 9.5 GB in fp16)
int8       8-bit        8-bit       on the GPU
nf4        NF4 (4-bit)  8-bit       on the GPU
nf4-t5nf4  NF4          NF4         on the GPU
offload    fp16         fp16        model CPU offload: one component on the GPU at a time
sequential fp16         fp16        sequential CPU offload: one layer on the GPU at a time
=========  ===========  ==========  =================================================

On a T4 (15 GB VRAM, 12.7 GB RAM, no bf16) that gives SD3.5 Medium ``fp16-t5i8`` (the MMDiT in fp16)
and SD3.5 Large and FLUX.1 ``nf4``. 8-bit and NF4 weights come from bitsandbytes through diffusers'
``PipelineQuantizationConfig`` (:func:`quantization_config`). How diffusers loads them without the
whole model in RAM: ``from_pretrained`` builds the model on the ``meta`` device, then for each
safetensors shard reads the tensors through an mmap (file-backed pages the kernel can drop, not
process memory) and moves each tensor to the GPU, where bitsandbytes quantizes it
(``load_model_dict_into_meta`` -> ``create_quantized_param``); the shard's mapping is then released.
So the fp16/bf16 model never exists whole in RAM, and RAM holds only what the plan offloads.
A plan that fits nowhere, or a forced plan that does not fit, is refused with one line naming the
setting (``fastsd_memory_plan``) to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserInputError
from .registry import FLOW_FAMILIES

#: Parameters (billions) of the real models' parts: the denoiser per (family, variant), text encoders per family.
TRANSFORMER_B = {
    ("sd3", "medium"): 2.47,
    ("sd3", "sd3.0-medium"): 2.03,
    ("sd3", "large"): 8.15,  # 8.06 B of blocks plus the saved 192x192 positional table (0.09 B)
    ("sd3", "large-turbo"): 8.15,
    ("flux", "dev"): 11.90,
    ("flux", "schnell"): 11.90,
}
CLIP_B = {"sd3": 0.124 + 0.695, "flux": 0.123}  # CLIP-L (+ OpenCLIP bigG for SD3)
T5_B = 4.76  # T5 v1.1 XXL encoder
VAE_B = 0.084
#: Bytes per parameter as stored on the GPU (NF4: 4 bits + block absmax, non-linear layers kept in fp16).
BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.06, "nf4": 0.56}
#: GiB a 1024 px image adds to the loaded weights (denoising with CFG where the family has it, then the VAE
#: decode), as the allocator reserves it: measured 2026-12-03 on an H200 under a T4's cap, eager, peak
#: reserved minus the loaded weights: SD3.5 Medium ~2.0 (2.58 with its graph's 0.58 GiB pool), FLUX.1-dev 3.04.
ACTIVATIONS_GIB = {"sd3": 2.0, "flux": 3.0}
CUDA_CONTEXT_GIB = 0.5
#: GiB the web UI's captured denoiser (:mod:`fastsd.webui.fastpath`) keeps in its graph's pool for as long
#: as the model is loaded, at 1024 px (measured 2026-12-03 on an H200: SD3.5 Medium with CFG 0.58,
#: FLUX.1-dev 1.11). Not in a plan's estimate: a plan without this much room left runs the denoiser eagerly.
GRAPH_POOL_GIB = {"sd3": 0.6, "flux": 1.1}
#: GiB the allocator held but could not use beside such a pool (a permanent pool splits the free memory):
#: 0.93 when SD3.5 Medium's fp16-t5i8 plan ran out under a 14.5 GiB cap with its graph, same day.
GRAPH_FRAGMENTATION_GIB = 1.0
#: RAM the process needs besides offloaded weights (Python, torch, CUDA host side, one tensor in flight).
PROCESS_RAM_GIB = 3.0
#: What a plan may use: a little under the card and the machine, as allocators fragment.
HEADROOM = 0.97
GIB = 1e9 / 2**30  # billions of bytes -> GiB

#: Pipeline component holding the T5 encoder, per family.
T5_COMPONENT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
PLAN_NAMES = ("fp16", "fp16-t5i8", "int8", "nf4", "nf4-t5nf4", "offload", "sequential")
SETTING = "fastsd_memory_plan"  # the web UI option; `fastsd webui --memory-plan` sets it
SETTING_HOW = f"{SETTING} (fastsd webui --memory-plan)"


@dataclass(frozen=True)
class MemoryPlan:
    """How to load and place an SD3/FLUX pipeline.

    Attributes:
        name: one of :data:`PLAN_NAMES` (``cpu`` when there is no GPU).
        transformer: ``fp16``/``bf16``/``fp32``, ``int8`` or ``nf4``.
        t5: the T5 encoder's weights, same vocabulary.
        offload: ``none``, ``model`` (diffusers' ``enable_model_cpu_offload``) or ``sequential``.
        compute_dtype: ``float16``, ``bfloat16`` or ``float32`` (bf16 only on GPUs that have it).
        vram_gib: estimated peak VRAM.
        ram_gib: estimated RAM.
    """

    name: str
    transformer: str
    t5: str
    offload: str
    compute_dtype: str
    vram_gib: float
    ram_gib: float

    def describe(self) -> str:
        """One line for logs and the UI: ``nf4: transformer nf4, T5 int8, on the GPU (~11.9 GiB VRAM, ~3.0 GiB RAM)``."""
        where = {"none": "on the GPU", "model": "model CPU offload", "sequential": "sequential CPU offload"}
        if self.name == "cpu":  # no GPU: everything runs in fp32 on the CPU
            where["none"] = "on the CPU"
        return (
            f"{self.name}: transformer {self.transformer}, T5 {self.t5}, {where.get(self.offload, self.offload)} "
            f"(~{self.vram_gib:.1f} GiB VRAM, ~{self.ram_gib:.1f} GiB RAM)"
        )


_SPECS = {  # name -> (transformer, t5, offload); "half" is fp16 or bf16 by the GPU
    "fp16": ("half", "half", "none"),
    "fp16-t5i8": ("half", "int8", "none"),
    "int8": ("int8", "int8", "none"),
    "nf4": ("nf4", "int8", "none"),
    "nf4-t5nf4": ("nf4", "nf4", "none"),
    "offload": ("half", "half", "model"),
    "sequential": ("half", "half", "sequential"),
}


#: (transformer, T5, everything else) in billions of parameters.
Sizes = tuple[float, float, float]


def model_sizes(family: str, variant: str) -> Sizes:
    """The real model's :data:`Sizes` (an unknown variant: the family's first)."""
    key = (family, variant)
    if key not in TRANSFORMER_B:
        key = next(k for k in TRANSFORMER_B if k[0] == family)
    return TRANSFORMER_B[key], T5_B, CLIP_B[family] + VAE_B


def folder_sizes(folder: Any, family: str) -> Sizes:
    """:data:`Sizes` of a Diffusers folder from its safetensors headers (no weights read)."""
    from pathlib import Path

    from .detect import tensor_infos, weight_files

    def billions(component: str) -> float:
        path = Path(folder) / component
        if not path.is_dir():
            return 0.0
        infos, _ = tensor_infos(weight_files(path))
        return sum(i.nbytes // max(i.dtype.itemsize, 1) for i in infos.values()) / 1e9

    t5 = T5_COMPONENT[family]
    rest = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    return billions("transformer"), billions(t5), sum(billions(c) for c in rest if c != t5)


def estimate(family: str, variant: str, name: str, *, bf16: bool = False, sizes: Sizes | None = None) -> MemoryPlan:
    """The plan ``name``'s estimated peak VRAM and RAM for ``family``/``variant`` (see :data:`TRANSFORMER_B`)."""
    half = "bf16" if bf16 else "fp16"
    tr_kind, t5_kind, offload = _SPECS[name]
    tr_kind, t5_kind = (half if k == "half" else k for k in (tr_kind, t5_kind))
    tr_b, t5_b, rest_b = sizes or model_sizes(family, variant)
    tr, t5, rest = tr_b * BYTES[tr_kind] * GIB, t5_b * BYTES[t5_kind] * GIB, rest_b * BYTES[half] * GIB
    act = ACTIVATIONS_GIB[family] + CUDA_CONTEXT_GIB
    if offload == "none":
        vram, ram = tr + t5 + rest + act, PROCESS_RAM_GIB
    elif offload == "model":  # the largest component on the GPU at a time; all of them in RAM
        vram, ram = max(tr, t5, rest) + act, PROCESS_RAM_GIB + tr + t5 + rest
    else:  # one block at a time on the GPU
        vram, ram = act + 0.5, PROCESS_RAM_GIB + tr + t5 + rest
    return MemoryPlan(name, tr_kind, t5_kind, offload, "bfloat16" if bf16 else "float16", vram, ram)


def room_for_graph(plan: MemoryPlan, family: str, vram_gib: float) -> bool:
    """Whether a GPU of ``vram_gib`` holds ``plan``, the captured denoiser's pool (:data:`GRAPH_POOL_GIB`) and
    the memory that pool strands (:data:`GRAPH_FRAGMENTATION_GIB`).

    Under a T4's memory the pool beside a tight plan ran the second 1024 px image out of memory (SD3.5
    Medium fp16-t5i8, FLUX.1-dev nf4); FLUX.1 in nf4, run eagerly, fitted (14.03 GiB of a 14.74 GiB cap).
    """
    need = plan.vram_gib + GRAPH_POOL_GIB[family] + GRAPH_FRAGMENTATION_GIB
    return plan.offload == "none" and need <= vram_gib * HEADROOM


def choose_plan(
    family: str,
    variant: str,
    vram_gib: float,
    ram_gib: float,
    *,
    bf16: bool = False,
    want: str | None = None,
    sizes: Sizes | None = None,
) -> MemoryPlan:
    """The best plan that fits a GPU of ``vram_gib`` and a machine of ``ram_gib`` (a pure function).

    Args:
        family: ``sd3`` or ``flux`` (:mod:`fastsd.models.detect`'s names).
        variant: the detected variant (``medium``, ``large``, ``large-turbo``, ``dev``, ``schnell``).
        vram_gib: the GPU's memory; 0 means no GPU (plan ``cpu``: fp32, nothing quantized).
        ram_gib: the machine's memory.
        bf16: the GPU computes in bf16 (Ampere and newer; a T4 does not).
        want: a plan name to force (``auto``/None chooses).
        sizes: the model's measured :data:`Sizes` (:func:`folder_sizes`); default the real model's.

    Raises:
        UserInputError: ``want`` is unknown or does not fit, or no plan fits; the message names the
            setting to change.
    """
    if family not in FLOW_FAMILIES:
        raise UserInputError(f"memory plans are for SD3/FLUX models, not {family}")
    if want not in (None, "", "auto") and want not in PLAN_NAMES:
        raise UserInputError(f"unknown {SETTING} {want!r}: use auto or one of {', '.join(PLAN_NAMES)}")
    if vram_gib <= 0:
        need = PROCESS_RAM_GIB + sum(sizes or model_sizes(family, variant)) * BYTES["fp32"] * GIB
        if need > ram_gib * HEADROOM:
            raise UserInputError(
                f"{family} {variant} on the CPU needs ~{need:.0f} GiB RAM in fp32, this machine has {ram_gib:.1f}: "
                "use a GPU runtime (fastsd_memory_plan applies to GPUs only)"
            )
        return MemoryPlan("cpu", "fp32", "fp32", "none", "float32", 0.0, need)
    names = PLAN_NAMES if want in (None, "", "auto") else (want,)  # best first
    tried = []
    for name in names:
        plan = estimate(family, variant, name, bf16=bf16, sizes=sizes)
        if plan.vram_gib <= vram_gib * HEADROOM and plan.ram_gib <= ram_gib * HEADROOM:
            return plan
        tried.append(plan)
    if want not in (None, "", "auto"):
        p = tried[0]
        raise UserInputError(
            f"{SETTING} {want} needs ~{p.vram_gib:.1f} GiB VRAM and ~{p.ram_gib:.1f} GiB RAM for {family} {variant}; "
            f"this machine has {vram_gib:.1f} GiB VRAM and {ram_gib:.1f} GiB RAM: set {SETTING_HOW} to auto"
        )
    smallest = min(tried, key=lambda p: p.ram_gib)
    raise UserInputError(
        f"{family} {variant} fits no memory plan here ({vram_gib:.1f} GiB VRAM, {ram_gib:.1f} GiB RAM; the smallest, "
        f"{smallest.name}, needs ~{smallest.ram_gib:.1f} GiB RAM): use a machine with more RAM or VRAM"
    )


def quantization_config(plan: MemoryPlan, family: str) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` for ``plan`` (bitsandbytes), or None when nothing is quantized.

    The transformer gets diffusers' ``BitsAndBytesConfig``, the T5 encoder transformers' (the two
    libraries each have their own class).
    """
    import torch
    from diffusers import PipelineQuantizationConfig
    from transformers import BitsAndBytesConfig as TransformersBnb

    compute = getattr(torch, plan.compute_dtype)
    mapping: dict[str, Any] = {}
    if plan.transformer in ("nf4", "int8"):
        mapping["transformer"] = transformer_quantization(plan.transformer, compute)
    if plan.t5 in ("nf4", "int8"):
        mapping[T5_COMPONENT[family]] = _bnb(TransformersBnb, plan.t5, compute)
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def transformer_quantization(kind: str, compute: Any) -> Any:
    """diffusers' ``BitsAndBytesConfig`` for an SD3/FLUX transformer in ``nf4`` or ``int8`` (plans and QLoRA)."""
    from diffusers import BitsAndBytesConfig

    return _bnb(BitsAndBytesConfig, kind, compute)


def _bnb(cls: Any, kind: str, compute: Any) -> Any:
    """A bitsandbytes config of ``cls``: NF4 computing in ``compute`` (fp16 on a T4) with double quantization
    (the absmax scales quantized too: ~0.4 bits/parameter less), or 8-bit."""
    if kind == "nf4":
        return cls(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                   bnb_4bit_use_double_quant=True)  # fmt: skip
    return cls(load_in_8bit=True)


def machine() -> tuple[float, float, bool]:
    """(VRAM GiB of GPU 0 or 0, RAM GiB, bf16 support) of this machine, for :func:`choose_plan` (from :mod:`fastsd.runtime`)."""
    from ..runtime import gpus, ram_gb

    found = gpus()
    ram = ram_gb()["total_gb"]
    if not found:
        return 0.0, ram, False
    return found[0].vram_total_gb, ram, found[0].bf16
