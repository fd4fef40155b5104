"""Web UI building blocks without a server: sampler table, infotext, LoRA tags, catalog, masks, queue."""

from __future__ import annotations

import threading
import time

import diffusers
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastsd.errors import UserInputError
from fastsd.webui import catalog, infotext, samplers
from fastsd.webui.memory import memory_settings
from fastsd.webui.pixels import crop_region, fill_masked
from fastsd.webui.server import parse_auth
from fastsd.webui.worker import Worker

SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "steps_offset": 1,
}


@pytest.mark.parametrize("sampler", samplers.SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_builds_its_scheduler_keeping_the_model_config(sampler):
    sched = samplers.make_scheduler(SD_SCHEDULER, sampler)
    assert type(sched).__name__ == sampler.scheduler
    assert sched.config.prediction_type == "v_prediction"  # SD2-768 stays v-prediction
    for key, value in sampler.config.items():
        assert sched.config[key] == value


def test_sampler_lookup_names_aliases_and_errors():
    assert samplers.find_sampler("dpm++ 2m karras").scheduler == "DPMSolverMultistepScheduler"
    assert samplers.find_sampler("k_euler_a").name == "Euler a"
    assert samplers.find_sampler(None).name == "Euler"  # A1111's API default (sampler_index)
    with pytest.raises(UserInputError, match="unknown sampler"):
        samplers.find_sampler("Euler z")
    assert samplers.find_schedule_type("sgm_uniform") == "SGM Uniform"
    karras = samplers.make_scheduler(SD_SCHEDULER, samplers.find_sampler("Euler"), "Karras")
    assert karras.config.use_karras_sigmas is True
    # A schedule type a scheduler cannot take is ignored, as A1111 does.
    assert isinstance(
        samplers.make_scheduler(SD_SCHEDULER, samplers.find_sampler("DDIM"), "Karras"), diffusers.DDIMScheduler
    )


def test_infotext_layout_matches_a1111():
    text = infotext.build(
        "a dog, best",
        "blurry",
        {
            "Steps": 20,
            "Sampler": "DPM++ 2M",
            "CFG scale": 7.0,
            "Seed": 1,
            "Size": "512x512",
            "Lora weights": "x: 1",
            "VAE": None,
        },
    )
    assert (
        text
        == 'a dog, best\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512, Lora weights: "x: 1"'
    )
    assert infotext.build("p", "", {"CFG scale": 7.5}) == "p\nCFG scale: 7.5"
    png = infotext.png_bytes(Image.new("RGB", (8, 8)), text)
    assert infotext.read_parameters(png) == text


def test_lora_tags():
    assert infotext.parse_loras("a dog <lora:style_a:0.6>, <lora:b>") == ("a dog", [("style_a", 0.6), ("b", 1.0)])
    assert infotext.parse_loras("<lora:x:0.5> a <lora:x:0.9>")[1] == [("x", 0.9)]
    with pytest.raises(ValueError, match="not a number"):
        infotext.parse_loras("<lora:x:abc>")


def test_catalog_sorts_files_by_tensor_names(tmp_path):
    t = torch.zeros(1)
    models = tmp_path / "models"
    models.mkdir()
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": t, "first_stage_model.decoder.conv_in.weight": t.clone()},
        str(models / "ckpt.safetensors"),
    )
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t}, str(models / "style.safetensors"))
    save_file(
        {"encoder.conv_in.weight": t, "decoder.conv_in.weight": t.clone()}, str(models / "vae-ft-mse.safetensors")
    )
    save_file({"emb_params": t}, str(models / "embedding.safetensors"))  # a textual inversion: not listed
    (models / "broken.safetensors").write_bytes(b"\x00")
    (tmp_path / "sessions" / "dog" / "models").mkdir(parents=True)
    save_file(
        {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": t},
        str(tmp_path / "sessions/dog/models/dog.safetensors"),
    )
    found = {(e.title, e.kind) for e in catalog.scan(tmp_path)}
    assert found == {
        ("ckpt.safetensors", "checkpoint"),
        ("style.safetensors", "lora"),
        ("vae-ft-mse.safetensors", "vae"),
        ("sessions/dog/dog.safetensors", "lora"),
    }
    entries = catalog.scan(tmp_path)
    assert catalog.find(entries, "checkpoint", "ckpt.safetensors [abc123]").name == "ckpt"
    with pytest.raises(UserInputError, match="no lora called"):
        catalog.find(entries, "lora", "nope")


def test_inpaint_crop_region_grows_to_aspect_and_fill_colours_the_hole():
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (90, 40, 110, 60))
    x1, y1, x2, y2 = crop_region(mask, 10, 64, 64)
    assert (x2 - x1) == (y2 - y1) and x1 <= 80 and x2 >= 120
    image = Image.new("RGB", (200, 100), (200, 0, 0))
    image.paste((0, 0, 0), (90, 40, 110, 60))
    filled = fill_masked(image, mask)
    assert filled.getpixel((100, 50))[0] > 150  # the black hole took the surrounding red


def test_memory_settings_by_vram_and_overrides():
    assert memory_settings("sd1", 0) == {"attention_slicing": False, "vae_tiling": False, "cpu_offload": False}
    assert memory_settings("sdxl", 4)["cpu_offload"] is True
    assert memory_settings("sd2", 15) == {"attention_slicing": False, "vae_tiling": False, "cpu_offload": False}
    assert memory_settings("sd3", 15)["cpu_offload"] is True  # T4 + SD3.5: T5 and MMDiT do not fit together
    assert memory_settings("flux", 14.5)["vae_tiling"] is True  # as SD3.5's: larger-than-1024 px decodes tile
    assert memory_settings("sdxl", 15, {"cpu_offload": True, "vae_tiling": "auto"}) == {
        "attention_slicing": False,
        "vae_tiling": True,
        "cpu_offload": True,
    }


def test_worker_is_fifo_and_interrupt_only_hits_the_running_job():
    worker = Worker()
    order: list[int] = []
    gate = threading.Event()

    def job(i: int):
        def run():
            if i == 0:
                gate.wait(5)
                while not worker.state.interrupted:
                    time.sleep(0.01)
            order.append(i)
            return worker.state.interrupted

        return run

    futures = [worker.submit(job(i), f"job{i}") for i in range(4)]
    assert [f.job_id for f in futures] == [1, 2, 3, 4]
    gate.set()
    while worker.state.job_id != 1:
        time.sleep(0.01)
    worker.state.interrupt()
    assert [f.result(5) for f in futures] == [True, False, False, False]
    assert order == [0, 1, 2, 3]
    worker.state.interrupt()  # nothing running: a no-op, the next job starts clean
    assert worker.submit(lambda: worker.state.interrupted).result(5) is False
    worker.stop()


def test_parse_auth():
    assert parse_auth("u:p:x") == ("u", "p:x")
    assert parse_auth(None) is None
    for bad in ("nocolon", ":p", "u:"):
        with pytest.raises(UserInputError):
            parse_auth(bad)


def test_decode_latents_matches_the_pipeline_and_stops_between_images(tiny_sd1):
    import itertools

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from fastsd.webui.pixels import decode_latents

    pipe = DiffusionPipeline.from_pretrained(tiny_sd1, local_files_only=True)

    def run(output_type):
        gens = [torch.Generator().manual_seed(s) for s in range(3)]
        return pipe(["a dog"] * 3, num_inference_steps=2, height=64, width=64, generator=gens,
                    output_type=output_type).images  # fmt: skip

    reference, latents = run("pil"), run("latent")
    decoded = decode_latents(pipe, latents)  # one image at a time, as the web UI does
    assert len(decoded) == 3
    for ref, got in zip(reference, decoded, strict=True):
        assert np.abs(np.asarray(ref, dtype=int) - np.asarray(got, dtype=int)).max() <= 1
    asked = itertools.count()
    assert len(decode_latents(pipe, latents, stop=lambda: next(asked) >= 1)) == 1
