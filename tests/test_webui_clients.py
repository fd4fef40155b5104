"""Public A1111 clients work unchanged: their recorded requests, the answers' shape, schedule types, png-info."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image
from webui_fixtures import SIZE, b64_png, info, make_home

from fastsd.webui import infotext, samplers, start

API = "/sdapi/v1"
RECORDED = Path(__file__).parent / "data" / "a1111_clients"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sd1):
    root = make_home(tmp_path_factory.mktemp("clients-home"), tiny_sd1)
    handle = start(home=root, port=0, ui=False, quiet=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def recorded(name: str, **replace: str) -> dict:
    text = (RECORDED / name).read_text()
    for key, value in replace.items():
        text = text.replace(key, value)
    return json.loads(text)


def assert_a1111_answer(answer: dict, n_images: int = 1) -> dict:
    """The answer parses the way both clients read it; returns the parsed ``info``."""
    assert isinstance(answer["images"], list) and len(answer["images"]) == n_images
    for b64 in answer["images"]:
        assert Image.open(io.BytesIO(base64.b64decode(b64))).format == "PNG"
    assert isinstance(answer["parameters"], dict)
    assert isinstance(answer["info"], str)
    meta = json.loads(answer["info"])
    assert isinstance(meta["sd_model_hash"], str) and re.fullmatch(r"[0-9a-f]{10}", meta["sd_model_hash"])
    assert isinstance(meta["sd_model_name"], str) and isinstance(meta["infotexts"], list)
    assert isinstance(meta["seed"], int) and isinstance(meta["all_seeds"], list)
    return meta


def test_webuiapi_txt2img_as_recorded(client):
    r = client.post(f"{API}/txt2img", json=recorded("webuiapi_txt2img.json"))
    assert r.status_code == 200, r.text
    meta = assert_a1111_answer(r.json())
    assert meta["seed"] == 1003 and meta["sampler_name"] == "Euler a"
    assert f"Model hash: {meta['sd_model_hash']}, Model: tiny-sd1" in meta["infotexts"][0]


def test_sd_backend_client_txt2img_with_schedule_normal(client):
    r = client.post(f"{API}/txt2img", json=recorded("sd_backend_client_txt2img.json"))
    assert r.status_code == 200, r.text
    meta = assert_a1111_answer(r.json())
    assert meta["scheduler"] == "Normal" and "Schedule type: Normal" in meta["infotexts"][0]


def test_img2img_below_one_step_runs_one_step_as_a1111(client):
    body = recorded("webuiapi_img2img.json", **{"<INIT_IMAGE>": b64_png(Image.new("RGB", (64, 64), (120, 80, 40)))})
    assert body["denoising_strength"] * body["steps"] < 1
    r = client.post(f"{API}/img2img", json=body)
    assert r.status_code == 200, r.text
    assert_a1111_answer(r.json())


def test_every_schedule_type_by_label_and_name_builds_its_diffusers_scheduler(client, tiny_sd1):
    labels = [s["label"] for s in client.get(f"{API}/schedulers").json()]
    for wanted in ("Normal", "Simple", "DDIM", "Align Your Steps", "Karras", "Exponential", "SGM Uniform", "Beta"):
        assert wanted in labels
    base = json.loads((tiny_sd1 / "scheduler" / "scheduler_config.json").read_text())
    dpm = samplers.find_sampler("DPM++ 2M")
    for label in labels:
        assert samplers.find_schedule_type(label) == samplers.find_schedule_type(samplers.schedule_id(label)) == label
        scheduler = samplers.make_scheduler(base, dpm, label)
        for key, value in samplers.SCHEDULE_TYPES[label].items():
            assert scheduler.config[key] == value, (label, key)
        scheduler.set_timesteps(4)  # diffusers accepts the combination
    assert samplers.make_scheduler(base, dpm, "Normal").config["timestep_spacing"] == "linspace"


def test_align_your_steps_through_the_api(client):
    r = client.post(
        f"{API}/txt2img", json={"prompt": "x", **SIZE, "sampler_name": "DPM++ 2M", "scheduler": "align_your_steps"}
    )
    assert r.status_code == 200, r.text
    assert "Schedule type: Align Your Steps" in info(r.json())["infotexts"][0]


def test_schedules_diffusers_cannot_do_are_refused_with_the_supported_ones(client):
    for name in ("Polyexponential", "kl_optimal", "Karras Exponential"):
        r = client.post(f"{API}/txt2img", json={"prompt": "x", **SIZE, "scheduler": name})
        assert r.status_code == 422
        assert "is not available in fastsd's diffusers UI: use one of Automatic, Uniform, Karras" in r.text


def test_align_your_steps_uses_the_published_timesteps():
    assert samplers.ays_timesteps("sd1", 10) == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    many = samplers.ays_timesteps("sdxl", 25)
    assert (
        len(many) == 25
        and many[0] == 999
        and many[-1] == 13
        and all(a > b for a, b in zip(many, many[1:], strict=False))
    )


def test_png_info_reads_back_what_txt2img_wrote(client):
    made = client.post(f"{API}/txt2img", json={"prompt": "a red fox", "negative_prompt": "blurry", **SIZE, "seed": 7})
    image = made.json()["images"][0]
    r = client.post(f"{API}/png-info", json={"image": image})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["info"] == info(made.json())["infotexts"][0] and out["items"] == {}
    p = out["parameters"]
    assert p["Prompt"] == "a red fox" and p["Negative prompt"] == "blurry"
    assert (p["Steps"], p["Seed"], p["Size-1"], p["Size-2"], p["Model"]) == ("2", "7", "64", "64", "tiny-sd1")
    assert p["Model hash"] == info(made.json())["sd_model_hash"]
    data_url = client.post(f"{API}/png-info", json={"image": "data:image/png;base64," + image})
    assert data_url.json()["info"] == out["info"]
    plain = client.post(f"{API}/png-info", json={"image": b64_png(Image.new("RGB", (8, 8)))})
    assert plain.status_code == 200 and plain.json() == {"info": "", "items": {}, "parameters": {}}
    bad = client.post(f"{API}/png-info", json={"image": "not base64!"})
    assert bad.status_code == 422 and "image is not valid base64" in bad.text


def test_infotext_parse_follows_a1111():
    text = infotext.build(
        "a dog,\nsitting",
        "blurry",
        {"Steps": 20, "Sampler": "Euler a", "Size": "512x768", "Lora weights": "a: 1, b: 0.5"},
    )
    assert infotext.parse(text) == {
        "Prompt": "a dog,\nsitting",
        "Negative prompt": "blurry",
        "Steps": "20",
        "Sampler": "Euler a",
        "Size-1": "512",
        "Size-2": "768",
        "Lora weights": "a: 1, b: 0.5",
        "Clip skip": "1",
    }
