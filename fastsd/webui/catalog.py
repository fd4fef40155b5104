"""What the web UI can load: checkpoints, LoRAs and VAEs found in the fastsd home.

Looks in ``<home>/models/**`` (downloaded models), ``<home>/sessions/*/models/*`` (models exported
by training sessions), any extra folders, and an explicit ``--model`` (made a local path by
:func:`fastsd.models.load.local_model` before it gets here). A ``.safetensors`` file is sorted into checkpoint,
LoRA or VAE from its tensor names (read from the header only, never loading weights); a folder
with ``model_index.json`` is a Diffusers pipeline; a folder with a VAE ``config.json`` is a VAE.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UserInputError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".sft")
#: Name fragments that mark LoRA tensors in kohya, diffusers/peft and A1111 LyCORIS files.


@dataclass
class Entry:
    """One loadable item. ``title`` is what the API and UI show and accept back."""

    title: str
    path: str
    kind: str  # "checkpoint" | "lora" | "vae"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The title without folders and suffix (A1111's ``model_name``; LoRA prompt name)."""
        base = self.title.rsplit("/", 1)[-1]
        for suffix in CHECKPOINT_SUFFIXES:
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (tensor names, shapes, ``__metadata__``), validated.

    Raises:
        ModelFormatError: the file is not a readable safetensors file (see :func:`fastsd.models.tensorfile.header_json`).
    """
    from ..models.tensorfile import header_json

    try:
        return header_json(path)[0]
    except OSError as err:
        raise ModelFormatError(f"{path} cannot be read ({err.strerror}): check the file") from err


def classify_file(path: Path) -> str | None:
    """``"checkpoint"``, ``"lora"``, ``"vae"`` or None (not a model) for one file, from its tensor names."""
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        return None
    parent_names = {p.name.lower() for p in path.parents}
    if suffix == ".ckpt":  # pickles are never opened here: sort them by folder name only
        if parent_names & {"lora", "loras"}:
            return "lora"
        return "vae" if parent_names & {"vae", "vaes"} else "checkpoint"
    try:
        keys = [k for k in safetensors_header(path) if k != "__metadata__"]
    except ModelFormatError:
        log.warning("skipping unreadable model file %s", path)
        return None
    from ..models.detect import kind_from_keys  # the one rule (imported here: it loads torch)

    kind = kind_from_keys(keys)  # the UI lists three kinds
    return kind if kind in ("checkpoint", "lora", "vae") else None


def _folder_kind(path: Path) -> str | None:
    if (path / "model_index.json").is_file():
        return "checkpoint"
    config = path / "config.json"
    if config.is_file() and any(path.glob("diffusion_pytorch_model*.safetensors")):
        try:
            if json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
                return "vae"
        except (OSError, ValueError):
            return None
    return None


def _walk(root: Path, prefix: str, out: list[Entry]) -> None:
    if not root.is_dir():
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            children = sorted(folder.iterdir())
        except OSError:
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            rel = prefix + child.relative_to(root).as_posix()
            if child.is_dir():
                kind = _folder_kind(child)
                if kind:
                    out.append(Entry(rel, str(child), kind))
                else:
                    stack.append(child)
            else:
                kind = classify_file(child)
                if kind:
                    out.append(Entry(rel, str(child), kind, _metadata(child) if kind == "lora" else {}))


def _metadata(path: Path) -> dict[str, Any]:
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        return dict(safetensors_header(path).get("__metadata__") or {})
    except ModelFormatError:
        return {}


def scan(home: Path, models_dirs: list[str | Path] | None = None, model: str | None = None) -> list[Entry]:
    """Every checkpoint, LoRA and VAE visible to the web UI, checkpoints first in a stable order.

    Args:
        home: the fastsd home.
        models_dirs: extra folders to search (titled by their path relative to that folder).
        model: an explicit model (``--model``) as a local file/folder.
    """
    found: list[Entry] = []
    if model:  # a spec is made local by the caller (fastsd.models.load.local_model), never here
        p = Path(model).expanduser()
        if not p.exists():
            raise UserInputError(f"model {model} does not exist: check the path")
        found.append(Entry(p.name, str(p.resolve()), "checkpoint"))
    _walk(home / "models", "", found)
    sessions = home / "sessions"
    if sessions.is_dir():
        for session in sorted(sessions.iterdir()):
            _walk(session / "models", f"sessions/{session.name}/", found)
    for extra in models_dirs or []:
        _walk(Path(extra).expanduser(), f"{Path(extra).name}/", found)
    seen: set[tuple[str, str]] = set()
    unique = []
    for e in found:
        if (e.kind, e.path) not in seen:
            seen.add((e.kind, e.path))
            unique.append(e)
    order = {"checkpoint": 0, "lora": 1, "vae": 2}
    return sorted(unique, key=lambda e: order[e.kind])


def find(entries: list[Entry], kind: str, name: str) -> Entry:
    """The entry of ``kind`` whose title, name, or path is ``name`` (an A1111 ``title [hash]`` works too).

    Raises:
        UserInputError: nothing matches.
    """
    wanted = name.strip()
    if wanted.endswith("]") and " [" in wanted:  # A1111 titles carry " [shorthash]"
        wanted = wanted[: wanted.rindex(" [")]
    for attr in ("title", "name", "path"):
        for e in entries:
            if e.kind == kind and getattr(e, attr) == wanted:
                return e
    known = ", ".join(e.title for e in entries if e.kind == kind) or "none found"
    raise UserInputError(
        f"no {kind} called {name!r}: use one of: {known} (POST /sdapi/v1/refresh-checkpoints after adding files)"
    )


#: sha256 per (path, size, mtime): hashing a multi-GB checkpoint costs seconds, so once per process.
_SHA256: dict[tuple[str, int, int], str] = {}


def model_sha256(path: str | Path) -> str:
    """The checkpoint's sha256, as A1111 reports it (its short hash is the first 10 characters).

    A single file is hashed whole. A Diffusers folder has no one file, so its identity is the
    sha256 of its JSON configs and of each weight file's name and size, which changes when any
    part is replaced. Cached while the path's size and modification time stay the same.
    """
    import hashlib

    from ..storage import sha256_file

    p = Path(path)
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        if p.is_file():
            _SHA256[key] = sha256_file(p)
        else:
            digest = hashlib.sha256()
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                rel = f.relative_to(p).as_posix()
                digest.update(rel.encode())
                digest.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
            _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def short_hash(path: str | Path) -> str:
    """A1111's ``shorthash`` of a checkpoint: the first 10 hex characters of :func:`model_sha256`."""
    return model_sha256(path)[:10]
