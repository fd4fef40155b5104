"""SD3/SD3.5 and FLUX.1: Diffusers folder <-> the single files Stability, Black Forest Labs, ComfyUI and Forge use.

Layouts written (the ones the model makers publish, so every UI that loads theirs loads ours):

* SD3: the MMDiT under ``model.diffusion_model.`` (original names, :mod:`.keymap_sd3`) and the VAE
  under ``first_stage_model.`` (ldm names, :func:`.keymap.vae_plan`), as ``sd3.5_medium.safetensors``.
  The CLIP-L, CLIP-G and T5 encoders stay out, as in Stability's files (ComfyUI and Forge load them
  from their own ``text_encoders``/``clip`` folder).
* FLUX: the bare transformer under its original names (:mod:`.keymap_flux`), as
  ``flux1-dev.safetensors`` (ComfyUI's "Load Diffusion Model", Forge's checkpoint list).

Both directions stream: a plan of :class:`~fastsd.models.keymap.Op` s is made from headers (or, for
file -> Diffusers, from the model config built on the ``meta`` device: no weights), the output
header is written first, then one tensor at a time is read, packed/split/swapped and written.
Memory is the largest single tensor (FLUX's ``linear1``: 132 MB in bf16), whatever the model size.
File -> Diffusers is the exact inverse of Diffusers -> file (same bytes back), and needs a Diffusers
folder of the same model for what the file does not hold (configs, tokenizers, text encoders;
``config=``); diffusers' own ``from_single_file`` loads the files written here too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import ModelFormatError, UserInputError
from ..storage import building_folder, write_stream
from . import keymap
from .detect import Detection, detect, weight_files
from .keymap_flux import flux_plan
from .keymap_sd3 import sd3_plan
from .tensorfile import TensorSource, safetensors_header, tensor_bytes

log = logging.getLogger(__name__)

#: Per family: (Diffusers component, how it is planned, prefix in the single file).
LAYOUT: dict[str, list[tuple[str, str, str]]] = {
    "sd3": [("transformer", "sd3", "model.diffusion_model."), ("vae", "vae", "first_stage_model.")],
    "flux": [("transformer", "flux", "")],
}
#: modelspec architecture names (Stability's convention; kohya and ComfyUI read them).
ARCHITECTURE = {
    "medium": "stable-diffusion-v3.5-medium",
    "large": "stable-diffusion-v3.5-large",
    "large-turbo": "stable-diffusion-v3.5-large-turbo",
    "sd3.0-medium": "stable-diffusion-v3-medium",
    "dev": "flux-1-dev",
    "schnell": "flux-1-schnell",
}
IMPLEMENTATION = {"sd3": "https://github.com/Stability-AI/sd3.5", "flux": "https://github.com/black-forest-labs/flux"}


def plan(kind: str, keys: list[str], shapes: dict[str, tuple[int, ...]], prefix: str) -> list[keymap.Op]:
    """The Diffusers -> single-file plan of one component (``sd3``, ``flux`` or ``vae``)."""
    if kind == "sd3":
        return sd3_plan(keys, prefix)
    if kind == "flux":
        return flux_plan(keys, prefix)
    return keymap.vae_plan(keys, shapes, prefix)


def _out_meta(op: keymap.Op, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], half: bool):
    dtype = dtypes[op.sources[0]]
    if half and dtype.is_floating_point:
        dtype = torch.float16
    shape = shapes[op.sources[0]]
    if op.kind == "qkv":
        shape = (sum(shapes[s][0] for s in op.sources), *shape[1:])
    elif op.kind == "conv1x1":
        shape = (*shape, 1, 1)
    return dtype, tuple(shape)


def _swap(t: torch.Tensor) -> torch.Tensor:
    """(a, b) halves along dim 0 -> (b, a): Diffusers' (scale, shift) <-> the original (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _forward(op: keymap.Op, source: TensorSource, dtype: torch.dtype) -> torch.Tensor:
    tensors = [source.get(s) for s in op.sources]
    t = torch.cat(tensors, dim=0) if op.kind == "qkv" else tensors[0]
    if op.kind == "swap":
        t = _swap(t)
    elif op.kind == "conv1x1":
        t = t.reshape(*t.shape, 1, 1)
    return t.to(dtype).contiguous()


def _write(dst: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], meta: dict[str, str], make: Callable):
    """Stream a safetensors file: header from ``entries``, then ``make(i)`` for each entry, in order."""
    header = safetensors_header(entries, meta)

    def produce(fh: BinaryIO) -> None:
        fh.write(header)
        for i in range(len(entries)):
            fh.write(tensor_bytes(make(i)))

    write_stream(dst, produce)


def modelspec(det: Detection, title: str, half: bool) -> dict[str, str]:
    """modelspec metadata for an SD3/FLUX single file."""
    variant = det.variants[0] if det.variants else ""
    res = det.resolution or 1024
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE.get(variant, det.family),
        "modelspec.implementation": IMPLEMENTATION[det.family],
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "flow",
        "fastsd.variants": ",".join(det.variants),
        "fastsd.precision": "fp16" if half else det.precision,
    }


def to_single_file(src: Path, dst: Path, det: Detection, *, half: bool, metadata: dict[str, str]) -> Path:
    """Write the SD3/FLUX Diffusers folder ``src`` as one single file ``dst`` (see the module doc)."""
    sources: list[TensorSource] = []
    todo: list[tuple[TensorSource, keymap.Op]] = []
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    try:
        for component, kind, prefix in LAYOUT[det.family]:
            if not (src / component).is_dir():
                raise ModelFormatError(f"{src} has no {component}/ folder; a {det.family} model needs one")
            source = TensorSource(weight_files(src / component))
            sources.append(source)
            shapes = {k: i.shape for k, i in source.infos.items()}
            dtypes = {k: i.dtype for k, i in source.infos.items()}
            ops = plan(kind, source.keys(), shapes, prefix)
            ops.sort(key=lambda op, s=source: s.infos[op.sources[0]].start or 0)  # read front to back
            for op in ops:
                entries.append((op.out, *_out_meta(op, shapes, dtypes, half)))
                todo.append((source, op))
        _write(dst, entries, metadata, lambda i: _forward(todo[i][1], todo[i][0], entries[i][1]))
    finally:
        for s in sources:
            s.close()
    return dst


# --- single file -> Diffusers ----------------------------------------------------------------


def _meta_shapes(component_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Diffusers model from its ``config.json`` alone (built on ``meta``)."""
    import diffusers

    config = json.loads((component_dir / "config.json").read_text())
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None:
        raise ModelFormatError(f"{component_dir}/config.json names no diffusers model class")
    with torch.device("meta"):
        model = cls.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _inverse(op: keymap.Op, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, int, int]]:
    """For each Diffusers key an op was built from: (key, first row, end row) of the packed tensor."""
    out, row = [], 0
    for s in op.sources:
        n = shapes[s][0] if op.kind == "qkv" else 0
        out.append((s, row, row + n))
        row += n
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same disk: no second copy of the text encoders
    except OSError:
        shutil.copy2(src, dst)


def to_diffusers(
    src: Path, dst: Path, det: Detection, *, config: Path | None, torch_dtype: torch.dtype | None = None
) -> Path:
    """Write the SD3/FLUX single file ``src`` as a Diffusers folder ``dst`` (see the module doc).

    Raises:
        UserInputError: no ``config`` folder, or one of another family.
        ModelFormatError: the file's tensors do not fit the config's model (another variant or size).
    """
    if config is None:
        raise UserInputError(
            f"{src.name} is a {det.family} single file, which holds only the "
            f"{' and '.join(c for c in det.components if c in ('transformer', 'vae'))}: pass --config with a "
            "Diffusers folder of the same model for the rest (e.g. the folder `fastsd model get "
            f"{'sd35-medium' if det.family == 'sd3' else 'flux1-dev'}` makes)"
        )
    config = Path(config)
    cfg_det = detect(config)
    if cfg_det.family != det.family:
        raise UserInputError(f"--config {config} is a {cfg_det.family} model, but {src.name} is {det.family}")
    file = TensorSource([src])
    try:
        # built under a temp name and swapped in (an old folder is removed only after the swap)
        with building_folder(dst, "convert") as tmp:
            replaced = {c for c, _, _ in LAYOUT[det.family] if c in det.components}
            shutil.copytree(
                config,
                tmp,
                copy_function=_link_or_copy,
                dirs_exist_ok=True,
                ignore=lambda d, names: [n for n in names if Path(d).name in replaced and n != "config.json"],
            )
            file_keys = set(file.keys())
            for component, kind, prefix in LAYOUT[det.family]:
                if component not in replaced:
                    continue
                if component == "transformer":  # Stability's and ComfyUI's files prefix it, BFL's do not
                    prefix = (
                        "model.diffusion_model."
                        if any(k.startswith("model.diffusion_model.") for k in file_keys)
                        else ""
                    )
                shapes = _meta_shapes(tmp / component)
                ops = plan(kind, list(shapes), shapes, prefix)
                items: list[tuple[str, str, int, int, str]] = []  # (diffusers key, file key, row0, row1, op kind)
                for op in ops:
                    if op.out not in file_keys:
                        raise ModelFormatError(
                            f"{src.name} lacks {op.out}: it is not the same model as --config {config} "
                            f"({cfg_det.summary()})"
                        )
                    want = _out_meta(op, shapes, {s: file.infos[op.out].dtype for s in op.sources}, False)[1]
                    if tuple(file.infos[op.out].shape) != want:
                        raise ModelFormatError(
                            f"{src.name}: {op.out} is {list(file.infos[op.out].shape)}, the config's model wants "
                            f"{list(want)}: the file is another variant or size than --config {config}"
                        )
                    items += [(k, op.out, r0, r1, op.kind) for k, r0, r1 in _inverse(op, shapes)]
                items.sort(key=lambda it: file.infos[it[1]].start or 0)
                entries = [(k, torch_dtype or file.infos[f].dtype, shapes[k]) for k, f, _, _, _ in items]
                cache: dict[str, torch.Tensor] = {}

                def make(i: int, items=items, entries=entries, cache=cache) -> torch.Tensor:
                    key, name, r0, r1, kind = items[i]
                    if name not in cache:
                        cache.clear()  # one packed tensor at a time
                        cache[name] = file.get(name)
                    t = cache[name]
                    if kind == "qkv":
                        t = t[r0:r1]
                    elif kind == "swap":
                        t = _swap(t)
                    elif kind == "conv1x1":
                        t = t.reshape(entries[i][2])
                    return t.to(entries[i][1]).contiguous()

                _write(tmp / component / "diffusion_pytorch_model.safetensors", entries, {"format": "pt"}, make)
    finally:
        file.close()
    return dst
