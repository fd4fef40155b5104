"""AUTOMATIC1111-compatible HTTP API under ``/sdapi/v1`` (FastAPI).

Request fields and defaults are A1111's (``StableDiffusionTxt2ImgProcessingAPI`` /
``StableDiffusionImg2ImgProcessingAPI``); unknown fields are ignored as A1111 does, so existing
clients work unchanged. Invalid values answer 422 with the reason. Generation and model
switches go through the single :class:`~fastsd.webui.worker.Worker`, so requests are served
one at a time in arrival order while ``progress``/``interrupt`` answer at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import re
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import FastsdError, UserInputError
from . import infotext, samplers
from .generate import GenerationRequest, GenerationResult, PipelineManager
from .worker import Worker

MAX_SIDE = 4096
#: Default pixel budget of one job: width x height x batch_size x n_iter (64 MP: 256 images of
#: 512x512, or 16 of 2048x2048). Also the largest init image or mask accepted. A request over it
#: answers 422 instead of holding the only GPU worker for minutes; ``start(max_job_pixels=...)``.
DEFAULT_MAX_JOB_PIXELS = 64 * 1024 * 1024


@dataclass
class Backend:
    """What the API and the UI share: the model manager, the GPU worker and server facts."""

    manager: PipelineManager
    worker: Worker
    flags: dict[str, Any] = field(default_factory=dict)
    max_job_pixels: int = DEFAULT_MAX_JOB_PIXELS

    def submit(self, fn: Any, name: str):
        """Queue ``fn`` on the GPU worker; returns its Future."""
        return self.worker.submit(fn, name)

    def check_budget(self, req: GenerationRequest) -> None:
        """Refuse a job whose pixels (width x height x batch_size x n_iter) exceed :attr:`max_job_pixels`.

        Raises:
            UserInputError: the job is over the budget (the API answers 422 with this message).
        """
        total = req.width * req.height * req.batch_size * req.n_iter
        if total > self.max_job_pixels:
            raise UserInputError(
                f"this job asks for {req.width}x{req.height} x batch_size {req.batch_size} x n_iter {req.n_iter} = "
                f"{total / 2**20:.0f} MP, over this server's budget of {self.max_job_pixels / 2**20:.0f} MP per job: "
                "lower the size, batch_size or n_iter (or start the server with a larger max_job_pixels)"
            )

    def run_generation(self, req: GenerationRequest, *, save: bool, override: dict[str, Any] | None = None):
        """Queue a generation (optionally saving to ``<home>/outputs``); returns its Future.

        Raises:
            UserInputError: the job is over the pixel budget (:meth:`check_budget`); nothing is queued.
        """
        self.check_budget(req)

        def job() -> tuple[GenerationResult, list[Path]]:
            result = self.manager.generate(req)
            if override:
                self.manager.set_options(override)
            paths = []
            if save:
                paths = infotext.save_outputs(
                    result.images, result.infotexts, result.seeds, Path(self.manager.options["outdir_samples"])
                )
            return result, paths

        return self.submit(job, req.task)


# ----- request / response models ----------------------------------------------------------


class _Processing(BaseModel):
    """Fields common to txt2img and img2img (A1111's ``StableDiffusionProcessing``)."""

    # allow_inf_nan: JSON's NaN/Infinity would pass ge/le (every comparison with NaN is false) and
    # fail later as a 500; refused here as a 422 naming the field.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    sampler_index: str | None = "Euler"
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=1000)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int = Field(512, ge=8, le=MAX_SIDE)
    height: int = Field(512, ge=8, le=MAX_SIDE)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = Field(None, ge=0, le=1)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False
    send_images: bool = True
    save_images: bool = False
    script_name: str | None = None
    script_args: list[Any] = []
    alwayson_scripts: dict[str, Any] = {}
    # fastsd extension: LoRAs as a field, besides A1111's <lora:name:weight> prompt tags.
    loras: dict[str, float] | None = Field(None, description="fastsd extension: LoRA name -> weight")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int, info: Any) -> int:
        if v % 8:
            raise ValueError(f"{info.field_name} must be a multiple of 8 (got {v}); try {max(8, v // 8 * 8)}")
        return v

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _known_sampler(cls, v: str | None) -> str | None:
        if v:
            try:
                samplers.find_sampler(v)
            except UserInputError as err:
                raise ValueError(str(err)) from None
        return v

    @field_validator("scheduler")
    @classmethod
    def _known_schedule(cls, v: str | None) -> str | None:
        if v:
            try:
                samplers.find_schedule_type(v)
            except UserInputError as err:
                raise ValueError(str(err)) from None
        return v


class Txt2ImgRequest(_Processing):
    """``POST /sdapi/v1/txt2img`` (A1111's ``StableDiffusionTxt2ImgProcessingAPI``; hires fix is ignored)."""

    enable_hr: bool = False
    denoising_strength: float | None = Field(0.75, ge=0, le=1)
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0


class Img2ImgRequest(_Processing):
    """``POST /sdapi/v1/img2img`` (A1111's ``StableDiffusionImg2ImgProcessingAPI``); a mask makes it inpainting."""

    init_images: list[str] | None = None
    resize_mode: int = Field(0, ge=0, le=3)
    denoising_strength: float | None = Field(0.75, ge=0, le=1)
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=256)
    mask_blur_y: int = Field(4, ge=0, le=256)
    mask_blur: int | None = Field(None, ge=0, le=256)
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=1024)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    """A1111's ``TextToImageResponse`` / ``ImageToImageResponse``."""

    images: list[str] = Field(description="generated images, base64 PNG with the infotext")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seed, all_seeds, infotexts, ...")


class PngInfoRequest(BaseModel):
    """``POST /sdapi/v1/png-info`` (A1111's ``PNGInfoRequest``)."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="base64 image (a data: URL prefix is allowed)")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


# ----- helpers ----------------------------------------------------------------------------


def decode_image(data: str, what: str, max_pixels: int = DEFAULT_MAX_JOB_PIXELS) -> Image.Image:
    """A PIL image from base64 (a ``data:image/...;base64,`` prefix is allowed), at most ``max_pixels``.

    The size is read from the image header and checked before any pixel is decoded, so a few
    kilobytes claiming 900 megapixels cost nothing.

    Raises:
        UserInputError: not base64, not an image, or larger than ``max_pixels``.
    """
    if not isinstance(data, str) or not data.strip():
        raise UserInputError(f"{what} is empty: send a base64-encoded PNG or JPEG")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise UserInputError(
            f"{what} is not valid base64 ({err}): send the image file's bytes base64-encoded"
        ) from None
    too_big = (
        f"{what} is {{}}, over this server's limit of {max_pixels / 2**20:.0f} MP: send a smaller image "
        "(it is resized to width x height anyway)"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies, below
            img = Image.open(io.BytesIO(raw))
        width, height = img.size
        if width * height > max_pixels:
            raise UserInputError(too_big.format(f"{width}x{height} ({width * height / 2**20:.0f} MP)"))
        img.load()
    except Image.DecompressionBombError as err:
        m = re.search(r"\((\d+) pixels\)", str(err))
        raise UserInputError(too_big.format(f"{int(m.group(1)) / 2**20:.0f} MP" if m else "too large")) from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserInputError(f"{what} is base64 but not an image ({err}): send a PNG or JPEG") from None
    return img


def _common(req: _Processing) -> dict[str, Any]:
    override = req.override_settings or {}
    clip = override.get("CLIP_stop_at_last_layers")
    if clip is not None and (not isinstance(clip, int) or not 1 <= clip <= 12):
        raise UserInputError(f"override_settings.CLIP_stop_at_last_layers must be an integer 1..12, not {clip!r}")
    return {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt or "",
        "seed": req.seed,
        "subseed": req.subseed,
        # unset: the model's own defaults (SD3.5/FLUX: the makers' steps and guidance; else A1111's 50 / 7)
        "steps": req.steps if "steps" in req.model_fields_set else None,
        "cfg_scale": req.cfg_scale if "cfg_scale" in req.model_fields_set else None,
        "width": req.width,
        "height": req.height,
        "sampler_name": req.sampler_name or req.sampler_index,
        "scheduler": req.scheduler,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "clip_skip": clip,
        "checkpoint": override.get("sd_model_checkpoint"),
        "vae": override.get("sd_vae"),
        "loras": list((req.loras or {}).items()),
        "eta": req.eta,
    }


def _persistent_overrides(req: _Processing) -> dict[str, Any] | None:
    if req.override_settings and not req.override_settings_restore_afterwards:
        return dict(req.override_settings)
    return None


def txt2img_request(req: Txt2ImgRequest) -> GenerationRequest:
    """The generation request for an API txt2img body."""
    return GenerationRequest(**_common(req))


def img2img_request(req: Img2ImgRequest, max_pixels: int = DEFAULT_MAX_JOB_PIXELS) -> GenerationRequest:
    """The generation request for an API img2img body (inpainting when it has a mask).

    Raises:
        UserInputError: no init image, broken base64, an empty mask, an image over ``max_pixels``.
    """
    if not req.init_images:
        raise UserInputError("init_images is required for img2img: send a list with one base64 image")
    images = [decode_image(s, f"init_images[{i}]", max_pixels) for i, s in enumerate(req.init_images)]
    mask = decode_image(req.mask, "mask", max_pixels) if req.mask is not None else None
    blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    return GenerationRequest(
        **_common(req),
        init_images=images,
        denoising_strength=0.75 if req.denoising_strength is None else req.denoising_strength,
        resize_mode=req.resize_mode,
        mask=mask,
        mask_blur=blur,
        inpainting_fill=req.inpainting_fill,
        inpaint_full_res=req.inpaint_full_res,
        inpaint_full_res_padding=req.inpaint_full_res_padding,
        inpainting_mask_invert=req.inpainting_mask_invert,
    )


async def _await(future: Any) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except UserInputError as err:
        raise HTTPException(status_code=422, detail=str(err)) from None
    except FastsdError as err:
        raise HTTPException(status_code=500, detail=str(err)) from None


def _encode(result: GenerationResult, send: bool) -> list[str]:
    if not send:
        return []
    return [infotext.png_base64(img, text) for img, text in zip(result.images, result.infotexts, strict=True)]


# ----- router -----------------------------------------------------------------------------


def make_auth_dependency(auth: tuple[str, str] | None):
    """A FastAPI dependency enforcing HTTP Basic ``auth`` (user, password); a no-op when None."""
    basic = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if auth is None:
            return
        ok = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), auth[0].encode())
            & secrets.compare_digest(credentials.password.encode(), auth[1].encode())
        )
        if not ok:
            raise HTTPException(
                status_code=401, detail="wrong or missing user:password", headers={"WWW-Authenticate": "Basic"}
            )

    return check


def make_router(backend: Backend, auth: tuple[str, str] | None = None) -> APIRouter:
    """All ``/sdapi/v1`` routes over ``backend``, protected by HTTP Basic ``auth`` when given."""
    router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(make_auth_dependency(auth))], tags=["A1111 API"])
    manager, state = backend.manager, backend.worker.state

    def queue(req: GenerationRequest, body: _Processing) -> Any:
        save = body.save_images and not body.do_not_save_samples
        try:
            return backend.run_generation(req, save=save, override=_persistent_overrides(body))
        except UserInputError as err:  # over the pixel budget: refused before it is queued
            raise HTTPException(status_code=422, detail=str(err)) from None

    @router.post("/txt2img", response_model=ImageResponse)
    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        try:
            req = txt2img_request(body)
        except UserInputError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        result, _ = await _await(queue(req, body))
        images = await asyncio.to_thread(_encode, result, body.send_images)
        return {"images": images, "parameters": body.model_dump(), "info": _info_json(result)}

    @router.post("/img2img", response_model=ImageResponse)
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        try:
            req = await asyncio.to_thread(img2img_request, body, backend.max_job_pixels)
        except UserInputError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        result, _ = await _await(queue(req, body))
        images = await asyncio.to_thread(_encode, result, body.send_images)
        params = body.model_dump()
        if not body.include_init_images:
            params["init_images"] = None
            params["mask"] = None
        return {"images": images, "parameters": params, "info": _info_json(result)}

    @router.post("/png-info")
    async def png_info(body: PngInfoRequest) -> dict[str, Any]:
        try:
            image = await asyncio.to_thread(decode_image, body.image, "image")
        except UserInputError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        return infotext.png_info(image)

    @router.get("/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        value, eta = state.progress()
        current = None
        if not skip_current_image and state.busy:
            preview = await asyncio.to_thread(manager.preview)
            current = infotext.png_base64(preview, None) if preview is not None else None
        return {
            "progress": value,
            "eta_relative": eta,
            "state": state.as_dict(),
            "current_image": current,
            "textinfo": state.textinfo,
            "current_task": f"task({state.job_id})" if state.busy else None,
        }

    @router.post("/interrupt")
    async def interrupt() -> None:
        state.interrupt()

    @router.post("/skip")
    async def skip() -> None:
        state.skip()

    @router.get("/options")
    async def get_options() -> dict[str, Any]:
        out = dict(manager.options)
        out["sd_checkpoint_hash"] = None
        return out

    @router.post("/options")
    async def set_options(request: Request) -> None:
        try:
            values = await request.json()
        except ValueError:
            raise HTTPException(status_code=422, detail="the body must be a JSON object of option: value") from None
        if not isinstance(values, dict):
            raise HTTPException(status_code=422, detail="the body must be a JSON object of option: value")
        await _await(backend.submit(lambda: manager.set_options(values), "options"))

    @router.get("/cmd-flags")
    async def cmd_flags() -> dict[str, Any]:
        return dict(backend.flags)

    @router.get("/samplers")
    async def list_samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in samplers.SAMPLERS]

    @router.get("/schedulers")
    async def list_schedulers() -> list[dict[str, Any]]:
        return [
            {
                "name": samplers.schedule_id(label),
                "label": label,
                "aliases": None,
                "default_rho": 7.0 if label == "Karras" else -1,
                "need_inner_model": False,
            }
            for label in samplers.SCHEDULE_TYPES
        ]

    @router.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return [
            {"title": e.title, "model_name": e.name, "hash": None, "sha256": None, "filename": e.path, "config": None}
            for e in manager.listed("checkpoint")
        ]

    @router.get("/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": e.title, "filename": e.path} for e in manager.listed("vae")]

    @router.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        return [
            {"name": e.name, "alias": e.name, "path": e.path, "metadata": e.metadata} for e in manager.listed("lora")
        ]

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        await asyncio.to_thread(manager.refresh)

    @router.post("/refresh-loras")
    async def refresh_loras() -> None:
        await asyncio.to_thread(manager.refresh)

    @router.post("/refresh-vae")
    async def refresh_vae() -> None:
        await asyncio.to_thread(manager.refresh)

    @router.get("/memory")
    async def memory() -> dict[str, Any]:
        return memory_report(manager)

    return router


def _info_json(result: GenerationResult) -> str:
    import json

    return json.dumps(result.info, ensure_ascii=False)


def memory_report(manager: PipelineManager) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/memory``: RAM and CUDA numbers, plus fastsd's memory settings."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    proc = psutil.Process()
    out: dict[str, Any] = {
        "ram": {"free": vm.available, "used": proc.memory_info().rss, "total": vm.total},
        "fastsd": {"memory_settings": manager.memory, "device": manager.device},
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(key: str) -> dict[str, int]:
            return {"current": stats.get(f"{key}_bytes.all.current", 0), "peak": stats.get(f"{key}_bytes.all.peak", 0)}

        out["cuda"] = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": pair("active"),
            "allocated": pair("allocated"),
            "reserved": pair("reserved"),
            "inactive": pair("inactive_split"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    else:
        out["cuda"] = {"error": "no CUDA device"}
    return out


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings (JSON has no NaN), containers walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def install_error_handlers(app: Any) -> None:
    """Turn fastsd user errors raised outside the routes into 422 answers with the reason.

    Validation errors are answered by fastsd too: FastAPI's own handler echoes the rejected
    input, and a NaN there cannot be written as JSON, which turned the 422 into a 500.
    """
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:  # noqa: ARG001
        return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(err.errors()))})

    @app.exception_handler(UserInputError)
    async def _user_error(request: Request, err: UserInputError) -> JSONResponse:  # noqa: ARG001
        return JSONResponse(status_code=422, content={"detail": str(err)})
