"""FLUX.1: Diffusers ``FluxTransformer2DModel`` names -> Black Forest Labs' original names.

The files Black Forest Labs publish (``flux1-dev.safetensors``), and that ComfyUI ("Load Diffusion
Model") and Forge load, hold the bare transformer under the original names: ``double_blocks.N``
(``img_attn``/``txt_attn`` with packed ``qkv``, ``img_mod``/``txt_mod``, ``img_mlp``/``txt_mlp``),
``single_blocks.N`` (q, k, v and the MLP input packed into one ``linear1``; attention output and
MLP output in ``linear2``), and ``img_in``/``txt_in``/``time_in``/``vector_in``/``guidance_in``.
The final AdaLN linear stores (shift, scale) where Diffusers stores (scale, shift): written with
its halves swapped. Facts from diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` and
ComfyUI's ``flux_to_diffusers``; every key must match a rule.
"""

from __future__ import annotations

import re

from ..errors import ModelFormatError
from .keymap import Op

DOUBLE = {
    "norm1.linear.": "img_mod.lin.",
    "norm1_context.linear.": "txt_mod.lin.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.": "img_attn.proj.",
    "attn.to_add_out.": "txt_attn.proj.",
    "ff.net.0.proj.": "img_mlp.0.",
    "ff.net.2.": "img_mlp.2.",
    "ff_context.net.0.proj.": "txt_mlp.0.",
    "ff_context.net.2.": "txt_mlp.2.",
}
SINGLE = {
    "norm.linear.": "modulation.lin.",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out.": "linear2.",
}
FIXED = {
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "context_embedder.": "txt_in.",
    "x_embedder.": "img_in.",
    "proj_out.": "final_layer.linear.",
    "norm_out.linear.": "final_layer.adaLN_modulation.1.",
}
_DOUBLE = re.compile(r"transformer_blocks\.(\d+)\.(.*)")
_SINGLE = re.compile(r"single_transformer_blocks\.(\d+)\.(.*)")


def _rename(rest: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if rest == src or (src.endswith(".") and rest.startswith(src)):
            return dst + rest[len(src) :] if src.endswith(".") else dst
    return None


def _packed(base: str, parts: tuple[str, ...], what: str, have: set[str]) -> tuple[str, ...]:
    sources = tuple(f"{base}{p}.{what}" for p in parts)
    missing = [s for s in sources if s not in have]
    if missing:
        raise ModelFormatError(f"transformer lacks {missing[0]}: the file is incomplete")
    return sources


def flux_plan(keys: list[str], prefix: str = "") -> list[Op]:
    """Plan for a Diffusers ``FluxTransformer2DModel``'s keys (the output has no prefix by default)."""
    have = set(keys)
    ops: list[Op] = []
    done: set[str] = set()
    for key in keys:
        if key in done:
            continue
        out, kind, sources = None, "copy", (key,)
        what = key.rsplit(".", 1)[1]
        if m := _SINGLE.match(key):
            i, rest = m.group(1), m.group(2)
            base = f"single_transformer_blocks.{i}."
            if rest.startswith(("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")):
                parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
                sources, out, kind = _packed(base, parts, what, have), f"single_blocks.{i}.linear1.{what}", "qkv"
            elif (renamed := _rename(rest, SINGLE)) is not None:
                out = f"single_blocks.{i}.{renamed}"
        elif m := _DOUBLE.match(key):
            i, rest = m.group(1), m.group(2)
            base = f"transformer_blocks.{i}."
            if rest.startswith(("attn.to_q.", "attn.to_k.", "attn.to_v.")):
                parts = ("attn.to_q", "attn.to_k", "attn.to_v")
                sources, out, kind = _packed(base, parts, what, have), f"double_blocks.{i}.img_attn.qkv.{what}", "qkv"
            elif rest.startswith(("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")):
                parts = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
                sources, out, kind = _packed(base, parts, what, have), f"double_blocks.{i}.txt_attn.qkv.{what}", "qkv"
            elif (renamed := _rename(rest, DOUBLE)) is not None:
                out = f"double_blocks.{i}.{renamed}"
        elif (renamed := _rename(key, FIXED)) is not None:
            out = renamed
            if key.startswith("norm_out.linear."):
                kind = "swap"
        if out is None:
            raise ModelFormatError(f"transformer has a weight fastsd cannot place ({key}): not a FLUX.1 transformer")
        done.update(sources)
        ops.append(Op(prefix + out, sources, kind))
    return ops
