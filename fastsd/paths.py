"""Where fastsd keeps its data: the *fastsd home*.

One rule, used by every command: ``--root`` (the ``root`` argument) wins, then ``FASTSD_HOME``,
then ``MyDrive/fastsd`` when Google Drive is mounted in Colab (so work survives the runtime),
else ``~/fastsd``. Everything fastsd writes that should last (sessions, models, outputs, OCR
results, the Drive wheel cache) lives under it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .errors import UserInputError

#: Where Colab's ``drive.mount`` puts Drive; ``FASTSD_DRIVE_DIR`` overrides it (tests, Kaggle).
DEFAULT_DRIVE_DIR = "/content/drive/MyDrive"

SUBDIRS = ("sessions", "models", "webui", "outputs", "ocr", "wheels", "logs")


def drive_dir() -> Path | None:
    """The mounted Google Drive folder (``MyDrive``), or None when Drive is not mounted."""
    path = Path(os.environ.get("FASTSD_DRIVE_DIR", DEFAULT_DRIVE_DIR))
    return path if path.is_dir() else None


def resolve_home(root: str | os.PathLike[str] | None = None) -> Path:
    """The fastsd home for ``root`` by the rule above, without creating or checking it."""
    if root:
        return Path(root).expanduser().resolve()
    env = os.environ.get("FASTSD_HOME")
    if env:
        return Path(env).expanduser().resolve()
    drive = drive_dir()
    if drive is not None:
        return drive / "fastsd"
    return Path.home() / "fastsd"


def fastsd_home(root: str | os.PathLike[str] | None = None, *, create: bool = True) -> Path:
    """Resolve the fastsd home and make sure it is a writable folder.

    Args:
        root: an explicit root (the CLI's ``--root``); None applies the rule in the module doc.
        create: create the folder (and its standard subfolders) when missing.

    Returns:
        The absolute path of the home folder.

    Raises:
        UserInputError: the folder cannot be created or written to.

    Example:
        >>> home = fastsd_home("/tmp/fastsd-demo")
        >>> (home / "sessions").is_dir()
        True
    """
    home = resolve_home(root)
    if not create:
        return home
    try:
        home.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (home / sub).mkdir(exist_ok=True)
        probe = home / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserInputError(
            f"fastsd home {home} is not writable ({err.strerror or err}): "
            "pass --root DIR or set FASTSD_HOME to a folder you can write to"
        ) from err
    return home


def cache_dir() -> Path:
    """Local (never Drive) cache folder: ``$FASTSD_CACHE`` or ``~/.cache/fastsd``."""
    env = os.environ.get("FASTSD_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "fastsd"
    return base
