"""Tiny random-weight SD3 (MMDiT) and FLUX.1 pipelines with the real block structure, built offline.

As :mod:`fastsd.demo.tiny` does for the UNet families: diffusers' own ``SD3Transformer2DModel`` and
``FluxTransformer2DModel`` (joint/double blocks, FLUX's single blocks, SD3.5 Medium's dual-attention
MMDiT-X layer and RMS qk-norm, FLUX.1-dev's guidance embedder), a 16-channel ``AutoencoderKL``
without quant convs, two CLIP text encoders with projection (SD3) or one CLIP-L (FLUX), and a
T5 v1.1 encoder (gated-gelu) with a small Unigram tokenizer, at tiny widths. The scheduler is the
real models' ``FlowMatchEulerDiscreteScheduler`` config (SD3.5: shift 3; FLUX: dynamic shifting).
Images need sides that are multiples of 16 (FLUX packs 2x2 latent patches) and at most 128 px.
"""

from __future__ import annotations

from pathlib import Path

from .tiny import TINY_WIDTH, WORDS, _text_config, tiny_tokenizer

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
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


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
