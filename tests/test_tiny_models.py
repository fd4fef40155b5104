"""The tiny fixtures load like real pipelines and generate images on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2", "tiny_sdxl"])
def test_tiny_pipeline_generates_an_image(fixture, request):
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(fixture)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    gen = torch.Generator().manual_seed(1)
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np")
    image = out.images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    again = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).images[0]
    np.testing.assert_array_equal(image, again)


def test_tiny_inpaint_pipeline_takes_image_and_mask(tiny_sd1_inpaint):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_sd1_inpaint, local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    init = Image.new("RGB", (64, 64), "white")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = pipe("a cat", image=init, mask_image=mask, num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images[0].shape == (64, 64, 3)


def test_real_topology(tiny_sd2, tiny_sdxl):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sd2 = UNet2DConditionModel.from_pretrained(tiny_sd2, subfolder="unet")
    assert sd2.config.use_linear_projection and len(sd2.down_blocks) == 4
    assert CLIPTextModel.from_pretrained(tiny_sd2, subfolder="text_encoder").config.num_hidden_layers == 23
    xl = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert len(xl.down_blocks[2].attentions[0].transformer_blocks) == 10
    assert xl.config.addition_embed_type == "text_time"
    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    assert te2.config.num_hidden_layers == 32 and te2.text_projection.weight.shape == (64, 64)
