"""The training step and the sampler on their own: what a step draws, the loss it computes, the images it renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd.train import data, sampling, step
from fastsd.train.config import TrainConfig, resolve
from fastsd.train.parts import BaseModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n_images=3, n_class=2, batch=2):
    g = torch.Generator().manual_seed(0)
    dists = [
        torch.stack([torch.randn(4, 8, 8, generator=g), torch.rand(4, 8, 8, generator=g)]) for _ in range(n_images)
    ]
    cls = [torch.stack([torch.randn(4, 8, 8, generator=g), torch.rand(4, 8, 8, generator=g)]) for _ in range(n_class)]
    return step.StepData(
        latents=dists,
        class_latents=cls,
        order=data.BatchOrder([(64, 64)] * n_images, batch, seed=5),
        token_ids=[torch.arange(n_images * 77).view(n_images, 77)],
        class_ids=[torch.full((1, 77), 7)],
        time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * n_images),
        class_time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]]),
        batch_size=batch,
    )


def _den(**kw):
    alphas = torch.linspace(0.999, 0.01, 1000)
    return step.Denoiser(unet=None, text_encoders=[], family="sd1", alphas_cumprod=alphas, prediction="epsilon",
                         num_timesteps=1000, **kw)  # fmt: skip


def test_a_step_draws_in_a_fixed_order_from_its_seed_alone():
    d, den = _data(), _den(offset_noise=0.1)
    gen = torch.Generator()
    gen.manual_seed(step.seed_for(3, 7, 0, 0))
    inp = step.draw_inputs(d, step.TextCache(), den, gen, global_batch=7)

    # the same draws, by hand: instance latent sample, noise, offset noise, timesteps, then the class batch
    ref = torch.Generator().manual_seed(step.seed_for(3, 7, 0, 0))
    idx = d.order.batch(7)
    for branch, dists in ((inp.inst, [d.latents[i] for i in idx]), (inp.prior, [d.class_latents[i] for i in (0, 1)])):
        mean, std = torch.stack(dists)[:, 0], torch.stack(dists)[:, 1]
        assert torch.equal(branch.lat, mean + std * torch.randn(mean.shape, generator=ref))
        noise = torch.randn(mean.shape, generator=ref)
        assert torch.equal(branch.noise, noise + 0.1 * torch.randn((2, 4, 1, 1), generator=ref))
        assert torch.equal(branch.t, torch.randint(0, 1000, (2,), generator=ref))
    assert torch.equal(inp.inst.ids[0], d.token_ids[0][idx]) and not inp.inst.cond  # text encoders train: ids
    assert torch.equal(inp.prior.ids[0], d.class_ids[0].expand(2, -1))

    # a resumed run re-seeds and gets the very same step; another step gets other noise
    again = step.draw_inputs(d, step.TextCache(), den, gen.manual_seed(step.seed_for(3, 7, 0, 0)), 7)
    assert all(torch.equal(a, b) for a, b in zip(inp.flat().values(), again.flat().values(), strict=True))
    other = step.draw_inputs(d, step.TextCache(), den, gen.manual_seed(step.seed_for(3, 8, 0, 0)), 8)
    assert not torch.equal(other.inst.noise, inp.inst.noise)


def test_flat_inputs_round_trip_over_the_same_tensors():
    d = _data()
    cached = {"prompt_embeds": torch.randn(3, 77, 32), "pooled": None}
    text = step.TextCache(inst=cached, prior={"prompt_embeds": torch.randn(1, 77, 32)})
    inp = step.draw_inputs(d, text, _den(), torch.Generator().manual_seed(1), 0)
    assert set(inp.inst.cond) == {"prompt_embeds"} and not inp.inst.ids  # frozen encoders: embeddings
    flat = inp.flat()
    back = step.StepInputs.from_flat(flat)
    assert back.inst.lat is inp.inst.lat and back.prior.cond["prompt_embeds"] is inp.prior.cond["prompt_embeds"]
    assert back.flat().keys() == flat.keys()
    no_prior = step.StepInputs.from_flat({k: v for k, v in flat.items() if not k.startswith("c_")})
    assert no_prior.prior is None


def _unet(tiny_sd1):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet", local_files_only=True)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_loss_is_the_denoising_mse_with_min_snr_weights(tiny_sd1, prediction):
    unet = _unet(tiny_sd1)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    b = step.Branch(lat=torch.randn(2, 4, 8, 8, generator=g), noise=torch.randn(2, 4, 8, 8, generator=g),
                    t=torch.tensor([10, 900]), tids=torch.zeros(2, 6), cond={"prompt_embeds": emb})  # fmt: skip
    alphas = torch.linspace(0.9999, 0.005, 1000)
    den = step.Denoiser(unet=unet, text_encoders=[], family="sd1", alphas_cumprod=alphas, prediction=prediction,
                        num_timesteps=1000)  # fmt: skip
    with torch.no_grad():
        plain = step.per_sample_loss(den, b)
        den.min_snr_gamma = 5.0
        weighted = step.per_sample_loss(den, b)
        a = alphas[b.t].view(2, 1, 1, 1)
        pred = unet(a.sqrt() * b.lat + (1 - a).sqrt() * b.noise, b.t, encoder_hidden_states=emb).sample
    target = a.sqrt() * b.noise - (1 - a).sqrt() * b.lat if prediction == "v_prediction" else b.noise
    torch.testing.assert_close(plain, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    snr = alphas[b.t] / (1 - alphas[b.t])
    # Min-SNR (Hang et al. 2023): min(snr, gamma) / snr for epsilon, / (snr + 1) for v
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction == "v_prediction" else snr)
    torch.testing.assert_close(weighted / plain, expected)
    assert expected[0] < 1  # low noise (high SNR) is down-weighted


def test_min_snr_gamma_zero_is_off_in_one_place(tiny_sd1):
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), min_snr_gamma=0, max_grad_norm=0), gpu_list=[])
    assert c.min_snr_gamma is None and c.max_grad_norm is None
    c, _ = resolve(TrainConfig(model=str(tiny_sd1)), gpu_list=[])
    assert c.min_snr_gamma == 5.0


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_samples_are_seeded_named_by_step_and_the_cached_prompt_renders_as_the_text(home, tiny_sd1):
    from fastsd.session import Session

    s = Session.create("samples", home, base_model=str(tiny_sd1), resolution=64)
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), sample_prompts=["a photo of sks dog"], sample_steps=2,
                               sample_every=1, resolution=64, allow_resolution=True), gpu_list=[])  # fmt: skip
    models = BaseModel(c.model, "sd1", torch.float32, full=False)
    cpu = torch.device("cpu")
    with_text = sampling.sample_images(s, models, c, 3, step.TextCache(), cpu)
    assert [p.name for p in with_text] == ["step-000003-p0-s1.png", "step-000003-p0-s2.png"]
    assert all(Image.open(p).size == (64, 64) for p in with_text)
    assert np.abs(_pixels(with_text[0]) - _pixels(with_text[1])).max() > 0  # two seeds, two images

    d = step.StepData([], [], data.BatchOrder([(64, 64)], 1, 0), [data.tokenize(models.tokenizers[0], ["x"])],
                      [data.tokenize(models.tokenizers[0], [""])], torch.zeros(1, 6), torch.zeros(1, 6), 1)  # fmt: skip
    text = step.encode_frozen_text(models, d, c.sample_prompts, cpu, torch.autocast("cpu", enabled=False))
    assert text.frozen and text.sample["prompt_embeds"].shape[0] == 1
    cached = sampling.sample_images(s, models, c, 4, text, cpu)
    for a, b in zip(with_text, cached, strict=True):  # the embeddings path is the prompt's image
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_small_budgets_decode_large_samples_in_tiles_and_leave_the_vae_as_it_was(tiny_sdxl):
    """On the T4 preset an SDXL sample's fp32 decode (5.1 GiB at 1024 px) was the run's peak: a budget where the
    built-in UI tiles its VAE decodes training samples in 512 px tiles, blended into the same image size."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    cuda = torch.device("cuda")
    assert sampling.tiled_decode_for(SimpleNamespace(vram_budget_gb=14.0), "sdxl", cuda)  # the T4 preset
    assert not sampling.tiled_decode_for(SimpleNamespace(vram_budget_gb=72.0), "sdxl", cuda)  # an H100
    assert not sampling.tiled_decode_for(SimpleNamespace(vram_budget_gb=14.0), "sdxl", torch.device("cpu"))

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = sampling.TILE_PX * 2
    lat = torch.randn(
        1, vae.config.latent_channels, size // factor, size // factor, generator=torch.Generator().manual_seed(0)
    )
    before = vae.tile_sample_min_size, vae.tile_latent_min_size
    calls = []
    real = vae.tiled_decode
    vae.tiled_decode = lambda z, **kw: calls.append(z.shape) or real(z, **kw)
    with torch.no_grad():
        whole, tiled = sampling._decode(vae, lat, False), sampling._decode(vae, lat, True)
    assert calls and whole.shape == tiled.shape == (1, 3, size, size) and torch.isfinite(tiled).all()
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == before
