"""What the Colab notebooks call: they build widgets and call the library; nothing else lives here.

The notebooks in ``notebooks/`` are forms: each cell reads its fields and calls one or two
functions from here (``from fastsd import notebook as nb; nb.setup()``). The package is split by
what it is for, and this module re-exports the public names of every part:

- :mod:`.start`: the first cell (one-line errors, log messages in the cell, Drive, the home) and
  :func:`model_path` for model fields;
- :mod:`.widgets`: uploads (ipywidgets 7 and 8), image grids, :class:`CaptionEditor`,
  :class:`RemoveConfirm`;
- :mod:`.dreambooth`, :mod:`.servers` (web UI), :mod:`.reading` (OCR): one module per notebook;
- :mod:`.fields`: the comma-separated field parser they share.

Rules the helpers keep:

- Re-running a cell is safe: sessions are opened when they exist, a web UI started by an earlier
  run of a cell is stopped before a new one starts, uploads never overwrite.
- Nothing waits on ``input()``: choices are form fields, confirmations are buttons.
- An error is one line: ``fastsd: error: ...`` without a traceback (:func:`setup`).

The modules are not named after the functions the notebooks call (``setup``, ``webui``, ``ocr``),
so ``fastsd.notebook.webui`` is the function and ``fastsd.notebook.servers`` its module (tests patch
names there, where callers look them up).
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
from .reading import ocr, ocr_inputs, preview_markdown, preview_ocr
from .servers import list_models, stop_webui, webui
from .start import model_path, setup, show_error
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
