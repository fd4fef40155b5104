"""Training data from a session: images and captions, aspect-ratio buckets, cached latents and text embeddings.

Images are read once, resized to their bucket and encoded by the VAE once; only the latent
distribution (mean and std) is kept, on the training device, and a fresh latent is sampled from it
every step. When the text encoder is frozen its embeddings are cached per distinct caption too, so
the step runs the UNet alone. The batch order is a pure function of ``(seed, epoch)``: a resumed
run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Buckets keep aspect ratios between 1:2 and 2:1, sides multiples of 64, area <= resolution².
BUCKET_STEP = 64
BUCKET_MAX_RATIO = 2.0


@dataclass
class Example:
    """One training image after loading: its file, caption and bucket size (width, height)."""

    path: Path
    caption: str
    size: tuple[int, int]
    image: Any  # PIL.Image, dropped after encoding


def buckets_for(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``resolution``² pixels, as kohya/A1111 trainers use."""
    out = {(resolution, resolution)}
    area = resolution * resolution
    for w in range(BUCKET_STEP * 4, resolution * 2 + 1, BUCKET_STEP):
        h = (area // w) // BUCKET_STEP * BUCKET_STEP
        if h >= BUCKET_STEP and max(w / h, h / w) <= BUCKET_MAX_RATIO:
            out.add((w, h))
            out.add((h, w))
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_examples(
    paths: list[Path], captions: list[str], resolution: int, buckets: str = "auto"
) -> tuple[list[Example], bool]:
    """Open images (skipping unreadable ones with a warning) and give each its bucket.

    Args:
        paths / captions: instance images and their captions, in the same order.
        resolution: training size; square images use ``resolution``².
        buckets: ``on``, ``off`` (center-crop everything square) or ``auto`` (buckets when any
            image is not square, i.e. the images were not cropped).

    Returns:
        ``(examples, bucketed)``.
    """
    from PIL import Image, ImageOps

    loaded: list[tuple[Path, str, Any]] = []
    for path, caption in zip(paths, captions, strict=True):
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
                img.load()
        except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
            log.warning("skipping unreadable image %s (%s)", path.name, err)
            continue
        loaded.append((path, caption, img))
    use_buckets = buckets == "on" or (buckets == "auto" and any(img.width != img.height for _, _, img in loaded))
    table = buckets_for(resolution) if use_buckets else [(resolution, resolution)]
    examples = [Example(p, c, nearest_bucket(img.width, img.height, table), img) for p, c, img in loaded]
    return examples, use_buckets


def to_tensor(image: Any, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` and center-crop; returns CHW float in [-1, 1]."""
    import numpy as np
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    img = image.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - w) // 2, (rh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


@torch.no_grad()
def encode_latent_dists(
    vae: Any, examples: list[Example], device: torch.device, dtype: torch.dtype, chunk: int = 4
) -> list[torch.Tensor]:
    """VAE-encode each example once; returns per example the (mean, std) stacked as [2, C, H, W] fp32.

    Images of the same bucket are encoded together in chunks. Scaling (``scaling_factor``) is
    applied, so a latent is ``mean + std * noise``.
    """
    # An fp32 VAE encode of four 1024 px images peaked at 12.4 GiB on an H200 (each full-size
    # activation is 2 GiB) and ran out of memory under a 10 GiB cap with SDXL's weights loaded.
    # Chunks hold at most four 512 px images' worth of pixels, so SDXL encodes one at a time.
    biggest = max((ex.size[0] * ex.size[1] for ex in examples), default=1)
    chunk = max(1, min(chunk, (chunk * 512 * 512) // biggest))
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out: list[torch.Tensor | None] = [None] * len(examples)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        by_size.setdefault(ex.size, []).append(i)
    for size, idx in by_size.items():
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            pixels = torch.stack([to_tensor(examples[i].image, size) for i in part]).to(device, dtype)
            dist = vae.encode(pixels).latent_dist
            mean = ((dist.mean - shift) * scale).float()
            std = (dist.std * scale).float()
            for j, i in enumerate(part):
                out[i] = torch.stack([mean[j], std[j]])
    return [t for t in out if t is not None]


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """CLIP token ids padded/truncated to the tokenizer's max length (77)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(text_encoders: list[Any], ids: list[torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Text embeddings the UNet is conditioned on (with grad when an encoder trains).

    SD1/SD2: the last hidden state. SDXL: the penultimate hidden states of both encoders
    concatenated, plus the second encoder's pooled projection.
    """
    if family != "sdxl":
        te = text_encoders[0]
        return {"prompt_embeds": te(ids[0].to(te.device))[0]}
    hidden = []
    pooled = None
    for te, tok_ids in zip(text_encoders, ids, strict=True):
        out = te(tok_ids.to(te.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}


class BatchOrder:
    """Deterministic batches: per epoch, a seeded shuffle within each bucket, then of the batches.

    The order depends only on ``(seed, epoch)``, so :meth:`batch` for a global batch number is the
    same in an uninterrupted and a resumed run, and on every data-parallel rank.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int):
        self.sizes = sizes
        self.batch_size = batch_size
        self.seed = seed
        self._cache: dict[int, list[list[int]]] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            by_size.setdefault(s, []).append(i)
        self.groups = list(by_size.values())
        self.per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            batches = []
            for group in self.groups:
                perm = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
                for start in range(0, len(perm), self.batch_size):
                    chunk = perm[start : start + self.batch_size]
                    # a short last batch is filled from the bucket's start: shapes stay static
                    chunk += [perm[k % len(perm)] for k in range(self.batch_size - len(chunk))]
                    batches.append(chunk)
            order = torch.randperm(len(batches), generator=gen).tolist()
            self._cache = {epoch: [batches[i] for i in order]}
        return self._cache[epoch]

    def batch(self, index: int) -> list[int]:
        """Example indices of global batch ``index`` (epoch = index // batches per epoch)."""
        return self.epoch(index // self.per_epoch)[index % self.per_epoch]

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "per_epoch": self.per_epoch}
