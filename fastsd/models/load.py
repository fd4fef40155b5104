"""Load a Diffusers folder or a single-file checkpoint as a diffusers pipeline, offline.

The web UI and the trainer call :func:`load_pipeline` with whatever the user has; single files are
read by diffusers' ``from_single_file`` with the config fastsd ships for the detected family, so
nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UserInputError

#: (family, task) -> diffusers pipeline class name.
PIPELINES = {
    ("sd1", "txt2img"): "StableDiffusionPipeline",
    ("sd1", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd1", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sd2", "txt2img"): "StableDiffusionPipeline",
    ("sd2", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd2", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
}
TASKS = ("txt2img", "img2img", "inpaint")


def load_pipeline(
    path_or_folder: str | os.PathLike[str],
    *,
    torch_dtype: Any = None,
    pipeline: str = "txt2img",
    config: str | os.PathLike[str] | None = None,
) -> Any:
    """A diffusers pipeline for ``path_or_folder`` (Diffusers folder or single file), without network.

    Args:
        path_or_folder: a Diffusers pipeline folder or a ``.safetensors``/``.ckpt`` full model.
        torch_dtype: e.g. ``torch.float16``; None keeps diffusers' default (fp32).
        pipeline: ``txt2img``, ``img2img`` or ``inpaint`` (the task the pipeline is built for; an
            inpainting model used for ``txt2img`` still gets its inpainting pipeline).
        config: a Diffusers folder to take a single file's configs from (default: shipped ones).

    Returns:
        A ``DiffusionPipeline`` subclass instance on the CPU.

    Raises:
        UserInputError: unknown task, or the path does not exist.
        ModelFormatError: not a full SD1/SD2/SDXL model.
    """
    import diffusers

    from .convert import _require_full, config_for, shipped_config
    from .detect import detect

    if pipeline not in TASKS:
        raise UserInputError(f"unknown pipeline {pipeline!r}; use one of {', '.join(TASKS)}")
    det = detect(path_or_folder)
    _require_full(det, "loading a pipeline")
    task = "inpaint" if "inpaint" in det.variants else pipeline
    if "refiner" in det.variants:
        task = "img2img"
    cls = getattr(diffusers, PIPELINES[(det.family, task)])
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if det.family in ("sd1", "sd2"):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if det.layout == "diffusers":
        return cls.from_pretrained(Path(path_or_folder), **kwargs)
    kwargs["config"] = str(config or shipped_config(config_for(det)[0]))
    try:
        return cls.from_single_file(str(path_or_folder), **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelFormatError(f"diffusers could not load {path_or_folder} ({det.summary()}): {err}") from err


#: Specs :func:`diffusers_folder` fetched in this process, and where they are (cache owned here).
_FETCHED: dict[tuple[str, str], Path] = {}


def diffusers_folder(
    spec: str | os.PathLike[str],
    *,
    home: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Path:
    """A local Diffusers folder for any model spec: what the trainer reads its parts from.

    A Diffusers folder is returned as it is; a single-file model is converted once into the local
    cache (``~/.cache/fastsd/diffusers/``, reused while the file is unchanged); anything else
    (``sd15``, ``hf:org/repo``, URLs...) is fetched first with :func:`fastsd.models.fetch.get`.
    ``config`` is a Diffusers folder to take a single file's configs from (default: shipped ones).

    Raises:
        UserInputError, NetworkError, ModelFormatError: as :func:`~fastsd.models.fetch.get` and
            :func:`~fastsd.models.convert.single_file_to_diffusers`.
    """
    import hashlib

    from ..paths import cache_dir
    from .fetch import get

    path = Path(spec).expanduser()
    if not path.exists():
        key = (str(spec), str(home))
        if key not in _FETCHED:  # one Hub round per process: the CLI fetches before torch loads, then train
            _FETCHED[key] = get(str(spec), home=home)
        path = _FETCHED[key]
    if path.is_dir():
        return path
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "diffusers" / f"{path.stem}-{key}"
    if (target / "model_index.json").is_file():
        return target
    from .convert import single_file_to_diffusers  # torch: only once a file is to be converted

    return single_file_to_diffusers(path, target, overwrite=True, config=config)
