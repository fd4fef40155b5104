"""The base model's parts as training uses them: what loads, what trains, and what each phase trains.

:class:`BaseModel` loads a Diffusers folder (trained parts as fp32 masters, or 16-bit weights
with ``master_weights`` 16bit; frozen parts in the compute dtype). :class:`TrainedParts` says which parameters train (LoRA adapters, or every weight
of a full fine-tune), which components a run has trained so far, and the weights a checkpoint
keeps. :func:`mark_phase` switches ``requires_grad`` for a phase and gives its optimizer groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a resolved ``precision`` setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def master_dtype(c: Any) -> torch.dtype:
    """The dtype a full fine-tune trains its weights in: fp32 masters, or the run's 16-bit precision
    (``master_weights`` 16bit: stochastically rounded updates, see :mod:`.lowmem`)."""
    return dtype_of(c.precision) if c.master_weights == "16bit" else torch.float32


class BaseModel:
    """The base model's parts (UNet, VAE, tokenizers, text encoders, noise scheduler), all frozen when loaded.

    ``train(..., on_models=callback)`` hands the loaded instance to the caller, which is how tests
    read the trained modules after a run. SD3.5/FLUX.1 load as :class:`fastsd.train.flow.FlowModel`
    (:func:`load_base` picks); both name their denoiser ``denoiser`` and its component ``denoiser_name``.
    """

    flow = False
    denoiser_name = "unet"

    def __init__(self, folder: str, family: str, dtype: torch.dtype, full: bool, masters: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.family = family
        self.folder = folder
        # trained parts load as their masters (fp32, or 16-bit); frozen parts straight in the compute dtype (RAM on Colab)
        self.unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=masters if full else dtype
        )
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        self.tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        self.text_encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)]
        if family == "sdxl":
            self.tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
            self.text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=dtype)
            )
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.requires_grad_(False)

    @property
    def denoiser(self) -> Any:
        return self.unet

    @property
    def te_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]

    def components(self) -> dict[str, Any]:
        """Name -> trainable-capable module, as in a Diffusers folder."""
        return {"unet": self.unet, **dict(zip(self.te_names, self.text_encoders, strict=True))}

    def text_encoders_to(self, device: torch.device | str) -> None:
        for te in self.text_encoders:
            te.to(device)

    def pipeline(self, with_text_encoders: bool = True) -> Any:
        """A Diffusers pipeline over these modules (text encoders left out when they are offloaded)."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        sched = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        tes = self.text_encoders if with_text_encoders else [None] * len(self.text_encoders)
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=tes[0],
                text_encoder_2=tes[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=self.unet,
                scheduler=sched,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=tes[0],
            tokenizer=self.tokenizers[0],
            unet=self.unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def quantized(module: Any) -> bool:
    """Whether ``module`` was loaded quantized (bitsandbytes NF4): it lives on the GPU it loaded on and cannot move."""
    return getattr(module, "hf_quantizer", None) is not None


def load_base(
    folder: str, family: str, dtype: torch.dtype, *, full: bool, nf4: bool = False, masters: torch.dtype = torch.float32
) -> Any:
    """The base model's parts: a :class:`BaseModel` (UNet families) or a ``FlowModel`` (SD3.5, FLUX.1; ``nf4``: QLoRA).

    ``masters``: the dtype a full fine-tune's weights train in (:func:`master_dtype`).
    """
    from ..models.registry import FLOW_FAMILIES

    if family in FLOW_FAMILIES:
        from .flow import FlowModel

        return FlowModel(folder, family, dtype, nf4=nf4)
    return BaseModel(folder, family, dtype, full, masters)


@dataclass
class TrainedParts:
    """Which parameters train: LoRA adapters (``lora``) or every weight of a full fine-tune.

    ``trained`` grows as phases run (a component that trained once is kept in every later
    checkpoint and export); a resumed run starts from the checkpoint's set.
    """

    models: Any  # BaseModel or flow.FlowModel
    full: bool
    te_train: bool  # the run has text-encoder steps
    lora: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    trained: set[str] = field(default_factory=set)

    def params_of(self, name: str) -> list[torch.nn.Parameter]:
        return list(self.models.components()[name].parameters()) if self.full else self.lora.get(name, [])

    def te_params(self) -> list[torch.nn.Parameter]:
        return [p for n in self.models.te_names for p in self.params_of(n)]

    def count(self) -> int:
        """Trainable parameters of the whole run (the memory plan's input)."""
        denoiser = sum(p.numel() for p in self.params_of(self.models.denoiser_name))
        return denoiser + (sum(p.numel() for p in self.te_params()) if self.te_train else 0)

    def weights(self) -> dict[str, torch.Tensor]:
        """``component.parameter`` -> tensor of what has trained so far: a checkpoint's weights."""
        comps = self.models.components()
        out = {}
        for name in sorted(self.trained):
            for n, p in comps[name].named_parameters():
                if self.full or "lora_" in n:
                    out[f"{name}.{n}"] = p
        return out

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's weights into the modules (in place: optimizers keep their tensors)."""
        for name, module in self.models.components().items():
            part = {k[len(name) + 1 :]: v for k, v in weights.items() if k.split(".", 1)[0] == name}
            if part:
                with torch.no_grad():
                    own = dict(module.named_parameters())
                    for k, v in part.items():
                        own[k].copy_(v)


def make_trainable(models: Any, c: Any) -> TrainedParts:
    """LoRA adapters on the denoiser (and the text encoders when they train), or the masters of a full run."""
    parts = TrainedParts(models, full=c.method == "full", te_train=c.te_steps > 0)
    if not parts.full:
        from .lora import add_lora

        name = models.denoiser_name
        parts.lora[name] = add_lora(models.denoiser, c.lora_rank, c.lora_alpha, name, seed=c.seed)
        if parts.te_train:
            for k, (name, te) in enumerate(zip(models.te_names, models.text_encoders, strict=True)):
                parts.lora[name] = add_lora(te, c.lora_rank, c.lora_alpha, "text", seed=c.seed + 1 + k)
    elif parts.te_train:
        models.text_encoders[0].to(master_dtype(c))  # its masters (loaded in the compute dtype)
    return parts


def mark_phase(parts: TrainedParts, phase: str, unet_lr: float, te_lr: float) -> list[tuple[list[Any], float]]:
    """Switch ``requires_grad`` for ``phase`` (``te``, ``unet``, ``joint``); its optimizer's (params, lr) groups."""
    train_unet = phase in ("unet", "joint")  # the denoiser: a UNet, or an SD3/FLUX transformer
    train_te = phase in ("te", "joint")
    denoiser = parts.models.denoiser_name
    for comp in parts.models.components():
        is_te = comp != denoiser
        on = train_te if is_te else train_unet
        for p in parts.params_of(comp) if (is_te and parts.te_train) or not is_te else []:
            p.requires_grad_(on)
        if on:
            parts.trained.add(comp)
    groups = [(parts.params_of(denoiser), unet_lr)] if train_unet else []
    if train_te:
        groups.append((parts.te_params(), te_lr))
    return groups
