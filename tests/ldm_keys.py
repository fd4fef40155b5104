"""Key lists of the ORIGINAL single-file checkpoints, written down from the original modules' structure.

Independent of fastsd's converter (which works from Diffusers names): these follow the module
trees of CompVis ``ldm`` (SD1/SD2: ``openaimodel.UNetModel``, ``autoencoder.AutoencoderKL``,
``FrozenCLIPEmbedder`` / ``FrozenOpenCLIPEmbedder``) and Stability ``sgm`` (SDXL:
``GeneralConditioner`` with ``conditioner.embedders.N``):

UNetModel
  time_embed = Sequential(Linear, SiLU, Linear)                  -> time_embed.0, time_embed.2
  label_emb  = Sequential(Sequential(Linear, SiLU, Linear))      -> label_emb.0.0, label_emb.0.2 (SDXL)
  input_blocks[0] = conv_in; per level, num_res_blocks x [ResBlock, SpatialTransformer?],
                    then (not last level) [Downsample(op)]
  middle_block = [ResBlock, SpatialTransformer, ResBlock]
  output_blocks: per level reversed, (num_res_blocks + 1) x [ResBlock, SpatialTransformer?,
                 Upsample(conv) after the last one except at level 0]
  out = Sequential(GroupNorm, SiLU, conv)                        -> out.0, out.2
ResBlock: in_layers(GroupNorm, SiLU, conv) .0/.2; emb_layers(SiLU, Linear) .1;
          out_layers(GroupNorm, SiLU, Dropout, conv) .0/.3; skip_connection when channels change
SpatialTransformer: norm, proj_in, transformer_blocks.N(attn1, ff.net.0.proj, ff.net.2, attn2,
          norm1-3), proj_out
Encoder/Decoder: conv_in, down.i.block.j / up.i.block.j (ResnetBlock: norm1 conv1 norm2 conv2
          [nin_shortcut]), down.i.downsample.conv, up.i.upsample.conv, mid.block_1, mid.attn_1
          (norm, q, k, v, proj_out: 1x1 convs), mid.block_2, norm_out, conv_out
OpenCLIP text: token_embedding, positional_embedding, transformer.resblocks.N(ln_1, attn.in_proj_*,
          attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj), ln_final, text_projection
"""

from __future__ import annotations

WB = ("weight", "bias")


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.{x}" for x in WB]


def resblock(p: str, skip: bool) -> list[str]:
    keys = []
    for m in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"):
        keys += _wb(f"{p}.{m}")
    if skip:
        keys += _wb(f"{p}.skip_connection")
    return keys


def spatial_transformer(p: str, depth: int) -> list[str]:
    keys = _wb(f"{p}.norm") + _wb(f"{p}.proj_in") + _wb(f"{p}.proj_out")
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for a in ("attn1", "attn2"):
            keys += [f"{b}.{a}.to_q.weight", f"{b}.{a}.to_k.weight", f"{b}.{a}.to_v.weight"]
            keys += _wb(f"{b}.{a}.to_out.0")
        keys += _wb(f"{b}.ff.net.0.proj") + _wb(f"{b}.ff.net.2")
        for n in ("norm1", "norm2", "norm3"):
            keys += _wb(f"{b}.{n}")
    return keys


def unet_keys(channels: list[int], attention: list[bool], depth: list[int], *, label_emb: bool) -> set[str]:
    """``model.diffusion_model.*`` for a UNetModel with num_res_blocks=2 and these per-level settings."""
    nr = 2
    keys = _wb("time_embed.0") + _wb("time_embed.2")
    if label_emb:
        keys += _wb("label_emb.0.0") + _wb("label_emb.0.2")
    keys += _wb("input_blocks.0.0")
    idx, ch = 1, channels[0]
    chans = [ch]
    for level, out in enumerate(channels):
        for _ in range(nr):
            keys += resblock(f"input_blocks.{idx}.0", ch != out)
            ch = out
            if attention[level]:
                keys += spatial_transformer(f"input_blocks.{idx}.1", depth[level])
            chans.append(ch)
            idx += 1
        if level < len(channels) - 1:
            keys += _wb(f"input_blocks.{idx}.0.op")
            chans.append(ch)
            idx += 1
    keys += resblock("middle_block.0", False) + resblock("middle_block.2", False)
    keys += spatial_transformer("middle_block.1", depth[-1])
    idx = 0
    for level in reversed(range(len(channels))):
        out = channels[level]
        for i in range(nr + 1):
            skip_ch = chans.pop()
            keys += resblock(f"output_blocks.{idx}.0", ch + skip_ch != out)
            ch = out
            n = 1
            if attention[level]:
                keys += spatial_transformer(f"output_blocks.{idx}.1", depth[level])
                n = 2
            if level and i == nr:
                keys += _wb(f"output_blocks.{idx}.{n}.conv")
            idx += 1
    keys += _wb("out.0") + _wb("out.2")
    return {"model.diffusion_model." + k for k in keys}


def vae_keys(channels: list[int]) -> set[str]:
    """``first_stage_model.*`` for ldm's AutoencoderKL (2 ResnetBlocks per level, ch_mult levels)."""
    keys = _wb("quant_conv") + _wb("post_quant_conv")

    def res(p: str, cin: int, cout: int) -> list[str]:
        k = _wb(f"{p}.norm1") + _wb(f"{p}.conv1") + _wb(f"{p}.norm2") + _wb(f"{p}.conv2")
        return k + (_wb(f"{p}.nin_shortcut") if cin != cout else [])

    def mid(side: str, c: int) -> list[str]:
        k = res(f"{side}.mid.block_1", c, c) + res(f"{side}.mid.block_2", c, c)
        for m in ("norm", "q", "k", "v", "proj_out"):
            k += _wb(f"{side}.mid.attn_1.{m}")
        return k

    keys += _wb("encoder.conv_in") + _wb("encoder.norm_out") + _wb("encoder.conv_out")
    ch = channels[0]
    for i, out in enumerate(channels):
        for j in range(2):
            keys += res(f"encoder.down.{i}.block.{j}", ch, out)
            ch = out
        if i < len(channels) - 1:
            keys += _wb(f"encoder.down.{i}.downsample.conv")
    keys += mid("encoder", ch)
    keys += _wb("decoder.conv_in") + _wb("decoder.norm_out") + _wb("decoder.conv_out")
    keys += mid("decoder", channels[-1])
    ch = channels[-1]
    for i in reversed(range(len(channels))):
        out = channels[i]
        for j in range(3):
            keys += res(f"decoder.up.{i}.block.{j}", ch, out)
            ch = out
        if i > 0:
            keys += _wb(f"decoder.up.{i}.upsample.conv")
    return {"first_stage_model." + k for k in keys}


def clip_keys(prefix: str, layers: int) -> set[str]:
    """transformers CLIPTextModel under ``{prefix}transformer.text_model.`` (with position_ids)."""
    keys = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "embeddings.position_ids"]
    keys += _wb("final_layer_norm")
    for i in range(layers):
        b = f"encoder.layers.{i}"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            keys += _wb(f"{b}.{m}")
        keys += _wb(f"{b}.layer_norm1") + _wb(f"{b}.layer_norm2") + _wb(f"{b}.mlp.fc1") + _wb(f"{b}.mlp.fc2")
    return {f"{prefix}transformer.text_model.{k}" for k in keys}


def openclip_keys(prefix: str, layers: int, *, projection: bool) -> set[str]:
    """OpenCLIP text tower under ``{prefix}model.``."""
    keys = ["token_embedding.weight", "positional_embedding"] + _wb("ln_final")
    if projection:
        keys.append("text_projection")
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        keys += [f"{b}.attn.in_proj_weight", f"{b}.attn.in_proj_bias"] + _wb(f"{b}.attn.out_proj")
        keys += _wb(f"{b}.ln_1") + _wb(f"{b}.ln_2") + _wb(f"{b}.mlp.c_fc") + _wb(f"{b}.mlp.c_proj")
    return {f"{prefix}model.{k}" for k in keys}


def expected_keys(kind: str) -> set[str]:
    """The full key set for the tiny fixtures (fastsd/demo/tiny.py) of ``kind``."""
    vae = vae_keys([16, 32, 32, 32])
    if kind in ("sd1", "sd1-inpaint"):
        unet = unet_keys([32, 64, 64, 64], [True, True, True, False], [1, 1, 1, 1], label_emb=False)
        return unet | vae | clip_keys("cond_stage_model.", 12)
    if kind == "sd2":
        unet = unet_keys([32, 64, 64, 64], [True, True, True, False], [1, 1, 1, 1], label_emb=False)
        return unet | vae | openclip_keys("cond_stage_model.", 23, projection=False)
    if kind == "sdxl":
        unet = unet_keys([32, 64, 64], [False, True, True], [0, 2, 10], label_emb=True)
        text = clip_keys("conditioner.embedders.0.", 12) | openclip_keys(
            "conditioner.embedders.1.", 32, projection=True
        )
        return unet | vae | text
    raise KeyError(kind)
