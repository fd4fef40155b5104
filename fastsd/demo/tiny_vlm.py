"""A tiny random-weight Qwen3-VL (fastsd's default captioner's architecture) that works offline.

The model is ``Qwen3VLForConditionalGeneration`` with the real block structure of
Qwen/Qwen3-VL-2B-Instruct (a ViT with 2D rotary positions and learned position embeddings, 2x2
patch merging, DeepStack feature injection into the decoder, a Qwen3 decoder with q/k norms and
interleaved 3-section M-RoPE) at tiny widths; patch size 16 and merge size 2 as in the real one.
The tokenizer is byte-level (every text round-trips) plus Qwen's chat and vision special tokens,
the chat template renders ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>...``
as the real one does, and the image processor has small pixel bounds (at most 64 image tokens).
The weights are random (with the end-of-turn logits zeroed, so it writes until its token cap rather
stopping at once): what it writes is gibberish, but every step of captioning runs for real.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

MIN_PIXELS = 64 * 64
MAX_PIXELS = 128 * 128


def build_tiny_qwen3_vl(
    folder: str | Path,
    seed: int = 0,
    *,
    text_config: dict | None = None,
    vision_config: dict | None = None,
    pixels: tuple[int, int] = (MIN_PIXELS, MAX_PIXELS),
    dtype: str | None = None,
) -> Path:
    """Write a tiny random Qwen3-VL checkpoint (model, tokenizer, image processor, chat template) to ``folder``.

    ``text_config``/``vision_config`` override the tiny widths (the benchmarks build the full-size
    shape this way), ``pixels`` the image processor's (min, max) pixels, ``dtype`` the saved weights'.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from .tiny_ocr import byte_level_tokenizer

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers before the PIL/torchvision split (needs torchvision's fast one there)
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer(SPECIAL_TOKENS, eos="<|im_end|>", max_length=4096)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": False,
            **(text_config or {}),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
            **(vision_config or {}),
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    if dtype:
        model.to(getattr(torch, dtype))
    with torch.no_grad():  # random weights would often stop at once; a zero end-of-turn logit lets them write
        for name in ("<|im_end|>", "<|endoftext|>"):
            model.lm_head.weight[ids[name]] = 0
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    ImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": pixels[0], "longest_edge": pixels[1]},
    ).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return folder
