"""A tiny random-weight GLM-OCR (``GlmOcrForConditionalGeneration``) with a processor that works offline.

The model has the real structure of zai-org/GLM-OCR (CogViT-style vision tower with q/k norms, 2x2
patch merge through a conv downsample and a gated merger, a GLM decoder with four norms per layer and
3-section M-RoPE) at tiny widths. The processor is the one the real checkpoint names
(``Glm46VProcessor`` with a ``Glm46VImageProcessor``) with the real patch size (14), merge size (2) and
temporal patch size (2) but small min/max pixels, so a page becomes at most 64 image tokens. The
tokenizer is built with the ``tokenizers`` library: byte-level (every text round-trips) plus GLM's
special tokens in the checkpoint's order, so ``<|image|>`` sits 34 ids after ``<|endoftext|>`` as in
the real vocabulary. The chat template renders what the real one renders for OCR requests:
``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|><|end_of_image|>Text Recognition:<|assistant|>\\n``.

``fastsd demo`` takes it from :func:`cached_glm_ocr` (built once into the local cache); the tests
build it once per test session. The weights are random: what it reads is gibberish.
"""

from __future__ import annotations

import json
from pathlib import Path

#: GLM's special tokens in the order of the real vocabulary (ids are consecutive from <|endoftext|>).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "/nothink",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
]

#: The GLM-V chat template, reduced to what OCR requests use (system/user/assistant turns, images,
#: text parts); renders the same string as the checkpoint's template for those messages.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

#: Bump when the builder changes, so caches of older builds are not reused.
BUILD_VERSION = 1

#: Small pixel bounds: 112x112 .. 224x224 (16..64 image tokens per page).
MIN_PIXELS = 112 * 112
MAX_PIXELS = 224 * 224


def byte_level_tokenizer(special_tokens: list[str], *, eos: str, max_length: int):
    """A byte-level BPE tokenizer (no merges) with ``special_tokens``, as a transformers fast tokenizer.

    Every byte is a token, so any text round-trips; the tiny GLM-OCR and Qwen3-VL models share it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )


#: zai-org/GLM-OCR's sizes (config.json), for full-size random-weight benchmarks.
FULL_TEXT = {
    "vocab_size": 59392,
    "hidden_size": 1536,
    "intermediate_size": 4608,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [16, 24, 24],
        "partial_rotary_factor": 1.0,
    },
}
FULL_VISION = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 1536}
#: The checkpoint's pixel bounds (preprocessor_config.json).
FULL_PIXELS = (12544, 9633792)


def tiny_glm_ocr_config(tokenizer, full: bool = False):
    """A GlmOcrConfig with the real structure at tiny widths (``full``: the checkpoint's sizes), token ids from ``tokenizer``."""
    from transformers import GlmOcrConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "partial_rotary_factor": 1.0,
        },
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"]],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if full:
        text_config.update(FULL_TEXT)
        vision_config.update(FULL_VISION)
    config = GlmOcrConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )
    return config


def _image_processor_config(full: bool = False) -> dict:
    """preprocessor_config.json as the real checkpoint writes it, with small min/max pixels (``full``: the real ones)."""
    low, high = FULL_PIXELS if full else (MIN_PIXELS, MAX_PIXELS)
    return {
        "size": {"shortest_edge": low, "longest_edge": high},
        "do_rescale": True,
        "do_resize": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Glm46VImageProcessor",
        "processor_class": "Glm46VProcessor",
    }


def save_tiny_glm_ocr(folder: str | Path, seed: int = 0, *, full: bool = False, dtype: str = "float32") -> Path:
    """Write a tiny random-weight GLM-OCR model and its processor files to ``folder``; returns the folder.

    The folder has the files of the real checkpoint: config.json, model.safetensors,
    generation_config.json, tokenizer.json + tokenizer_config.json, preprocessor_config.json,
    video_preprocessor_config.json, processor_config.json and chat_template.jinja. Load it with
    ``GlmOcrForConditionalGeneration.from_pretrained(folder)`` and ``AutoProcessor.from_pretrained(folder)``
    (the latter, like for the real checkpoint, needs torchvision for Glm46VProcessor's video half;
    ``fastsd.ocr.processor.load_processor`` works without it). No network is used.

    ``full=True`` writes the checkpoint's sizes and pixel bounds instead (about 1.1 B parameters,
    random weights: for benchmarks; ``dtype`` ``bfloat16`` halves the file).
    """
    import torch
    from transformers import GenerationConfig, GlmOcrForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer(SPECIAL_TOKENS, eos="<|endoftext|>", max_length=8192)
    config = tiny_glm_ocr_config(tokenizer, full=full)
    torch.manual_seed(seed)
    model = GlmOcrForConditionalGeneration(config).eval().to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pre = _image_processor_config(full)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = {**pre, "video_processor_type": "Glm46VVideoProcessor", "fps": 2, "do_sample_frames": True}
    video.pop("image_processor_type")
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Glm46VProcessor"}, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def cached_glm_ocr() -> Path:
    """The tiny GLM-OCR folder in the local cache (``<cache>/tiny/glm-ocr-v<N>``), built on first use."""
    from .tiny import build_cached

    return build_cached(f"glm-ocr-v{BUILD_VERSION}", "model.safetensors", save_tiny_glm_ocr)
