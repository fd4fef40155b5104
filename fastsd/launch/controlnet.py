"""ControlNet models for a web UI: chosen for the base model's family, never another family's.

Names are looked up in the model registry's per-family ControlNet table
(:data:`fastsd.models.registry.CONTROLNETS`). A ControlNet can also be given explicitly as
``hf:org/repo/path/file.safetensors`` or an ``https://`` URL; its family is then read from its
name when the name says one, and a mismatch is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import NetworkError, UserInputError

FAMILIES = ("sd15", "sd21", "sdxl", "sd35")

#: Model spec (the conventions in the design) -> family.
SPEC_FAMILIES = {"sd15": "sd15", "sd21-512": "sd21", "sd21-768": "sd21", "sdxl": "sdxl", "sd35-medium": "sd35"}

#: Family spelled in file and repository names (checked in order: "sdxl" before "sd").
_NAME_FAMILIES = (
    (re.compile(r"sdxl|[-_]xl[-_.]|xl_", re.I), "sdxl"),
    (re.compile(r"sd3|sd35", re.I), "sd35"),
    (re.compile(r"sd21|sd2[-_.]|sd-2|v2-1", re.I), "sd21"),
    (re.compile(r"sd15|sd1[-_.]5|sd-1|v11[pfe]_sd15|control_v11", re.I), "sd15"),
)


@dataclass(frozen=True)
class ControlNetModel:
    """One ControlNet file to fetch: where from, for which family, stored under which name."""

    name: str
    family: str
    source: str  # hf:org/repo/path/file or https:// URL
    filename: str | None = None  # stored name; default: the source's last path part


def family_from_name(text: str) -> str | None:
    """The family a name says (``control_v11p_sd15_canny`` -> ``sd15``), or None."""
    for pattern, family in _NAME_FAMILIES:
        if pattern.search(text):
            return family
    return None


#: fastsd.models.detect / registry family -> the family names used on the command line here.
FROM_MODELS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "sd3": "sd35"}


def family_from_checkpoint(path: Path) -> str | None:
    """The family of a single-file checkpoint, from its header (no weights are read)."""
    from ..errors import FastsdError
    from ..models.detect import detect

    try:
        return FROM_MODELS.get(detect(path).family)
    except FastsdError:
        return None


def base_family(model: str | None, family: str | None) -> str | None:
    """The base model family from ``--family``, a model spec, or a checkpoint file's tensor names."""
    if family:
        family = family.lower()
        if family not in FAMILIES:
            raise UserInputError(f"unknown family {family!r}: choose from {', '.join(FAMILIES)}")
        return family
    if not model:
        return None
    if model in SPEC_FAMILIES:
        return SPEC_FAMILIES[model]
    path = Path(model).expanduser()
    if path.is_file():
        return family_from_checkpoint(path)
    return family_from_name(model)


def registry_table() -> dict[str, dict[str, Any]]:
    """family -> {name -> {"source", "filename"}} from :data:`fastsd.models.registry.CONTROLNETS`.

    Diffusers-format repos all name their weights ``diffusion_pytorch_model.safetensors``; the
    stored file is named after the repo instead (``control_v11p_sd15_canny.safetensors``), which
    A1111's ControlNet extension, Forge and ComfyUI all load.
    """
    from ..models.registry import CONTROLNETS

    table: dict[str, dict[str, Any]] = {}
    for family, entries in CONTROLNETS.items():
        rows = table.setdefault(FROM_MODELS.get(family, family), {})
        for cn in entries:
            file = cn.file or "diffusion_pytorch_model.safetensors"
            stored = cn.file or f"{cn.repo.rsplit('/', 1)[-1]}.safetensors"
            rows[cn.name] = {"source": f"hf:{cn.repo}/{file}", "filename": stored}
    return table


def resolve(
    names: list[str], family: str | None, table: dict[str, dict[str, Any]] | None = None
) -> list[ControlNetModel]:
    """Turn ``--controlnet`` values into models for ``family``.

    Raises:
        UserInputError: no family known, an unknown name (with the family's choices), or a
            ControlNet of another family.
    """
    if not names:
        return []
    if family is None:
        raise UserInputError("ControlNet models depend on the base model's family: pass --family sd15|sd21|sdxl")
    table = registry_table() if table is None else table
    out = []
    for name in names:
        if name.startswith(("hf:", "https://", "http://")):
            said = family_from_name(name)
            if said and said != family:
                raise UserInputError(
                    f"{name} is a {said} ControlNet but the base model is {family}: choose one made for {family}"
                )
            out.append(ControlNetModel(name.rsplit("/", 1)[-1], family, name))
            continue
        entries = table.get(family, {})
        if name not in entries:
            other = next((f for f, e in table.items() if name in e), None)
            if other:
                raise UserInputError(f"ControlNet {name!r} is for {other}, the base model is {family}: never mixed")
            choices = ", ".join(sorted(entries)) or "none listed yet"
            raise UserInputError(
                f"unknown ControlNet {name!r} for {family} (choices: {choices}); or give hf:org/repo/file.safetensors"
            )
        entry = entries[name]
        out.append(ControlNetModel(name, family, entry["source"], entry.get("filename")))
    return out


def fetch(model: ControlNetModel, home: Path, *, echo: Callable[[str], None] = print) -> Path:
    """Download ``model`` into ``<home>/models/controlnet/<family>/`` (kept when already there)."""
    folder = home / "models" / "controlnet" / model.family
    filename = model.filename or model.source.rsplit("/", 1)[-1].split("?")[0]
    target = folder / filename
    if target.is_file() and target.stat().st_size > 0:
        return target
    echo(f"downloading ControlNet {model.name} ({model.family}) into {folder}")
    try:
        if model.source.startswith("hf:"):
            from huggingface_hub import hf_hub_download

            org, repo, path = model.source[3:].split("/", 2)
            cached = hf_hub_download(f"{org}/{repo}", path)
            storage.copy_file(cached, target, verify_sha256=False)
        else:
            import httpx

            def produce(fh) -> None:  # type: ignore[no-untyped-def]
                with httpx.stream("GET", model.source, follow_redirects=True, timeout=60) as r:
                    r.raise_for_status()
                    for chunk in r.iter_bytes(1 << 20):
                        fh.write(chunk)

            storage.write_stream(target, produce)
    except ValueError as err:
        raise UserInputError(f"{model.source} is not hf:org/repo/path/file: {err}") from err
    except OSError as err:
        raise NetworkError(f"could not download {model.source}: {err}") from err
    return target
