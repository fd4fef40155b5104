"""Tiny random-weight models with the real block structure, built offline.

Each builder returns a diffusers pipeline whose UNet, VAE and text encoders have the *topology*
of the real model (block types and counts, layers per block, transformer depth, attention
layout, text-encoder depth and activation, SDXL's second encoder with projection, v-prediction
for SD2-768; SD3.5's MMDiT and FLUX.1's double/single-stream transformer with CLIP and T5 encoders)
at tiny widths, so key names and code paths are the real ones while a CPU runs them
in milliseconds. The CLIP tokenizer is written from a small vocabulary by :func:`write_clip_tokenizer`.

Everything is built from the configs in this file, offline and without downloads: ``fastsd demo``
takes its model from :func:`cached_pipeline` (built once into the local cache), the tests build
them once per test session (``tests/conftest.py``), and the benchmarks' ``--small`` runs use them.
The weights are random: images made with them are noise.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Bump when a builder changes, so caches of older builds are not reused.
BUILD_VERSION = 1

# Words the tiny tokenizer knows as whole tokens; anything else falls back to byte tokens.
WORDS = [
    "a",
    "photo",
    "of",
    "sks",
    "dog",
    "cat",
    "person",
    "man",
    "woman",
    "face",
    "portrait",
    "style",
    "painting",
    "in",
    "the",
    "on",
    "at",
    "with",
    "and",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "beach",
    "city",
    "forest",
    "mountain",
    "snow",
    "night",
    "day",
    "high",
    "quality",
    "detailed",
    "blurry",
    "lowres",
    "ugly",
    "zwx",
    "ohwx",
    "by",
    "art",
    "digital",
    "render",
    "cinematic",
    "light",
]

TINY_WIDTH = 32


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` for a small CLIP BPE vocabulary and save a CLIPTokenizer.

    The vocabulary has all 256 byte symbols (plain and word-final), the merges that spell
    :data:`WORDS`, and CLIP's start/end tokens, so any prompt tokenizes.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from fastsd.models.convert import bytes_to_unicode  # CLIP's byte table, as fastsd ships it

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return folder


def tiny_tokenizer(folder: str | Path, pad_token: str | None = None):
    """A CLIPTokenizer from :func:`write_clip_tokenizer` (SD2/SDXL's second tokenizer pads with "!")."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").exists():
        write_clip_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    if pad_token is not None:
        tok.pad_token = pad_token
    return tok


def _text_config(tok, *, layers: int, hidden: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_vae(scaling_factor: float = 0.18215, latent_channels: int = 4, **extra: Any):
    """AutoencoderKL with SD's 4-level encoder/decoder (2 ResNets per level, mid attention); ``extra``: more config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **extra,
    )


def tiny_sd1_unet(in_channels: int = 4, **sd2: object):
    """SD1.x UNet: 3 cross-attention down blocks + 1 plain, conv projections, 8 heads.

    ``sd2`` overrides the few settings in which SD2.x differs (see :func:`tiny_sd2_unet`).
    """
    from diffusers import UNet2DConditionModel

    settings = {"attention_head_dim": 8, **sd2}
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        cross_attention_dim=TINY_WIDTH,
        norm_num_groups=8,
        **settings,
    )


def tiny_sd2_unet(in_channels: int = 4):
    """SD2.x UNet: SD1's blocks with linear projections, per-level head dims, upcast attention."""
    return tiny_sd1_unet(
        in_channels, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True
    )


def tiny_sdxl_unet():
    """SDXL UNet: 3 levels (plain, 2-deep, 10-deep transformers), text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=TINY_WIDTH + 2 * TINY_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 2 * TINY_WIDTH,
        norm_num_groups=8,
    )


def build_sd1(folder: str | Path, *, inpaint: bool = False, seed: int = 0):
    """Tiny SD1.x (or SD1.x inpainting) pipeline: CLIP ViT-L-shaped text encoder (12 layers, quick_gelu)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer(Path(folder) / "_tokenizer")
    te = CLIPTextModel(_text_config(tok, layers=12, hidden=TINY_WIDTH, act="quick_gelu"))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(
        vae=tiny_vae(),
        text_encoder=te,
        tokenizer=tok,
        unet=tiny_sd1_unet(9 if inpaint else 4),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd2(folder: str | Path, *, v_prediction: bool = True, seed: int = 0):
    """Tiny SD2.x pipeline: OpenCLIP-H-shaped text encoder (23 layers, gelu), v-prediction (768) or ε (512)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer(Path(folder) / "_tokenizer", pad_token="!")
    te = CLIPTextModel(_text_config(tok, layers=23, hidden=TINY_WIDTH, act="gelu"))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=te,
        tokenizer=tok,
        unet=tiny_sd2_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(folder: str | Path, *, seed: int = 0):
    """Tiny SDXL base: CLIP-L-shaped encoder (12 layers) + OpenCLIP-bigG-shaped one (32 layers, projection)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_tokenizer(Path(folder) / "_tokenizer")
    tok2 = tiny_tokenizer(Path(folder) / "_tokenizer", pad_token="!")
    te = CLIPTextModel(_text_config(tok, layers=12, hidden=TINY_WIDTH, act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(_text_config(tok2, layers=32, hidden=2 * TINY_WIDTH, act="gelu"))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=tiny_sdxl_unet(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


# --- SD3.5 and FLUX.1 ----------------------------------------------------------------------
#
# Tiny random-weight SD3 (MMDiT) and FLUX.1 pipelines with the real block structure, built offline.
#
# As :mod:`fastsd.demo.tiny` does for the UNet families: diffusers' own ``SD3Transformer2DModel`` and
# ``FluxTransformer2DModel`` (joint/double blocks, FLUX's single blocks, SD3.5 Medium's dual-attention
# MMDiT-X layer and RMS qk-norm, FLUX.1-dev's guidance embedder), a 16-channel ``AutoencoderKL``
# without quant convs, two CLIP text encoders with projection (SD3) or one CLIP-L (FLUX), and a
# T5 v1.1 encoder (gated-gelu) with a small Unigram tokenizer, at tiny widths. The scheduler is the
# real models' ``FlowMatchEulerDiscreteScheduler`` config (SD3.5: shift 3; FLUX: dynamic shifting).
# Images need sides that are multiples of 16 (FLUX packs 2x2 latent patches) and at most 128 px.

T5_WIDTH = 4 * TINY_WIDTH  # SD3 pads the concatenated CLIP embeddings (1 + 2 widths) up to T5's width


def tiny_t5_tokenizer(folder: str | Path):
    """A T5 (Unigram) tokenizer: T5's special tokens, the demo words as whole pieces, single characters."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():
        return T5Tokenizer.from_pretrained(folder)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -2.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789,.!?-'"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    tok.save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def tiny_t5(tok):
    """T5 v1.1 encoder (what SD3 and FLUX use): gated-gelu, relative attention, untied head."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=T5_WIDTH,
            d_kv=16,
            d_ff=2 * T5_WIDTH,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )


def tiny_flow_vae(scaling_factor: float, shift_factor: float):
    """SD3/FLUX AutoencoderKL: SD's 4-level encoder/decoder with 16 latent channels and no quant convs."""
    return tiny_vae(scaling_factor, 16, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_transformer(variant: str = "medium"):
    """MMDiT: ``medium`` is SD3.5 Medium's MMDiT-X (dual attention in the first layer, RMS qk-norm),
    ``large`` SD3.5 Large's (RMS qk-norm, no dual attention)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=3 * TINY_WIDTH,
        out_channels=16,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if variant == "medium" else (),
        qk_norm="rms_norm",
    )


def tiny_flux_transformer(variant: str = "dev"):
    """FLUX.1 transformer: double-stream then single-stream blocks; ``dev`` has the guidance embedder."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=TINY_WIDTH,
        guidance_embeds=variant == "dev",
        axes_dims_rope=(2, 2, 4),
    )


def build_sd3(folder: str | Path, *, variant: str = "medium", seed: int = 0):
    """Tiny SD3.5 pipeline: CLIP-L- and CLIP-G-shaped encoders with projection, a T5 encoder, MMDiT."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_tokenizer(Path(folder) / "_tokenizer")
    tok2 = tiny_tokenizer(Path(folder) / "_tokenizer", pad_token="!")
    t5_tok = tiny_t5_tokenizer(Path(folder) / "_t5_tokenizer")
    te = CLIPTextModelWithProjection(_text_config(tok, layers=12, hidden=TINY_WIDTH, act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(_text_config(tok2, layers=32, hidden=2 * TINY_WIDTH, act="gelu"))
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(variant),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_flow_vae(1.5305, 0.0609),
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=tiny_t5(t5_tok),
        tokenizer_3=t5_tok,
    )


def build_flux(folder: str | Path, *, variant: str = "dev", seed: int = 0):
    """Tiny FLUX.1 pipeline: a CLIP-L-shaped encoder (pooled), a T5 encoder, the FLUX transformer."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer(Path(folder) / "_tokenizer")
    t5_tok = tiny_t5_tokenizer(Path(folder) / "_t5_tokenizer")
    te = CLIPTextModel(_text_config(tok, layers=12, hidden=TINY_WIDTH, act="quick_gelu"))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if variant == "schnell" else 3.0,
        use_dynamic_shifting=variant == "dev",
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=tiny_flow_vae(0.3611, 0.1159),
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=tiny_t5(t5_tok),
        tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(variant),
    )


BUILDERS = {
    "sd1": build_sd1,
    "sd1-inpaint": lambda folder: build_sd1(folder, inpaint=True),
    "sd2": build_sd2,
    "sd2-512": lambda folder: build_sd2(folder, v_prediction=False),
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "sd3-large": lambda folder: build_sd3(folder, variant="large"),
    "flux": build_flux,
    "flux-schnell": lambda folder: build_flux(folder, variant="schnell"),
}


def save_tiny_pipeline(kind: str, folder: str | Path) -> Path:
    """Build the tiny ``kind`` pipeline (see :data:`BUILDERS`) and save it as a Diffusers folder in ``folder``."""
    folder = Path(folder)
    pipe = BUILDERS[kind](folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer", ignore_errors=True)  # the builders' scratch, not part of the model
    return folder


def cached_pipeline(kind: str = "sd1") -> Path:
    """The tiny ``kind`` pipeline as a Diffusers folder in the local cache, built on first use.

    Lives in ``<cache>/tiny/<kind>-v<BUILD_VERSION>`` (see :func:`fastsd.paths.cache_dir`).

    Raises:
        KeyError: ``kind`` is not in :data:`BUILDERS`.
    """
    if kind not in BUILDERS:
        raise KeyError(f"no tiny model {kind!r}: one of {', '.join(BUILDERS)}")
    return build_cached(f"{kind}-v{BUILD_VERSION}", "model_index.json", lambda tmp: save_tiny_pipeline(kind, tmp))


def build_cached(name: str, marker: str, build: Callable[[Path], object]) -> Path:
    """``<cache>/tiny/<name>``, made by ``build(folder)`` (fills the empty ``folder``) if missing.

    The folder is built by :func:`fastsd.storage.building_folder` (temp name, then one rename), so
    a killed build never leaves a half folder that a later run would trust (``marker`` is the file
    a complete one has), and two runs building at once both end with a complete one.
    """
    from .. import storage
    from ..paths import cache_dir

    target = cache_dir() / "tiny" / name
    if (target / marker).is_file():
        return target
    if target.exists() or target.is_symlink():
        with contextlib.suppress(FileNotFoundError):  # another run may be removing it too
            storage.remove_folder(target)  # an incomplete folder that no build of ours made: replace it
    try:
        with storage.building_folder(target, replace=False) as tmp:
            build(tmp)
    except FileExistsError:
        if not (target / marker).is_file():
            raise
        # another run finished first: its folder is as good as ours
    return target
