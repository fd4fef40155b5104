"""Images a run renders: class images for prior preservation, and sample images while it trains.

Both go through :func:`render_png`: denoise under autocast, decode the latents outside it (the
SDXL VAE overflows in fp16), and write the PNG with a safe write. Class images are kept in the
session and reused by later runs; samples are named ``step-NNNNNN-pP-sS.png`` (step, prompt,
seed) in the session's ``samples/``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from .. import storage
from .parts import dtype_of, quantized
from .step import TextCache

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@contextlib.contextmanager
def eager() -> Any:
    """Run compiled modules eagerly (sampling and export use other shapes than training)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


#: Tile side (px) of a tiled sample decode. The VAEs' own tile (their ``sample_size``: 1024 px for SDXL,
#: SD3.5, FLUX.1) would leave a 1024 px image whole.
TILE_PX = 512


def render_png(pipe: Any, path: Path, *, size: int, steps: int, seed: int, autocast: Any, tiled: bool = False,
               **prompt: Any) -> Path:  # fmt: skip
    """Render one image with ``pipe`` (``prompt``: a text or its embeddings) and save it at ``path``.

    ``tiled`` decodes the latents in :data:`TILE_PX` tiles (blended where they overlap): the fp32 SDXL
    VAE's decode of a 1024 px image took 5.1 GiB beside the model on the T4 preset (H200, 2026-12-04),
    the whole run's peak.
    """
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    gen = torch.Generator(denoiser.device).manual_seed(seed)
    with torch.no_grad(), eager(), autocast:
        lat = pipe(
            **prompt, num_inference_steps=steps, height=size, width=size, generator=gen, output_type="latent"
        ).images
    vae = pipe.vae
    if hasattr(pipe, "_unpack_latents"):  # FLUX returns its latents packed in 2x2 patches
        lat = pipe._unpack_latents(lat, size, size, pipe.vae_scale_factor)
    tiled = tiled and size > TILE_PX
    if tiled and lat.device.type == "cuda":  # a tight budget: the denoiser's freed blocks go back before the decode
        torch.cuda.empty_cache()
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3/FLUX VAEs' latent shift
    with torch.no_grad():  # decode outside autocast: the SDXL VAE overflows in fp16
        image = _decode(vae, lat.to(vae.dtype) / vae.config.scaling_factor + shift, tiled)
    image = pipe.image_processor.postprocess(image.float(), output_type="pil")[0]
    storage.write_bytes(path, storage.png_bytes(image))
    return path


def _decode(vae: Any, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
    if not tiled:
        return vae.decode(latents).sample
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size = TILE_PX
    vae.tile_latent_min_size = TILE_PX // 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        return vae.tiled_decode(latents).sample
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def tiled_decode_for(c: Any, family: str, device: torch.device) -> bool:
    """Whether this run decodes its images in tiles: where the built-in UI would tile them on a GPU of the
    run's VRAM budget (:func:`fastsd.webui.memory.memory_settings`, the one rule)."""
    from ..webui.memory import memory_settings

    if device.type != "cuda" or not c.vram_budget_gb:
        return False
    return memory_settings(family, c.vram_budget_gb)["vae_tiling"]


def _autocast(device: torch.device, precision: str) -> Any:
    dtype = dtype_of(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def class_images(session: Any, models: Any, c: Any, device: torch.device) -> list[Path]:
    """Class images for prior preservation: the missing ones rendered with the base model, the rest reused."""
    folder = session.class_images_dir(c.class_prompt)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = c.num_class_images - len(existing)
    if missing > 0:
        log.info("generating %d class images for %r (kept and reused in %s)", missing, c.class_prompt, folder)
        pipe = models.pipeline().to(device)
        pipe.set_progress_bar_config(disable=True)
        autocast = _autocast(device, c.precision)
        tiled = tiled_decode_for(c, models.family, device)
        for k in range(len(existing), c.num_class_images):
            render_png(
                pipe,
                folder / f"class-{k:05d}.png",
                size=c.resolution,
                steps=c.sample_steps,
                seed=c.seed * 7919 + k,
                autocast=autocast,
                tiled=tiled,
                prompt=c.class_prompt,
            )
        if not quantized(models.denoiser):  # an NF4 transformer stays where it loaded
            models.denoiser.to("cpu")
        models.text_encoders_to("cpu")
        existing = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return existing[: c.num_class_images]


def sample_images(session: Any, models: Any, c: Any, step: int, text: TextCache, device: torch.device) -> list[Path]:
    """Render ``c.sample_prompts`` x ``c.sample_seeds`` with the model as it is at ``step``.

    With frozen text encoders (offloaded to the CPU) the prompts' cached embeddings are used.
    """
    dtype = dtype_of(c.precision)
    models.vae.to(device)
    pipe = models.pipeline(with_text_encoders=not text.frozen)
    pipe.set_progress_bar_config(disable=True)
    tiled = tiled_decode_for(c, models.family, device)
    paths = []
    for pi, prompt in enumerate(c.sample_prompts):
        for seed in c.sample_seeds:
            kwargs: dict[str, Any] = {"prompt": prompt}
            if text.sample is not None and text.sample_neg is not None:
                s, n = text.sample, text.sample_neg
                kwargs = {"prompt_embeds": s["prompt_embeds"][pi : pi + 1].to(dtype)}
                if models.family in ("sdxl", "sd3", "flux"):
                    kwargs["pooled_prompt_embeds"] = s["pooled"][pi : pi + 1].to(dtype)
                if models.family != "flux":  # FLUX.1 has no negative prompt (guidance is an input)
                    kwargs["negative_prompt_embeds"] = n["prompt_embeds"][pi : pi + 1].to(dtype)
                if models.family in ("sdxl", "sd3"):
                    kwargs["negative_pooled_prompt_embeds"] = n["pooled"][pi : pi + 1].to(dtype)
            path = session.samples_dir / f"step-{step:06d}-p{pi}-s{seed}.png"
            paths.append(
                render_png(
                    pipe,
                    path,
                    size=c.resolution,
                    steps=c.sample_steps,
                    seed=seed,
                    autocast=_autocast(device, c.precision),
                    tiled=tiled,
                    **kwargs,
                )
            )
    models.vae.to("cpu")
    return paths
