"""The DreamBooth metrics as functions of embeddings (rows are images or texts), with no model inside.

* DINO / CLIP-I: mean cosine similarity over all (generated, real) pairs, with DINO ViT-S/16 or
  CLIP image embeddings. Higher means the subject looks like the photos.
* CLIP-T: mean cosine similarity of each generated image to its own prompt (CLIP image vs text).
* PRES: mean DINO similarity of images generated from the bare class prompt to the real photos;
  lower means the class prior was preserved (the model did not turn every dog into yours).
* DIV: diversity of the images generated from one prompt, averaged over prompts. The paper's is
  mean pairwise LPIPS (:mod:`fastsd.eval.lpips`, which holds the network); without the LPIPS
  weights fastsd reports ``div_dino`` = 1 − mean pairwise DINO similarity within each prompt's
  images (:func:`within_group_diversity`), a different but related distance, labelled as such.
"""

from __future__ import annotations

from typing import Any


def _unit(x: Any) -> Any:
    import torch

    x = torch.as_tensor(x, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pairwise_cosine(a: Any, b: Any) -> float:
    """Mean cosine similarity over every pair (row of ``a``, row of ``b``)."""
    return float((_unit(a) @ _unit(b).T).mean())


def mean_matched_cosine(a: Any, b: Any) -> float:
    """Mean cosine similarity of row i of ``a`` with row i of ``b`` (CLIP-T: image i, its prompt)."""
    if len(a) != len(b):
        raise ValueError("one text per image")
    return float((_unit(a) * _unit(b)).sum(-1).mean())


def within_group_diversity(embeddings: Any, group_size: int) -> float:
    """1 − mean cosine similarity between distinct images of the same group (consecutive rows)."""
    x = _unit(embeddings)
    if group_size < 2 or len(x) % group_size:
        raise ValueError("diversity needs groups of at least 2 images")
    sims = []
    for start in range(0, len(x), group_size):
        g = x[start : start + group_size]
        s = g @ g.T
        n = len(g)
        sims.append((s.sum() - s.diagonal().sum()) / (n * (n - 1)))
    return 1.0 - float(sum(sims) / len(sims))
