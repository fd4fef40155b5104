"""``fastsd ocr serve``: GLM-OCR behind an OpenAI-compatible API, with dynamic batching.

``POST /v1/chat/completions`` takes what vLLM/SGLang take for GLM-OCR (one ``image_url`` part as a
data URI or an http(s) URL, a text part with the prompt, ``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stream``), ``GET /v1/models`` lists the served model, ``GET /health`` answers when up. The
GLM-OCR SDK in self-hosted mode and fastsd's own ``--engine openai`` talk to it unchanged.

Requests are not run one by one: a :class:`~.batcher.Batcher` thread takes the first waiting request,
gathers whatever else arrives within ``batch_wait_ms`` of the last arrival - and, up to ``max_wait_ms``,
whatever is still being received and decoded by the HTTP side (up to the batch limit), and decodes them
together with fastsd's fast decoder (static KV cache, CUDA-graph decode), each row stopping at its
own ``max_tokens``. Requests that land just after a small batch began join it (the batch restarts
at its first check). Under many clients the GPU runs batches as large as in-process OCR does.

Decoding is greedy unless a request asks for ``temperature`` > 0 (GLM-OCR's recommended setting,
and the SDK's, is 0). A sampled request draws from ``softmax(logits / temperature)`` within its
``top_k``/``top_p``, inside the same CUDA-graph decode step as the greedy rows beside it
(:mod:`~.sampling`); its random numbers come from its ``seed`` alone, so the same seed gives the
same answer whatever batch it lands in, and a request without one gets a random seed. Greedy rows
are bit-identical to a batch without sampling. A text-only request (the SDK's connection check)
goes through plain ``generate`` and is always greedy.

``stream: true`` is answered as server-sent ``chat.completion.chunk`` events while the batch
decodes: the role, then the new text every ``stream_every`` decode steps (detokenized through a
sliding window so a character is never split, and held back where the repetition guard or the
final strip could still remove it, so the chunks join to exactly the non-streamed answer), a last
chunk with ``finish_reason`` and ``usage``, then ``data: [DONE]``. A client that disconnects stops
its row at the next check; the others go on, and the batch ends when its last row does (rows are
not refilled mid-batch: a request that arrives meanwhile starts with the next batch).

Safety: a bearer token (``api_key``) is required for every ``/v1`` route when set, and a server
listening beyond loopback never runs without one (one is generated and printed once). Bodies,
images (bytes and pixels), ``max_tokens`` and the queue are limited; a request over a limit or
with a bad image gets one 4xx with the reason, in OpenAI's error shape, and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import FastsdError, UserInputError
from ..httpserve import BackgroundServer
from .batcher import Batcher, Pending
from .chat import ApiError, ServeLimits, decode_image, parse_request

log = logging.getLogger(__name__)
DEFAULT_PORT = 8080
SERVED_NAME = "glm-ocr"  # the GLM-OCR SDK's default ``ocr_api.model`` (vLLM's --served-model-name)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
            req = parse_request(body, limits, names)
            if not req.sampling.greedy and getattr(batcher.engine, "fast", None) is None:
                raise ApiError(400, "this server decodes greedily only (its engine runs generate)", param="temperature")
            image = None
            if req.image_url is not None:
                image = await run_in_threadpool(_fitted, req.image_url, limits, batcher.engine.grid)
            pending = Pending(image, req.prompt, req.max_tokens, req.sampling)
            if req.stream:
                deltas: asyncio.Queue[str | None] = asyncio.Queue()
                pending.listener = _listener(asyncio.get_running_loop(), deltas)
            batcher.submit(pending)
        finally:
            batcher.preparing(-1)
        rid, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", body.get("model") or names[0]
        if req.stream:
            return StreamingResponse(_events(pending, deltas, rid, model), media_type="text/event-stream")
        text, completion, prompt_tokens, finish = await asyncio.wrap_future(pending.future)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": _usage(prompt_tokens, completion),
        }

    return app


def _listener(loop: asyncio.AbstractEventLoop, deltas: asyncio.Queue):
    """What the batcher thread calls with each text delta: puts it on the request's queue in its loop."""

    def put(delta: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is closed: nobody listens any more
            loop.call_soon_threadsafe(deltas.put_nowait, delta)

    return put


def _usage(prompt_tokens: int, completion: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(pending: Pending, deltas: asyncio.Queue, rid: str, model: str):
    """The SSE chunks of a streamed answer as the batcher hands its text over; a client gone cancels the row."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    answered = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        sent = []
        while (delta := await deltas.get()) is not None:
            sent.append(delta)
            yield chunk({"content": delta})
        try:
            text, completion, prompt_tokens, finish = await asyncio.wrap_future(pending.future)
        except ApiError as err:  # the status line is long gone: the error is an event, as OpenAI streams it
            answered = True
            yield _sse(err.body())
            yield _sse("[DONE]")
            return
        given = "".join(sent)
        if not text.startswith(given):  # cannot happen while TextStream keeps its promise; say so if it does
            log.warning("streamed text (%d chars) is not a prefix of the answer; nothing more is sent", len(given))
        rest = text[len(given) :] if text.startswith(given) else ""
        if rest:
            yield chunk({"content": rest})
        answered = True
        yield chunk({}, finish, usage=_usage(prompt_tokens, completion))
        yield _sse("[DONE]")
    finally:
        if not answered:
            pending.cancelled.set()  # the client went away: its row stops at the next check


def _fitted(url: str, limits: ServeLimits, grid: Any) -> Any:
    from PIL import Image

    image = decode_image(url, limits)
    size = grid.fit(*image.size)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


@dataclass
class OcrServer(BackgroundServer):
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

    label = "fastsd OCR server"

    def release(self, deadline: float) -> None:
        self.batcher.stop()


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
    from ..httpserve import check_port, serve_in_thread
    from ..redact import register

    exposed = public or host not in LOOPBACK
    if api_key is not None and len(api_key) < 8:
        raise UserInputError("--api-key must be at least 8 characters")
    if limits is None:
        limits = ServeLimits(allow_urls=not exposed)
    port = check_port(host, port)
    if engine_obj is None:
        from .engine import TransformersEngine

        engine_obj = TransformersEngine(
            model, device=device, quantize=quantize, max_new_tokens=limits.max_tokens, local_files_only=local_files_only
        )
    if exposed and not api_key:  # made once the model loaded: a failed start prints no key
        api_key = secrets.token_urlsafe(24)
        print(f"the OCR server is reachable from other machines, so it needs a key: {api_key}", flush=True)
    register(api_key)
    from .engine import DEFAULT_MODEL

    # the SDK sends "glm-ocr", fastsd's openai engine "zai-org/GLM-OCR"; the loaded id works too
    names = tuple(dict.fromkeys([served_name, DEFAULT_MODEL, getattr(engine_obj, "model_id", model)]))
    batcher = Batcher(engine_obj, limits)
    app = build_app(batcher, names=names, api_key=api_key, limits=limits)
    try:
        server, thread, url = serve_in_thread(app, host, port, name="fastsd-ocr-http", what="the OCR server")
    except FastsdError:
        batcher.stop()
        raise
    handle = OcrServer(url, host, port, api_key, batcher, app, server, thread)
    if not quiet:
        print(f"fastsd OCR server: {handle.base_url}  (model names: {', '.join(names)})", flush=True)
    return handle
