"""The embedding models the metrics read: DINO ViT-S/16 (``ViTModel``, CLS token) and CLIP (``CLIPModel``).

Both are loaded through transformers from a registry name, Hub id or folder (fetched like other
models), with their image processors' PIL backends, so no torchvision is needed. DINO is the
paper's self-supervised ViT-S/16 (v1): it separates individual subjects of one class, which CLIP
does poorly, and it keeps fastsd's numbers comparable to the paper's.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import FastsdError


def model_folder(spec: str, home: str | os.PathLike[str] | None, flag: str = "--model") -> Any:
    """The local folder of a scoring model (registry name, Hub id or folder), fetched if needed.

    ``flag`` is the option that takes a folder instead (``--dino``/``--clip``): the offline message names it.
    """
    from ..errors import NetworkError
    from ..models.load import local_model
    from ..models.registry import helper_spec

    try:
        return local_model(helper_spec(spec), home=home)
    except NetworkError as err:
        raise NetworkError(str(err).replace(" and pass --model ", f" and pass {flag} ")) from None


class Scorers:
    """DINO and CLIP embedders on one device.

    Args:
        dino: registry name, Hub id or folder of a DINO ViT (default dino-vits16).
        clip: the same for a CLIP model (default clip-vit-b32).
        device: torch device.
    """

    def __init__(self, dino: str, clip: str, *, device: str = "cpu", home: str | os.PathLike[str] | None = None):
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer, ViTModel

        self.device = device
        try:
            dpath, cpath = model_folder(dino, home), model_folder(clip, home)
            self.dino = (
                ViTModel.from_pretrained(dpath, add_pooling_layer=False, local_files_only=True).eval().to(device)
            )
            self.dino_proc = AutoImageProcessor.from_pretrained(dpath, local_files_only=True)
            self.clip = CLIPModel.from_pretrained(cpath, local_files_only=True).eval().to(device)
            self.clip_proc = AutoImageProcessor.from_pretrained(cpath, local_files_only=True)
            self.clip_tok = CLIPTokenizer.from_pretrained(cpath, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FastsdError(f"could not load the scoring models ({dino}, {clip}): {err}") from err

    def close(self) -> None:
        """Free the models (and GPU memory) before training needs it."""
        import gc

        import torch

        del self.dino, self.clip
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def dino_embed(self, images: list[Any]) -> Any:
        """DINO CLS embeddings (N, D) of PIL images."""
        import torch

        pixels = self.dino_proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.dino(pixel_values=pixels.to(self.device, self.dino.dtype))
        return out.last_hidden_state[:, 0].float().cpu()

    def clip_image_embed(self, images: list[Any]) -> Any:
        """CLIP image embeddings (N, D), projected."""
        import torch

        pixels = self.clip_proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype))
        out = getattr(out, "pooler_output", out)
        return out.float().cpu()

    def clip_text_embed(self, texts: list[str]) -> Any:
        """CLIP text embeddings (N, D), projected (texts cut at 77 tokens)."""
        import torch

        enc = self.clip_tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            out = self.clip.get_text_features(**{k: v.to(self.device) for k, v in enc.items()})
        out = getattr(out, "pooler_output", out)
        return out.float().cpu()
