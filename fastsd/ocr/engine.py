"""OCR engines: GLM-OCR in this process (transformers) or on an OpenAI-compatible server (vLLM/SGLang).

Both take a batch of :class:`PageJob` (a page image at its model-grid size + the exact prompt)
and return one :class:`Generation` each. The transformers engine decodes greedily (a job may carry
a seeded :class:`~.sampling.Sampling` instead; ``fastsd ocr serve`` passes requests' settings) with
repetition penalty 1.1 and a new-token cap, stops pages that start repeating one line (the repetition guard),
picks its batch size from free VRAM unless given, and on CUDA out-of-memory halves the batch and
retries it. The openai engine sends the same prompts and images as chat-completions requests,
many at once, which is how throughput scales past one GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import FastsdError, UserInputError
from ..runtime import usable_vram_bytes
from ..vlm.client import image_data_url  # noqa: F401 - re-exported: engine.image_data_url is public
from .processor import PatchGrid, load_processor
from .prompts import repetition
from .sampling import Sampling

log = logging.getLogger(__name__)

DEFAULT_MODEL = "zai-org/GLM-OCR"
REPETITION_PENALTY = 1.1
DEFAULT_MAX_NEW_TOKENS = 4096
MAX_AUTO_BATCH = 64
GUARD_EVERY = 16  # tokens between two runs of the repetition guard on a row


@dataclass
class PageJob:
    """One page to recognise: an id the caller routes results by, the image, the prompt, and how to pick tokens."""

    key: Any
    image: Any
    prompt: str
    sampling: Sampling | None = None  # None: greedy (what ``fastsd ocr`` always does)


@dataclass
class Generation:
    """What the engine produced for one page."""

    key: Any
    text: str
    tokens: int
    finish: str  # eos | length | repetition | error
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _guarded(text: str) -> tuple[str, list[str], bool]:
    """Cut a runaway repetition to one copy; returns (text, warnings, was_cut)."""
    cut = repetition(text)
    if cut is None:
        return text, [], False
    return text[:cut], ["stopped: the output started repeating the same line; the repeats were removed"], True


def pick_dtype(device: str):
    """bf16 where the GPU really has it (Ampere+), fp16 on older GPUs (T4), fp32 on CPU."""
    import torch

    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def quantized_load(quantize: str, dtype: Any, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load a transformers model in 8-bit or NF4 (bitsandbytes) on ``device``.

    ``quantize`` is ``none`` (no arguments), ``8bit`` or ``4bit`` (NF4, computing in ``dtype``);
    OCR's and the vision-language engines' one rule.
    """
    if quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return {"quantization_config": config, "device_map": {"": device}}


class TransformersEngine:
    """GLM-OCR through transformers (``GlmOcrForConditionalGeneration`` + its processor).

    Args:
        model: Hub id (default zai-org/GLM-OCR) or local folder.
        device: ``cuda``/``cpu`` (default: cuda when available).
        quantize: ``none``, ``8bit`` or ``4bit`` (bitsandbytes, CUDA only).
        batch_size: pages per batch, or None to size batches from free VRAM.
        max_new_tokens: cap on generated tokens per page.
        fast: use :class:`fastsd.ocr.fast.FastGlmOcr` (static KV cache, CUDA graphs) instead of ``generate``.
    """

    name = "transformers"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        quantize: str = "none",
        batch_size: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        repetition_penalty: float = REPETITION_PENALTY,
        fast: bool = True,
        local_files_only: bool = False,
    ) -> None:
        if not local_files_only and not Path(model).expanduser().exists():
            from ..models.fetch import hub_repo_offline
            from ..paths import resolve_home

            suggested = resolve_home() / "models" / model.replace("/", "--")
            local_files_only = hub_repo_offline(model, suggested)  # fails in a second, not after retries
        import torch
        from transformers import GlmOcrForConditionalGeneration

        self.model_id = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if quantize not in ("none", "8bit", "4bit"):
            raise UserInputError(f"--quantize must be none, 8bit or 4bit, not {quantize!r}")
        if quantize != "none" and not self.device.startswith("cuda"):
            raise UserInputError("--quantize 8bit/4bit needs a CUDA GPU (bitsandbytes); use --quantize none on CPU")
        self.dtype = pick_dtype(self.device)
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "attn_implementation": "sdpa",
            "local_files_only": local_files_only,
        }
        kwargs.update(quantized_load(quantize, self.dtype, self.device))
        try:
            self.processor = load_processor(model, local_files_only=local_files_only)
            self.model = GlmOcrForConditionalGeneration.from_pretrained(model, **kwargs).eval()
        except OSError as err:
            raise FastsdError(f"could not load GLM-OCR from {model}: {err}") from err
        if quantize == "none":
            self.model.to(self.device)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.text_config.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [self.processor.tokenizer.eos_token_id])
        self.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else self.processor.pad_token_id
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        self.fast = None
        if fast:
            from .fast import FastGlmOcr

            self.fast = FastGlmOcr(self.model, cuda_graphs=quantize == "none")
        self._limits: dict[tuple[int, int], int] = {}  # page size -> batch size that fitted after an OOM

    def close(self) -> None:
        """Nothing to release but the model, which goes with the engine (the OCR protocol asks for it)."""

    @property
    def grid(self) -> PatchGrid:
        return self.processor.grid

    def batch_size_for(self, size: tuple[int, int]) -> int:
        """Pages of this size per batch: the given size, else what free VRAM holds (KV cache per page)."""
        if size in self._limits:
            return self._limits[size]
        if self.batch_size:
            return self.batch_size
        if not self.device.startswith("cuda"):
            return 4
        import torch

        tc = self.model.config.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        elt = torch.finfo(self.dtype).bits // 8
        tokens = self.grid.image_tokens(*size) + 32 + min(self.max_new_tokens, 1024)
        per_page = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * elt * tokens
        per_page += tc.vocab_size * 4 * 2 + tokens * 8  # logits + seen mask, positions
        free = usable_vram_bytes(torch.device(self.device))  # respects a per-process cap
        # one page's vision + prefill activations stay resident beside the cache
        patches = (size[0] // self.grid.patch_size) * (size[1] // self.grid.patch_size)
        overhead = 1.0 * 2**30 + patches * self.model.config.vision_config.hidden_size * elt * 24
        return max(1, min(MAX_AUTO_BATCH, int((free * 0.85 - overhead) // per_page)))

    def _stop_check(self, prompt_rows: int):
        """The repetition guard: every 16 tokens of a row, however often the decoder checks in.

        So a streamed row (checked every few steps) stops at the very token a plain one stops at.
        """
        last = [0] * prompt_rows

        def should_stop(row: int, tokens: list[int]) -> bool:
            if len(tokens) // GUARD_EVERY == last[row] // GUARD_EVERY and len(tokens) < self.max_new_tokens:
                return False
            last[row] = len(tokens)
            return repetition(self.processor.decode(tokens[-400:])) is not None

        return should_stop

    def _generate(
        self,
        jobs: list[PageJob],
        *,
        watch: Callable[[int, list[int]], bool] | None = None,
        check_every: int = 16,
    ) -> list[tuple[list[int], str]]:
        """Token ids and finish (eos/length/stopped) per job.

        Args:
            watch: also called every ``check_every`` tokens with (row, tokens so far) for rows still
                running, before the repetition guard; True stops the row (the server streams and
                cancels through it).
        """
        import torch

        inputs = self.processor.encode([j.image for j in jobs], [j.prompt for j in jobs])
        guard = self._stop_check(len(jobs))

        def should_stop(row: int, tokens: list[int]) -> bool:
            return (watch is not None and watch(row, tokens)) or guard(row, tokens)

        if self.fast is not None:
            results = self.fast.generate(
                inputs,
                max_new_tokens=self.max_new_tokens,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                repetition_penalty=self.repetition_penalty,
                check_every=check_every,
                should_stop=should_stop,
                sampling=[j.sampling for j in jobs],
            )
            return [(r.tokens, r.finish) for r in results]
        if any(j.sampling is not None and not j.sampling.greedy for j in jobs):
            raise FastsdError("sampling (temperature > 0) needs fastsd's fast decoder; this engine runs generate")
        from transformers import StoppingCriteria, StoppingCriteriaList

        length = inputs["input_ids"].shape[1]
        eos = set(self.eos_token_ids)

        class Guard(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                if (input_ids.shape[1] - length) % check_every == 0:
                    for row, seq in enumerate(input_ids[:, length:].tolist()):
                        if not eos.intersection(seq):  # finished rows only pad on
                            done[row] = should_stop(row, seq)
                return done

        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                repetition_penalty=self.repetition_penalty,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                stopping_criteria=StoppingCriteriaList([Guard()]),
            )
        rows = []
        for seq in out[:, length:].tolist():
            cut = next((i for i, t in enumerate(seq) if t in eos), None)
            rows.append((seq[:cut], "eos") if cut is not None else (seq, "length"))
        return rows

    def run(self, jobs: list[PageJob]) -> list[Generation]:
        """Recognise one batch of same-size pages; on CUDA OOM, split in halves and retry."""
        import torch

        start = time.perf_counter()
        try:
            rows = self._generate(jobs)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(jobs) == 1:
                raise FastsdError(
                    "out of GPU memory on a single page; lower --dpi, use --quantize 8bit, or free the GPU"
                ) from None
            half = len(jobs) // 2
            size = getattr(jobs[0].image, "size", None)
            if size is not None:
                self._limits[tuple(size)] = max(1, half)
            log.warning("CUDA out of memory with %d pages; retrying as %d + %d", len(jobs), half, len(jobs) - half)
            return self.run(jobs[:half]) + self.run(jobs[half:])
        seconds = (time.perf_counter() - start) / len(jobs)
        out = []
        for job, (tokens, finish) in zip(jobs, rows, strict=True):
            text, warnings, cut = _guarded(self.processor.decode(tokens))
            if cut or finish == "stopped":
                finish = "repetition"
                warnings = warnings or ["stopped: the output started repeating the same line"]
            elif finish == "length":
                warnings.append(f"truncated: reached the {self.max_new_tokens}-token cap (raise --max-new-tokens)")
            out.append(Generation(job.key, text.strip(), len(tokens), finish, seconds, warnings))
        return out


class OcrEngine(Protocol):
    """What :func:`fastsd.ocr.ocr` needs of an engine: the page grid, a batch size, a batch run, close."""

    name: str
    model_id: str

    @property
    def grid(self) -> PatchGrid: ...

    def batch_size_for(self, size: tuple[int, int]) -> int: ...

    def run(self, jobs: list[PageJob]) -> list[Generation]: ...

    def close(self) -> None: ...


class OpenAIEngine:
    """GLM-OCR served behind an OpenAI-compatible ``/v1/chat/completions`` (vLLM, SGLang).

    Requests go through the shared :class:`fastsd.vlm.client.ChatClient`: bounded concurrency,
    retries with backoff on 429/5xx and dropped connections, and a failed or malformed reply
    becomes that page's error (``finish="error"``) while the other pages go on.

    Args:
        base_url: server root, e.g. ``http://127.0.0.1:8080/v1`` (``/v1`` added when missing).
        model: model name the server knows (default zai-org/GLM-OCR).
        concurrency: requests in flight at once.
        api_key: bearer token if the server wants one (never logged).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = DEFAULT_MODEL,
        concurrency: int = 16,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        repetition_penalty: float = REPETITION_PENALTY,
        api_key: str | None = None,
        timeout: float = 600.0,
        grid: PatchGrid | None = None,
        retries: int = 4,
    ) -> None:
        from ..vlm.client import ChatClient

        self.client = ChatClient(
            base_url, model=model, api_key=api_key, concurrency=concurrency, retries=retries, timeout=timeout
        )
        self.url = self.client.url
        self.model_id = model
        self.concurrency = self.client.concurrency
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        # The server resizes itself; sizing pages to GLM-OCR's grid here keeps uploads small and identical.
        self._grid = grid or PatchGrid(min_pixels=12544, max_pixels=9633792)

    @property
    def grid(self) -> PatchGrid:
        return self._grid

    def batch_size_for(self, size: tuple[int, int]) -> int:
        return self.concurrency

    def close(self) -> None:
        self.client.close()

    def _generation(self, job: PageJob, reply: Any) -> Generation:
        if reply.error:
            return Generation(job.key, "", 0, "error", reply.seconds, [reply.error])
        text, warnings, cut = _guarded(reply.text)
        finish = "repetition" if cut else reply.finish
        if finish == "length":
            warnings.append(f"truncated: reached the {self.max_new_tokens}-token cap (raise --max-new-tokens)")
        return Generation(job.key, text.strip(), reply.tokens, finish, reply.seconds, warnings)

    def run(self, jobs: list[PageJob]) -> list[Generation]:
        """Send the pages as concurrent requests; results come back in job order."""
        from ..vlm.client import user_message

        params = {"max_tokens": self.max_new_tokens, "temperature": 0.0, "repetition_penalty": self.repetition_penalty}
        replies = self.client.complete_many([(user_message(j.image, j.prompt), params) for j in jobs])
        return [self._generation(j, r) for j, r in zip(jobs, replies, strict=True)]
