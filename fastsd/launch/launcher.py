"""``fastsd webui``: start a web UI with fastsd's models and make it reachable — one call.

:func:`launch` picks the tunnel (Colab's proxy by default inside Colab, where the free tier does
not allow third-party tunnels), makes sure a public tunnel never serves the UI without a login,
installs and starts the backend under supervision, opens the tunnel once the server answers,
prints the checked URL, and blocks until Ctrl-C / a cell interrupt, then stops everything.
:func:`start` does the same without blocking (notebooks) and returns a :class:`RunningUI`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import FastsdError, UserInputError
from ..paths import cache_dir, fastsd_home
from ..redact import register
from ..runtime import environment, gpus
from . import tunnel

log = logging.getLogger(__name__)

BACKEND_NAMES = ("a1111", "forge", "comfyui", "builtin")


@dataclass
class WebUIOptions:
    """What ``fastsd webui`` was asked for (the CLI's flags, as values)."""

    backend: str = "builtin"
    tunnel: str | None = None  # None: colab inside Colab, else none
    model: str | None = None
    port: int | None = None
    listen: bool = False
    auth: str | None = None
    ref: str | None = None
    temp: bool = False
    extensions: list[str] = field(default_factory=list)
    controlnet: list[str] = field(default_factory=list)
    family: str | None = None
    ngrok_token: str | None = None
    timeout: float = 900.0
    root: str | None = None
    memory_plan: str | None = None  # built-in UI, SD3/FLUX: fastsd.models.memplan's plan name or "auto"


def choose_tunnel(
    requested: str | None,
    *,
    env: str | None = None,
    tier: Callable[[], str] = tunnel.colab_tier,
    echo: Callable[[str], None] = print,
) -> str:
    """The tunnel to use: the requested one, else Colab's proxy in Colab, else none.

    In Colab without a sign of a paid plan, the free-tier rule is said plainly; an explicit
    third-party tunnel is still honoured (the user chose it), with the same notice.
    """
    env = env or environment()
    if requested is not None and requested not in tunnel.KINDS:
        raise UserInputError(f"unknown tunnel {requested!r}: choose from {', '.join(tunnel.KINDS)}")
    if env != "colab":
        return requested or "none"
    if tier() != "paid" and (requested is None or tunnel.needs_password(requested)):
        echo(tunnel.COLAB_FREE_NOTICE)
    return requested or "colab"


def check_auth(auth: str | None) -> str | None:
    """Validate ``user:password`` (and register it as a secret)."""
    if auth is None:
        return None
    if not re.fullmatch(r"[^:,\s]+:[^,\s]{4,}", auth):
        raise UserInputError("--auth must be user:password (no spaces or commas, password of 4+ characters)")
    register(auth)
    return auth


def resolve_auth(auth: str | None, kind: str, listen: bool, echo: Callable[[str], None]) -> str | None:
    """The login to use: the given one, or a generated one when the UI would be public without it."""
    auth = check_auth(auth)
    if auth is None and (tunnel.needs_password(kind) or listen):
        auth = tunnel.generate_auth()
        user, password = auth.split(":", 1)
        # Shown once, on the terminal / cell output only: the user needs it to log in. Never logged.
        echo(f"the web UI is public, so it gets a login: user {user}  password {password}")
    return auth


def _announce(t: tunnel.Tunnel, auth: str | None, echo: Callable[[str], None]) -> None:
    echo(f"web UI ready: {t.url}" + (f"  (local: {t.local_url})" if t.url != t.local_url else ""))
    if t.note:
        echo(t.note)
    if auth:
        echo(f"log in as {auth.split(':', 1)[0]} (password as given or shown above)")


@dataclass
class RunningUI:
    """A web UI started by :func:`start`: where to open it, and how to stop it.

    Attributes:
        backend: ``builtin``, ``a1111``, ``forge`` or ``comfyui``.
        url: the checked URL to open (the tunnel's, or the local one).
        local_url: ``http://127.0.0.1:PORT``.
        auth_user: the login's user name, when there is a login.
        log_path: the live log of a backend process (None for the built-in UI, which runs in process).
    """

    backend: str
    url: str
    local_url: str
    auth_user: str | None = None
    log_path: Path | None = None
    _tunnel: tunnel.Tunnel | None = field(default=None, repr=False)
    _server: Any = field(default=None, repr=False)  # fastsd.webui.server.ServerHandle
    _supervisor: Any = field(default=None, repr=False)  # fastsd.launch.supervise.Supervisor
    _watchdog: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        if self._supervisor is not None:
            return bool(self._supervisor.running)
        return self._server is not None and bool(self._server.running)

    def log_tail(self, n: int = 40) -> list[str]:
        """The last ``n`` lines of a backend's log (empty for the built-in UI)."""
        return self._supervisor.last_lines(n) if self._supervisor is not None else []

    def wait(self) -> None:
        """Block until the server stops or Ctrl-C / a cell interrupt; a backend that crashes is restarted."""
        if self._supervisor is not None:
            self._supervisor.wait()
        else:
            _wait_forever(self._server)

    def detach(self) -> None:
        """Keep running in the background (a notebook cell returns): the backend's log goes to its
        file only, and a watchdog thread restarts the backend if it crashes (within its bound)."""
        sup = self._supervisor
        if sup is None or self._watchdog is not None:
            return
        sup.echo = None

        def watch() -> None:
            try:
                sup.wait()
            except FastsdError as err:
                log.error("web UI %s stopped: %s", self.backend, err)

        self._watchdog = threading.Thread(target=watch, name=f"watch-{self.backend}", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        """Close the tunnel and stop the server (idempotent)."""
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        if self._supervisor is not None:
            self._supervisor.stop()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _repr_html_(self) -> str:
        return f'<a href="{self.url}" target="_blank">{self.backend} web UI: {self.url}</a>'


def start(opts: WebUIOptions, *, echo: Callable[[str], None] = print) -> RunningUI:
    """Start the web UI described by ``opts`` in the background; return once its URL answers.

    Used by notebooks, where a cell must finish while the UI keeps running; :func:`launch` (the
    CLI) calls it and then waits.

    Returns:
        A :class:`RunningUI`; call ``stop()`` to end it.

    Raises:
        UserInputError: bad options (unknown backend/tunnel, malformed --auth, ComfyUI with
            --listen or behind a tunnel that cannot carry a login...).
        FastsdError: install, startup or tunnel failures, each with what to do (a backend that
            did not start carries its last log lines).
    """
    backend_name = opts.backend.lower()
    if backend_name not in BACKEND_NAMES:
        raise UserInputError(f"unknown backend {opts.backend!r}: choose from {', '.join(BACKEND_NAMES)}")
    kind = choose_tunnel(opts.tunnel, echo=echo)
    # What can be checked is checked before a model loads or a backend installs (minutes).
    if kind == "ngrok":
        opts.ngrok_token = tunnel.ngrok_token(opts.ngrok_token)
    if opts.model:
        from ..models.fetch import check_spec

        check_spec(str(opts.model))
    home = fastsd_home(opts.root)
    if backend_name == "builtin":
        return _start_builtin(opts, kind, home, echo)
    return _start_backend(opts, backend_name, kind, home, echo)


def launch(opts: WebUIOptions, *, echo: Callable[[str], None] = print) -> int:
    """Run the web UI described by ``opts`` until interrupted. Returns an exit code.

    Raises:
        UserInputError: bad options (see :func:`start`).
        FastsdError: install, startup or tunnel failures, each with what to do.
    """
    ui = start(opts, echo=echo)
    try:
        echo("press Ctrl-C (or interrupt the cell) to stop")
        ui.wait()
    finally:
        ui.stop()
    return 0


def _wait_forever(server: Any = None) -> None:
    while server is None or server.running:
        time.sleep(1 if server is not None else 3600)


def _start_builtin(opts: WebUIOptions, kind: str, home: Path, echo: Callable[[str], None]) -> RunningUI:
    from ..webui import server  # the built-in server (fastsd.webui.server); imported only when used

    port = opts.port or 7860
    auth = resolve_auth(opts.auth, kind, opts.listen, echo)
    host = "0.0.0.0" if opts.listen else "127.0.0.1"
    public = kind not in ("none", "colab") or opts.listen
    memory = {"memory_plan": opts.memory_plan} if opts.memory_plan else None
    handle = server.start(
        opts.model, host=host, port=port, auth=_auth_pair(auth), home=home, public=public, memory=memory
    )
    try:
        t = tunnel.open_tunnel(kind, handle.port, auth=auth, ngrok_token_value=opts.ngrok_token, echo=echo)
    except BaseException:
        handle.stop()
        raise
    _announce(t, auth, echo)
    user = auth.split(":", 1)[0] if auth else None
    return RunningUI("builtin", t.url, t.local_url, user, None, t, handle, None)


def _auth_pair(auth: str | None) -> tuple[str, str] | None:
    if auth is None:
        return None
    user, password = auth.split(":", 1)
    return user, password


def _start_backend(opts: WebUIOptions, name: str, kind: str, home: Path, echo: Callable[[str], None]) -> RunningUI:
    from . import controlnet as cn
    from .backends import context_for, get_backend, install_backend, install_dir_for, xformers_installed
    from .modelfolders import build_links, comfy_extra_paths
    from .supervise import Supervisor

    backend = get_backend(name)
    if kind == "gradio":
        raise UserInputError("--tunnel gradio is the built-in UI's share link: use cloudflared or ngrok with " + name)
    if name == "comfyui" and kind in ("cloudflared", "localtunnel"):
        raise UserInputError(
            "ComfyUI has no login of its own, so it is not put on a public tunnel that cannot add one: "
            "use --tunnel ngrok (fastsd adds a password) or --tunnel colab"
        )
    if name == "comfyui" and opts.listen:
        # --listen binds 0.0.0.0, where nothing could ask for the password: refuse rather than warn.
        raise UserInputError(
            "ComfyUI has no login of its own, so fastsd does not expose it with --listen: drop --listen and "
            "use --tunnel ngrok (fastsd adds a password) or --tunnel colab"
        )
    auth = resolve_auth(opts.auth, kind, opts.listen, echo)

    family = cn.base_family(opts.model, opts.family)
    controlnets = cn.resolve(opts.controlnet, family)
    ckpt = None
    if opts.model:
        from ..models.load import local_model

        # the backends load single files: sd15, hf:..., URLs are fetched and Diffusers folders converted once
        ckpt = local_model(opts.model, want="file", home=home).resolve()

    inst = install_backend(
        backend,
        install_dir_for(backend, home, temp=opts.temp),
        ref=opts.ref,
        extensions=opts.extensions,
        controlnet=bool(controlnets),
        echo=echo,
    )
    for model in controlnets:
        cn.fetch(model, home, echo=echo)
    links = cache_dir() / "webui-links" / name
    linked = build_links(home, links)
    echo(f"linked {len(linked)} model file(s) from {home} into {links}")
    if name == "comfyui":
        storage.write_text(links / "extra_model_paths.yaml", comfy_extra_paths(links))

    ctx = context_for(
        inst,
        links,
        port=opts.port or backend.spec.default_port,
        listen=opts.listen,
        auth=auth if name != "comfyui" else None,
        gpu=bool(gpus()),
        xformers=xformers_installed(inst.python),
        controlnet=bool(controlnets) or name == "forge",
        ckpt=ckpt,
    )
    echo(f"starting {backend.spec.title}: {backend.describe(ctx)}")
    sup = Supervisor(
        f"webui-{name}",
        backend.command(ctx),
        ready_url=backend.ready_url(ctx),
        env=backend.environment(ctx),
        cwd=inst.install_dir,
        auth=ctx.auth,
        ready_timeout=opts.timeout,
        log_path=cache_dir() / "logs" / f"webui-{name}.log",
        mirror_path=home / "logs" / f"webui-{name}.log",
        echo=echo,
    )
    try:
        sup.start()
        sup.wait_ready()
        t = tunnel.open_tunnel(kind, ctx.port, auth=auth, ngrok_token_value=opts.ngrok_token, echo=echo)
    except BaseException:
        sup.stop()
        raise
    _announce(t, auth, echo)
    user = auth.split(":", 1)[0] if auth else None
    return RunningUI(name, t.url, t.local_url, user, sup.log_path, t, None, sup)
