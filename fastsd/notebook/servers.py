"""The web UI notebook: start a web UI in the background (one per kernel), list the models, stop it."""

from __future__ import annotations

import os
from typing import Any

from ..errors import UserInputError
from ..paths import fastsd_home
from .fields import split_field

#: The web UI a notebook started (one per kernel: starting another stops it first).
_WEBUI: dict[str, Any] = {}


def webui(
    backend: str = "builtin",
    *,
    model: str | os.PathLike[str] | None = None,
    tunnel: str = "auto",
    user: str = "",
    password: str = "",
    controlnet: str = "",
    extensions: str = "",
    port: int = 0,
    ngrok_token: str = "",
    home: str | os.PathLike[str] | None = None,
    timeout: float = 900.0,
) -> Any:
    """Start a web UI in the background and print its URL; a UI started earlier by this kernel stops first.

    Args:
        backend: ``builtin``, ``a1111``, ``forge`` or ``comfyui``.
        model: a model file/folder to load first (see :func:`fastsd.notebook.model_path`); A1111, Forge and ComfyUI
            get a Diffusers folder converted once to a single file (:func:`fastsd.models.load.local_model`).
        tunnel: ``auto`` (Colab's proxy in Colab, else none), ``colab``, ``ngrok``, ``cloudflared``,
            ``localtunnel``, ``gradio`` (built-in only) or ``none``.
        user / password: a login for the UI; blank: none, or a generated one when the tunnel is public.
        controlnet / extensions: comma-separated ControlNet names and extension git URLs.
        port: local port (0: the backend's default).
        ngrok_token: blank: ``NGROK_AUTHTOKEN`` from the environment or Colab's secrets.
        timeout: seconds to wait for a backend's first start (installs take minutes).

    Returns:
        The :class:`fastsd.launch.launcher.RunningUI` (``.url``, ``.stop()``, ``.log_tail()``).

    Raises:
        FastsdError: the UI did not start (the message carries the cause and the log's last lines).
    """
    from ..launch.launcher import WebUIOptions, start

    if bool(user.strip()) != bool(password):
        raise UserInputError("give both a username and a password for the login, or neither")
    if _WEBUI:
        stop_webui()
    opts = WebUIOptions(
        backend=backend,
        tunnel=None if tunnel in ("", "auto") else tunnel,
        model=str(model) if model else None,
        port=port or None,
        auth=f"{user.strip()}:{password}" if password else None,
        controlnet=split_field(controlnet),
        extensions=split_field(extensions),
        ngrok_token=ngrok_token.strip() or None,
        timeout=timeout,
        root=str(fastsd_home(home)),
    )
    ui = start(opts)
    ui.detach()
    _WEBUI["ui"] = ui
    print(f"open the web UI: {ui.url}")
    if ui.log_path:
        print(f"log: {ui.log_path}")
    return ui


def list_models(home: str | os.PathLike[str] | None = None) -> None:
    """Print the models every web UI started by fastsd lists (``<home>/models`` and sessions' exports)."""
    from ..launch.modelfolders import collect_models

    found = collect_models(fastsd_home(home))
    if not found:
        print("no model files in fastsd/models or in sessions yet")
    for kind, rel, _ in found:
        print(f"{kind:<10} {rel}")


def stop_webui() -> None:
    """Stop the web UI this kernel started, if any."""
    ui = _WEBUI.pop("ui", None)
    if ui is None:
        print("no web UI is running")
        return
    ui.stop()
    print(f"stopped the {ui.backend} web UI")
