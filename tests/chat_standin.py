"""A stand-in OpenAI-compatible chat-completions server on loopback (a real HTTP server thread).

It answers each request from what it was sent, so tests can tell replies apart: the reply text
names the prompt and the image's size and mean colour. Behaviour knobs (class attributes set per
test through :func:`serve`): ``busy`` answers the first N requests with 429 (``Retry-After: 0``)
or 503 alternately; a prompt or an image of colour ``malformed_rgb`` gets a reply without
``choices``; ``delay`` holds each request so concurrency can be measured.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageStat


class State:
    def __init__(self, busy: int = 0, malformed_rgb=None, delay: float = 0.0, reply=None) -> None:
        self.busy = busy
        self.malformed_rgb = malformed_rgb
        self.delay = delay
        self.reply = reply  # optional fn(prompt, image) -> text
        self.requests: list[dict] = []
        self.auth: list[str] = []
        self.statuses: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()


def _image(content):
    for c in content:
        if c.get("type") == "image_url":
            raw = base64.b64decode(c["image_url"]["url"].split(",", 1)[1])
            return Image.open(io.BytesIO(raw)).convert("RGB")
    return None


class _Handler(BaseHTTPRequestHandler):
    state: State

    def _send(self, status: int, payload, headers=()) -> None:
        data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server API
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with st.lock:
            st.requests.append(body)
            st.auth.append(self.headers.get("Authorization", ""))
            n = len(st.requests)
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            time.sleep(st.delay)
            if n <= st.busy:
                status = 429 if n % 2 else 503
                with st.lock:
                    st.statuses.append(status)
                self._send(status, {"error": "busy"}, [("Retry-After", "0")])
                return
            content = body["messages"][0]["content"]
            prompt = next(c["text"] for c in content if c["type"] == "text")
            image = _image(content)
            mean = tuple(round(v) for v in ImageStat.Stat(image).mean) if image else None
            if st.malformed_rgb is not None and mean == tuple(st.malformed_rgb):
                self._send(200, {"object": "chat.completion", "oops": True})
                return
            if st.reply is not None:
                text = st.reply(prompt, image)
            else:
                size = f"{image.size[0]}x{image.size[1]}" if image else "no image"
                text = f"reply to [{prompt[:40]}] {size} rgb{mean}"
            with st.lock:
                st.statuses.append(200)
            self._send(
                200,
                {
                    "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"completion_tokens": 5},
                },
            )
        finally:
            with st.lock:
                st.in_flight -= 1

    def log_message(self, *args):
        pass


@contextmanager
def serve(**knobs):
    """Run the stand-in server; yields (base_url, state)."""
    state = State(**knobs)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()
