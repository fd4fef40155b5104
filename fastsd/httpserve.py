"""Serving an ASGI app from a background thread: the web UI's and the OCR server's one way.

Both servers run uvicorn on a daemon thread so they work inside a notebook cell (whose event
loop is already running) as well as from the CLI. This module owns the three facts they share:
a busy port is the user's error, said before anything loads; the server counts as up only once
uvicorn says it started; and the URL printed for ``0.0.0.0`` is the loopback one.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .errors import FastsdError, UserInputError

#: Seconds for uvicorn to come up before the start counts as failed.
READY_TIMEOUT_S = 60


def check_port(host: str, port: int) -> int:
    """``port`` if free on ``host`` (0 picks a free one).

    Raises:
        UserInputError: the port is taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as uvicorn binds: connections of a server stopped moments ago (TIME_WAIT) do not make the port busy,
        # so a notebook cell that restarts the server on the same port works
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("0.0.0.0", "") else "0.0.0.0", port))
        except OSError as err:
            raise UserInputError(f"port {port} on {host} is in use ({err.strerror}): pass another port") from None
        return s.getsockname()[1]


def serve_in_thread(app: Any, host: str, port: int, *, name: str, what: str) -> tuple[Any, threading.Thread, str]:
    """Start uvicorn for ``app`` on a daemon thread; returns (server, thread, local URL) once it is up.

    Args:
        name: the thread's name; what: the server in the error (``the web UI``).

    Raises:
        FastsdError: uvicorn stopped or did not come up within :data:`READY_TIMEOUT_S`.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.time() + READY_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            server.should_exit = True
            raise FastsdError(f"{what} did not start on {host}:{port}: see the log above")
        time.sleep(0.05)
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return server, thread, f"http://{shown}:{port}"


class BackgroundServer:
    """What a running server's handle does (mixin for a dataclass with ``_server`` and ``_thread``).

    ``stop()`` gives HTTP a short graceful window, then forces it, then calls :meth:`release`
    (the subclass's own cleanup: a model, a batcher); ``wait()`` serves until Ctrl-C or a
    notebook interrupt; ``with start(...) as server:`` stops it at the end.
    """

    _server: Any
    _thread: threading.Thread
    #: What the Ctrl-C line calls it.
    label = "fastsd server"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def release(self, deadline: float) -> None:
        """Free what the server used, by ``deadline`` (``time.monotonic()``) where it can."""

    def stop(self, timeout: float = 5) -> None:
        """Stop serving and release what the server used, within about ``timeout`` seconds (idempotent)."""
        deadline = time.monotonic() + timeout
        self._server.should_exit = True
        self._thread.join(min(3.0, timeout / 2))
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(1.0)
        self.release(deadline)

    def wait(self) -> None:
        """Block until the server stops; Ctrl-C (or a notebook interrupt) stops it cleanly."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            print(f"Stopping {self.label}...", flush=True)
        finally:
            self.stop()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
