"""Chat-completions requests for ``fastsd ocr serve``: limits, OpenAI-shaped errors, body and image checks.

Everything a client must fix is an :class:`ApiError` with its HTTP status (400 bad request, 404
unknown model, 413 too large, 429 busy); nothing here touches the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from dataclasses import dataclass
from typing import Any

from .sampling import Sampling


@dataclass
class ServeLimits:
    """What one request may ask for, and how requests are batched.

    Attributes:
        max_body_bytes: request body size (a base64 page is ~1.4x its file).
        max_image_pixels: pixels of the decoded image (width x height).
        max_tokens: the largest ``max_tokens`` a request may ask for (also the default).
        max_queue: requests waiting at once; more get 429 (retry later).
        max_batch: requests decoded together (None: the engine's batch size for the page size).
        batch_wait_ms: how long the first request of a batch waits for company; each arrival extends the
            wait by as much again, up to ``max_wait_ms``.
        max_wait_ms: how long it waits at most while more requests are still being received
            (after a batch, every client sends its next page at once; their images take a while to decode).
        allow_urls: fetch ``http(s)://`` image URLs (off by default on a public server).
        url_timeout_s: time allowed for fetching one image URL.
        stream_every: decode steps between the text chunks of a batch that has streaming requests
            (each is a host sync; batches without one check every 16 steps).
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
    stream_every: int = 4


class ApiError(Exception):
    """A request problem answered as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


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


@dataclass(frozen=True)
class ChatRequest:
    """What a checked chat-completions body asks for."""

    image_url: str | None
    prompt: str
    max_tokens: int
    stream: bool
    sampling: Sampling  # temperature 0: greedy


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not ((low < value if open_low else low <= value) and value <= high)
    ):
        words = f"over {low:g} and at most {high:g}" if open_low else f"from {low:g} to {high:g}"
        raise ApiError(400, f"{name} must be a number {words}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int, low: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApiError(400, f"{name} must be an integer of at least {low}", param=name)
    return value


def sampling_of(body: dict) -> Sampling:
    """The request's sampling: OpenAI's ``temperature``/``top_p``/``seed`` and vLLM's ``top_k`` (-1 or 0: off).

    Without a ``seed`` a sampled request gets a random one, as OpenAI's API does.

    Raises:
        ApiError: 400 for a value out of range.
    """
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    top_k = max(0, _integer(body, "top_k", 0, -1))
    seed = secrets.randbits(63) if body.get("seed") is None else _integer(body, "seed", 0, -(2**63))
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def parse_request(body: dict, limits: ServeLimits, names: tuple[str, ...]) -> ChatRequest:
    """Check a chat-completions body.

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
    sampling = sampling_of(body)
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "n must be 1 (one answer per request)", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    return ChatRequest(images[0] if images else None, prompt, max_tokens, stream, sampling)
