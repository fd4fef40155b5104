"""Run the built-in web UI + A1111 API: :func:`start` (background, returns a handle) and :func:`serve`.

One FastAPI app serves the API under ``/sdapi/v1``, its OpenAPI docs at ``/docs`` and the
Gradio UI at ``/``; uvicorn runs it on a background thread so it works inside a notebook
kernel as well as from a terminal. Auth is optional: HTTP Basic for the API, Gradio's login
page for the UI. A server meant to be public (``public=True``) never runs without a password:
when none is given one is generated and printed once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FastsdError, UserInputError
from ..httpserve import BackgroundServer, check_port, serve_in_thread
from ..paths import fastsd_home

log = logging.getLogger(__name__)

GENERATED_USER = "fastsd"


def parse_auth(auth: str | tuple[str, str] | None) -> tuple[str, str] | None:
    """``"user:password"`` or ``(user, password)`` -> (user, password); None stays None.

    Raises:
        UserInputError: not in user:password form, or an empty part.
    """
    if auth is None or auth == "":
        return None
    if isinstance(auth, str):
        if ":" not in auth:
            raise UserInputError("auth must look like user:password")
        user, password = auth.split(":", 1)
    else:
        user, password = auth
    if not user or not password:
        raise UserInputError("auth must look like user:password, with neither part empty")
    return user, password


@dataclass
class ServerHandle(BackgroundServer):
    """A running server. ``url`` is where to open it; ``stop()`` ends it and frees the model.

    Also usable as a context manager (``with start(...) as server: ...``).
    """

    url: str
    host: str
    port: int
    auth_user: str | None
    backend: Any
    app: Any
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def api_url(self) -> str:
        """Base URL of the A1111 API (``.../sdapi/v1``)."""
        return f"{self.url}/sdapi/v1"

    label = "fastsd web UI"

    def release(self, deadline: float) -> None:
        """Interrupt the running job and release the model once the worker has stopped.

        A job that cannot be interrupted (a model load) is left to the daemon worker thread:
        releasing the model under a running job would race with it.
        """
        if self.backend.worker.stop(max(0.1, deadline - time.monotonic())):
            self.backend.manager.unload()
        else:
            log.info("the web UI's current job is still running; it ends with the process")

    def show(self, height: int = 900) -> Any:
        """Display the UI in a notebook output (Colab: through its port proxy)."""
        from ..colab import show_port

        if show_port(self.port, height):
            return None
        from IPython.display import IFrame, display  # not in Colab: a plain iframe

        frame = IFrame(self.url + "/", width="100%", height=height)
        display(frame)
        return frame

    def _repr_html_(self) -> str:
        return f'<a href="{self.url}/" target="_blank">fastsd web UI at {self.url}</a> · <a href="{self.url}/docs" target="_blank">API docs</a>'


def build_app(
    backend: Any, *, auth: tuple[str, str] | None, ui: bool = True, ui_defaults: dict[str, Any] | None = None
):
    """The FastAPI app: API routes, ``/docs``, and (with ``ui``) the Gradio app at ``/``."""
    from fastapi import FastAPI

    from .. import __version__
    from .api import install_error_handlers, make_router

    app = FastAPI(
        title="fastsd",
        version=__version__,
        description="AUTOMATIC1111-compatible API on diffusers (built into fastsd).",
        # FastAPI's own /docs, /redoc and /openapi.json take no dependencies: they are added below,
        # behind the same login as the API.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(make_router(backend, auth))
    _add_docs(app, auth)
    install_error_handlers(app)
    if ui:
        import gradio as gr

        from .ui import build_ui

        blocks = build_ui(backend, ui_defaults)
        outputs = Path(backend.manager.options["outdir_samples"])
        outputs.mkdir(parents=True, exist_ok=True)
        app = gr.mount_gradio_app(
            app, blocks, path="", auth=[auth] if auth else None, allowed_paths=[str(outputs)], ssr_mode=False
        )
    return app


def _add_docs(app: Any, auth: tuple[str, str] | None) -> None:
    """``/openapi.json`` and ``/docs`` (Swagger UI), behind the API's HTTP Basic login when there is one.

    The schema lists every route and field, and the docs page can send requests: with auth on,
    neither answers without the login.
    """
    from fastapi import Depends
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import JSONResponse

    from .api import make_auth_dependency

    login = [Depends(make_auth_dependency(auth))]

    @app.get("/openapi.json", include_in_schema=False, dependencies=login)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=login)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="fastsd API")


def start(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | tuple[str, str] | None = None,
    home: str | Path | None = None,
    public: bool = False,
    models_dirs: list[str | Path] | None = None,
    memory: dict[str, Any] | None = None,
    ui: bool = True,
    ui_defaults: dict[str, Any] | None = None,
    device: str | None = None,
    preload: bool = True,
    quiet: bool = False,
    max_job_pixels: int | None = None,
) -> ServerHandle:
    """Start the web UI + A1111 API in the background and return once it answers HTTP.

    Args:
        model: a model to offer first and load at start: any spec (a local file/folder, ``sd15``,
            ``hf:org/repo``, a URL), fetched first through :func:`fastsd.models.load.local_model`. Without it, the first model found under ``<home>/models`` or in sessions is used.
        host: interface to listen on; ``0.0.0.0`` to accept other machines (``--listen``).
        port: TCP port; 0 picks a free one.
        auth: ``"user:password"`` (or a tuple) required by the API (HTTP Basic) and the UI (login).
        home: fastsd home (default: the usual rule, see :func:`fastsd.paths.fastsd_home`).
        public: the server will be reachable from the internet (a tunnel): without ``auth`` a
            password is generated, printed once, and required.
        models_dirs: extra folders to list models, LoRAs and VAEs from.
        memory: overrides of the VRAM-based memory settings, e.g. ``{"cpu_offload": True}``.
        ui: mount the Gradio UI (False serves only the API).
        ui_defaults: starting values of the UI fields (``width``, ``height``, ``steps``...).
        device: torch device (default CUDA when available, else CPU).
        preload: load the model in the background right away instead of at the first request.
        quiet: do not print the URL (``serve`` and notebooks print it).
        max_job_pixels: the pixel budget of one job (width x height x batch_size x n_iter, and the
            largest init image or mask); default ``api.DEFAULT_MAX_JOB_PIXELS`` (64 MP). Jobs over it
            answer 422; ``/sdapi/v1/cmd-flags`` reports it.

    Returns:
        A :class:`ServerHandle` with ``url`` and ``stop()``.

    Raises:
        UserInputError: a bad ``auth``, a busy port, an unwritable home.
        FastsdError: the server did not come up.

    Example:
        >>> server = start("/content/models/sd15", port=0)  # doctest: +SKIP
        >>> requests.post(server.api_url + "/txt2img", json={"prompt": "a dog"})  # doctest: +SKIP
        >>> server.stop()  # doctest: +SKIP
    """
    from .api import DEFAULT_MAX_JOB_PIXELS, Backend
    from .generate import PipelineManager
    from .worker import Worker

    credentials = parse_auth(auth)
    budget = int(max_job_pixels or DEFAULT_MAX_JOB_PIXELS)
    if budget < 64 * 64:
        raise UserInputError(f"max_job_pixels {budget} is too small: give at least 4096 (one 64x64 image)")
    if public and credentials is None:
        credentials = (GENERATED_USER, secrets.token_urlsafe(12))
        # Printed once, never logged: this is the only place the password appears.
        print(
            f"fastsd web UI is public: log in as user {credentials[0]!r} with password {credentials[1]!r}", flush=True
        )
    root = fastsd_home(home)
    if model:
        from ..models.load import local_model

        model = str(local_model(model, home=root))  # sd15, hf:..., URLs: fetched; a local path as it is
    port = check_port(host, port)
    worker = Worker()
    manager = PipelineManager(
        root, model=model, models_dirs=models_dirs, memory=memory, device=device, state=worker.state
    )
    flags = {
        "api": True,
        "nowebui": not ui,
        "listen": host not in ("127.0.0.1", "localhost"),
        "server_name": host,
        "port": port,
        "ckpt": model,
        "ckpt_dir": str(root / "models"),
        "lora_dir": str(root / "models"),
        "data_dir": str(root),
        "share": public,
        "api_auth": "<set>" if credentials else None,  # never the secret itself
        "gradio_auth": "<set>" if credentials else None,
        "backend": "fastsd-builtin",
        "max_job_pixels": budget,  # fastsd: width x height x batch_size x n_iter allowed per job
    }
    backend = Backend(manager, worker, flags, max_job_pixels=budget)
    app = build_app(backend, auth=credentials, ui=ui, ui_defaults=ui_defaults)

    try:
        server, thread, url = serve_in_thread(app, host, port, name="fastsd-webui-http", what="the web UI")
    except FastsdError:
        worker.stop()
        raise
    handle = ServerHandle(url, host, port, credentials[0] if credentials else None, backend, app, server, thread)
    if preload and manager.options.get("sd_model_checkpoint"):
        future = worker.submit(manager.ensure_loaded, "load model")
        future.add_done_callback(_log_failure)
    if not quiet:
        print(f"fastsd web UI: {handle.url}/  (API: {handle.api_url}, docs: {handle.url}/docs)", flush=True)
    return handle


def _log_failure(future: Any) -> None:
    err = future.exception()
    if err is not None:
        log.error("loading the model failed: %s", err)


def serve(model: str | None = None, **kwargs: Any) -> None:
    """Run the web UI + API until Ctrl-C; takes :func:`start`'s arguments.

    Prints the local URL when ready and, on Ctrl-C, stops the server and releases the model.
    """
    handle = start(model, **kwargs)
    handle.wait()
