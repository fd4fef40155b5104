"""Make fastsd's models visible to A1111, Forge and ComfyUI without copying them.

Models live in ``<home>/models`` (downloads) and ``<home>/sessions/<name>/models`` (exports).
Each launch rebuilds a *link folder* on local disk (symlinks on Drive's FUSE mount are not
reliable, links on local disk pointing into Drive are) with one subfolder per kind, named as
A1111 names its own::

    <links>/Stable-diffusion/<relpath>          full checkpoints
    <links>/Stable-diffusion/sessions/<name>/   a session's exported models
    <links>/Lora/  <links>/VAE/  <links>/ControlNet/  <links>/embeddings/

A file's kind comes from its ``.safetensors`` header (the tensor names, read without loading
any weights), else from the folder it sits in, else from its name. Pickled ``.ckpt``/``.pt``
files are never opened. Only files a session lists as complete in its manifest are linked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFormatError
from ..session import SESSION_FILE, Session
from ..storage import TEMP_PREFIX

#: kind -> link subfolder (A1111's own folder names, so its defaults line up).
KIND_FOLDERS = {
    "checkpoint": "Stable-diffusion",
    "lora": "Lora",
    "vae": "VAE",
    "controlnet": "ControlNet",
    "embedding": "embeddings",
}

#: ComfyUI's model-folder keys for each kind (for ``extra_model_paths.yaml``).
COMFY_KEYS = {
    "checkpoint": "checkpoints",
    "lora": "loras",
    "vae": "vae",
    "controlnet": "controlnet",
    "embedding": "embeddings",
}

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

#: Folder names users and other tools use, lowercased -> kind.
_FOLDER_HINTS = {
    "stable-diffusion": "checkpoint",
    "checkpoints": "checkpoint",
    "ckpt": "checkpoint",
    "lora": "lora",
    "loras": "lora",
    "vae": "vae",
    "controlnet": "controlnet",
    "control": "controlnet",
    "embeddings": "embedding",
    "textual_inversion": "embedding",
}


def safetensors_keys(path: str | os.PathLike[str]) -> list[str] | None:
    """Tensor names in a ``.safetensors`` file's (validated) header, or None when it is not a readable one."""
    from ..models.tensorfile import header_json

    try:
        header, _ = header_json(path)
    except (OSError, ModelFormatError):
        return None
    return [k for k in header if k != "__metadata__"]


def classify(path: Path, root: Path | None = None) -> str | None:
    """The kind of model file ``path`` is (``checkpoint``, ``lora``, ``vae``, ``controlnet``,
    ``embedding``), or None when it is not a model file."""
    if path.suffix.lower() not in MODEL_SUFFIXES or path.name.startswith((".", TEMP_PREFIX)):
        return None
    if path.suffix.lower() == ".safetensors":
        keys = safetensors_keys(path)
        if keys is None:
            return None  # truncated or not safetensors: linking it would only give a load error later
        from ..models.detect import kind_from_keys  # the one rule (imported here: it loads torch)

        kind = kind_from_keys(keys)
        if kind:
            return kind
    parents = path.relative_to(root).parts[:-1] if root and path.is_relative_to(root) else path.parts[:-1]
    for part in reversed(parents):
        if part.lower() in _FOLDER_HINTS:
            return _FOLDER_HINTS[part.lower()]
    name = path.stem.lower()
    for hint, kind in (("lora", "lora"), ("vae", "vae"), ("control", "controlnet")):
        if hint in name:
            return kind
    return "checkpoint" if path.stat().st_size > 500 * 1024 * 1024 else None


@dataclass(frozen=True)
class LinkedModel:
    """One model made visible: its kind, the link and the real file."""

    kind: str
    link: Path
    target: Path


def _is_diffusers_part(path: Path, root: Path) -> bool:
    # Files inside a Diffusers folder (model_index.json at its top) are parts, not models.
    for parent in path.parents:
        if (parent / "model_index.json").is_file() or (parent / "config.json").is_file():
            return True
        if parent == root:
            return False
    return False


def collect_models(home: Path) -> list[tuple[str, Path, Path]]:
    """Every linkable model under ``home``: (kind, relative link path, real file)."""
    found: list[tuple[str, Path, Path]] = []
    models_root = home / "models"
    if models_root.is_dir():
        for file in sorted(models_root.rglob("*")):
            if not file.is_file() or _is_diffusers_part(file, models_root):
                continue
            kind = classify(file, models_root)
            if kind:
                rel = file.relative_to(models_root)
                # A file already in a kind folder ("lora/x.safetensors") should not nest it twice.
                if rel.parts[0].lower() in _FOLDER_HINTS and len(rel.parts) > 1:
                    rel = Path(*rel.parts[1:])
                found.append((kind, rel, file))
    sessions_root = home / "sessions"
    if sessions_root.is_dir():
        for folder in sorted(p for p in sessions_root.iterdir() if (p / SESSION_FILE).is_file()):
            try:
                session = Session.open(folder.name, home)
            except Exception:  # noqa: BLE001 - one broken session must not hide the others
                continue
            for entry in session.models():
                file = session.path / entry["file"]
                kind = "lora" if entry.get("kind") == "lora" else (classify(file) or "checkpoint")
                found.append((kind, Path("sessions") / session.name / file.name, file))
    return found


def build_links(home: Path, links: Path) -> list[LinkedModel]:
    """(Re)build the link folder ``links`` for the models under ``home``; returns what was linked.

    Old links are removed first (only symlinks: a real file someone put there is left alone), so
    a deleted model disappears from the web UI on the next launch.
    """
    links.mkdir(parents=True, exist_ok=True)
    for folder in KIND_FOLDERS.values():
        base = links / folder
        base.mkdir(exist_ok=True)
        for old in sorted(base.rglob("*"), reverse=True):
            if old.is_symlink():
                old.unlink()
            elif old.is_dir() and not any(old.iterdir()):
                old.rmdir()
    linked: list[LinkedModel] = []
    for kind, rel, target in collect_models(home):
        link = links / KIND_FOLDERS[kind] / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            continue  # two sources with one name: the first (home models) wins
        link.symlink_to(target.resolve())
        linked.append(LinkedModel(kind, link, target))
    return linked


def comfy_extra_paths(links: Path) -> str:
    """The ``extra_model_paths.yaml`` text that points ComfyUI at the link folder."""
    lines = ["# Written by fastsd at every launch: edits are overwritten.", "fastsd:", f"    base_path: {links}"]
    lines += [f"    {COMFY_KEYS[kind]}: {folder}" for kind, folder in KIND_FOLDERS.items()]
    return "\n".join(lines) + "\n"
