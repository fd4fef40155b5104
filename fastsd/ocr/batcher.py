"""The OCR server's batcher: one thread that owns the model and decodes concurrent requests together.

Rows of a batch are independent: each has its own ``max_tokens`` and sampling; a streaming row
hands its text out every ``stream_every`` decode steps through its ``listener``; a row whose client
went away (``cancelled``) stops at the next check, and a batch ends when its last row does.

Requests that arrive just after a small batch started join it: at the batch's first check (16
decode steps, a few percent of a page), if the queue holds at least as many requests as the batch
has rows and the batch is at most half its limit, the batch stops and starts again with them.
Without it, the first request after a quiet spell decodes alone, a whole decode of one row, while
the clients that sent theirs a few milliseconds later wait for it (H200, 32 clients: 64 requests
ran as batches of 1, 32 and 31). Greedy rows decode the same tokens again; rows that have streamed
text never restart. Each restart at least doubles the batch, so it happens at most log2(limit) times.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .chat import ApiError, ServeLimits
from .sampling import Sampling
from .stream import TextStream

log = logging.getLogger(__name__)


class _Restart(Exception):
    """A batch stopped at its first check so that the requests that arrived since can join it."""


@dataclass
class Pending:
    """One request waiting for the batcher."""

    image: Any  # PIL image fitted to the model grid, or None for a text-only request
    prompt: str
    max_tokens: int
    sampling: Sampling | None = None  # None: greedy
    listener: Callable[[str | None], None] | None = None  # streaming: text deltas, then None when done
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    streamed: str = ""  # text handed to the listener so far (a batch retried after OOM resumes after it)
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Gathered:
    """How one batch was gathered: for tuning the waits (``Batcher.gathered`` keeps the latest)."""

    size: int
    waited_ms: float  # from its first request to the batch's start
    closed: str  # full: the batch limit; quiet: nothing arrived within batch_wait_ms; cap: max_wait_ms ran out;
    # joined: a batch that restarted to take in the requests that arrived after it began
    still_receiving: int  # requests the HTTP side was still reading when the batch closed


class Batcher:
    """One thread that owns the model: gathers waiting requests into batches and decodes them.

    Args:
        engine: a loaded :class:`~fastsd.ocr.engine.TransformersEngine`.
        limits: queue size, batch size and wait.
    """

    def __init__(self, engine: Any, limits: ServeLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.queue: queue.Queue[Pending | None] = queue.Queue(maxsize=limits.max_queue)
        self.batches = 0
        self.largest_batch = 0
        self.abandoned = 0  # rows stopped mid-decode because their client went away
        self.restarts = 0  # small batches stopped at their first check to take in late arrivals
        self._rejoin: list[Pending] = []  # the rows of a restarted batch: the head of the next one
        self.gathered: deque[Gathered] = deque(maxlen=256)  # how the latest batches were gathered
        self._preparing = 0  # requests the HTTP side has accepted and not yet queued (images decoding)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fastsd-ocr-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Pending) -> Future:
        """Queue a request; its future resolves to ``(text, completion_tokens, prompt_tokens, finish)``.

        Raises:
            ApiError: 429 when the queue is full.
        """
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            raise ApiError(429, "the server is busy (request queue full); retry shortly", "rate_limit_error") from None
        return item.future

    def preparing(self, delta: int) -> None:
        """The HTTP side counts requests it is still reading/decoding (+1), then queued or refused (-1)."""
        with self._lock:
            self._preparing += delta

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(5)

    def _limit(self, item: Pending) -> int:
        if self.limits.max_batch:
            return self.limits.max_batch
        size = item.image.size if item.image is not None else (28, 28)
        return max(1, self.engine.batch_size_for(size))

    def _loop(self) -> None:
        while True:
            rejoin, self._rejoin = self._rejoin, []
            first = rejoin[0] if rejoin else self.queue.get()
            if first is None:
                return
            batch = rejoin or [first]
            limit = self._limit(first)
            start = time.perf_counter()
            deadline = start + self.limits.batch_wait_ms / 1000
            cap = start + max(self.limits.batch_wait_ms, self.limits.max_wait_ms) / 1000
            while len(batch) < limit:
                now = time.perf_counter()
                coming = self._preparing > 0 and now < cap
                if now >= deadline and not coming and self.queue.empty():
                    break
                try:
                    item = self.queue.get(timeout=0.002 if coming else max(0.0, deadline - now))
                except queue.Empty:
                    continue
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
                # while requests keep arriving, keep the door open a little longer (up to the cap): after
                # a batch, clients send their next pages in a trickle, and a batch of one left behind by a
                # closed window costs a whole decode
                deadline = min(cap, max(deadline, time.perf_counter() + self.limits.batch_wait_ms / 1000))
            closed = time.perf_counter()
            why = "full" if len(batch) >= limit else ("cap" if closed >= cap else "quiet")
            why = f"{why}, joined" if rejoin else why
            self.gathered.append(Gathered(len(batch), round((closed - start) * 1000, 1), why, self._preparing))
            self._run(batch, limit)

    def _run(self, batch: list[Pending], limit: int | None = None) -> None:
        live = []
        for p in batch:
            if p.cancelled.is_set():  # gone while it waited: nobody reads its answer
                p.future.cancel()
                self._done(p)
            else:
                live.append(p)
        batch = live
        texts = [p for p in batch if p.image is None]
        pages = [p for p in batch if p.image is not None]
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(pages))
        for p in texts:
            self._settle([p], lambda items: [self._text_only(items[0])])
        if pages:
            # only the whole gathered batch may restart: the halves of one that ran out of memory must not
            # grow back into it
            self._settle(pages, lambda items: self._decode(items, limit if len(items) == len(pages) else None))

    def _settle(self, items: list[Pending], fn: Any) -> None:
        try:
            results = fn(items)
        except _Restart:
            self.restarts += 1
            self._rejoin = items
            return
        except Exception as err:  # noqa: BLE001 - the batch's requests fail, the server goes on
            import torch

            if isinstance(err, torch.cuda.OutOfMemoryError) and len(items) > 1:
                torch.cuda.empty_cache()
                half = len(items) // 2
                self._settle(items[:half], fn)
                self._settle(items[half:], fn)
                return
            log.warning("OCR batch of %d failed: %s", len(items), err)
            for p in items:
                p.future.set_exception(ApiError(500, f"recognition failed: {err}", "server_error"))
                self._done(p)
            return
        for p, res in zip(items, results, strict=True):
            p.future.set_result(res)
            self._done(p)

    @staticmethod
    def _done(p: Pending) -> None:
        if p.listener is not None:
            p.listener(None)

    def _late_arrivals_join(self, items: list[Pending], limit: int | None, decoded: int, every: int) -> bool:
        """Whether a batch at its first check should stop and restart with the requests queued since."""
        return (
            limit is not None
            and decoded <= every
            and 2 * len(items) <= limit
            and self.queue.qsize() >= len(items)
            and not any(p.streamed for p in items)
        )

    def _decode(self, items: list[Pending], limit: int | None = None) -> list[tuple[str, int, int, str]]:
        from .engine import PageJob, _guarded

        eng = self.engine
        streams = [TextStream(eng.processor.decode) if p.listener is not None else None for p in items]
        restart: list[bool] = []  # decided once, at the first check

        def watch(row: int, tokens: list[int]) -> bool:
            """At each check: stream the row's new text; stop it at its own cap or when its client left."""
            if not restart:
                restart.append(self._late_arrivals_join(items, limit, len(tokens), every))
            if restart[0]:
                return True
            p, stream = items[row], streams[row]
            if stream is not None:
                stream.feed(tokens[: p.max_tokens])
                if len(stream.given) > len(p.streamed):
                    p.listener(stream.given[len(p.streamed) :])
                    p.streamed = stream.given
            if p.cancelled.is_set():
                self.abandoned += 1
                return True
            return len(tokens) >= p.max_tokens

        cap = max(p.max_tokens for p in items)
        saved = eng.max_new_tokens
        eng.max_new_tokens = cap  # the batch runs to its largest cap; each row stops at its own
        every = self.limits.stream_every if any(s is not None for s in streams) else 16
        try:
            jobs = [PageJob(i, p.image, p.prompt, p.sampling) for i, p in enumerate(items)]
            rows = eng._generate(jobs, watch=watch, check_every=every)
        finally:
            eng.max_new_tokens = saved
        if restart and restart[0]:
            raise _Restart
        out = []
        for p, (tokens, finish) in zip(items, rows, strict=True):
            if len(tokens) >= p.max_tokens:  # ran past this request's own cap (the batch's is larger)
                tokens, finish = tokens[: p.max_tokens], "length"
            text, _, cut = _guarded(eng.processor.decode(tokens))
            finish = "stop" if cut or finish in ("eos", "stopped") else "length"
            template = eng.processor.tokenizer(eng.processor.prompt_text(p.prompt), add_special_tokens=False)
            prompt_tokens = len(template["input_ids"]) - 1 + eng.grid.image_tokens(*p.image.size)  # <|image|> expanded
            out.append((text.strip(), len(tokens), prompt_tokens, finish))
        return out

    def _text_only(self, item: Pending) -> tuple[str, int, int, str]:
        """A request without an image (the SDK's connection check): plain ``generate`` on the text."""
        import torch

        eng = self.engine
        messages = [{"role": "user", "content": [{"type": "text", "text": item.prompt}]}]
        text = eng.processor.tokenizer.apply_chat_template(
            messages, chat_template=eng.processor.chat_template, tokenize=False, add_generation_prompt=True
        )
        ids = eng.processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(eng.device)
        with torch.inference_mode():
            out = eng.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=min(item.max_tokens, 256),
                do_sample=False,
                repetition_penalty=eng.repetition_penalty,
                eos_token_id=eng.eos_token_ids,
                pad_token_id=eng.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        eos = set(eng.eos_token_ids)
        cut = next((i for i, t in enumerate(new) if t in eos), None)
        finish = "stop" if cut is not None else "length"
        new = new[:cut] if cut is not None else new
        return eng.processor.decode(new).strip(), len(new), int(ids.shape[1]), finish
