"""The first cell of every notebook: one-line errors, log messages in the cell, Drive, the home; models.

:func:`setup` registers an IPython handler that shows a :class:`~fastsd.errors.FastsdError` as
``fastsd: error: ...`` without a traceback (the cell still fails, so "Run all" stops there).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import FastsdError, UserInputError
from ..paths import fastsd_home
from ..redact import install_logging

# ---------------------------------------------------------------- setup and errors


def show_error(shell: Any, etype: type, evalue: BaseException, tb: Any, tb_offset: Any = None) -> None:
    """IPython custom-exception handler: a :class:`FastsdError` as one line, no traceback."""
    print(f"fastsd: error: {evalue}", file=sys.stderr, flush=True)


def _register_error_handler() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.set_custom_exc((FastsdError,), show_error)
    return True


def _log_to_cell() -> None:
    """Show fastsd's INFO messages in the cell output (once, however often setup runs)."""
    logger = logging.getLogger("fastsd")
    if not any(getattr(h, "_fastsd_notebook", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._fastsd_notebook = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    install_logging([h for h in logger.handlers if getattr(h, "_fastsd_notebook", False)])


def setup(*, drive: bool = True, home: str | os.PathLike[str] | None = None) -> Path:
    """First call of every notebook: one-line errors, log messages in the cell, Drive, the home.

    Args:
        drive: mount Google Drive (in Colab) so the fastsd home is ``MyDrive/fastsd`` and
            sessions, models and outputs survive the runtime.
        home: an explicit fastsd home (else the usual rule: ``FASTSD_HOME``, Drive, ``~/fastsd``).

    Returns:
        The fastsd home.
    """
    _register_error_handler()
    # trio (imported by some web libraries) warns when any custom exception handler exists; ours is deliberate
    warnings.filterwarnings("ignore", message="IPython detected, but you already have a custom exception handler")
    _log_to_cell()
    from ..liblogs import quiet

    quiet()
    if drive:
        from ..colab import mount_drive

        mount_drive()
    root = fastsd_home(home)
    where = "on Google Drive" if on_drive(root) else "on this machine's disk (lost with the runtime)"
    print(f"fastsd home: {root}  ({where})")
    return root


def on_drive(path: Path) -> bool:
    """Whether ``path`` is on the mounted Google Drive (so it outlives the runtime, and deletions go to its trash)."""
    from ..paths import drive_dir

    drive = drive_dir()
    return drive is not None and (path == drive or drive in path.parents)


# ---------------------------------------------------------------- models


def model_path(spec: str, *, home: str | os.PathLike[str] | None = None, diffusers: bool = False) -> Path | None:
    """A model for a form field (blank: None), through :func:`fastsd.models.load.local_model`.

    Args:
        spec: a path, a registry name (``sd15``, ``sdxl``...), ``hf:org/repo``, or a URL.
        home: the fastsd home downloads go to.
        diffusers: the caller needs a Diffusers folder (training): a single file is converted once
            into the local conversion cache.

    Raises:
        UserInputError: a path that does not exist and is no downloadable spec.
        FastsdError: a failed download or conversion.
    """
    from ..models.load import local_model

    spec = (spec or "").strip()
    if not spec:
        return None
    if spec.startswith(("/", "./", "~")) and not Path(spec).expanduser().exists():
        raise UserInputError(f"{spec} does not exist: check the path (is Drive connected?)")
    return local_model(spec, want="diffusers" if diffusers else "any", home=home)
