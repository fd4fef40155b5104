"""PP-DocLayoutV3 (``PPDocLayoutV3ForObjectDetection``) built from a config: tiny for tests, full for benchmarks.

The tiny model has the real block structure (HGNetV2 backbone, hybrid encoder, deformable-attention
decoder with mask, box, class and reading-order heads, 25 labels) at tiny widths, with the
mask-enhanced query boxes off (random masks make every box the whole page); the full config
is PaddlePaddle/PP-DocLayoutV3_safetensors' sizes (transformers' defaults with the 25 labels).
The weights are random: the regions it finds are arbitrary, which is what tests of the plumbing need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_OVERRIDES: dict[str, Any] = {
    "backbone_config": {
        "model_type": "hgnet_v2",
        "arch": "B0",
        "stem_channels": [3, 8, 8],
        "stage_in_channels": [8, 16, 32, 64],
        "stage_mid_channels": [8, 16, 32, 64],
        "stage_out_channels": [16, 32, 64, 128],
        "stage_num_blocks": [1, 1, 1, 1],
        "stage_downsample": [False, True, True, True],
        "stage_light_block": [False, False, True, True],
        "stage_kernel_size": [3, 3, 5, 5],
        "stage_numb_of_layers": [1, 1, 1, 1],
        "hidden_sizes": [16, 32, 64, 128],
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
        "return_idx": [0, 1, 2, 3],
    },
    "encoder_in_channels": [32, 64, 128],
    "encoder_hidden_dim": 32,
    "encoder_ffn_dim": 64,
    "encoder_attention_heads": 2,
    "d_model": 32,
    "decoder_in_channels": [32, 32, 32],
    "decoder_ffn_dim": 64,
    "decoder_layers": 2,
    "decoder_attention_heads": 2,
    "num_queries": 12,
    "num_denoising": 0,
    "mask_feature_channels": [16, 16],
    "x4_feat_dim": 16,
    "num_prototypes": 8,
    "global_pointer_head_size": 16,
    "mask_enhanced": False,
}


def layout_config(tiny: bool = True, overrides: dict[str, Any] | None = None):
    """A ``PPDocLayoutV3Config`` with the checkpoint's 25 labels (tiny widths, or the full sizes)."""
    from transformers import PPDocLayoutV3Config

    from ..ocr.layout import LABELS

    id2label = dict(enumerate(LABELS))
    extra = {**(TINY_OVERRIDES if tiny else {}), **(overrides or {})}
    return PPDocLayoutV3Config(id2label=id2label, label2id={v: k for k, v in id2label.items()}, **extra)


def save_pp_doclayout(
    folder: str | Path,
    *,
    tiny: bool = True,
    seed: int = 0,
    bias: dict[str, float] | None = None,
    anchors: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight PP-DocLayoutV3 to ``folder`` (config.json + model.safetensors); returns it.

    Args:
        bias: label -> logit added to that class's score head, so a test can make the random
            model find regions of a known kind (e.g. ``{"text": 6.0}``: every query scores as text).
    """
    import torch
    from transformers import PPDocLayoutV3ForObjectDetection

    from ..ocr.layout import LABELS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = PPDocLayoutV3ForObjectDetection(layout_config(tiny, overrides)).eval()
    if bias:
        with torch.no_grad():
            for head in (model.model.enc_score_head, model.model.decoder.class_embed):
                for label, value in bias.items():
                    head.bias[LABELS.index(label)] += value
    if anchors:
        with torch.no_grad():
            for head in (model.model.enc_bbox_head, model.model.decoder.bbox_embed):
                head.layers[-1].weight.zero_()
                head.layers[-1].bias.zero_()
    model.save_pretrained(folder)
    return folder
