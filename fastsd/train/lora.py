"""LoRA adapters (peft) for the UNet, the SD3/FLUX transformer and text encoders, and the files they export to.

SD3/FLUX LoRAs export in diffusers' peft layout (:func:`diffusers_state_dict`); the UNet families in kohya's:

The kohya format is what A1111, Forge, ComfyUI and diffusers' ``load_lora_weights`` all read:
one ``.safetensors`` with, per adapted layer, ``<name>.lora_down.weight`` (A), ``<name>.lora_up.weight``
(B) and ``<name>.alpha``, where ``<name>`` is ``lora_unet_`` / ``lora_te_`` (SDXL: ``lora_te1_``,
``lora_te2_``) followed by the Diffusers module path with dots turned into underscores (the
"diffusers-named" kohya layout those loaders convert).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import storage

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: SD3/FLUX transformers: the image stream's projections and the context stream's (``add_*``), as
#: diffusers' DreamBooth LoRA scripts target them (FLUX's single blocks have ``attn.to_q/k/v`` only).
TRANSFORMER_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]

#: kohya file prefixes per (family, component).
PREFIXES = {
    "unet": "lora_unet",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
}
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
#: The peft adapter name fastsd trains under.
ADAPTER = "default"


def add_lora(model: Any, rank: int, alpha: float, component: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter (peft) into ``model``'s attention projections; returns its trainable tensors.

    The random initialisation is drawn from ``seed`` (not the global RNG), so two runs with the same
    seed start from, and end with, the same adapter.

    The adapter goes in through peft itself (``inject_adapter_in_model``), not through the
    ``add_adapter`` of diffusers/transformers models: transformers gates that method on a peft
    version of its choosing (5.24.0 asked for a peft that did not exist), while fastsd needs only
    peft's LoRA layers.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = {"unet": UNET_TARGETS, "transformer": TRANSFORMER_TARGETS}.get(component, TEXT_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for module in model.modules():
        if hasattr(module, "lora_A"):
            # peft copies every adapted layer's input to the adapter's dtype (fp32 here) and keeps the
            # copy for backward: ~1.2 GiB at SDXL 1024 px. Training runs under autocast, which casts
            # the tiny adapter weights instead.
            module.cast_input_dtype_enabled = False
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()  # fp32 masters even when the frozen base is bf16/fp16
    return params


def kohya_state_dict(
    modules: dict[str, Any], alpha: float, family: str, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The kohya LoRA tensors of the adapters in ``modules`` (component name -> peft-adapted model)."""
    out: dict[str, torch.Tensor] = {}
    for component, model in modules.items():
        prefix = PREFIXES[component]
        if component == "text_encoder" and family == "sdxl":
            prefix = "lora_te1"
        for module, down, up in lora_layers(model):
            if component != "unet" and not module.startswith("text_model."):
                # transformers 5 dropped CLIP's ``text_model.`` level; kohya names keep it
                module = f"text_model.{module}"
            name = f"{prefix}_{module.replace('.', '_')}"
            out[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def lora_layers(model: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(module path, A, B)`` for every peft LoRA layer of fastsd's adapter in ``model``."""
    found = []
    for path, module in model.named_modules():
        down, up = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if down is not None and up is not None and ADAPTER in down:
            found.append((path, down[ADAPTER].weight, up[ADAPTER].weight))
    return found


def diffusers_state_dict(
    model: Any, alpha: float, rank: int, prefix: str = "transformer", dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The adapters of ``model`` in the diffusers/peft layout: ``<prefix>.<module>.lora_A/lora_B.weight``.

    This is what ``pipe.load_lora_weights`` reads for SD3/FLUX, and what ComfyUI and Forge map
    (``transformer.<diffusers module>`` in comfy/lora.py's key map). The file has no alpha: loaders
    then scale by 1, so ``alpha / rank`` is folded into ``lora_B``.
    """
    scale = float(alpha) / rank
    out: dict[str, torch.Tensor] = {}
    for module, down, up in lora_layers(model):
        out[f"{prefix}.{module}.lora_A.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{prefix}.{module}.lora_B.weight"] = (up.detach().float() * scale).to("cpu", dtype).contiguous()
    return out


def save_diffusers(path: Path, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float, family: str) -> Path:
    """Write a diffusers-layout LoRA file safely (temp + fsync + sha256 verify + rename), with fastsd's metadata."""
    from safetensors.torch import save

    metadata = {
        "format": "pt",
        "fastsd_layout": "diffusers",
        "fastsd_family": family,
        "fastsd_rank": str(rank),
        "fastsd_alpha": str(alpha),  # already folded into lora_B
        "ss_training_comment": "trained with fastsd",
    }
    storage.write_bytes(path, save(tensors, metadata=metadata), verify_sha256=True)
    return path


def save_kohya(path: Path, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float, family: str) -> Path:
    """Write a kohya LoRA file safely (temp + fsync + sha256 verify + rename) with kohya's metadata keys."""
    from safetensors.torch import save

    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": BASE_VERSION.get(family, family),
        "ss_training_comment": "trained with fastsd",
    }
    storage.write_bytes(path, save(tensors, metadata=metadata), verify_sha256=True)
    return path
