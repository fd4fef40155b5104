"""Built-in web UI and AUTOMATIC1111-compatible API on diffusers.

``start(...)`` runs the server in the background and returns a handle (``.url``, ``.stop()``);
``serve(...)`` runs it until Ctrl-C. See :mod:`fastsd.webui.server`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import ServerHandle

__all__ = ["ServerHandle", "serve", "start"]


def start(*args: Any, **kwargs: Any) -> ServerHandle:
    """See :func:`fastsd.webui.server.start` (imported lazily: it pulls in torch and gradio)."""
    from .server import start as _start

    return _start(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> None:
    """See :func:`fastsd.webui.server.serve`."""
    from .server import serve as _serve

    _serve(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "ServerHandle":
        from .server import ServerHandle

        return ServerHandle
    raise AttributeError(name)
