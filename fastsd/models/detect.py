"""What a model file or folder is, from its keys, shapes and stored metadata only.

Reads safetensors headers (a few kilobytes), Diffusers ``config.json`` files, and at most one tiny
tensor for the SD2 prediction-type heuristic; never loads a model and never needs a GPU. Pickled
checkpoints are opened with ``torch.load(weights_only=True, mmap=True)``.

Rules (first match wins), for a single file:

* LoRA: ``lora_up``/``lora_down``/``lora_A``/``lora_B`` keys. FLUX from ``double_blocks``/
  ``single_blocks`` (kohya, ComfyUI) or ``single_transformer_blocks`` (Diffusers) names, SD3 from
  ``joint_blocks`` or the transformer's width (1536 SD3.5 Medium, 2432 Large, 3072 FLUX); else the
  family from the cross-attention input width (768 SD1, 1024 SD2, 2048 SDXL) or ``lora_te2_`` keys (SDXL).
* VAE only: ``encoder.``/``decoder.`` keys and no UNet.
* SD3 (``joint_blocks``; variant from the MMDiT: dual attention = 3.5 Medium, qk-norm only = 3.5
  Large, "turbo" in the name/metadata = Large Turbo), FLUX (``double_blocks``; a ``guidance_in``
  embedder = dev, none = schnell), with or without the ``model.diffusion_model.`` prefix.
* SDXL: ``conditioner.embedders`` or ``label_emb`` (refiner when embedder 0 is OpenCLIP);
  SD2: an OpenCLIP ``cond_stage_model.model``; SD1: a transformers CLIP ``cond_stage_model.transformer``.
  A UNet without text encoder falls back on the cross-attention width.
* inpaint: 9 UNet input channels (8: instruct-pix2pix).
* SD2 prediction type: ``modelspec.prediction_type`` / kohya ``ss_v_parameterization`` metadata, an
  A1111 ``.yaml`` beside the file; otherwise ComfyUI's heuristic (the standard deviation of
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` is above 0.09 in v-prediction models),
  reported with ``prediction_guess=True``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError, UserInputError
from .registry import BASE_MODELS, native_resolution
from .tensorfile import PICKLE_SUFFIXES, TensorInfo, load_pickle_state_dict, read_header, read_tensor

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "other")

#: cross-attention context width -> family, for UNets and LoRAs without a text encoder.
CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl"}


V_PRED_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PRED_STD = 0.09

WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


@dataclass
class Detection:
    """What :func:`detect` found.

    Attributes:
        path: the file or folder looked at.
        layout: ``single-file``, ``diffusers`` (a pipeline folder) or ``diffusers-component``.
        family: one of :data:`FAMILIES`.
        kind: ``full`` (a whole pipeline), ``unet``, ``transformer`` (an SD3/FLUX denoiser alone, e.g.
            Black Forest Labs' FLUX files), ``vae``, ``text-encoder``, ``lora``, ``controlnet`` or ``unknown``.
        variants: any of ``inpaint``, ``instruct-pix2pix``, ``refiner``, ``v-prediction``; SD3:
            ``medium``, ``large``, ``large-turbo``, ``sd3.0-medium``; FLUX: ``dev``, ``schnell``.
        prediction_type: ``epsilon``, ``v_prediction``, ``flow_matching`` or None when it does not apply.
        prediction_guess: True when the prediction type comes from a heuristic, not stored data.
        precision: ``fp32``, ``fp16``, ``bf16``, ``fp8`` or ``mixed`` (by bytes of float tensors).
        components: parts present: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``.
        resolution: the native resolution (pixels, square), when known.
        notes: anything a user should know (e.g. how a guess was made).
    """

    path: str
    layout: str
    family: str
    kind: str
    variants: list[str] = field(default_factory=list)
    prediction_type: str | None = None
    prediction_guess: bool = False
    precision: str = "fp32"
    components: list[str] = field(default_factory=list)
    resolution: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for people: ``sd2 full model (v-prediction, guessed), fp16, 768px: unet, vae, text_encoder``."""
        what = {
            "full": "full model",
            "lora": "LoRA",
            "vae": "VAE only",
            "unet": "UNet only",
            "transformer": "transformer only",
        }.get(self.kind, self.kind)
        extra = ", ".join(self.variants)
        if self.prediction_guess:
            extra += " (prediction type guessed)"
        head = f"{self.family} {what}" + (f" ({extra})" if extra else "")
        res = f", {self.resolution}px" if self.resolution else ""
        return f"{head}, {self.precision}{res}: {', '.join(self.components) or 'no components'}"


# --- helpers shared with convert -------------------------------------------------------------


def weight_files(component_dir: str | os.PathLike[str]) -> list[Path]:
    """The weight files of one Diffusers component folder: single, sharded (``*.index.json``) or ``.bin``.

    Prefers safetensors over ``.bin``, and the plain file over ``fp16`` variants.

    Raises:
        ModelFormatError: no weights found, or an index names a missing shard.
    """
    folder = Path(component_dir)
    for variant in ("", ".fp16"):
        for stem in WEIGHT_NAMES:
            for ext in ("safetensors", "bin"):
                single = folder / f"{stem}{variant}.{ext}"
                index = folder / f"{stem}{variant}.{ext}.index.json"
                if single.is_file():
                    return [single]
                if index.is_file():
                    try:
                        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    except (OSError, ValueError, KeyError) as err:
                        raise ModelFormatError(f"{index} is not a valid shard index; download the model again") from err
                    files = [folder / s for s in shards]
                    missing = [f.name for f in files if not f.is_file()]
                    if missing:
                        raise ModelFormatError(f"{folder} lacks shard {missing[0]}; download the model again")
                    return files
    raise ModelFormatError(f"{folder} has no model weights (no *.safetensors or *.bin); download the model again")


def tensor_infos(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Headers of ``files`` merged (pickled files are loaded with weights_only=True to list them)."""
    infos: dict[str, TensorInfo] = {}
    meta: dict[str, str] = {}
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:
            for k, v in load_pickle_state_dict(f).items():
                infos[k] = TensorInfo(k, v.dtype, tuple(v.shape), f)
        else:
            i, m = read_header(f)
            infos.update(i)
            meta.update(m)
    return infos, meta


def precision_of(infos: dict[str, TensorInfo]) -> str:
    """``fp32``/``fp16``/``bf16``/``fp8``, or ``mixed`` when no float type holds 95% of the bytes."""
    by: dict[str, int] = {}
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    for i in infos.values():
        if not i.dtype.is_floating_point:
            continue
        name = names.get(i.dtype, "fp8" if i.dtype.itemsize == 1 else str(i.dtype))
        by[name] = by.get(name, 0) + i.nbytes
    if not by:
        return "none"
    name, n = max(by.items(), key=lambda kv: kv[1])
    return name if n >= 0.95 * sum(by.values()) else "mixed"


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"{path} is not valid JSON; the model folder is damaged") from err


# --- single files ----------------------------------------------------------------------------


#: Tensor-name marks of adapter files: LoRA (kohya, diffusers/peft, ComfyUI), LoCon, LoHa, LoKr.
LORA_MARKS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "hada_w", "lokr_w")
#: Names that only a denoiser has: ldm/sgm single files, Diffusers UNet/DiT, SD3's MMDiT, FLUX's blocks.
DENOISER_MARKS = ("model.diffusion_model.", "down_blocks.", "transformer_blocks.", "joint_blocks.", "double_blocks.")
_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def kind_from_keys(keys: list[str]) -> str | None:
    """What a single file is from its tensor names alone (cheap: for listing folders of models).

    ``lora``, ``controlnet``, ``checkpoint`` (anything with a denoiser, whole or alone), ``vae``,
    ``embedding`` (textual inversion), or None when the names do not say. :func:`detect` tells the
    family and the rest; the web UI's catalog and the backends' model links sort files with this.
    """
    if not keys:
        return None
    if any(m in k for k in keys for m in LORA_MARKS):
        return "lora"
    if any(k.startswith(("control_model.", "controlnet_")) or "input_hint_block" in k for k in keys):
        return "controlnet"
    if any(k.startswith(("conditioner.", "cond_stage_model.")) for k in keys) or any(
        k.startswith(m) or f".{m}" in k for k in keys for m in DENOISER_MARKS
    ):
        return "checkpoint"
    if all(k.removeprefix("first_stage_model.").startswith(_VAE_PREFIXES) for k in keys):
        return "vae"
    if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_") for k in keys):
        return "embedding"
    return None


def _family_from_width(width: int | None) -> str:
    return CONTEXT_WIDTH.get(width or -1, "other")


def _detect_file(path: Path) -> Detection:
    if path.suffix in PICKLE_SUFFIXES:
        infos = {k: TensorInfo(k, v.dtype, tuple(v.shape), path) for k, v in load_pickle_state_dict(path).items()}
        meta: dict[str, str] = {}
    elif path.suffix == ".safetensors" or path.suffix == "":
        infos, meta = read_header(path)
    else:
        raise UserInputError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors, .ckpt, .pt or .bin")
    if not infos:
        raise ModelFormatError(f"{path} holds no tensors; it is not a model")
    keys = list(infos)
    det = Detection(str(path), "single-file", "other", "unknown", precision=precision_of(infos))

    if any(("lora_up" in k or "lora_down" in k or "lora_A" in k or "lora_B" in k or ".lora." in k) for k in keys):
        det.kind = "lora"
        det.components = sorted(
            {"unet" if ("unet" in k or "transformer" in k) else "text_encoder" for k in keys if "lora" in k}
        )
        # fastsd's SD3/FLUX LoRAs name their family (a transformer's width alone misses non-standard sizes)
        flow = meta.get("fastsd_family") if meta.get("fastsd_family") in ("sd3", "flux") else None
        flow = flow or _flow_lora_family(keys, infos)
        if flow:
            det.family = flow
            det.components = ["transformer" if c == "unet" else c for c in det.components]
        elif any(k.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for k in keys):
            det.family = "sdxl"
        else:
            widths = [
                infos[k].shape[-1]
                for k in keys
                if ("attn2_to_k" in k or "attn2.to_k" in k) and ("lora_down" in k or "lora_A" in k or "lora.down" in k)
            ]
            det.family = _family_from_width(widths[0] if widths else None)
        return det

    unet_prefix = "model.diffusion_model."
    has_unet = any(k.startswith(unet_prefix) for k in keys)
    has_vae = any(k.startswith("first_stage_model.") for k in keys)
    if not has_unet and not has_vae and any(k.startswith(("encoder.", "decoder.")) for k in keys):
        det.kind, det.components = "vae", ["vae"]
        det.notes.append("SD1, SD2 and SDXL VAEs share one architecture; the family cannot be told from keys")
        return det
    if any(k.startswith(("joint_blocks.", f"{unet_prefix}joint_blocks.")) for k in keys):
        return _flow_file(det, "sd3", keys, meta, path)
    if any(k.startswith(("double_blocks.", f"{unet_prefix}double_blocks.")) for k in keys):
        return _flow_file(det, "flux", keys, meta, path)
    if not has_unet:
        if any("down_blocks." in k and "attn2.to_k" in k for k in keys):
            det.kind, det.layout, det.components = "unet", "diffusers-component", ["unet"]
            widths = [infos[k].shape[-1] for k in keys if k.endswith("attn2.to_k.weight")]
            det.family = _family_from_width(widths[0] if widths else None)
        if any(k.startswith(("control_model.", "controlnet_")) for k in keys):
            det.kind = "controlnet"
        return det

    det.components = ["unet"] + (["vae"] if has_vae else [])
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        det.family = "sdxl"
        det.components += ["text_encoder", "text_encoder_2"]
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        det.family = "sdxl"
        det.variants.append("refiner")
        det.components += ["text_encoder_2"]
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        det.family = "sd2"
        det.components += ["text_encoder"]
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        det.family = "sd1"
        det.components += ["text_encoder"]
    elif f"{unet_prefix}label_emb.0.0.weight" in keys:
        det.family = "sdxl"
        if infos[f"{unet_prefix}label_emb.0.0.weight"].shape[-1] == 2560:
            det.variants.append("refiner")
    else:
        widths = [infos[k].shape[-1] for k in keys if k.endswith("attn2.to_k.weight") and k.startswith(unet_prefix)]
        det.family = _family_from_width(widths[0] if widths else None)
    det.kind = "full" if det.family != "other" and len(det.components) > 1 else "unet"
    conv_in = infos.get(f"{unet_prefix}input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in.shape) == 4:
        if conv_in.shape[1] == 9:
            det.variants.insert(0, "inpaint")
        elif conv_in.shape[1] == 8:
            det.variants.insert(0, "instruct-pix2pix")
    _prediction(det, path, infos, meta)
    return det


#: Text encoders in a ComfyUI-style SD3/FLUX checkpoint: key prefix -> Diffusers component, per family.
FLOW_TEXT_ENCODERS = {
    "sd3": {
        "text_encoders.clip_l.": "text_encoder",
        "text_encoders.clip_g.": "text_encoder_2",
        "text_encoders.t5xxl.": "text_encoder_3",
    },
    "flux": {"text_encoders.clip_l.": "text_encoder", "text_encoders.t5xxl.": "text_encoder_2"},
}


#: Hidden width of the transformer -> family, for SD3/FLUX LoRAs that touch only the joint blocks.
FLOW_WIDTH = {1536: "sd3", 2432: "sd3", 3072: "flux"}


def _flow_lora_family(keys: list[str], infos: dict[str, TensorInfo]) -> str | None:
    """``sd3``/``flux`` for LoRAs of those transformers, in Diffusers/PEFT, kohya or ComfyUI names."""
    if any(("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k) for k in keys):
        return "flux"
    if any("joint_blocks" in k for k in keys):
        return "sd3"
    widths = [
        infos[k].shape[-1]
        for k in keys
        if k.startswith("transformer.transformer_blocks.")
        and ".attn.to_q." in k
        and ("lora_A" in k or "lora_down" in k)
    ]
    return FLOW_WIDTH.get(widths[0]) if widths else None


def _turbo(*names: str) -> bool:
    return any("turbo" in n.lower() for n in names if n)


def sd3_variant(*, dual_attention: bool, qk_norm: bool, turbo: bool = False) -> str:
    """SD3 variant from the MMDiT's structure: SD3.5 Medium is MMDiT-X (dual attention layers),
    SD3.5 Large has RMS qk-norm without them, SD3.0 Medium neither. Large and Large Turbo share
    weights' shapes; turbo is told by name or metadata only."""
    if dual_attention:
        return "medium"
    if qk_norm:
        return "large-turbo" if turbo else "large"
    return "sd3.0-medium"


def _flow_file(det: Detection, family: str, keys: list[str], meta: dict[str, str], path: Path) -> Detection:
    """SD3 (``joint_blocks``) or FLUX (``double_blocks``/``single_blocks``) single files.

    Stability's SD3.5 files hold the MMDiT under ``model.diffusion_model.`` and the VAE under
    ``first_stage_model.``; Black Forest Labs' FLUX files hold the bare transformer (no prefix);
    ComfyUI's all-in-one files add ``text_encoders.clip_l.`` / ``clip_g.`` / ``t5xxl.``.
    """
    det.family, det.resolution = family, native_resolution(family)
    det.prediction_type = "flow_matching"
    has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in keys)
    texts = [c for pre, c in FLOW_TEXT_ENCODERS[family].items() if any(k.startswith(pre) for k in keys)]
    det.components = ["transformer"] + (["vae"] if has_vae else []) + texts
    det.kind = "full" if has_vae else "transformer"
    if family == "sd3":
        turbo = _turbo(path.name, meta.get("modelspec.title", ""), meta.get("modelspec.architecture", ""))
        det.variants.append(
            sd3_variant(
                dual_attention=any(".x_block.attn2." in k for k in keys),
                qk_norm=any(".attn.ln_q." in k for k in keys),
                turbo=turbo,
            )
        )
    else:
        det.variants.append("dev" if any("guidance_in." in k for k in keys) else "schnell")
    return det


def _flow_folder(det: Detection, path: Path) -> None:
    """Variant of an SD3/FLUX Diffusers folder, from ``transformer/config.json``."""
    cfg_file = path / "transformer" / "config.json"
    cfg = _json(cfg_file) if cfg_file.is_file() else {}
    det.prediction_type = "flow_matching"
    if det.family == "sd3":
        det.variants.append(
            sd3_variant(
                dual_attention=bool(cfg.get("dual_attention_layers")),
                qk_norm=bool(cfg.get("qk_norm")),
                turbo=_turbo(path.name, str(cfg.get("_name_or_path", ""))),
            )
        )
    elif det.family == "flux":
        det.variants.append("dev" if cfg.get("guidance_embeds") else "schnell")


def _prediction(det: Detection, path: Path, infos: dict[str, TensorInfo], meta: dict[str, str]) -> None:
    if det.family not in ("sd1", "sd2", "sdxl"):
        return
    stored = (meta.get("modelspec.prediction_type") or meta.get("prediction_type") or "").lower()
    if meta.get("ss_v_parameterization", "").lower() == "true":
        stored = "v"
    yaml = path.with_suffix(".yaml")
    if not stored and yaml.is_file():
        text = yaml.read_text(errors="replace")
        stored = "v" if 'parameterization: "v"' in text or "parameterization: v" in text else "epsilon"
    if stored:
        det.prediction_type = "v_prediction" if stored in ("v", "v_prediction", "v-prediction") else "epsilon"
    elif det.family != "sd2" or "inpaint" in det.variants:
        det.prediction_type = "epsilon"  # SD1, SDXL base/refiner and SD2 inpainting are all ε-prediction
    else:
        probe = infos.get(V_PRED_PROBE)
        std = 0.0
        if probe is not None and probe.start is not None:
            std = float(read_tensor(probe).float().std(unbiased=False))
        elif probe is not None:
            std = float(load_pickle_state_dict(path)[V_PRED_PROBE].float().std(unbiased=False))
        det.prediction_type = "v_prediction" if std > V_PRED_STD else "epsilon"
        det.prediction_guess = True
        det.notes.append(
            f"SD2 prediction type guessed from {V_PRED_PROBE.split('model.', 1)[1]} (std {std:.3f}, v above "
            f"{V_PRED_STD}); put a .yaml beside the file or use a file with modelspec metadata to be sure"
        )
    if det.prediction_type == "v_prediction":
        det.variants.append("v-prediction")
    res = meta.get("modelspec.resolution", "").split("x")[0]
    det.resolution = int(res) if res.isdigit() else native_resolution(det.family, det.prediction_type)


# --- Diffusers folders -----------------------------------------------------------------------

PIPELINE_FAMILY = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}


def _detect_folder(path: Path) -> Detection:
    index = path / "model_index.json"
    if not index.is_file():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelFormatError(f"{path} is neither a Diffusers folder (no model_index.json) nor a model file")
        config = _json(cfg)
        cls = config.get("_class_name", "")
        infos, _ = tensor_infos(weight_files(path))
        kind = {
            "AutoencoderKL": "vae",
            "UNet2DConditionModel": "unet",
            "ControlNetModel": "controlnet",
            "SD3Transformer2DModel": "transformer",
            "FluxTransformer2DModel": "transformer",
        }.get(cls, "text-encoder" if re.search("CLIP|T5", str(config.get("architectures", ""))) else "unknown")
        det = Detection(str(path), "diffusers-component", "other", kind, precision=precision_of(infos))
        det.components = [kind]
        if kind == "transformer":
            det.family = "sd3" if cls.startswith("SD3") else "flux"
            det.resolution = native_resolution(det.family)
            if det.family == "sd3":
                det.variants.append(
                    sd3_variant(
                        dual_attention=bool(config.get("dual_attention_layers")),
                        qk_norm=bool(config.get("qk_norm")),
                        turbo=_turbo(path.parent.name),
                    )
                )
            else:
                det.variants.append("dev" if config.get("guidance_embeds") else "schnell")
        if kind in ("unet", "controlnet"):
            width = config.get("cross_attention_dim")
            det.family = "sdxl" if config.get("addition_embed_type") == "text_time" else _family_from_width(width)
        return det

    model_index = _json(index)
    cls = model_index.get("_class_name", "")
    components = [
        name
        for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        if isinstance(model_index.get(name), list) and model_index[name][0] and (path / name).is_dir()
    ]
    det = Detection(str(path), "diffusers", PIPELINE_FAMILY.get(cls, "other"), "full", components=components)
    infos: dict[str, TensorInfo] = {}
    for name in components:
        infos.update({f"{name}.{k}": v for k, v in tensor_infos(weight_files(path / name))[0].items()})
    det.precision = precision_of(infos)
    unet_cfg = _json(path / "unet" / "config.json") if "unet" in components else {}
    if det.family == "other" and unet_cfg:
        te_cfg = _json(path / "text_encoder" / "config.json") if "text_encoder" in components else {}
        if unet_cfg.get("addition_embed_type") == "text_time":
            det.family = "sdxl"
        elif te_cfg.get("hidden_act") == "gelu" or unet_cfg.get("cross_attention_dim") == 1024:
            det.family = "sd2"  # OpenCLIP-H text encoder
        elif te_cfg.get("hidden_act") == "quick_gelu" or unet_cfg.get("cross_attention_dim") == 768:
            det.family = "sd1"
    if det.family == "sdxl" and "text_encoder" not in components:
        det.variants.append("refiner")
    in_ch = unet_cfg.get("in_channels")
    if in_ch == 9:
        det.variants.insert(0, "inpaint")
    elif in_ch == 8:
        det.variants.insert(0, "instruct-pix2pix")
    if not unet_cfg and "transformer" not in components:
        det.kind = "unknown"
    sched = path / "scheduler" / "scheduler_config.json"
    if det.family in ("sd1", "sd2", "sdxl"):
        pred = _json(sched).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
        det.prediction_type = "v_prediction" if pred == "v_prediction" else "epsilon"
        if det.prediction_type == "v_prediction":
            det.variants.append("v-prediction")
        if unet_cfg.get("sample_size") and (path / "vae" / "config.json").is_file():
            levels = len(_json(path / "vae" / "config.json").get("block_out_channels", [0, 0, 0, 0]))
            det.resolution = int(unet_cfg["sample_size"]) * 2 ** (levels - 1)
    else:
        det.resolution = native_resolution(det.family)
        if det.family in ("sd3", "flux"):
            _flow_folder(det, path)
    return det


def detect(path: str | os.PathLike[str]) -> Detection:
    """Tell what a model file or Diffusers folder is, from headers, keys, shapes and configs only.

    Args:
        path: a ``.safetensors``/``.ckpt``/``.pt``/``.bin`` file, a Diffusers pipeline folder, or a
            Diffusers component folder (e.g. ``vae/``).

    Returns:
        A :class:`Detection`.

    Raises:
        UserInputError: the path does not exist.
        ModelFormatError: the file is truncated, not a model, or a pickle that needs code to load.

    Example:
        >>> detect("model.safetensors").summary()  # doctest: +SKIP
        'sd1 full model, fp16, 512px: unet, vae, text_encoder'
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserInputError(f"{p} does not exist; check the path")
    return _detect_folder(p) if p.is_dir() else _detect_file(p)


def diffusers_family(model: str | os.PathLike[str]) -> dict[str, Any]:
    """Family facts of a Diffusers folder from its JSON configs alone (what the trainer plans with).

    Returns:
        ``{"family": "sd1"|"sd2"|"sdxl", "prediction_type": ..., "native_resolution": int}``; SD3/FLUX
        folders give ``family`` ``sd3``/``flux``, ``prediction_type`` ``flow_matching`` and ``variant``.

    Raises:
        UserInputError: not a Diffusers folder with a UNet or a transformer.
    """
    root = Path(model)
    unet_cfg = root / "unet" / "config.json"
    if not unet_cfg.is_file() and (root / "transformer" / "config.json").is_file():
        if not (root / "model_index.json").is_file():
            raise UserInputError(
                f"base model {model} is a transformer folder only: pass the whole SD3/FLUX Diffusers folder"
            )
        det = _detect_folder(root)
        facts = {
            "family": det.family,
            "prediction_type": "flow_matching",
            "native_resolution": native_resolution(det.family),
            "variant": det.variants[0] if det.variants else "",
        }
        transformer = _json(root / "transformer" / "config.json")
        vae_cfg = root / "vae" / "config.json"
        if transformer.get("pos_embed_max_size") and vae_cfg.is_file():  # SD3's learned position table
            scale = 2 ** (len(_json(vae_cfg).get("block_out_channels", (0,) * 4)) - 1)  # Medium 6144 px, Large 3072
            patch = int(transformer.get("patch_size", 2))
            facts["max_resolution"] = int(transformer["pos_embed_max_size"]) * patch * scale
        return facts
    if not unet_cfg.is_file():
        raise UserInputError(
            f"base model {model} is not a Diffusers folder (no unet/config.json): "
            "pass a Diffusers folder, or download/convert the model first"
        )
    unet = _json(unet_cfg)
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = _json(sched_file) if sched_file.is_file() else {}
    prediction = sched.get("prediction_type", "epsilon")
    if unet.get("addition_embed_type") == "text_time":
        family = "sdxl"
    elif unet.get("use_linear_projection"):
        family = "sd2"
    else:
        family = "sd1"
    return {"family": family, "prediction_type": prediction, "native_resolution": native_resolution(family, prediction)}


def native_size(spec: str | os.PathLike[str] | None) -> tuple[str, int] | None:
    """``(family, native size)`` of a base model spec, without network; None until it is local.

    A registry name answers from the registry, a local Diffusers folder from its configs, a local
    single file from :func:`detect`; ``hf:``/URL specs not yet fetched are unknown.
    """
    if not spec:
        return None
    if str(spec) in BASE_MODELS:
        entry = BASE_MODELS[str(spec)]
        return entry.family, entry.resolution
    path = Path(spec).expanduser()
    try:
        if (path / "unet" / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
            facts = diffusers_family(path)
            return facts["family"], facts["native_resolution"]
        if path.is_file():
            det = detect(path)
            px = native_resolution(det.family, det.prediction_type)
            return (det.family, px) if px else None
    except (ModelFormatError, UserInputError):
        return None
    return None
