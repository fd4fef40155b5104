"""SD3.5 and FLUX.1 LoRA training: the flow-matching model's parts, its timesteps and its loss.

The facts follow diffusers' ``train_dreambooth_lora_sd3.py`` / ``_flux.py``: the noisy latent is
``(1 - sigma) * x0 + sigma * noise`` and the transformer predicts the velocity ``noise - x0``;
sigmas come from a logit-normal density (mean 0, std 1; the density is the timestep weighting, so
the per-sample loss weight is 1), shifted as the model's scheduler shifts them at inference
(SD3.5: ``shift`` 3; FLUX.1-dev: ``use_dynamic_shifting``, a shift that grows with the image's
token count). FLUX's transformer reads 2x2-packed latents with their position ids, text ids, and
(dev) a guidance input, 1.0 while training as diffusers does.

:class:`FlowModel` is the :class:`~fastsd.train.parts.BaseModel` of these families: the transformer
(16-bit, or NF4 for QLoRA on a GPU whose budget it would not fit), the 16-channel VAE, and the text
encoders, which never train: prompts are embedded once through the pipeline's own ``encode_prompt``
and the T5 encoder is then freed.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: T5 tokens per prompt while training (diffusers' DreamBooth scripts' ``max_sequence_length`` defaults).
MAX_T5_TOKENS = {"sd3": 77, "flux": 512}
#: FLUX.1-dev's guidance input while training (diffusers' ``--guidance_scale`` default).
TRAIN_GUIDANCE = 1.0
#: The transformer in 16 bits may take at most this share of the VRAM budget; above it the run is QLoRA (NF4).
NF4_ABOVE_BUDGET_SHARE = 0.6
#: The pipeline component holding T5, per family (the one freed after caching).
T5_COMPONENT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}


@dataclass
class FlowSettings:
    """What the flow step needs besides the transformer: the family and the scheduler's shift rule."""

    family: str
    num_timesteps: int
    shift: float  # static shift (SD3.5: 3.0)
    dynamic: bool  # FLUX.1-dev: shift from the image's token count
    shift_table: tuple[int, int, float, float]  # base/max image tokens, base/max shift (dynamic shifting)
    vae_scale_factor: int
    guidance: float | None  # None: the transformer has no guidance embedder


def settings_of(models: Any) -> FlowSettings:
    """:class:`FlowSettings` of a loaded :class:`FlowModel` (its scheduler's config, its VAE's depth)."""
    cfg = models.noise_scheduler.config
    guidance = TRAIN_GUIDANCE if getattr(models.transformer.config, "guidance_embeds", False) else None
    return FlowSettings(
        family=models.family,
        num_timesteps=int(cfg.num_train_timesteps),
        shift=float(cfg.shift),
        dynamic=bool(cfg.get("use_dynamic_shifting", False)),
        shift_table=(
            int(cfg.get("base_image_seq_len", 256)),
            int(cfg.get("max_image_seq_len", 4096)),
            float(cfg.get("base_shift", 0.5)),
            float(cfg.get("max_shift", 1.15)),
        ),
        vae_scale_factor=2 ** (len(models.vae.config.block_out_channels) - 1),
        guidance=guidance,
    )


def shift_for(f: FlowSettings, latent_hw: tuple[int, int]) -> float:
    """The sigma shift for latents of ``latent_hw``: static, or FLUX's exp(mu) from the packed token count."""
    if not f.dynamic:
        return f.shift
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    return math.exp(calculate_shift(tokens, *f.shift_table))


def draw_sigmas(f: FlowSettings, gen: torch.Generator, batch: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per-image sigmas in (0, 1): logit-normal u, shifted as ``s*u / (1 + (s-1)*u)`` (the scheduler's rule)."""
    u = torch.sigmoid(torch.randn((batch,), generator=gen, device=gen.device))
    s = shift_for(f, latent_hw)
    return s * u / (1 + (s - 1) * u)


def per_sample_loss(transformer: Any, f: FlowSettings, b: Any) -> torch.Tensor:
    """Flow-matching MSE per image: the velocity ``noise - x0`` predicted at ``(1-sigma)*x0 + sigma*noise``."""
    sigma = b.t.view(-1, 1, 1, 1)
    noisy = (1 - sigma) * b.lat + sigma * b.noise
    pred = predict(transformer, f, noisy, b.t, b.cond)
    target = b.noise - b.lat
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def predict(transformer: Any, f: FlowSettings, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict) -> torch.Tensor:
    """The transformer's velocity for ``noisy`` latents [B, C, H, W] (FLUX: packed in, unpacked out)."""
    embeds, pooled = cond["prompt_embeds"], cond["pooled"]
    if f.family == "sd3":
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * f.num_timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    from diffusers import FluxPipeline

    b, ch, h, w = noisy.shape
    guidance = None if f.guidance is None else torch.full((b,), f.guidance, device=noisy.device)
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, b, ch, h, w),
        timestep=sigmas,  # FLUX's transformer takes t in [0, 1] (it scales by 1000 itself)
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
        return_dict=False,
    )[0]
    vsf = f.vae_scale_factor
    return FluxPipeline._unpack_latents(out, h * vsf, w * vsf, vsf)


def wants_nf4(folder: str, family: str, device: torch.device, budget_gb: float | None) -> bool:
    """QLoRA: the transformer loads in NF4 on CUDA (with bitsandbytes) when 16 bits would crowd the budget."""
    if device.type != "cuda" or not budget_gb:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    from ..models.memplan import folder_sizes

    billions = folder_sizes(folder, family)[0]
    return billions * 2e9 / 2**30 > NF4_ABOVE_BUDGET_SHARE * budget_gb


class FlowModel:
    """An SD3.5 / FLUX.1 base model's parts for LoRA training, all frozen when loaded.

    It answers what the loop asks of :class:`~fastsd.train.parts.BaseModel` (``denoiser``,
    ``components``, ``pipeline``, ``text_encoders_to``, ``vae``, ``noise_scheduler``). ``tokenizers``
    is empty: the step caches no token ids, prompts are embedded by :meth:`encode_prompts`.
    """

    flow = True
    denoiser_name = "transformer"
    tokenizers: tuple[Any, ...] = ()

    def __init__(self, folder: str, family: str, dtype: torch.dtype, *, nf4: bool = False):
        from diffusers import (
            AutoencoderKL,
            FluxPipeline,
            FluxTransformer2DModel,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )

        from ..models.memplan import transformer_quantization  # the quantization generation uses too

        self.family, self.folder, self.nf4, self.dtype = family, folder, nf4, dtype
        pipe_cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
        t5_name = T5_COMPONENT[family]
        # T5 is left out here and loaded where it runs (text_encoders_to): see _load_t5
        base = pipe_cls.from_pretrained(folder, transformer=None, vae=None, torch_dtype=dtype, **{t5_name: None})
        self.pipe_cls = pipe_cls
        self.text_parts = {k: v for k, v in base.components.items() if k.startswith(("text_encoder", "tokenizer"))}
        self.t5_state = "not loaded"  # then "loaded", then "freed" once every prompt is embedded
        self.noise_scheduler = base.scheduler
        model_cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
        quant = {"quantization_config": transformer_quantization("nf4", dtype)} if nf4 else {}
        self._load_transformer = lambda: model_cls.from_pretrained(
            folder, subfolder="transformer", torch_dtype=dtype, **quant
        )
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        for m in [self.vae, *self.text_encoders]:
            m.requires_grad_(False)

    @functools.cached_property
    def transformer(self) -> Any:
        """The transformer, frozen, loaded on first use.

        Late because an NF4 transformer loads straight onto the GPU (bitsandbytes quantizes there):
        the loop embeds the prompts and frees T5 first, so on a T4 the two never share its 15 GB
        (FLUX.1: T5 9.5 GB + the NF4 transformer 6.7 GB), and the host never holds both.
        """
        return self._load_transformer().requires_grad_(False)

    @property
    def denoiser(self) -> Any:
        return self.transformer

    @property
    def text_encoders(self) -> list[Any]:
        return [v for k, v in sorted(self.text_parts.items()) if k.startswith("text_encoder") and v is not None]

    @property
    def te_names(self) -> list[str]:
        return []  # the text encoders never train

    def components(self) -> dict[str, Any]:
        """Name -> trainable-capable module: the transformer alone."""
        return {"transformer": self.transformer}

    def text_encoders_to(self, device: torch.device | str) -> None:
        if self.t5_state == "not loaded" and torch.device(device).type != "cpu":
            self._load_t5(device)
        for te in self.text_encoders:
            te.to(device)

    def _load_t5(self, device: torch.device | str) -> None:
        """Load the T5 encoder straight onto ``device``, tensor by tensor.

        Loaded on the host and then moved, T5-XXL (4.8 B parameters) is held whole in RAM: 9.5 GB in
        16 bits, more while a bf16 file is cast to fp16 for a T4 (13.7 GiB anonymous RSS measured for
        SD3.5 Medium under a T4's cap, 2026-12-03, against Colab's 12.7 GB). Streamed onto the GPU
        the host holds one tensor at a time.
        """
        from transformers import T5EncoderModel

        name = T5_COMPONENT[self.family]
        dev = torch.device(device)
        where = {"device_map": {"": str(dev)}} if dev.type != "cpu" else {}  # as ocr.engine.quantized_load places
        t5 = T5EncoderModel.from_pretrained(self.folder, subfolder=name, torch_dtype=self.dtype, **where)
        self.text_parts[name] = t5.requires_grad_(False).eval()
        self.t5_state = "loaded"

    def encode_prompts(self, prompts: list[str], device: torch.device, chunk: int = 8) -> dict[str, torch.Tensor]:
        """``{"prompt_embeds", "pooled"}`` of ``prompts`` through the pipeline's ``encode_prompt`` (no CFG)."""
        pipe = self.pipeline(with_transformer=False)  # embedding needs none: it may not be loaded yet
        embeds, pooled = [], []
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            n = MAX_T5_TOKENS[self.family]
            if self.family == "sd3":
                e, _, p, _ = pipe.encode_prompt(
                    part, part, part, device=device, do_classifier_free_guidance=False, max_sequence_length=n
                )
            else:
                e, p, _ = pipe.encode_prompt(part, part, device=device, max_sequence_length=n)
            embeds.append(e)
            pooled.append(p)
        return {"prompt_embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}

    def free_t5(self, device: torch.device) -> None:
        """Drop the T5 encoder once every prompt is embedded (9.5 GB in 16 bits for the real models)."""
        self.text_parts[T5_COMPONENT[self.family]] = None
        self.t5_state = "freed"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def pipeline(self, with_text_encoders: bool = True, with_transformer: bool = True) -> Any:
        """A Diffusers pipeline over these modules (text encoders left out when they are offloaded or freed;
        the transformer left out, and so not loaded, for embedding prompts)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if with_text_encoders and self.t5_state == "not loaded":
            self._load_t5("cpu")  # prior preservation renders class images before any prompt is embedded
        parts = dict(self.text_parts)
        if not with_text_encoders:
            parts = {k: (None if k.startswith("text_encoder") else v) for k, v in parts.items()}
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        transformer = self.transformer if with_transformer else None
        return self.pipe_cls(transformer=transformer, vae=self.vae, scheduler=sched, **parts)
