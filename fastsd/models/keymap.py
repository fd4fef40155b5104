"""Diffusers key names -> the original single-file (ldm / sgm) names, as data plus small rules.

The original Stable Diffusion code (CompVis ``ldm`` for SD1/SD2, Stability ``sgm`` for SDXL) names
its modules by position: ``input_blocks.N.M`` for the UNet's down path, ``output_blocks`` for the
up path, ``first_stage_model.encoder.down.N.block.M`` for the VAE, and the text encoders either as
a transformers CLIP (``cond_stage_model.transformer.text_model.*``) or as OpenCLIP
(``cond_stage_model.model.*`` with q/k/v packed into one ``in_proj``). A1111, Forge and ComfyUI
load exactly these names. Each plan below maps every Diffusers key to one output tensor and an
operation, from the key list alone, so the whole output header is known before any data is read.
Any key no rule covers is an error: a silently dropped or misnamed tensor is how other converters
produce files that load nowhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ModelFormatError


@dataclass(frozen=True)
class Op:
    """One output tensor: its name, the input tensors it is built from, and how.

    kind: ``copy``; ``conv1x1`` (a linear weight reshaped to a 1x1 conv, VAE attention);
    ``qkv`` (q, k, v concatenated along dim 0 into OpenCLIP's ``in_proj``); ``T`` (transposed,
    OpenCLIP's ``text_projection``); ``arange`` (CLIP's ``position_ids`` buffer, made, not read).
    """

    out: str
    sources: tuple[str, ...]
    kind: str = "copy"
    n: int = 0


#: Op kinds whose output bytes are their sources' bytes, one after the other, when the dtype stays:
#: a reshape changes only the header's shape, and a dim-0 concatenation of contiguous tensors is
#: their bytes in order. The converter copies these without looking at them.
BYTE_COPY_KINDS = frozenset({"copy", "conv1x1", "qkv"})


# --- UNet ------------------------------------------------------------------------------------

UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}

UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)")


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def unet_plan(keys: list[str], prefix: str = "model.diffusion_model.") -> list[Op]:
    """Plan for a Diffusers ``UNet2DConditionModel`` (SD1, SD2, SDXL, inpainting: any depth).

    ldm numbers the down path as one flat list: ``input_blocks.0`` is conv_in, then each level
    contributes ``layers_per_block`` blocks (``.0`` resnet, ``.1`` attention) and, except the last,
    a downsampler (``.0.op``). The up path has ``layers_per_block + 1`` blocks per level, the
    upsampler sitting after the attention (``.2``) or, in a level without attention, at ``.1``.
    """
    per_level = 1 + max((int(m.group(3)) for k in keys if (m := _DOWN.match(k)) and m.group(2) == "resnets"), default=1)
    up_has_attn = {int(m.group(1)) for k in keys if (m := _UP.match(k)) and m.group(2) == "attentions"}
    ops = []
    for key in keys:
        out = None
        for old, new in UNET_FIXED.items():
            if key.startswith(old):
                out = new + key[len(old) :]
        if m := _DOWN.match(key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                out = f"input_blocks.{i * (per_level + 1) + j + 1}.0.{_rename(rest, UNET_RESNET)}"
            elif kind == "attentions":
                out = f"input_blocks.{i * (per_level + 1) + j + 1}.1.{rest}"
            elif rest.startswith("conv."):
                out = f"input_blocks.{(i + 1) * (per_level + 1)}.0.op.{rest[5:]}"
        elif m := _UP.match(key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                out = f"output_blocks.{i * (per_level + 1) + j}.0.{_rename(rest, UNET_RESNET)}"
            elif kind == "attentions":
                out = f"output_blocks.{i * (per_level + 1) + j}.1.{rest}"
            else:
                out = f"output_blocks.{i * (per_level + 1) + per_level}.{2 if i in up_has_attn else 1}.{rest}"
        elif m := _MID.match(key):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            out = (
                f"middle_block.{2 * j}.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
            )
        if out is None:
            raise ModelFormatError(f"unet has a weight fastsd cannot place ({key}): not an SD1/SD2/SDXL UNet")
        ops.append(Op(prefix + out, (key,)))
    return ops


# --- VAE -------------------------------------------------------------------------------------

VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTN = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
    # names used by diffusers before 0.14, still found in old Diffusers folders
    "query.": "q.",
    "key.": "k.",
    "value.": "v.",
    "proj_attn.": "proj_out.",
}
VAE_FIXED = {"conv_norm_out.": "norm_out.", "conv_in.": "conv_in.", "conv_out.": "conv_out."}
_VAE = re.compile(r"(encoder|decoder)\.(.*)")


def vae_plan(keys: list[str], shapes: dict[str, tuple[int, ...]], prefix: str = "first_stage_model.") -> list[Op]:
    """Plan for a Diffusers ``AutoencoderKL``: ldm's ``down.N.block.M`` / reversed ``up.N``, 1x1-conv attention."""
    n_up = 1 + max((int(k.split(".")[2]) for k in keys if k.startswith("decoder.up_blocks.")), default=0)
    ops = []
    for key in keys:
        out, kind = None, "copy"
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out = key
        elif m := _VAE.match(key):
            side, rest = m.group(1), m.group(2)
            parts = rest.split(".")
            if rest.startswith("down_blocks.") and parts[2] == "resnets":
                out = f"down.{parts[1]}.block.{parts[3]}.{_rename('.'.join(parts[4:]), VAE_RESNET)}"
            elif rest.startswith("down_blocks.") and parts[2] == "downsamplers":
                out = f"down.{parts[1]}.downsample.{'.'.join(parts[4:])}"
            elif rest.startswith("up_blocks.") and parts[2] == "resnets":
                out = f"up.{n_up - 1 - int(parts[1])}.block.{parts[3]}.{_rename('.'.join(parts[4:]), VAE_RESNET)}"
            elif rest.startswith("up_blocks.") and parts[2] == "upsamplers":
                out = f"up.{n_up - 1 - int(parts[1])}.upsample.{'.'.join(parts[4:])}"
            elif rest.startswith("mid_block.resnets."):
                out = f"mid.block_{int(parts[2]) + 1}.{_rename('.'.join(parts[3:]), VAE_RESNET)}"
            elif rest.startswith("mid_block.attentions.0."):
                out = "mid.attn_1." + _rename(".".join(parts[3:]), VAE_ATTN)
                if key.endswith(".weight") and len(shapes[key]) == 2:
                    kind = "conv1x1"
            else:
                renamed = _rename(rest, VAE_FIXED)
                out = renamed if renamed != rest or rest.startswith(("conv_in.", "conv_out.")) else None
            if out is not None:
                out = f"{side}.{out}"
        if out is None:
            raise ModelFormatError(f"vae has a weight fastsd cannot place ({key}): not an SD-style AutoencoderKL")
        ops.append(Op(prefix + out, (key,), kind))
    return ops


# --- Text encoders ---------------------------------------------------------------------------


def _strip_text_model(key: str) -> str:
    # transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` wrapper; older ones with it.
    return key[len("text_model.") :] if key.startswith("text_model.") else key


def clip_plan(keys: list[str], shapes: dict[str, tuple[int, ...]], prefix: str) -> list[Op]:
    """OpenAI CLIP layout (SD1's and SDXL's first encoder): ``{prefix}transformer.text_model.*``.

    Output is canonical whether the input has the ``text_model.`` prefix or not. The original
    checkpoints also carry the ``position_ids`` buffer (0..76), which newer transformers no longer
    saves; it is written so the key set matches the original files.
    """
    ops = []
    n_pos = 0
    for key in keys:
        flat = _strip_text_model(key)
        if flat.startswith("text_projection") or flat == "embeddings.position_ids":
            continue  # a projection belongs to CLIPTextModelWithProjection, never in this layout
        if not flat.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            raise ModelFormatError(f"text encoder has a weight fastsd cannot place ({key}): not a CLIP text model")
        if flat == "embeddings.position_embedding.weight":
            n_pos = shapes[key][0]
        ops.append(Op(f"{prefix}transformer.text_model.{flat}", (key,)))
    if n_pos:
        ops.append(Op(f"{prefix}transformer.text_model.embeddings.position_ids", (), "arange", n_pos))
    return ops


OPENCLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
OPENCLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.*)")
_QKV = re.compile(r"self_attn\.(q|k|v)_proj\.(weight|bias)")


def openclip_plan(keys: list[str], prefix: str) -> list[Op]:
    """OpenCLIP layout (SD2's encoder, SDXL's bigG): ``{prefix}model.*``, q/k/v packed into ``in_proj``.

    OpenCLIP computes ``x @ text_projection``; transformers' Linear stores the transpose, so the
    projection is written transposed.
    """
    ops = []
    flat_keys = {_strip_text_model(k) if not k.startswith("text_projection") else k: k for k in keys}
    done_qkv = set()
    for flat, key in flat_keys.items():
        out, kind, sources = None, "copy", (key,)
        if flat == "embeddings.position_ids":
            continue
        if flat in OPENCLIP_FIXED:
            out = OPENCLIP_FIXED[flat]
        elif flat == "text_projection.weight":
            out, kind = "text_projection", "T"
        elif m := _LAYER.match(flat):
            layer, rest = m.group(1), m.group(2)
            if q := _QKV.match(rest):
                what = q.group(2)
                if (layer, what) in done_qkv:
                    continue
                done_qkv.add((layer, what))
                base = f"encoder.layers.{layer}.self_attn"
                names = [f"{base}.{p}_proj.{what}" for p in "qkv"]
                missing = [n for n in names if n not in flat_keys]
                if missing:
                    raise ModelFormatError(f"text encoder lacks {missing[0]}: the file is incomplete")
                out, kind, sources = (
                    f"transformer.resblocks.{layer}.attn.in_proj_{what}",
                    "qkv",
                    tuple(flat_keys[n] for n in names),
                )
            else:
                renamed = _rename(rest, OPENCLIP_LAYER)
                out = f"transformer.resblocks.{layer}.{renamed}" if renamed != rest else None
        if out is None:
            raise ModelFormatError(f"text encoder has a weight fastsd cannot place ({key}): not a CLIP text model")
        ops.append(Op(prefix + "model." + out, sources, kind))
    return ops
