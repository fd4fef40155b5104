"""GLM-OCR's input processing: chat template, image patches, left-padded batches.

The checkpoint names ``Glm46VProcessor``, whose video half needs torchvision; runtimes without it
(Kaggle images, slim GPU boxes) cannot build it even for images. :func:`load_processor` uses
``AutoProcessor`` when it loads and otherwise assembles the same pieces itself (the tokenizer, the
image processor from ``preprocessor_config.json`` and the chat template). Either way
:class:`OcrProcessor` encodes a batch the way the model expects: each ``<|image|>`` expanded to one
token per merged patch, ``mm_token_type_ids`` marking them, padding on the LEFT so every row ends
at the position generation continues from.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The GLM-V chat template for OCR requests, used only when a checkpoint ships none.
FALLBACK_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class PatchGrid:
    """How the image processor cuts pages: sizes are multiples of ``patch * merge`` within pixel bounds."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 112 * 112
    max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the model sees for a page of this size (Glm46V's ``smart_resize``).

        The bounds apply to ``temporal_patch_size`` stacked copies of the image, as in transformers,
        so one page holds at most ``max_pixels / temporal_patch_size`` pixels.
        """
        f, t = self.factor, self.temporal_patch_size
        if height < f or width < f:
            scale = max(f / height, f / width)
            height, width = int(height * scale), int(width * scale)
        h_bar, w_bar = max(f, round(height / f) * f), max(f, round(width / f) * f)
        if t * h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(t * height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif t * h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (t * height * width))
            h_bar = math.ceil(height * beta / f) * f
            w_bar = math.ceil(width * beta / f) * f
        return w_bar, h_bar

    def image_tokens(self, width: int, height: int) -> int:
        """Number of ``<|image|>`` tokens a page of this (already fitted) size becomes."""
        return (width // self.patch_size) * (height // self.patch_size) // (self.merge_size**2)


class OcrProcessor:
    """Tokenizer + image processor + chat template, encoding OCR requests in left-padded batches."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        size = getattr(image_processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
        self.grid = PatchGrid(
            patch_size=int(getattr(image_processor, "patch_size", 14)),
            merge_size=int(getattr(image_processor, "merge_size", 2)),
            temporal_patch_size=int(getattr(image_processor, "temporal_patch_size", 2)),
            min_pixels=int(get("shortest_edge", None) or getattr(image_processor, "min_pixels", None) or 112 * 112),
            max_pixels=int(get("longest_edge", None) or getattr(image_processor, "max_pixels", None) or 9633792),
        )

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted text for one page: the image, then the task prompt, then the assistant turn."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def encode(self, images: list, prompts: list[str]) -> dict[str, Any]:
        """Model inputs for pages ``images`` with their ``prompts`` (one each), padded on the left.

        Returns:
            ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (B, L) long tensors,
            ``pixel_values`` (patches, C*T*P*P) and ``image_grid_thw`` (B, 3).
        """
        import torch

        if len(images) != len(prompts):
            raise ValueError("one prompt per image")
        vision = self.image_processor(images=images, return_tensors="pt")
        grid_thw = vision["image_grid_thw"]
        merge = self.grid.merge_size**2
        rows = []
        for i, prompt in enumerate(prompts):
            text = self.prompt_text(prompt)
            n = int(grid_thw[i].prod().item()) // merge
            text = text.replace(self.image_token, "\0" * n, 1).replace("\0", self.image_token)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, length - len(r) :] = 1
        mm_token_type_ids = (input_ids == self.image_token_id).long() * attention_mask
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": grid_thw,
        }

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _read_text(model: str, name: str, local_files_only: bool) -> str | None:
    """An optional file of a checkpoint (local folder or Hub id) as text, or None when it has none."""
    path = Path(model) / name
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, name, local_files_only=local_files_only))
        except Exception:  # noqa: BLE001 - optional file
            return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _read_json(model: str, name: str, local_files_only: bool) -> dict | None:
    text = _read_text(model, name, local_files_only)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def load_processor(model: str, *, local_files_only: bool = False) -> OcrProcessor:
    """Load the processor of a GLM-OCR checkpoint (Hub id or local folder).

    Uses ``AutoProcessor`` when it can be built; otherwise (no torchvision for the video half) the
    tokenizer, ``AutoImageProcessor`` and the checkpoint's chat template directly.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(model, local_files_only=local_files_only)
        return OcrProcessor(proc.tokenizer, proc.image_processor, getattr(proc, "chat_template", None))
    except ImportError as err:
        log.debug("AutoProcessor unavailable (%s); assembling tokenizer + image processor", err)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
    image_processor = AutoImageProcessor.from_pretrained(model, local_files_only=local_files_only)
    template = _read_text(model, "chat_template.jinja", local_files_only)
    if template is None:
        template = (_read_json(model, "processor_config.json", local_files_only) or {}).get("chat_template")
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    return OcrProcessor(tokenizer, image_processor, template)
