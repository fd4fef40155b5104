"""Vision-language engines for captions and questions: a local model (transformers) or any endpoint.

Both answer a list of :class:`VlmRequest` (an image, or none, and a prompt) with one
:class:`~fastsd.vlm.client.ChatReply` each, in order; a request that fails carries its error and
the others go on. :class:`LocalVlm` loads an image-text-to-text model (the default is Qwen3-VL-2B,
see :data:`fastsd.models.registry.HELPER_MODELS` for why) and decodes batches greedily, left-padded,
through GLM-OCR's processor assembly (:func:`fastsd.ocr.processor.load_processor`, which works
without torchvision). :class:`EndpointVlm` sends the same requests to an OpenAI-compatible server
through the shared :class:`~fastsd.vlm.client.ChatClient`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import FastsdError, UserInputError
from .client import ChatClient, ChatReply, api_key, user_message

log = logging.getLogger(__name__)

ENGINES = ("local", "openai")
#: Longest image side sent to a model: enough for captions, small enough to batch on a T4.
MAX_SIDE = 768


@dataclass
class VlmRequest:
    """One question: the image (a PIL image, or None for text only), the prompt and a token cap."""

    image: Any
    prompt: str
    max_new_tokens: int = 256
    json_schema: dict | None = None  # endpoints that support structured output get it as response_format


class VlmEngine(Protocol):
    """What captioning and ``ask`` need of an engine."""

    name: str
    model_id: str

    def answer(self, requests: list[VlmRequest]) -> list[ChatReply]: ...

    def close(self) -> None: ...


def shrink(image: Any, max_side: int = MAX_SIDE) -> Any:
    """An RGB copy of ``image`` whose longest side is at most ``max_side`` (aspect kept)."""
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        from PIL import Image

        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
        )
    return image


class LocalVlm:
    """An image-text-to-text model in this process (Qwen3-VL and others whose processor has an image-pad token).

    Args:
        model: a local folder, or a spec :func:`fastsd.models.load.local_model` fetches.
        device: ``cuda``/``cpu`` (default: cuda when available).
        quantize: ``none``, ``8bit`` or ``4bit`` (bitsandbytes, CUDA only).
        batch_size: requests per ``generate`` call.
        home: the fastsd home a fetched model goes to.
    """

    name = "local"

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        quantize: str = "none",
        batch_size: int | None = None,
        home: str | Path | None = None,
    ) -> None:
        if quantize not in ("none", "8bit", "4bit"):
            raise UserInputError(f"--quantize must be none, 8bit or 4bit, not {quantize!r}")
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if quantize != "none" and not self.device.startswith("cuda"):
            raise UserInputError("--quantize 8bit/4bit needs a CUDA GPU (bitsandbytes); use --quantize none on CPU")
        from ..models.load import local_model
        from ..models.registry import helper_spec

        path = local_model(helper_spec(model), home=home)
        from transformers import AutoModelForImageTextToText

        from ..ocr.engine import pick_dtype, quantized_load
        from ..ocr.processor import load_processor

        self.model_id = model
        self.dtype = pick_dtype(self.device)
        kwargs: dict[str, Any] = {"dtype": self.dtype, "local_files_only": True}
        kwargs.update(quantized_load(quantize, self.dtype, self.device))
        try:
            self.processor = load_processor(str(path), local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
        except (OSError, ValueError) as err:
            raise FastsdError(f"could not load the vision-language model {model} from {path}: {err}") from err
        if quantize == "none":
            self.model.to(self.device)
        tok = self.processor.tokenizer
        pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
        if isinstance(pad_id, int) and pad_id != tok.unk_token_id and pad_id is not None:
            self.processor.image_token, self.processor.image_token_id = "<|image_pad|>", pad_id  # Qwen-VL family
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else self.processor.pad_token_id
        self.batch_size = batch_size or (8 if self.device.startswith("cuda") else 2)

    def close(self) -> None:
        """Free the model (and the GPU memory it held) before training needs it."""
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _batch(self, batch: list[VlmRequest]) -> list[ChatReply]:
        import torch

        start = time.perf_counter()
        inputs = self.processor.encode([shrink(r.image) for r in batch], [r.prompt for r in batch])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        length = inputs["input_ids"].shape[1]
        cap = max(r.max_new_tokens for r in batch)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=cap,
                do_sample=False,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
            )
        seconds = (time.perf_counter() - start) / len(batch)
        eos = set(self.eos_token_ids)
        replies = []
        for r, seq in zip(batch, out[:, length:].tolist(), strict=True):
            cut = next((i for i, t in enumerate(seq) if t in eos), None)
            ended = cut is not None and cut <= r.max_new_tokens
            seq = seq[:cut] if ended else seq[: r.max_new_tokens]
            finish = "eos" if ended else "length"
            replies.append(ChatReply(self.processor.decode(seq).strip(), finish, len(seq), seconds))
        return replies

    def answer(self, requests: list[VlmRequest]) -> list[ChatReply]:
        """Answer in batches of ``batch_size``; requests without an image are refused per request."""
        import torch

        replies: list[ChatReply | None] = [None] * len(requests)
        todo = [i for i, r in enumerate(requests) if r.image is not None]
        for i, r in enumerate(requests):
            if r.image is None:
                replies[i] = ChatReply(finish="error", error="the local engine answers about an image; none was given")
        size = self.batch_size
        pos = 0
        while pos < len(todo):
            chunk = todo[pos : pos + size]
            try:
                got = self._batch([requests[i] for i in chunk])
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if size == 1:
                    raise FastsdError("out of GPU memory on one image; use --quantize 4bit or free the GPU") from None
                size = max(1, size // 2)
                log.warning("CUDA out of memory; continuing with batches of %d", size)
                continue
            for i, reply in zip(chunk, got, strict=True):
                replies[i] = reply
            pos += len(chunk)
        return [r for r in replies if r is not None]


class EndpointVlm:
    """Any OpenAI-compatible vision model endpoint (vLLM, SGLang, hosted GLM-4.5V, ERNIE 4.5 VL...).

    Args:
        base_url: server root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server knows.
        key_name: environment variable or Colab secret holding the API key (default ``OPENAI_API_KEY``).
        concurrency: requests in flight at once.
    """

    name = "openai"

    def __init__(self, base_url: str, *, model: str, key_name: str | None = None, concurrency: int = 8) -> None:
        if not model:
            raise UserInputError("--engine openai needs --model NAME (the model name the server serves)")
        self.model_id = model
        self.client = ChatClient(base_url, model=model, api_key=api_key(key_name), concurrency=concurrency)

    def close(self) -> None:
        self.client.close()

    def answer(self, requests: list[VlmRequest]) -> list[ChatReply]:
        batch = []
        for r in requests:
            params: dict[str, Any] = {"max_tokens": r.max_new_tokens, "temperature": 0.0}
            if r.json_schema is not None:
                params["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": r.json_schema},
                }
            image = shrink(r.image, 1536) if r.image is not None else None
            batch.append((user_message(image, r.prompt), params))
        return self.client.complete_many(batch)


def make_engine(
    engine: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    key_name: str | None = None,
    concurrency: int = 8,
    device: str | None = None,
    quantize: str = "none",
    batch_size: int | None = None,
    home: str | Path | None = None,
) -> VlmEngine:
    """The engine the CLI flags describe (checked before anything loads)."""
    from ..models.registry import DEFAULT_CAPTIONER

    if engine == "openai":
        if not base_url:
            raise UserInputError("--engine openai needs --base-url URL (an OpenAI-compatible server)")
        return EndpointVlm(base_url, model=model or "", key_name=key_name, concurrency=concurrency)
    if engine == "local":
        if base_url:
            raise UserInputError("--base-url is for --engine openai; the local engine runs the model here")
        if model and not Path(model).expanduser().exists() and model.startswith((".", "/", "~")):
            raise UserInputError(f"--model {model}: no such folder")
        return LocalVlm(model or DEFAULT_CAPTIONER, device=device, quantize=quantize, batch_size=batch_size, home=home)
    raise UserInputError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
