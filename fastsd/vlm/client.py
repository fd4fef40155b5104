"""The one OpenAI-compatible chat-completions client: OCR, captions and questions all send through it.

vLLM, SGLang, hosted GLM-4.5V / ERNIE 4.5 VL and OpenAI itself speak ``POST /v1/chat/completions``.
:class:`ChatClient` sends many requests at once (bounded by ``concurrency``), retries what a busy
server answers (429, 5xx) and dropped connections with exponential backoff, honouring
``Retry-After``, and turns one request's failure (an error status after the retries, a reply
without ``choices[0].message.content``) into that item's :class:`ChatReply` error: the rest go
on. The API key is sent as a bearer token and registered with :mod:`fastsd.redact`, so no log
line or message prints it.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import UserInputError

log = logging.getLogger(__name__)

#: Statuses a server answers when it is busy or restarting: worth another try.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: The environment variable (or Colab secret) the key is read from unless the caller names another.
DEFAULT_KEY_NAME = "OPENAI_API_KEY"


def image_data_url(image: Any) -> str:
    """A PNG data URL of a PIL image (what chat-completions servers accept for local images)."""
    from ..storage import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def chat_url(base_url: str) -> str:
    """``.../v1/chat/completions`` for a server root (``/v1`` added when missing)."""
    if not base_url:
        raise UserInputError("--engine openai needs --base-url, e.g. http://127.0.0.1:8080/v1")
    url = base_url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


def api_key(name: str | None = None) -> str | None:
    """The endpoint's key from the environment or Colab's Secrets panel (registered as a secret), or None."""
    from ..colab import secret

    return secret(name or DEFAULT_KEY_NAME)


def user_message(image: Any | None, text: str) -> list[dict[str, Any]]:
    """One user turn: the image (if any) as a data URL, then the text."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@dataclass
class ChatReply:
    """What the server answered for one request: the text, or an error saying why not."""

    text: str = ""
    finish: str = "eos"  # eos | length | error
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None


class ChatClient:
    """Chat completions against one OpenAI-compatible server (thread-safe; close it, or use ``with``).

    Args:
        base_url: server root, e.g. ``http://127.0.0.1:8080/v1``.
        model: model name the server knows.
        api_key: bearer token (never logged); None sends none.
        concurrency: requests in flight at once.
        retries: further tries after a 429/5xx or a dropped connection.
        backoff: first wait in seconds; doubled each retry (with jitter), capped at ``max_backoff``.
        timeout: seconds per request.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        concurrency: int = 16,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 600.0,
    ) -> None:
        import httpx

        from ..redact import register

        self.url = chat_url(base_url)
        self.model = model
        self.concurrency = max(1, int(concurrency))
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        register(api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._http = httpx.Client(timeout=timeout, headers=headers, limits=limits)
        #: Set once a request found no server through all its retries: the rest fail at once with it.
        self.unreachable: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        base = min(self.max_backoff, self.backoff * 2**attempt)
        return base * (0.5 + random.random() / 2)

    def complete(self, messages: list[dict[str, Any]], **params: Any) -> ChatReply:
        """Send one request (retrying busy answers); never raises for what the server did."""
        import httpx

        body = {"model": self.model, "messages": messages, **params}
        start = time.perf_counter()
        problem = ""
        answered = False
        for attempt in range(self.retries + 1):
            if self.unreachable:  # another request already waited out every retry
                return ChatReply(finish="error", seconds=time.perf_counter() - start, error=self.unreachable)
            retry_after = None
            try:
                resp = self._http.post(self.url, json=body)
            except httpx.HTTPError as err:
                problem = f"{self.url} unreachable ({type(err).__name__}); is the server running?"
            else:
                answered = True
                if resp.status_code == 200:
                    return self._parse(resp, start)
                problem = f"server said {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRY_STATUSES:
                    break
                retry_after = resp.headers.get("Retry-After")
            if attempt < self.retries:
                wait = self._wait(attempt, retry_after)
                log.debug("chat request failed (%s); retry %d in %.1fs", problem, attempt + 1, wait)
                time.sleep(wait)
        if not answered:
            self.unreachable = problem
        return ChatReply(finish="error", seconds=time.perf_counter() - start, error=problem)

    def _parse(self, resp: Any, start: float) -> ChatReply:
        seconds = time.perf_counter() - start
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return ChatReply(
                finish="error",
                seconds=seconds,
                error=f"malformed reply from the server ({type(err).__name__}: {err}): {resp.text[:200]}",
            )
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        finish = "length" if choice.get("finish_reason") == "length" else "eos"
        return ChatReply(text, finish, int(tokens) if isinstance(tokens, int) else 0, seconds)

    def complete_many(self, requests: list[tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[ChatReply]:
        """Send ``(messages, params)`` requests, up to ``concurrency`` at once; replies in request order."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self.complete(r[0], **r[1]), requests))
