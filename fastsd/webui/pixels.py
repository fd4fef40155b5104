"""Pixels in and out of the built-in UI's pipelines, with A1111's semantics.

Latents to PIL one image at a time (:func:`decode_latents`), the cheap live preview, and the
img2img/inpaint image rules: resize modes, "fill" masked content, the "Only masked" crop region and
the paste back through the mask.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from ..errors import UserInputError

#: Latent -> RGB factors for the cheap live preview (A1111's "Approx cheap"), per family.
_SD_LATENT_RGB = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
LATENT_RGB: dict[str, list[list[float]]] = {
    "sd1": _SD_LATENT_RGB,
    "sd2": _SD_LATENT_RGB,
    "sdxl": [
        [0.3448, 0.4168, 0.4395],
        [-0.1953, -0.0290, 0.0250],
        [0.1074, 0.0886, -0.0163],
        [-0.3730, -0.2499, -0.2088],
    ],
}


def decode_latents(pipe: Any, latents: Any, stop: Any = lambda: False) -> list[Image.Image]:
    """PIL images from a pipeline's ``output_type="latent"`` result, decoded one image at a time.

    Peak VAE memory is one image's, and ``stop()`` is asked before each image, so an interrupt
    ends a long decode between images instead of after the whole batch. Applies what diffusers'
    SD / SDXL / SD3 pipelines do after sampling: the fp16 VAE upcast when its config asks for it,
    ``latents_mean``/``latents_std`` or ``scaling_factor``/``shift_factor``, the watermark, and
    post-processing to PIL.
    """
    import torch

    vae = pipe.vae
    config = vae.config
    scaling = config.scaling_factor
    shift = getattr(config, "shift_factor", None) or 0.0
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    upcast = vae.dtype == torch.float16 and bool(getattr(config, "force_upcast", False))
    if upcast:
        vae.to(dtype=torch.float32)
    images: list[Image.Image] = []
    try:
        for i in range(latents.shape[0]):
            if stop():
                break
            z = latents[i : i + 1].to(dtype=vae.dtype)
            if mean is not None and std is not None:
                channels = z.shape[1]
                m = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, channels, 1, 1)
                sd = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, channels, 1, 1)
                z = z * sd / scaling + m
            else:
                z = z / scaling + shift
            with torch.no_grad():
                x = vae.decode(z, return_dict=False)[0]
            if getattr(pipe, "watermark", None) is not None:
                x = pipe.watermark.apply_watermark(x)
            images += pipe.image_processor.postprocess(x.detach(), output_type="pil")
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return images


def resize(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's img2img resize modes: 0 stretch, 1 crop to fill, 2 fit and fill the borders."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    if mode == 1:
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    if mode == 2:
        ratio = min(width / image.width, height / image.height)
        inner = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.LANCZOS)
        canvas = image.resize((width, height), Image.LANCZOS).filter(ImageFilter.GaussianBlur(16))
        canvas.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
        return canvas
    return image.resize((width, height), Image.LANCZOS)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Fill the masked (white) area with colours spread from around it (A1111's "fill" content).

    Blurs the unmasked pixels with premultiplied alpha at shrinking radii and stacks the results,
    so the hole gets smooth surrounding colours and the rest of the image stays as it was.
    """
    keep = ImageOps.invert(mask.convert("L"))
    premultiplied = Image.new("RGBa", image.size)
    premultiplied.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The box around the mask's white pixels plus ``padding``, grown to the ``width:height`` ratio.

    This is "inpaint at full resolution" (A1111's "Only masked"): only this box is repainted at
    the requested size and pasted back, so small areas get all the pixels.
    """
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return 0, 0, mask.width, mask.height
    x1, y1, x2, y2 = box
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    ratio = width / height
    w, h = x2 - x1, y2 - y1
    if w / h < ratio:  # too tall: widen
        grow = min(round(h * ratio) - w, mask.width - w)
        x1 = max(0, x1 - grow // 2)
        x2 = min(mask.width, x1 + w + grow)
        x1 = max(0, x2 - (w + grow))
    else:  # too wide: heighten
        grow = min(round(w / ratio) - h, mask.height - h)
        y1 = max(0, y1 - grow // 2)
        y2 = min(mask.height, y1 + h + grow)
        y1 = max(0, y2 - (h + grow))
    return x1, y1, x2, y2


def paste_back(generated: Image.Image, original: Image.Image, mask: Image.Image, box: tuple[int, int, int, int]):
    """Put the repainted region back into the original through the blurred mask (A1111's overlay)."""
    x1, y1, x2, y2 = box
    canvas = original.copy()
    canvas.paste(generated.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    return Image.composite(canvas, original, mask)


def latent_preview(latents: Any, family: str) -> Image.Image | None:
    """A cheap RGB preview of ``latents``' first image (A1111's "Approx cheap"), or None for other latents."""
    factors = LATENT_RGB.get(family)
    if latents is None or factors is None or getattr(latents, "ndim", 0) != 4 or latents.shape[1] != 4:
        return None
    import torch

    with torch.no_grad():
        lat = latents[0].detach().float().cpu()
        rgb = torch.einsum("chw,cr->rhw", lat, torch.tensor(factors))
        rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb).resize((lat.shape[2] * 8, lat.shape[1] * 8), Image.NEAREST)


def prepare_inpaint(
    req: Any, width: int, height: int
) -> tuple[Image.Image, Image.Image, tuple[Image.Image, Image.Image, tuple[int, int, int, int]]]:
    """Image and mask for an inpaint job (a :class:`~.generate.GenerationRequest`), plus (original, blurred mask, box) to paste the result into."""
    mask = req.mask.convert("L")
    if req.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if mask.getbbox() is None:
        raise UserInputError(
            "the mask has no white pixels, so there is nothing to inpaint: white marks the area to repaint"
        )
    original = req.init_images[0].convert("RGB")
    if req.inpaint_full_res:
        mask = mask.resize(original.size, Image.LANCZOS) if mask.size != original.size else mask
    else:
        original = resize(original, width, height, req.resize_mode)
        mask = resize(mask, width, height, req.resize_mode).convert("L")
    blurred = mask.filter(ImageFilter.GaussianBlur(req.mask_blur)) if req.mask_blur > 0 else mask
    source = original
    if req.inpainting_fill == 0:
        source = fill_masked(original, mask)
    elif req.inpainting_fill in (2, 3):
        gen = random.Random(req.seed)
        if req.inpainting_fill == 2:
            noise = Image.frombytes("RGB", original.size, gen.randbytes(original.width * original.height * 3))
        else:
            noise = Image.new("RGB", original.size, (127, 127, 127))
        source = Image.composite(noise, original, mask)
    if req.inpaint_full_res:
        box = crop_region(mask, req.inpaint_full_res_padding, width, height)
        image = source.crop(box).resize((width, height), Image.LANCZOS)
        crop_mask = blurred.crop(box).resize((width, height), Image.LANCZOS)
    else:
        box = (0, 0, original.width, original.height)
        image, crop_mask = source, blurred
    return image, crop_mask, (original, blurred, box)
