"""Full-size model configs for the benchmarks: the real SD1.5 and SDXL shapes, random weights.

Written here (not downloaded) so the GPU machine, which has no network, builds models whose cost
and memory are the real ones.
"""

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}

CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

CLIP_BIGG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}

# --- SD3.5 and FLUX.1 (benchmarks/flow.py) ---------------------------------------------------------
# The values of the real repos' config.json files: stabilityai/stable-diffusion-3.5-medium and
# stabilityai/stable-diffusion-3.5-large (transformer/, vae/, scheduler/, text_encoder*/) and
# black-forest-labs/FLUX.1-dev (transformer/, vae/, scheduler/, text_encoder_2/). Those repos are
# gated, so the values were taken from public copies of those files (diffusers-format configs quoted
# in public code, e.g. kohya-ss/sd-scripts' T5 config JSON for FLUX.1's text_encoder_2) and checked
# against the parameter counts in fastsd.models.memplan (SD3.5 Medium 2.47 B, Large 8.06 B,
# FLUX.1 11.90 B, T5 4.76 B; tests/test_full_configs.py).

#: SD3.5 Medium's MMDiT-X: 24 layers of 24 x 64, dual attention in the first 13, RMS qk-norm.
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

#: SD3.5 Large's MMDiT: 38 layers of 38 x 64, RMS qk-norm, no dual attention.
SD35_LARGE_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}

#: FLUX.1-dev: 19 double-stream and 38 single-stream blocks of 24 x 128, the guidance embedder.
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

#: The 16-channel VAE both families use (SD's encoder/decoder, no quant convs); factors per family below.
FLOW_VAE = {
    **VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}

#: T5 v1.1 XXL, encoder only (SD3.5's text_encoder_3, FLUX.1's text_encoder_2): 24 layers, d_model 4096.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

#: FlowMatchEulerDiscreteScheduler: SD3.5 shifts the timesteps by 3; FLUX.1-dev shifts by the image's
#: token count (dynamic shifting from 0.5 at 256 tokens to 1.15 at 4096).
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
