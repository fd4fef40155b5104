"""``fastsd ocr serve``: GLM-OCR behind an OpenAI-compatible API, with dynamic batching.

``POST /v1/chat/completions`` takes what vLLM/SGLang take for GLM-OCR (one ``image_url`` part as a
data URI or an http(s) URL, a text part with the prompt, ``max_tokens``, ``temperature``,
``stream``), ``GET /v1/models`` lists the served model, ``GET /health`` answers when up. The
GLM-OCR SDK in self-hosted mode and fastsd's own ``--engine openai`` talk to it unchanged.

Requests are not run one by one: a :class:`Batcher` thread takes the first waiting request,
gathers whatever else arrives within ``batch_wait_ms`` - and, up to ``max_wait_ms``, whatever is
still being received and decoded by the HTTP side (up to the batch limit), and decodes them
together with fastsd's fast decoder (static KV cache, CUDA-graph decode), each row stopping at its
own ``max_tokens``. Under many clients the GPU runs batches as large as in-process OCR does.

Decoding is greedy (GLM-OCR's recommended setting): ``temperature``/``top_p``/``top_k`` are
accepted and do not change the output. ``stream: true`` is answered as server-sent events whose
content arrives in one chunk when the request's batch is done.

Safety: a bearer token (``api_key``) is required for every ``/v1`` route when set, and a server
listening beyond loopback never runs without one (one is generated and printed once). Bodies,
images (bytes and pixels), ``max_tokens`` and the queue are limited; a request over a limit or
with a bad image gets one 4xx with the reason, in OpenAI's error shape, and the server goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import FastsdError, UserInputError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
SERVED_NAME = "glm-ocr"  # the GLM-OCR SDK's default ``ocr_api.model`` (vLLM's --served-model-name)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeLimits:
    """What one request may ask for, and how requests are batched.

    Attributes:
        max_body_bytes: request body size (a base64 page is ~1.4x its file).
        max_image_pixels: pixels of the decoded image (width x height).
        max_tokens: the largest ``max_tokens`` a request may ask for (also the default).
        max_queue: requests waiting at once; more get 429 (retry later).
        max_batch: requests decoded together (None: the engine's batch size for the page size).
        batch_wait_ms: how long the first request of a batch waits for company.
        max_wait_ms: how long it waits at most while more requests are still being received
            (after a batch, every client sends its next page at once; their images take a while to decode).
        allow_urls: fetch ``http(s)://`` image URLs (off by default on a public server).
        url_timeout_s: time allowed for fetching one image URL.
    """

    max_body_bytes: int = 40 * 2**20
    max_image_pixels: int = 40_000_000
    max_tokens: int = 8192
    max_queue: int = 512
    max_batch: int | None = None
    batch_wait_ms: float = 15.0
    max_wait_ms: float = 250.0
    allow_urls: bool = True
    url_timeout_s: float = 20.0


class ApiError(Exception):
    """A request problem answered as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# ----------------------------------------------------------------------------- requests
@dataclass
class Pending:
    """One request waiting for the batcher."""

    image: Any  # PIL image fitted to the model grid, or None for a text-only request
    prompt: str
    max_tokens: int
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


def _image_from_bytes(raw: bytes, limits: ServeLimits) -> Any:
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    def too_big(pixels: int, shape: str = "") -> ApiError:
        return ApiError(
            413,
            f"image is {shape}{pixels / 1e6:.0f} MP, over this server's {limits.max_image_pixels / 1e6:.0f} MP limit",
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(raw))
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise too_big(w * h, f"{w}x{h}, ")
            im.load()
            return im.convert("RGB")
        except Image.DecompressionBombError as err:  # PIL's own limit, checked on open
            m = re.search(r"\((\d+) pixels\)", str(err))
            raise too_big(int(m.group(1)) if m else limits.max_image_pixels + 1) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise ApiError(400, f"image_url does not hold a readable image ({type(err).__name__}: {err})") from None


def decode_image(url: str, limits: ServeLimits) -> Any:
    """The PIL image of an ``image_url``: a ``data:`` URI or (when allowed) an http(s) URL.

    Raises:
        ApiError: 400 bad/unsupported URL or undecodable image, 413 too large.
    """
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(400, "image_url data URI must be base64: data:image/png;base64,...", param="image_url")
        if len(payload) * 3 // 4 > limits.max_body_bytes:
            raise ApiError(413, "image is larger than this server's body limit")
        try:
            raw = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image_url data URI is not valid base64", param="image_url") from None
        return _image_from_bytes(raw, limits)
    if url.startswith(("http://", "https://")):
        if not limits.allow_urls:
            raise ApiError(
                400, "this server does not fetch image URLs; send the image as a data URI", param="image_url"
            )
        import httpx

        try:
            with httpx.stream("GET", url, timeout=limits.url_timeout_s, follow_redirects=True) as resp:
                if resp.status_code != 200:
                    raise ApiError(400, f"fetching image_url answered {resp.status_code}", param="image_url")
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_body_bytes:
                        raise ApiError(413, "image at image_url is larger than this server's limit")
        except httpx.HTTPError as err:
            raise ApiError(400, f"could not fetch image_url ({type(err).__name__})", param="image_url") from None
        return _image_from_bytes(bytes(buf), limits)
    raise ApiError(400, "image_url must be a data: URI or an http(s) URL", param="image_url")


def parse_request(body: dict, limits: ServeLimits, names: tuple[str, ...]) -> tuple[str | None, str, int, bool]:
    """Check a chat-completions body; returns (image URL or None, prompt, max_tokens, stream).

    Raises:
        ApiError: anything a client must fix (400), an unknown model (404), limits (413/400).
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in names and model != "default":
        raise ApiError(404, f"model {model!r} is not served here; use {names[0]!r}", "not_found_error", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    images: list[str] = []
    texts: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "each message needs a role of system, user or assistant", param="messages")
        if msg["role"] != "user":
            continue  # GLM-OCR reads one image with one instruction; other turns do not change it
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise ApiError(400, "message content must be a string or a list of parts", param="messages")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise ApiError(400, "image_url needs a url", param="image_url")
                images.append(url)
            else:
                raise ApiError(400, f"unsupported content part {kind!r}; use text and image_url", param="messages")
    if len(images) > 1:
        raise ApiError(400, f"one image per request ({len(images)} given); send one request per page or region")
    prompt = "\n".join(t for t in texts if t).strip()
    if not prompt and not images:
        raise ApiError(400, "the request has neither an image nor text", param="messages")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", limits.max_tokens))
    if max_tokens is None:
        max_tokens = limits.max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise ApiError(
            400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}", param="max_tokens"
        )
    temperature = body.get("temperature", 0.0)
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise ApiError(400, "temperature must be a number from 0 to 2", param="temperature")
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "n must be 1 (decoding is greedy)", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    return (images[0] if images else None), prompt, max_tokens, stream


# ----------------------------------------------------------------------------- batching
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
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            limit = self._limit(first)
            start = time.perf_counter()
            deadline = start + self.limits.batch_wait_ms / 1000
            cap = start + max(self.limits.batch_wait_ms, self.limits.max_wait_ms) / 1000
            while len(batch) < limit:
                now = time.perf_counter()
                coming = self._preparing > 0 and now < cap
                if now >= deadline and not coming:
                    break
                try:
                    item = self.queue.get(timeout=0.002 if coming else max(0.0, deadline - now))
                except queue.Empty:
                    continue
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[Pending]) -> None:
        texts = [p for p in batch if p.image is None]
        pages = [p for p in batch if p.image is not None]
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(pages))
        for p in texts:
            self._settle([p], lambda items: [self._text_only(items[0])])
        if pages:
            self._settle(pages, self._decode)

    def _settle(self, items: list[Pending], fn: Any) -> None:
        try:
            results = fn(items)
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
            return
        for p, res in zip(items, results, strict=True):
            p.future.set_result(res)

    def _decode(self, items: list[Pending]) -> list[tuple[str, int, int, str]]:
        from .engine import PageJob, _guarded

        eng = self.engine
        cap = max(p.max_tokens for p in items)
        saved = eng.max_new_tokens
        eng.max_new_tokens = cap  # the batch runs to its largest cap; each row is cut to its own
        try:
            jobs = [PageJob(i, p.image, p.prompt) for i, p in enumerate(items)]
            rows = eng._generate(jobs)
        finally:
            eng.max_new_tokens = saved
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


# ----------------------------------------------------------------------------- HTTP
def _bearer_dependency(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", "authentication_error")

    return check


async def _read_body(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"request body is {int(declared) / 2**20:.1f} MiB, over this server's {limit / 2**20:.0f} MiB limit"
        )
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"request body is over this server's {limit / 2**20:.0f} MiB limit")
    try:
        return json.loads(bytes(buf))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None


def build_app(batcher: Batcher, *, names: tuple[str, ...], api_key: str | None, limits: ServeLimits):
    """The FastAPI app of the server (routes, auth, limits, OpenAI-shaped errors)."""
    from .. import __version__

    app = FastAPI(title="fastsd OCR", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    auth = [Depends(_bearer_dependency(api_key))]
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:  # noqa: ARG001
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(status_code=err.status, content=err.body(), headers=headers)

    @app.get("/")
    async def root() -> dict:
        return {"service": "fastsd ocr", "models": "/v1/models", "chat": "/v1/chat/completions"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "fastsd"} for n in names],
        }

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request) -> Any:
        batcher.preparing(+1)
        try:
            body = await _read_body(request, limits.max_body_bytes)
            url, prompt, max_tokens, stream = parse_request(body, limits, names)
            image = None
            if url is not None:
                image = await run_in_threadpool(_fitted, url, limits, batcher.engine.grid)
            future = batcher.submit(Pending(image, prompt, max_tokens))
        finally:
            batcher.preparing(-1)
        text, completion, prompt_tokens, finish = await asyncio.wrap_future(future)
        rid, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", body.get("model") or names[0]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if not stream:
            return {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage,
            }

        def events():
            base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
            for delta, reason in (
                ({"role": "assistant", "content": ""}, None),
                ({"content": text}, None),
                ({}, finish),
            ):
                chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                if reason is not None:
                    chunk["usage"] = usage
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _fitted(url: str, limits: ServeLimits, grid: Any) -> Any:
    from PIL import Image

    image = decode_image(url, limits)
    size = grid.fit(*image.size)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


@dataclass
class OcrServer:
    """A running OCR server: ``url`` (``.../v1`` is the OpenAI base URL), ``api_key``, ``stop()``."""

    url: str
    host: str
    port: int
    api_key: str | None
    batcher: Batcher
    app: Any
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self.batcher.stop()

    def wait(self) -> None:
        """Serve until Ctrl-C (or a notebook interrupt)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            print("Stopping fastsd OCR server...", flush=True)
        finally:
            self.stop()

    def __enter__(self) -> OcrServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(
    model: str = "zai-org/GLM-OCR",
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    public: bool = False,
    limits: ServeLimits | None = None,
    served_name: str = SERVED_NAME,
    device: str | None = None,
    quantize: str = "none",
    engine_obj: Any = None,
    local_files_only: bool = False,
    quiet: bool = False,
) -> OcrServer:
    """Load GLM-OCR and serve it in the background; returns once the server answers.

    Args:
        host: ``127.0.0.1`` (this machine only) or ``0.0.0.0`` (others too: an API key is then required).
        port: TCP port (0 picks a free one; default 8080, the GLM-OCR SDK's default ``api_port``).
        api_key: bearer token clients must send; generated and printed once when the server is
            public (``public`` or a non-loopback ``host``) and none is given. Never logged.
        limits: request limits and batching (:class:`ServeLimits`); URL images off by default when public.
        served_name: the model name clients use (``glm-ocr``, as the SDK sends); the model id works too.
        engine_obj: an already loaded TransformersEngine to serve.

    Raises:
        UserInputError: busy port, too short a key.
        FastsdError: the server did not come up.
    """
    import uvicorn

    from ..redact import register
    from ..webui.server import _check_port

    exposed = public or host not in LOOPBACK
    if api_key is not None and len(api_key) < 8:
        raise UserInputError("--api-key must be at least 8 characters")
    if exposed and not api_key:
        api_key = secrets.token_urlsafe(24)
        print(f"the OCR server is reachable from other machines, so it needs a key: {api_key}", flush=True)
    register(api_key)
    if limits is None:
        limits = ServeLimits(allow_urls=not exposed)
    port = _check_port(host, port)
    if engine_obj is None:
        from .engine import TransformersEngine

        engine_obj = TransformersEngine(
            model, device=device, quantize=quantize, max_new_tokens=limits.max_tokens, local_files_only=local_files_only
        )
    from .engine import DEFAULT_MODEL

    # the SDK sends "glm-ocr", fastsd's openai engine "zai-org/GLM-OCR"; the loaded id works too
    names = tuple(dict.fromkeys([served_name, DEFAULT_MODEL, getattr(engine_obj, "model_id", model)]))
    batcher = Batcher(engine_obj, limits)
    app = build_app(batcher, names=names, api_key=api_key, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fastsd-ocr-http", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            batcher.stop()
            raise FastsdError(f"the OCR server did not start on {host}:{port}: see the log above")
        time.sleep(0.05)
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    handle = OcrServer(f"http://{shown}:{port}", host, port, api_key, batcher, app, server, thread)
    if not quiet:
        print(f"fastsd OCR server: {handle.base_url}  (model names: {', '.join(names)})", flush=True)
    return handle
