"""Sessions: one training project kept under ``<home>/sessions/<name>/``.

Layout::

    session.json          base model, family, resolution, token/class, progress, and the manifest of
                          verified checkpoints and exported models (with sha256)
    instance_images/      cropped training images
    captions/<stem>.txt   per-image captions
    class_images/<slug>/  prior-preservation images, reused across runs
    checkpoints/step-000500/   resumable training states (only those in the manifest count)
    models/               exported single-file models and LoRA files
    samples/  logs/

``session.json`` is written with the safe-write helper, and a checkpoint or model enters the
manifest only after every file of it is on disk and hashed, so a runtime that dies mid-write
never leaves a half checkpoint that looks complete.

This package is split by what each part owns; import from ``fastsd.session``:

- :mod:`.core`: the :class:`Session` (create, open, manifest, images and captions, locking) and
  :func:`list_sessions`;
- :mod:`.info`: session names and ``session.json`` checks (:func:`load_info`, :func:`entry_path`);
- :mod:`.share`: :func:`import_session` and :func:`remove_session`;
- :mod:`.show`: the ``show`` text and the free-Drive space plan (:func:`space_plan`, :func:`human_size`).
"""

from __future__ import annotations

from ..images import IMAGE_SUFFIXES, filename_caption
from .core import SUBDIRS, Session, list_sessions
from .info import MAX_NAME, NAME_RE, SESSION_FILE, entry_path, load_info, normalize_name
from .share import import_session, remove_session
from .show import FREE_DRIVE_BYTES, describe_summary, human_size, space_plan

__all__ = [
    "FREE_DRIVE_BYTES",
    "IMAGE_SUFFIXES",
    "MAX_NAME",
    "NAME_RE",
    "SESSION_FILE",
    "SUBDIRS",
    "Session",
    "describe_summary",
    "entry_path",
    "filename_caption",
    "human_size",
    "import_session",
    "list_sessions",
    "load_info",
    "normalize_name",
    "remove_session",
    "space_plan",
]
