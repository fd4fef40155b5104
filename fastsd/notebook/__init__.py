"""What the Colab notebooks call: they build widgets and call the library; nothing else lives here.

The notebooks in ``notebooks/`` are forms: each cell reads its fields and calls one or two
functions from here (``from fastsd import notebook as nb; nb.setup()``). The package is split by
what it is for, and this module re-exports the public names of every part:

- :mod:`.setup`: the first cell (one-line errors, log messages in the cell, Drive, the home) and
  :func:`model_path` for model fields;
- :mod:`.widgets`: uploads (ipywidgets 7 and 8), image grids, :class:`CaptionEditor`,
  :class:`RemoveConfirm`;
- :mod:`.dreambooth`, :mod:`.webui`, :mod:`.ocr`: one module per notebook.

Rules the helpers keep:

- Re-running a cell is safe: sessions are opened when they exist, a web UI started by an earlier
  run of a cell is stopped before a new one starts, uploads never overwrite.
- Nothing waits on ``input()``: choices are form fields, confirmations are buttons.
- An error is one line: ``fastsd: error: ...`` without a traceback (:func:`setup`).

The functions :func:`setup`, :func:`webui` and :func:`ocr` share their names with their modules,
so ``fastsd.notebook.webui`` is the function; reach the modules through
``importlib.import_module("fastsd.notebook.webui")`` (tests patch names there, where callers look them up).
"""

from __future__ import annotations

from .dreambooth import (
    add_images,
    auto_caption,
    caption_editor,
    confirm_remove,
    exports,
    latest_model,
    open_session,
    session_status,
    show_eval,
    train,
    train_config,
    try_model,
    upload_images,
)
from .ocr import ocr, ocr_inputs, preview_markdown, preview_ocr
from .setup import model_path, setup, show_error
from .webui import list_models, stop_webui, webui
from .widgets import (
    CaptionEditor,
    RemoveConfirm,
    images_html,
    save_uploads,
    show_images,
    thumbnail_bytes,
    upload_entries,
)

__all__ = [
    "CaptionEditor",
    "RemoveConfirm",
    "add_images",
    "auto_caption",
    "caption_editor",
    "confirm_remove",
    "exports",
    "images_html",
    "latest_model",
    "list_models",
    "model_path",
    "ocr",
    "ocr_inputs",
    "open_session",
    "preview_markdown",
    "preview_ocr",
    "save_uploads",
    "session_status",
    "setup",
    "show_error",
    "show_eval",
    "show_images",
    "stop_webui",
    "thumbnail_bytes",
    "train",
    "train_config",
    "try_model",
    "upload_entries",
    "upload_images",
    "webui",
]
