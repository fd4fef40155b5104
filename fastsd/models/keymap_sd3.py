"""SD3/SD3.5 MMDiT: Diffusers ``SD3Transformer2DModel`` names -> Stability's original (``sd3_impls``) names.

Stability's files (``sd3.5_medium.safetensors``...) and ComfyUI/Forge use the original names:
``joint_blocks.N.x_block`` (image stream) and ``.context_block`` (text stream) with q/k/v packed
into one ``attn.qkv``, ``adaLN_modulation.1`` for the AdaLN linears, ``x_embedder``/``t_embedder``/
``y_embedder`` for the embedders. Two AdaLN linears of Diffusers (the final ``norm_out`` and the
last block's text-stream ``norm1_context``, both ``AdaLayerNormContinuous``) store (scale, shift)
where the original stores (shift, scale): they are written with their halves swapped. The facts
follow diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` and ComfyUI's ``mmdit`` key
map; every key must match a rule (see :mod:`fastsd.models.keymap`).
"""

from __future__ import annotations

import re

from ..errors import ModelFormatError
from .keymap import Op

#: Diffusers name -> original name, per block (``{i}`` prefixes ``joint_blocks.{i}.``).
BLOCK = {
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "attn.norm_q.": "x_block.attn.ln_q.",
    "attn.norm_k.": "x_block.attn.ln_k.",
    "attn.norm_added_q.": "context_block.attn.ln_q.",
    "attn.norm_added_k.": "context_block.attn.ln_k.",
    "attn2.to_out.0.": "x_block.attn2.proj.",
    "attn2.norm_q.": "x_block.attn2.ln_q.",
    "attn2.norm_k.": "x_block.attn2.ln_k.",
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}
#: q/k/v triples packed into one tensor: (Diffusers names with {p} for q/k/v, original name).
QKV = (
    ("attn.to_{p}.", "x_block.attn.qkv."),
    ("attn.add_{p}_proj.", "context_block.attn.qkv."),
    ("attn2.to_{p}.", "x_block.attn2.qkv."),
)
FIXED = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.weight": "x_embedder.proj.weight",
    "pos_embed.proj.bias": "x_embedder.proj.bias",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
    "norm_out.linear.": "final_layer.adaLN_modulation.1.",
}
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.*)")


def _fixed(key: str) -> str | None:
    for src, dst in FIXED.items():
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :] if src.endswith(".") else dst
    return None


def sd3_plan(keys: list[str], prefix: str = "model.diffusion_model.") -> list[Op]:
    """Plan for a Diffusers ``SD3Transformer2DModel``'s keys (``swap`` marks halves written swapped)."""
    blocks = [int(m.group(1)) for k in keys if (m := _BLOCK.match(k))]
    last = max(blocks, default=-1)
    have = set(keys)
    ops: list[Op] = []
    done: set[str] = set()
    for key in keys:
        if key in done:
            continue
        out, kind, sources = None, "copy", (key,)
        if m := _BLOCK.match(key):
            i, rest = int(m.group(1)), m.group(2)
            for pattern, packed in QKV:
                names = [f"transformer_blocks.{i}." + pattern.format(p=p) for p in ("q", "k", "v")]
                if key.startswith(tuple(names)):
                    what = key.rsplit(".", 1)[1]
                    sources = tuple(n + what for n in names)
                    missing = [s for s in sources if s not in have]
                    if missing:
                        raise ModelFormatError(f"transformer lacks {missing[0]}: the file is incomplete")
                    out, kind = f"joint_blocks.{i}.{packed}{what}", "qkv"
                    break
            else:
                for src, dst in BLOCK.items():
                    if rest.startswith(src):
                        out = f"joint_blocks.{i}.{dst}{rest[len(src) :]}"
                        if i == last and src == "norm1_context.linear.":
                            kind = "swap"
                        break
        else:
            out = _fixed(key)
            if key.startswith("norm_out.linear."):
                kind = "swap"
        if out is None:
            raise ModelFormatError(f"transformer has a weight fastsd cannot place ({key}): not an SD3 MMDiT")
        done.update(sources)
        ops.append(Op(prefix + out, sources, kind))
    return ops
