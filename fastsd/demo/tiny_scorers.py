"""Tiny random-weight scoring models: a DINO-style ``ViTModel``, a ``CLIPModel`` and LPIPS's files, built offline.

Real block structure (ViT-S/16's patch embedding, CLS token and pre-norm encoder; CLIP's two
towers and projections) at tiny widths, with their PIL image processors and, for CLIP, the tiny
CLIP tokenizer of :func:`fastsd.demo.tiny.write_clip_tokenizer`. LPIPS's AlexNet is small (2.5M
parameters in its features), so its two files are written at the real shapes. Random weights:
the scores they give mean nothing, but every step of ``fastsd eval`` runs for real.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_dino(folder: str | Path, seed: int = 0, *, full: bool = False) -> Path:
    """A DINO-style ViT; ``full``: ViT-S/16 at 224 px (the benchmark's shape), else tiny."""
    import torch
    from transformers import ViTConfig, ViTModel

    try:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    except ImportError:  # transformers before the PIL/torchvision split
        from transformers import ViTImageProcessor as ViTImageProcessorPil

    folder = Path(folder)
    torch.manual_seed(seed)
    side = 224 if full else 32
    config = (
        ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                  intermediate_size=1536)
        if full
        else ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    )  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(
        size={"height": side, "width": side}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(folder)
    return folder


def build_tiny_clip(folder: str | Path, seed: int = 0, *, full: bool = False) -> Path:
    """A CLIP model; ``full``: ViT-B/32's shape (transformers' CLIPConfig defaults), else tiny."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:  # transformers before the PIL/torchvision split
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    from .tiny import write_clip_tokenizer

    folder = Path(folder)
    write_clip_tokenizer(folder)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    config = CLIPConfig(text_config={**ids, "vocab_size": 49408}) if full else CLIPConfig(
        text_config={**ids, "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    side = 224 if full else 32
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        folder
    )
    return folder


def build_tiny_lpips(folder: str | Path, seed: int = 0) -> Path:
    """LPIPS's two files as the ``lpips-alex`` download has them, with random weights at the real shapes.

    ``alexnet-owt-7be5be79.pth`` holds torchvision's ``features.*`` keys (the real file also has the
    classifier's, which LPIPS ignores) and ``alex.pth`` lpips' ``lin<k>.model.1.weight`` keys, with
    non-negative weights as lpips' training keeps them.
    """
    import torch

    from ..eval.lpips import CHANNELS, alexnet_features

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(
        {f"features.{k}": v for k, v in alexnet_features().state_dict().items()}, folder / "alexnet-owt-7be5be79.pth"
    )
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    torch.save(lin, folder / "alex.pth")
    return folder
