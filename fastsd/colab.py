"""The few places fastsd talks to Google Colab: Drive, secrets, and the notebook's port proxy.

Everything degrades to a plain local run outside Colab, so the same library calls work in a
terminal, in Jupyter, on Kaggle and in the tests (which install a stand-in ``google.colab``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .paths import DEFAULT_DRIVE_DIR, drive_dir
from .runtime import environment

log = logging.getLogger(__name__)


def mount_drive(mountpoint: str = "/content/drive") -> Path | None:
    """Mount Google Drive in Colab (asks the user once) and return ``MyDrive``; None elsewhere.

    Outside Colab nothing is mounted: fastsd then keeps its home on local disk (``~/fastsd``)
    unless ``FASTSD_HOME`` says otherwise.
    """
    if environment() != "colab":
        log.info("not in Colab: Drive is not mounted; fastsd keeps its data under the local home")
        return drive_dir()
    from google.colab import drive  # type: ignore[import-not-found]

    target = Path(os.environ.get("FASTSD_DRIVE_DIR", DEFAULT_DRIVE_DIR))
    if not target.is_dir():
        drive.mount(mountpoint)
    return drive_dir()


def unmount_drive() -> bool:
    """Colab's ``drive.flush_and_unmount()``: waits until Drive has uploaded everything, then unmounts.

    Called by :func:`fastsd.storage.flush` (``unmount=True``), which syncs first.

    Returns:
        True when Drive was flushed and unmounted, False when not running in Colab.
    """
    try:
        from google.colab import drive  # type: ignore[import-not-found]
    except ImportError:
        log.info("not running in Colab: nothing to unmount (files are already written)")
        return False
    drive.flush_and_unmount()
    return True


def show_port(port: int, height: int) -> bool:
    """Show a local port's page in the cell's output through Colab's proxy; False when not in Colab."""
    try:
        from google.colab import output  # type: ignore[import-not-found]
    except ImportError:
        return False
    output.serve_kernel_port_as_iframe(port, height=str(height))
    return True


def upload_files() -> dict[str, bytes]:
    """Colab's upload dialog: file name -> content (Colab also leaves copies in the working folder)."""
    from google.colab import files  # type: ignore[import-not-found]

    return dict(files.upload())


def download_file(path: str | os.PathLike[str]) -> None:
    """Have the browser download ``path`` from the Colab runtime."""
    from google.colab import files  # type: ignore[import-not-found]

    files.download(str(path))


def secret(name: str) -> str | None:
    """A secret (``HF_TOKEN``, ``NGROK_AUTHTOKEN``, ``CIVITAI_TOKEN``...) from the environment or Colab.

    The environment wins; in Colab the notebook's Secrets panel (``google.colab.userdata``) is
    asked next. Returns None when neither has it. A value found is registered with
    :mod:`fastsd.redact`, so it is masked in every message and log line from then on.
    """
    value = os.environ.get(name)
    if not value and environment() == "colab":
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            value = userdata.get(name)
        except Exception:  # noqa: BLE001 - SecretNotFoundError, NotebookAccessError, no kernel...
            value = None
    if value:
        from .redact import register

        register(value)
    return value or None


def proxy_url(port: int) -> str:
    """Colab's own HTTPS proxy URL for a local port (no third-party tunnel)."""
    from google.colab.output import eval_js  # type: ignore[import-not-found]

    return str(eval_js(f"google.colab.kernel.proxyPort({int(port)})"))
