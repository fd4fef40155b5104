"""SD3.5 and FLUX.1 in the built-in server: A1111 API txt2img/img2img, defaults, samplers, memory plans."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from PIL import Image
from webui_fixtures import b64_png, decode

from fastsd.errors import UserInputError
from fastsd.models import memplan
from fastsd.webui import start

API = "/sdapi/v1"
T4 = {"vram_gib": 15.0, "ram_gib": 12.7}  # a Colab T4: 15 GB VRAM, 12.7 GB RAM, no bf16


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_sd3, tiny_flux):
    root = tmp_path_factory.mktemp("flow-home")
    shutil.copytree(tiny_sd3, root / "models" / "tiny-sd3")
    shutil.copytree(tiny_flux, root / "models" / "tiny-flux")
    for name, folder in (("sd3", tiny_sd3), ("flux", tiny_flux)):
        _lora(name, folder, root / "models" / "Lora")
    handle = start(home=root, port=0, ui=False, quiet=True)
    with httpx.Client(base_url=handle.url, timeout=300) as c:
        yield c
    handle.stop()


def _lora(family: str, pipeline, out) -> None:
    """A diffusers-format LoRA on the tiny transformer (what diffusers' and kohya's SD3/FLUX trainers save)."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_cls, pipe_cls = {
        "sd3": ("SD3Transformer2DModel", "StableDiffusion3Pipeline"),
        "flux": ("FluxTransformer2DModel", "FluxPipeline"),
    }[family]
    transformer = getattr(diffusers, model_cls).from_pretrained(pipeline / "transformer")
    torch.manual_seed(0)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    layers = {k: v * 5 for k, v in get_peft_model_state_dict(transformer).items()}
    getattr(diffusers, pipe_cls).save_lora_weights(
        out, transformer_lora_layers=layers, weight_name=f"{family}lora.safetensors"
    )


def _post(client, model: str, path: str = "txt2img", **fields):
    body = {"prompt": "a photo of a dog", "width": 64, "height": 64, "steps": 2, **fields}
    body["override_settings"] = {"sd_model_checkpoint": model, **body.get("override_settings", {})}
    return client.post(f"{API}/{path}", json=body)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_txt2img_and_img2img_through_the_a1111_api(client, model):
    r = _post(client, model, seed=5, sampler_name="Euler")
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert image.size == (64, 64) and image.getextrema() != ((0, 0), (0, 0), (0, 0))
    info = json.loads(r.json()["info"])
    assert info["sd_model_name"] == model and "Memory plan: cpu" in info["infotexts"][0]
    again = _post(client, model, seed=5, sampler_name="Euler")
    assert again.json()["images"] == r.json()["images"]  # a seed gives the same image
    other = _post(client, model, seed=5, sampler_name="DPM++ 2M")
    assert other.status_code == 200 and other.json()["images"] != r.json()["images"]
    i2i = _post(client, model, "img2img", init_images=[b64_png(image)], denoising_strength=0.5, seed=5)
    assert i2i.status_code == 200, i2i.text
    assert decode(i2i.json()["images"][0]).size == (64, 64)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    red = Image.new("RGB", (64, 64), (200, 10, 10))
    inpaint = _post(client, model, "img2img", init_images=[b64_png(red)], mask=b64_png(mask), seed=5)
    assert inpaint.status_code == 200, inpaint.text
    out = decode(inpaint.json()["images"][0])
    assert out.getpixel((2, 2)) == (200, 10, 10) and out.getpixel((32, 32)) != (200, 10, 10)  # only the mask repainted


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_lora_tag_changes_the_image_and_its_absence_restores_it(client, family):
    model = f"tiny-{family}"
    plain = _post(client, model, seed=3).json()["images"]
    with_lora = _post(client, model, seed=3, prompt=f"a photo of a dog <lora:{family}lora:1>").json()
    assert with_lora["images"] != plain
    assert f'Lora weights: "{family}lora: 1"' in json.loads(with_lora["info"])["infotexts"][0]
    assert _post(client, model, seed=3).json()["images"] == plain


def test_flux_defaults_are_its_own_and_the_negative_prompt_is_reported_ignored(client):
    body = {"prompt": "a photo of a dog", "negative_prompt": "blurry", "width": 64, "height": 64}
    body["override_settings"] = {"sd_model_checkpoint": "tiny-flux"}
    r = client.post(f"{API}/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["steps"], info["cfg_scale"]) == (28, 3.5)  # FLUX.1-dev: 28 steps, distilled guidance 3.5
    assert info["warnings"] == ["FLUX.1 is guidance-distilled and takes no negative prompt: it was ignored"]


@pytest.mark.parametrize(
    ("model", "sampler", "usable"),
    [("tiny-flux", "Euler a", "Euler, DPM++ 2M, UniPC"), ("tiny-sd3", "DDIM", "Euler, Heun, DPM++ 2M, UniPC")],
)
def test_samplers_without_a_flow_matching_form_are_a_422_naming_the_usable_ones(client, model, sampler, usable):
    r = _post(client, model, sampler_name=sampler)
    assert r.status_code == 422
    family = model.split("-")[1]
    assert r.json()["detail"] == (
        f"sampler {sampler!r} does not apply to {family} (a flow-matching model): use one of {usable}"
    )


def test_webuiapi_client_body_on_flux(client):
    from test_webui_clients import assert_a1111_answer, recorded

    body = recorded("webuiapi_txt2img.json", **{"Euler a": "Euler"})
    body["override_settings"] = {"sd_model_checkpoint": "tiny-flux"}
    r = client.post(f"{API}/txt2img", json=body)
    assert r.status_code == 200, r.text
    meta = assert_a1111_answer(r.json())
    assert meta["seed"] == 1003 and meta["sampler_name"] == "Euler" and meta["sd_model_name"] == "tiny-flux"


# --- memory plans: a pure function of (family, variant, VRAM, RAM) -----------------------------


@pytest.mark.parametrize(
    ("family", "variant", "transformer"),
    [
        ("sd3", "medium", "fp16"),
        ("sd3", "large", "nf4"),
        ("sd3", "large-turbo", "nf4"),
        ("flux", "dev", "nf4"),
        ("flux", "schnell", "nf4"),
    ],
)
def test_t4_plans(family, variant, transformer):
    plan = memplan.choose_plan(family, variant, **T4)
    assert plan.transformer == transformer and plan.offload == "none"
    assert plan.compute_dtype == "float16"  # a T4 has no bf16
    assert plan.t5 in ("int8", "nf4")  # T5-XXL in fp16 is 9.5 GB: never beside the transformer on a T4
    assert plan.vram_gib < 14.5 and plan.ram_gib < 12


def test_a_t4_replays_the_denoiser_only_where_the_plan_leaves_room_for_its_graph():
    """Under a T4's memory the graph's pool beside SD3.5 Medium (fp16-t5i8) and FLUX.1 (nf4) ran the second
    1024 px image out of memory; with room to spare (T5 in NF4, a large card) the denoiser is replayed."""
    t4 = {"vram_gib": 14.74, "ram_gib": 12.7}  # what torch reports for a Colab T4
    flux, sd3 = memplan.choose_plan("flux", "dev", **t4), memplan.choose_plan("sd3", "medium", **t4)
    # FLUX.1 in nf4 with T5 in int8 reserved 14.66 GiB under a 14.74 GiB cap, plus the CUDA context: T5 goes NF4
    assert flux.name == "nf4-t5nf4" and not memplan.room_for_graph(flux, "flux", 14.74)
    assert sd3.name == "fp16-t5i8" and not memplan.room_for_graph(sd3, "sd3", 14.74)
    assert memplan.room_for_graph(memplan.choose_plan("sd3", "medium", 24, 32), "sd3", 24)  # an L4/A10: replayed
    big = memplan.choose_plan("flux", "dev", 80, 200, bf16=True)
    assert memplan.room_for_graph(big, "flux", 80)
    assert not memplan.room_for_graph(memplan.choose_plan("sd3", "large", 8, 64), "sd3", 8)  # offloaded


def test_a_capped_card_plans_as_the_card_it_emulates(monkeypatch):
    """set_per_process_memory_fraction on an H200 (how a T4 is emulated, or room kept for another model)."""
    import types

    import torch

    from fastsd.webui import memory

    gib, fraction = 2**30, 14.5 / 139.8
    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=int(139.8 * gib))
    for name, fake in {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "get_device_properties": lambda i: props,
        "mem_get_info": lambda i: (int(139 * gib), props.total_memory),
        "get_per_process_memory_fraction": lambda i: fraction,
        "memory_reserved": lambda i=None: 0,
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake, raising=False)
    assert memory.vram_gib() == 14.5
    vram, _, bf16 = memplan.machine()
    plan = memplan.choose_plan("flux", "dev", vram, 12.7, bf16=bf16)
    assert plan.transformer == "nf4" and not memplan.room_for_graph(plan, "flux", vram)


def test_plans_follow_the_machine():
    assert memplan.choose_plan("flux", "dev", 80, 200, bf16=True).name == "fp16"
    assert memplan.choose_plan("flux", "dev", 80, 200, bf16=True).transformer == "bf16"
    assert memplan.choose_plan("sd3", "medium", 24, 32).name == "fp16"
    assert memplan.choose_plan("sd3", "large", 8, 64).offload in ("model", "sequential")
    assert memplan.choose_plan("sd3", "medium", 0, 64).name == "cpu"


def test_a_forced_plan_that_does_not_fit_is_refused_naming_the_setting():
    with pytest.raises(UserInputError) as err:
        memplan.choose_plan("flux", "dev", **T4, want="fp16")
    message = str(err.value)
    assert "\n" not in message and message.endswith("set fastsd_memory_plan (fastsd webui --memory-plan) to auto")
    assert message.startswith("fastsd_memory_plan fp16 needs ~34.9 GiB VRAM")
    with pytest.raises(UserInputError, match="fits no memory plan here"):
        memplan.choose_plan("flux", "dev", 8, 6)
    with pytest.raises(UserInputError, match="unknown fastsd_memory_plan 'fp8'"):
        memplan.choose_plan("flux", "dev", **T4, want="fp8")


def test_measured_sizes_plan_a_small_model_for_what_it_is(tiny_flux):
    sizes = memplan.folder_sizes(tiny_flux, "flux")
    assert all(0 < s < 0.01 for s in sizes)
    assert memplan.choose_plan("flux", "dev", 4, 8, sizes=sizes).name == "fp16"


def test_quantization_configs_are_diffusers_bitsandbytes_ones():
    import torch
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig
    from transformers import BitsAndBytesConfig as TransformersBnb

    nf4 = memplan.quantization_config(memplan.choose_plan("flux", "dev", 24, 32, want="nf4"), "flux")
    assert isinstance(nf4, PipelineQuantizationConfig)
    transformer, t5 = nf4.quant_mapping["transformer"], nf4.quant_mapping["text_encoder_2"]
    assert isinstance(transformer, BitsAndBytesConfig) and transformer.load_in_4bit
    assert transformer.bnb_4bit_quant_type == "nf4" and transformer.bnb_4bit_compute_dtype == torch.float16
    assert isinstance(t5, TransformersBnb) and t5.load_in_8bit
    medium = memplan.quantization_config(memplan.choose_plan("sd3", "medium", **T4), "sd3")
    assert set(medium.quant_mapping) == {"text_encoder_3"}  # the MMDiT stays fp16
    assert memplan.quantization_config(memplan.choose_plan("sd3", "medium", 0, 64), "sd3") is None


@pytest.mark.gpu
def test_nf4_plan_loads_quantized_and_generates_on_a_gpu(tiny_flux, tmp_path):
    import bitsandbytes as bnb

    from fastsd.webui.generate import GenerationRequest, PipelineManager

    manager = PipelineManager(tmp_path, model=str(tiny_flux), memory={"memory_plan": "nf4"})
    result = manager.generate(GenerationRequest(prompt="a photo of a dog", width=64, height=64, steps=2, seed=1))
    assert result.images[0].size == (64, 64) and manager.plan.name == "nf4"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in manager.pipe.transformer.modules())
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in manager.pipe.text_encoder_2.modules())
