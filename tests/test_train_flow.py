"""SD3.5 and FLUX.1 DreamBooth LoRA on the tiny flow fixtures (CPU): through the CLI, the exported file
loads into diffusers and changes the image; resume equals uninterrupted; what these families refuse."""

from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from train_helpers import ModelsBox, square_session

from fastsd.errors import UserInputError
from fastsd.session import Session
from fastsd.train import TrainConfig, checkpoint, train
from fastsd.train.config import resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = {"sd3": "tiny_sd3", "flux": "tiny_flux"}
FAST = {"resolution": 64, "allow_resolution": True, "log_every": 1, "save_every": 0, "progress": False}
ENV = {"OMP_NUM_THREADS": "1"}


def _photos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        arr = (np.random.RandomState(i).rand(80, 80, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"dog{i}.png")
    return folder


def _render(model, lora=None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    gen = torch.Generator().manual_seed(0)
    return pipe("a photo of zwx dog", height=64, width=64, num_inference_steps=2, generator=gen, output_type="np")[0][0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_through_the_cli_exports_a_file_diffusers_loads(family, request, cli, tmp_path):
    from fastsd.models.detect import detect

    model = request.getfixturevalue(FIXTURES[family])
    home = tmp_path / "home"
    env = {**ENV, "FASTSD_HOME": str(home)}
    r = cli("session", "new", "dog", "--base-model", str(model), "--class", "dog", "--token", "zwx",
            "--resolution", "64", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("session", "add", "dog", str(_photos(tmp_path / "photos")), "--crop", "center", env=env)
    assert r.returncode == 0, r.stderr
    r = cli("train", "dog", "--method", "lora", "--steps", "3", "--lr", "3e-2", "--rank", "4", "--lora-alpha", "8",
            "--allow-resolution", "--sample-every", "3", "--sample-steps", "2", "--log-every", "1", "--json",
            env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["steps"] == 3 and math.isfinite(out["final_loss"]) and len(out["samples"]) == 2
    assert out["plan"]["cuda_graph"] is False and out["plan"]["qlora"] is False

    s = Session.open("dog", home)
    assert s.info["family"] == family
    [entry] = s.models()
    assert entry["kind"] == "lora"
    file = s.path / entry["file"]
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["fastsd_family"] == family
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any(".attn.add_q_proj." in k for k in keys)  # the context stream's projections train too
    assert detect(file).family == family  # the web UI's catalog files it under the right family
    ckpt = checkpoint.load(s.path / s.latest_checkpoint()["path"])["weights"]
    assert {k.split(".")[0] for k in ckpt} == {"transformer"}

    plain, with_lora = _render(model), _render(model, file)
    assert np.abs(plain - with_lora).max() > 1e-3


def test_sd3_interrupted_then_resumed_equals_uninterrupted(home, tiny_sd3):
    cfg = {"method": "lora", "unet_steps": 4, "unet_lr": 1e-2, "seed": 3, "export": False, **FAST}
    train(square_session(home, tiny_sd3, "a"), TrainConfig(**cfg))

    def kill(step, info):
        if step == 2:
            raise KeyboardInterrupt

    r = train(square_session(home, tiny_sd3, "b"), TrainConfig(**cfg), on_log=kill)
    assert r.stopped == "interrupted" and Session.open("b", home).latest_checkpoint()["step"] == 2
    r = train(Session.open("b", home), TrainConfig(**cfg, resume=True))
    assert r.steps == 4 and r.stopped is None

    a, b = Session.open("a", home), Session.open("b", home)
    wa = checkpoint.load(a.path / a.latest_checkpoint()["path"])["weights"]
    wb = checkpoint.load(b.path / b.latest_checkpoint()["path"])["weights"]
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def _watch_t5_loads(monkeypatch):
    """Weak references to every T5 encoder the trainer loads (T5 is loaded where it runs, not with the model)."""
    from transformers import T5EncoderModel

    loaded = []
    real = T5EncoderModel.from_pretrained.__func__

    def watched(cls, *args, **kwargs):
        model = real(cls, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(watched))
    return loaded


def test_flux_prior_preservation_renders_class_images_and_frees_t5(home, tiny_flux, monkeypatch):
    t5 = _watch_t5_loads(monkeypatch)
    s = square_session(home, tiny_flux, "prior", images=1)
    cfg = TrainConfig(method="lora", unet_steps=2, prior_preservation=True, num_class_images=1, sample_steps=2,
                      export=False, **FAST)  # fmt: skip
    alive = []

    def during(step, info):
        gc.collect()
        alive.append([ref() is not None for ref in t5])

    r = train(s, cfg, on_log=during)
    assert r.steps == 2 and math.isfinite(r.final_loss)
    assert len(list(s.class_images_dir("a photo of dog").glob("*.png"))) == 1
    assert len(t5) == 1  # loaded once, for the class images and the prompts
    assert alive == [[False], [False]]  # T5 freed once the prompts were embedded: nothing holds it while training


def test_t5_loads_after_the_latents_and_the_transformer_after_t5_is_freed(home, tiny_flux, monkeypatch):
    """On a T4 the host never holds T5 (9.5 GB) beside anything big, and the GPU never holds T5 beside
    an NF4 FLUX transformer (6.7 GB): T5 loads when the prompts are embedded, after the latents are
    cached, and the transformer loads once T5 is freed."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    box, order = ModelsBox(), []
    t5 = _watch_t5_loads(monkeypatch)
    real_load = FluxTransformer2DModel.from_pretrained.__func__
    real_encode = AutoencoderKL.encode

    def watched(cls, *args, **kwargs):
        order.append(("transformer", box["models"].t5_state))
        return real_load(cls, *args, **kwargs)

    def encode(self, *args, **kwargs):
        order.append(("latents", len(t5)))
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", classmethod(watched))
    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    r = train(square_session(home, tiny_flux, "late", images=1), TrainConfig(method="lora", unet_steps=1, **FAST),
              on_models=box)  # fmt: skip
    assert r.steps == 1 and len(t5) == 1
    assert order == [("latents", 0), ("transformer", "freed")]
    assert r.timings["load"] > 0 and r.timings["cache"] > 0


def test_what_flow_families_refuse(home, cli, tiny_sd3, tiny_flux):
    square_session(home, tiny_sd3, "full", images=1)
    r = cli("train", "full", "--method", "full", "--steps", "1", env={**ENV, "FASTSD_HOME": str(home)})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["fastsd: error: sd3 models train as a LoRA only: use --method lora"]
    info = {"base_model": str(tiny_flux)}
    with pytest.raises(UserInputError, match="FLUX.1 overflows fp16"):
        resolve(TrainConfig(method="lora", gpu="t4"), session_info=info, num_images=1, gpu_list=[])
    with pytest.raises(UserInputError, match="--te-steps 0"):
        resolve(TrainConfig(method="lora", te_steps=5), session_info=info, num_images=1, gpu_list=[])
    c, facts = resolve(TrainConfig(method="lora", gpu="t4", resolution=256), session_info={"base_model": str(tiny_sd3)},
                       num_images=1, gpu_list=[])  # fmt: skip
    assert (facts["family"], c.precision, c.cuda_graph, c.min_snr_gamma) == ("sd3", "fp16", "off", None)
    # past SD3's learned position table (the tiny model's ends at 256 px) the step would fail deep in diffusers
    r = cli("train", "full", "--steps", "1", "--resolution", "512", "--allow-resolution",
            env={**ENV, "FASTSD_HOME": str(home)})  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "fastsd: error: 512 px is beyond this sd3 model's position table (256 px): use --resolution 256 or lower"
    ]


def test_sigmas_follow_the_schedulers_shift(tiny_flux):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from fastsd.train.flow import FlowSettings, draw_sigmas

    f = FlowSettings("sd3", 1000, 3.0, False, (256, 4096, 0.5, 1.15), 8, None)
    gen = torch.Generator().manual_seed(0)
    u = torch.sigmoid(torch.randn((64,), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(draw_sigmas(f, gen, 64, (128, 128)), 3 * u / (1 + 2 * u))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux, subfolder="scheduler")
    dyn = FlowSettings("flux", 1000, 3.0, True, (256, 4096, 0.5, 1.15), 8, 1.0)
    sig = draw_sigmas(dyn, torch.Generator().manual_seed(0), 64, (128, 128))  # 1024 px: 4096 packed tokens
    torch.testing.assert_close(sig, sched.time_shift(calculate_shift(4096, 256, 4096, 0.5, 1.15), 1.0, u))
    assert sig.min() > 0 and sig.max() < 1


@pytest.mark.gpu
def test_flux_qlora_loads_the_transformer_in_nf4_and_trains(home, tiny_flux, monkeypatch):
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fastsd.train import flow

    box = ModelsBox()
    s = square_session(home, tiny_flux, "qlora", images=1)
    # the tiny transformer "crowds" any budget: the plan goes NF4 as a T4's does for the real one
    monkeypatch.setattr(flow, "NF4_ABOVE_BUDGET_SHARE", 0.0)
    r = train(s, TrainConfig(method="lora", unet_steps=2, vram_budget_gb=14.0, precision="bf16", gpu="h100",
                             **FAST), on_models=box)  # fmt: skip
    assert r.plan.qlora and r.steps == 2 and math.isfinite(r.final_loss)
    assert box["models"].transformer.hf_quantizer is not None
    with safe_open(str(s.path / s.models()[0]["file"]), "pt") as f:
        names = list(f.keys())
    assert names and all(k.startswith("transformer.") for k in names)
