"""Load a Diffusers folder or a single-file checkpoint as a diffusers pipeline, offline.

:func:`local_model` turns any model spec into a local file or Diffusers folder (fetched, or
converted once into the local cache); :func:`load_pipeline` builds a diffusers pipeline from any
spec; single files are read by diffusers' ``from_single_file`` with the config fastsd ships for the
detected family, so nothing is downloaded once the model is local.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UserInputError

log = logging.getLogger(__name__)

#: (family, task) -> diffusers pipeline class name, in :mod:`fastsd.models.detect`'s family names: the
#: one table (the web UI builds its img2img/inpaint pipelines from it too).
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
    ("sd3", "txt2img"): "StableDiffusion3Pipeline",
    ("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline",
    ("sd3", "inpaint"): "StableDiffusion3InpaintPipeline",
    ("flux", "txt2img"): "FluxPipeline",
    ("flux", "img2img"): "FluxImg2ImgPipeline",
    ("flux", "inpaint"): "FluxInpaintPipeline",
}
TASKS = ("txt2img", "img2img", "inpaint")


def load_pipeline(
    spec: str | os.PathLike[str],
    *,
    torch_dtype: Any = None,
    pipeline: str = "txt2img",
    config: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
    quantization: Any = None,
) -> Any:
    """A diffusers pipeline for any model spec; offline once the model is local.

    Args:
        spec: a Diffusers pipeline folder, a ``.safetensors``/``.ckpt`` full model, or any spec
            :func:`local_model` fetches (``sd15``, ``hf:org/repo``, a URL...).
        torch_dtype: e.g. ``torch.float16``; None keeps diffusers' default (fp32).
        pipeline: ``txt2img``, ``img2img`` or ``inpaint`` (the task the pipeline is built for; an
            inpainting model used for ``txt2img`` still gets its inpainting pipeline).
        config: a Diffusers folder to take a single file's configs from (default: shipped ones).
        home: the fastsd home a fetched model goes to.
        quantization: a diffusers ``PipelineQuantizationConfig`` (SD3/FLUX memory plans, see
            :func:`fastsd.models.memplan.quantization_config`): those components are quantized
            tensor by tensor while they load.

    Returns:
        A ``DiffusionPipeline`` subclass instance on the CPU.

    Raises:
        UserInputError: unknown task, or an unknown spec / missing path.
        NetworkError: a spec to fetch could not be fetched.
        ModelFormatError: not a full SD1/SD2/SDXL/SD3/FLUX model.
    """
    import diffusers

    from .convert import _require_full, config_for, shipped_config
    from .detect import detect

    if pipeline not in TASKS:
        raise UserInputError(f"unknown pipeline {pipeline!r}; use one of {', '.join(TASKS)}")
    path = local_model(spec, home=home)
    det = detect(path)
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
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if det.layout == "diffusers":
        return cls.from_pretrained(path, **kwargs)
    if det.family in ("sd3", "flux"):
        if config is None:
            raise UserInputError(
                f"{path.name} is a {det.family} single file without text encoders: use its Diffusers folder "
                "(e.g. `fastsd model get sd35-medium` / `flux1-dev`) or convert it with --config"
            )
        return cls.from_pretrained(single_file_to_diffusers_cached(path, config), **kwargs)
    kwargs["config"] = str(config or shipped_config(config_for(det)[0]))
    try:
        return cls.from_single_file(str(path), **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelFormatError(f"diffusers could not load {path} ({det.summary()}): {err}") from err


def single_file_to_diffusers_cached(path: Path, config: str | os.PathLike[str]) -> Path:
    """An SD3/FLUX single file as a Diffusers folder in the conversion cache (rest taken from ``config``)."""
    return local_model(path, want="diffusers", config=config)


#: Specs :func:`local_model` fetched in this process, and where they are (the one fetch memo).
_FETCHED: dict[tuple[str, str], Path] = {}
#: What :func:`local_model` can hand back: the model as it is, a Diffusers folder, or one file.
WANTS = ("any", "diffusers", "file")
#: Names a single-file checkpoint has (safetensors, and the pickles read with ``weights_only``).
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth")


def local_model(
    spec: str | os.PathLike[str],
    *,
    want: str = "any",
    home: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Path:
    """Any model spec as a local path in the form the caller needs: the one spec resolver.

    A spec is a registry name (``sd15``), ``hf:org/repo``, a Hub/Civitai/Drive/any URL, or a local
    file or folder (see :func:`fastsd.models.fetch.get`). The built-in web UI, the A1111/Forge/
    ComfyUI launcher, the trainer, the notebooks and ``convert`` all come through here, so a spec
    that works for one works for all. A spec is fetched at most once per process; a local path is
    used where it is.

    Args:
        spec: the model spec.
        want: ``any`` (a file or Diffusers folder, as it is: what :func:`load_pipeline` reads),
            ``diffusers`` (a Diffusers folder: what the trainer reads parts from) or ``file`` (one
            single-file checkpoint: what A1111, Forge and ComfyUI load). A model in the other form
            is converted once into the local conversion cache (``<cache>/converted/``) and reused
            while its source is unchanged.
        home: the fastsd home downloads go to.
        config: a Diffusers folder to take a single file's configs from (default: shipped ones).

    Raises:
        UserInputError: an unknown spec, a missing path, or a bad ``want``.
        NetworkError, ModelFormatError: as :func:`~fastsd.models.fetch.get` and the converters.
    """
    if want not in WANTS:
        raise UserInputError(f"unknown model form {want!r}; use one of {', '.join(WANTS)}")
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        from .fetch import get

        key = (str(spec), str(home))
        if key not in _FETCHED:  # one Hub round per process: the CLI fetches before torch loads, then train
            _FETCHED[key] = get(str(spec), home=home)
        path = _FETCHED[key]
    if want == "any" or (want == "diffusers") == path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UserInputError(f"{path} is not a model file: give a .safetensors/.ckpt file or a Diffusers folder")
    target = _converted_name(path, "" if want == "diffusers" else ".safetensors")
    if target.exists():
        return target
    from .convert import diffusers_to_single_file, single_file_to_diffusers  # torch: only to convert

    log.info("converting %s to %s (once, into the local cache): %s", path.name, want, target)
    if want == "diffusers":
        return single_file_to_diffusers(path, target, overwrite=True, config=config)
    return diffusers_to_single_file(path, target, half=True, overwrite=True)


def _converted_name(source: Path, suffix: str) -> Path:
    """Where the conversion of ``source`` lives: named after its path, sizes and modification times.

    A replaced or edited source gets a new name, so a stale conversion is never handed out.
    """
    from ..paths import cache_dir

    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(source.resolve()).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(source) if f != source else ''}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    stem = source.stem if source.is_file() else source.name
    return cache_dir() / "converted" / f"{stem}-{digest.hexdigest()[:12]}{suffix}"
