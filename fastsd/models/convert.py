"""Diffusers folder <-> single-file checkpoint, the format A1111, Forge and ComfyUI load.

Diffusers -> single file is streamed: the output header is computed from the input headers (see
:mod:`fastsd.models.keymap`), then the tensors follow in input-file order. Tensors whose bytes do
not change (renamed, reshaped, concatenated, same dtype) are copied file to file in the kernel;
the others are read, cast or transposed and written, large ones in chunks
(:mod:`fastsd.models.streamwrite`). Peak memory is the Python process plus a few chunks, whatever
the model size, so an fp32 SDXL converts on a free Colab. The file goes through
:func:`fastsd.storage.write_stream`: it appears under its final name only when complete.

Single file -> Diffusers goes through diffusers' own ``from_single_file`` with a config shipped in
``fastsd/models/configs`` for the detected family, so it works offline.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError, UserInputError
from ..paths import cache_dir
from ..storage import building_folder, write_stream, write_text
from . import convert_flow, keymap
from .detect import Detection, detect, weight_files
from .registry import FLOW_FAMILIES
from .streamwrite import Span, byte_spans, write_pieces
from .tensorfile import TensorInfo, TensorSource, map_flat, safetensors_header

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "ckpt")
CHUNK_BYTES = 16 * 1024 * 1024
CONFIGS = Path(__file__).parent / "configs"

#: family/variant -> modelspec architecture (the names kohya sd-scripts and Stability's tools write).
ARCHITECTURE = {
    ("sd1", False): "stable-diffusion-v1",
    ("sd2", False): "stable-diffusion-v2-512",
    ("sd2", True): "stable-diffusion-v2-768-v",
    ("sdxl", False): "stable-diffusion-xl-v1-base",
}
IMPLEMENTATION = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}

#: How each family's Diffusers components become single-file sections: (component, plan, prefix).
LAYOUT: dict[str, list[tuple[str, str, str]]] = {
    "sd1": [
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "clip", "cond_stage_model."),
    ],
    "sd2": [
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "openclip", "cond_stage_model."),
    ],
    "sdxl": [
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "clip", "conditioner.embedders.0."),
        ("text_encoder_2", "openclip", "conditioner.embedders.1."),
    ],
    "sdxl-refiner": [
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder_2", "openclip", "conditioner.embedders.0."),
    ],
}

#: Shipped Diffusers config folder and pipeline class per detected family/variant.
CONFIG_FOR = {
    ("sd1", ""): ("sd1", "StableDiffusionPipeline"),
    ("sd1", "inpaint"): ("sd1-inpaint", "StableDiffusionInpaintPipeline"),
    ("sd2", ""): ("sd2-512", "StableDiffusionPipeline"),
    ("sd2", "v"): ("sd2-768", "StableDiffusionPipeline"),
    ("sd2", "inpaint"): ("sd2-inpaint", "StableDiffusionInpaintPipeline"),
    ("sdxl", ""): ("sdxl", "StableDiffusionXLPipeline"),
    ("sdxl", "inpaint"): ("sdxl-inpaint", "StableDiffusionXLInpaintPipeline"),
    ("sdxl", "refiner"): ("sdxl-refiner", "StableDiffusionXLImg2ImgPipeline"),
}


# --- Diffusers -> single file ----------------------------------------------------------------


def _check_dst(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise UserInputError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    if dst.exists() and dst.is_dir() != (dst.suffix == ""):
        raise UserInputError(f"{dst} exists and is a {'folder' if dst.is_dir() else 'file'}; choose another name")


def _require_full(det: Detection, what: str) -> None:
    if det.family in FLOW_FAMILIES and det.kind in ("full", "transformer"):
        return  # SD3/FLUX files hold the denoiser (and SD3's the VAE); the rest comes from a config folder
    if det.kind == "lora":
        raise ModelFormatError(f"{det.path} is a LoRA, not a full model; {what} needs a whole checkpoint")
    if det.kind == "vae":
        raise ModelFormatError(f"{det.path} is a VAE only, not a full model; {what} needs a whole checkpoint")
    if det.kind != "full":
        raise ModelFormatError(f"{det.path} is a {det.kind}, not a full SD1/SD2/SDXL model; {what} needs one")
    if det.family not in ("sd1", "sd2", "sdxl"):
        raise ModelFormatError(
            f"{det.path} is a {det.family} model; fastsd converts SD1, SD2 and SDXL (use diffusers for others)"
        )


def modelspec(det: Detection, title: str, half: bool) -> dict[str, str]:
    """The modelspec metadata (Stability's safetensors convention) describing ``det``."""
    v = det.prediction_type == "v_prediction"
    arch = ARCHITECTURE.get((det.family, v and det.family == "sd2"), ARCHITECTURE.get((det.family, False), "unknown"))
    if "refiner" in det.variants:
        arch = "stable-diffusion-xl-v1-refiner"
    res = det.resolution or 512
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": IMPLEMENTATION.get(det.family, ""),
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.date": _dt.date.today().isoformat(),
        "fastsd.variants": ",".join(det.variants),
        "fastsd.precision": "fp16" if half else det.precision,
    }
    return meta


def _plans(src: Path, det: Detection) -> list[tuple[TensorSource, list[keymap.Op]]]:
    layout = "sdxl-refiner" if "refiner" in det.variants else det.family
    out = []
    for component, plan, prefix in LAYOUT[layout]:
        folder = src / component
        if not folder.is_dir():
            if component in ("unet", "vae"):
                raise ModelFormatError(f"{src} has no {component}/ folder; a full model needs one")
            log.warning("%s has no %s/; the single file will lack it", src, component)
            continue
        source = TensorSource(weight_files(folder))
        keys = source.keys()
        shapes = {k: i.shape for k, i in source.infos.items()}
        if plan == "unet":
            ops = keymap.unet_plan(keys, prefix)
        elif plan == "vae":
            ops = keymap.vae_plan(keys, shapes, prefix)
        elif plan == "clip":
            ops = keymap.clip_plan(keys, shapes, prefix)
        else:
            ops = keymap.openclip_plan(keys, prefix)
        # read each file front to back: sequential reads are what disks (and Drive) do fastest
        ops.sort(key=lambda op: (source.infos[op.sources[0]].start or 0) if op.sources else 1 << 62)
        out.append((source, ops))
    return out


def _out_meta(op: keymap.Op, source: TensorSource, half: bool) -> tuple[torch.dtype, tuple[int, ...]]:
    if op.kind == "arange":
        return torch.int64, (1, op.n)
    infos = [source.infos[s] for s in op.sources]
    dtype = infos[0].dtype
    if half and dtype.is_floating_point:
        dtype = torch.float16
    shape = infos[0].shape
    if op.kind == "conv1x1":
        shape = (*shape, 1, 1)
    elif op.kind == "qkv":
        shape = (sum(i.shape[0] for i in infos), *shape[1:])
    elif op.kind == "T":
        shape = tuple(reversed(shape))
    return dtype, shape


def _build(op: keymap.Op, source: TensorSource, dtype: torch.dtype) -> torch.Tensor:
    if op.kind == "arange":
        return torch.arange(op.n, dtype=torch.int64).unsqueeze(0)
    tensors = [source.get(s) for s in op.sources]
    t = tensors[0]
    if op.kind == "conv1x1":
        t = t.reshape(*t.shape, 1, 1)
    elif op.kind == "qkv":
        t = torch.cat(tensors, dim=0)
    elif op.kind == "T":
        t = t.T.contiguous()
    return t.to(dtype).contiguous()


def _chunks(info: TensorInfo, source: TensorSource, dtype: torch.dtype):
    """A plain copy in pieces of at most CHUNK_BYTES, so memory stays flat for any tensor size.

    Pieces are flat; the output bytes are the same as the whole tensor's, shape lives in the header.
    """
    if info.start is None:
        yield _build(keymap.Op("", (info.name,)), source, dtype)
        return
    itemsize = info.dtype.itemsize
    step = CHUNK_BYTES // itemsize * itemsize
    fh = source.handle(info.path)
    for pos in range(info.start, info.end, step):  # type: ignore[arg-type]
        yield map_flat(fh, info, pos, min(pos + step, info.end)).to(dtype)  # type: ignore[type-var]


def _pieces(plans: list[tuple[TensorSource, list[keymap.Op]]], half: bool) -> Iterator[Span | torch.Tensor]:
    """Every planned tensor in output order: byte ranges of the inputs where the bytes stay, else tensors."""
    for source, ops in plans:
        for op in ops:
            dtype, _ = _out_meta(op, source, half)
            spans = byte_spans(op, source, dtype)
            if spans is not None:
                yield from spans
            elif op.kind == "copy":
                yield from _chunks(source.infos[op.sources[0]], source, dtype)
            else:
                yield _build(op, source, dtype)


def diffusers_to_single_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    half: bool = False,
    fmt: str = "safetensors",
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Convert a Diffusers SD1/SD2/SDXL folder (incl. inpainting) to one A1111/ComfyUI checkpoint.

    Args:
        src: the Diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, text encoders).
            Weights may be safetensors, sharded (``*.index.json``) or ``.bin``.
        dst: the output file (``.safetensors``; ``.ckpt`` only with ``fmt="ckpt"``).
        half: store floating-point tensors as fp16.
        fmt: ``safetensors`` (default, streamed) or ``ckpt`` (a pickle; built in memory).
        overwrite: replace an existing ``dst``.
        metadata: extra safetensors metadata strings (added to the modelspec fields).

    Returns:
        The path written. For SD2 v-prediction models an A1111 ``.yaml`` is written beside it.

    Raises:
        UserInputError: bad ``fmt``/``dst`` or ``dst`` exists without ``overwrite``.
        ModelFormatError: ``src`` is not a full SD1/SD2/SDXL Diffusers model, or is damaged.
        StorageError: the write failed; nothing is left under ``dst``.

    Example:
        >>> diffusers_to_single_file("my-dreambooth", "my-model.safetensors", half=True)  # doctest: +SKIP
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if fmt not in FORMATS:
        raise UserInputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if dst.suffix == "":
        dst = dst.with_suffix(f".{fmt}")
    if dst.suffix == ".ckpt" and fmt != "ckpt":
        raise UserInputError(f"{dst.name}: .ckpt is a pickle and written only on request; pass --format ckpt")
    if dst.suffix != f".{fmt}":
        raise UserInputError(f"{dst.name}: the name should end in .{fmt} for format {fmt}")
    det = detect(src)
    _require_full(det, "conversion")
    if det.layout != "diffusers":
        raise UserInputError(
            f"{src} is not a Diffusers folder; to make a Diffusers folder from it, give a folder as DST"
        )
    _check_dst(dst, overwrite)
    if det.family in FLOW_FAMILIES:
        if fmt != "safetensors":
            raise UserInputError(f"{det.family} models are written as safetensors only; drop --format {fmt}")
        meta = {**convert_flow.modelspec(det, dst.stem, half), **(metadata or {})}
        convert_flow.to_single_file(src, dst, det, half=half, metadata=meta)
        log.info("wrote %s (%s)", dst, detect(dst).summary())
        return dst
    plans = _plans(src, det)
    meta = {**modelspec(det, dst.stem, half), **(metadata or {})}
    try:
        if fmt == "safetensors":
            entries = [(op.out, *_out_meta(op, s, half)) for s, ops in plans for op in ops]
            header = safetensors_header(entries, {str(k): str(v) for k, v in meta.items()})
            write_stream(dst, lambda fh: write_pieces(fh, header, _pieces(plans, half)))
        else:
            state = {op.out: _build(op, s, _out_meta(op, s, half)[0]) for s, ops in plans for op in ops}
            write_stream(dst, lambda fh: torch.save({"state_dict": state}, fh))
    finally:
        for s, _ in plans:
            s.close()
    if det.family == "sd2" and det.prediction_type == "v_prediction":
        write_text(dst.with_suffix(".yaml"), (CONFIGS / "a1111" / "v2-inference-v.yaml").read_text())
    log.info("wrote %s (%s)", dst, detect(dst).summary())  # what the file holds, as `model detect` says
    return dst


# --- single file -> Diffusers ----------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    # CLIP's (and GPT-2's) reversible byte -> printable character table; vocab ids follow its order.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _clip_tokenizer_files(folder: Path, pad: str) -> None:
    """Write CLIP's BPE vocabulary (shipped as the merges list; vocab.json is derived from it)."""
    merges = gzip.decompress((CONFIGS / "clip_merges.txt.gz").read_bytes()).decode("utf-8")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(line.split(" ")) for line in merges.split("\n")[1:] if line]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad,
                "do_lower_case": True,
            }
        )
    )


def shipped_config(name: str) -> Path:
    """A complete offline Diffusers config folder for ``name`` (e.g. ``sdxl``), made once in the cache.

    The component configs are shipped in ``fastsd/models/configs/<name>``; the tokenizers are
    written from the shipped CLIP vocabulary (SD2 and SDXL's second tokenizer pad with ``!``).
    """
    shipped = CONFIGS / name
    if not (shipped / "model_index.json").is_file():
        raise ModelFormatError(f"fastsd ships no config for {name}")
    stamp = sum(p.stat().st_mtime_ns for p in shipped.rglob("*.json"))
    target = cache_dir() / "configs" / f"{name}-{stamp:x}"
    if (target / "model_index.json").is_file():
        return target
    index = json.loads((shipped / "model_index.json").read_text())
    with contextlib.suppress(FileExistsError), building_folder(target, replace=False) as tmp:
        shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        for tok in ("tokenizer", "tokenizer_2"):
            if isinstance(index.get(tok), list) and index[tok][0]:
                pad = (
                    json.loads((shipped / f"{tok}.pad.json").read_text())["pad"]
                    if (shipped / f"{tok}.pad.json").is_file()
                    else "<|endoftext|>"
                )
                _clip_tokenizer_files(tmp / tok, pad)
        for f in tmp.glob("*.pad.json"):
            f.unlink()
    return target  # built here, or by another process that made it first


def config_for(det: Detection) -> tuple[str, str]:
    """(shipped config name, diffusers pipeline class) for a detected single file."""
    variant = "inpaint" if "inpaint" in det.variants else "refiner" if "refiner" in det.variants else ""
    if not variant and det.prediction_type == "v_prediction":
        variant = "v"
    try:
        return CONFIG_FOR[(det.family, variant)]
    except KeyError:
        raise ModelFormatError(f"{det.path}: no Diffusers config for {det.family} {variant}".strip()) from None


def single_file_to_diffusers(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    config: str | os.PathLike[str] | None = None,
    torch_dtype: torch.dtype | None = None,
) -> Path:
    """Convert a single-file SD1/SD2/SDXL checkpoint to a Diffusers folder, offline.

    Args:
        src: a ``.safetensors`` (or ``.ckpt``, read with ``weights_only=True``) full model.
        dst: the Diffusers folder to create.
        overwrite: replace an existing ``dst`` folder.
        config: a Diffusers folder to take the configs from (default: the one fastsd ships for the
            detected family).
        torch_dtype: dtype of the saved weights (default: the file's precision, fp16 or fp32).

    Returns:
        ``dst``.

    Raises:
        UserInputError: ``dst`` exists without ``overwrite`` or looks like a file name.
        ModelFormatError: ``src`` is not a full SD1/SD2/SDXL model, is damaged, or an unsafe pickle.
    """
    from diffusers import pipelines

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise UserInputError(f"{src} is already a single file; give a folder as DST to make a Diffusers model")
    det = detect(src)
    _require_full(det, "conversion")
    if det.layout != "single-file":
        raise UserInputError(f"{src} is a Diffusers folder; give a .safetensors DST to make a single file")
    _check_dst(dst, overwrite)
    if det.family in FLOW_FAMILIES:
        convert_flow.to_diffusers(src, dst, det, config=Path(config) if config else None, torch_dtype=torch_dtype)
        log.info("wrote Diffusers folder %s (%s)", dst, detect(dst).summary())
        return dst
    name, cls_name = config_for(det)
    config_dir = Path(config) if config else shipped_config(name)
    if torch_dtype is None:
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(det.precision, torch.float32)
    cls = getattr(pipelines, cls_name)
    kwargs: dict[str, Any] = {"config": str(config_dir), "local_files_only": True, "torch_dtype": torch_dtype}
    if cls_name.startswith("StableDiffusionPipeline") or cls_name == "StableDiffusionInpaintPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(str(src), **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelFormatError(f"diffusers could not load {src} as {det.summary()}: {err}") from err
    with building_folder(dst) as tmp:  # an existing dst (overwrite) is replaced in one swap
        pipe.save_pretrained(tmp, safe_serialization=True)
    log.info("wrote Diffusers folder %s (%s)", dst, detect(dst).summary())
    return dst


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    half: bool = False,
    fmt: str = "safetensors",
    overwrite: bool = False,
    config: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert in the direction ``src`` implies: a Diffusers folder -> single file, a file -> Diffusers.

    ``fastsd convert`` makes any spec local first (:func:`fastsd.models.load.local_model`).

    Raises:
        UserInputError: ``src`` missing, a file -> file or folder -> folder request, or ``dst`` exists.
        ModelFormatError: see :func:`diffusers_to_single_file` and :func:`single_file_to_diffusers`.
    """
    s, d = Path(src).expanduser(), Path(dst).expanduser()
    if not s.exists():
        raise UserInputError(f"{s} does not exist; check the path")
    if s.is_dir():
        if d.is_dir():
            raise UserInputError(f"{s} is a Diffusers folder and {d} a folder; give a .safetensors file as DST")
        return diffusers_to_single_file(s, d, half=half, fmt=fmt, overwrite=overwrite)
    if d.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or d.is_file():
        raise UserInputError(
            f"{s} is already a single file and so is {d}; give a folder as DST to make a Diffusers model"
        )
    if half or fmt != "safetensors":
        log.warning("--half and --format apply to single-file output only; ignored")
    return single_file_to_diffusers(s, d, overwrite=overwrite, config=config)
