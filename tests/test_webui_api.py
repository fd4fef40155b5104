"""The built-in server over real HTTP: A1111 API endpoints, queue, interrupt, model switch, errors, auth."""

from __future__ import annotations

import base64
import gc
import os
import shutil
import threading
import time
import weakref
from datetime import datetime

import httpx
import numpy as np
import pytest
from PIL import Image
from webui_fixtures import SIZE, b64_png, decode, info, make_home, pixels, png_claiming

from fastsd.webui import infotext, start

API = "/sdapi/v1"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sd1, tiny_sd2, tiny_sdxl):
    root = make_home(tmp_path_factory.mktemp("webui-home"), tiny_sd1, tiny_sd2, tiny_sdxl)
    handle = start(home=root, port=0, ui=True, quiet=True, ui_defaults=SIZE)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def txt2img(client, **fields):
    r = client.post(f"{API}/txt2img", json={"prompt": "a photo of a dog", **SIZE, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_get_endpoints(client, server):
    models = client.get(f"{API}/sd-models").json()
    titles = [m["title"] for m in models]
    assert titles[:1] == ["tiny-sd1"] and {"tiny-sd2", "tiny-sdxl"} <= set(titles)
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    names = [s["name"] for s in client.get(f"{API}/samplers").json()]
    for wanted in (
        "Euler a",
        "Euler",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DPM++ SDE Karras",
        "DDIM",
        "UniPC",
        "LMS",
        "Heun",
    ):
        assert wanted in names
    schedulers = client.get(f"{API}/schedulers").json()
    assert {"name": "karras", "label": "Karras"}.items() <= schedulers[2].items()
    options = client.get(f"{API}/options").json()
    assert options["sd_model_checkpoint"] == "tiny-sd1" and options["CLIP_stop_at_last_layers"] == 1
    progress = client.get(f"{API}/progress").json()
    assert {"progress", "eta_relative", "state", "current_image"} <= set(progress)
    assert client.get(f"{API}/cmd-flags").json()["api"] is True
    loras = client.get(f"{API}/loras").json()
    assert loras[0]["name"] == "doglora" and loras[0]["metadata"]["ss_network_module"] == "networks.lora"
    assert [v["model_name"] for v in client.get(f"{API}/sd-vae").json()] == ["VAE/tinyvae"]
    memory = client.get(f"{API}/memory").json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    assert client.get("/docs").status_code == 200
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]
    assert client.get("/").status_code == 200  # the Gradio UI on the same server


def test_seed_reproducible_and_a1111_response(client):
    first = txt2img(client, seed=1234, batch_size=2, n_iter=2, unknown_field="ignored as A1111 does")
    again = txt2img(client, seed=1234, batch_size=2, n_iter=2)
    assert len(first["images"]) == 4
    for a, b in zip(first["images"], again["images"], strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    meta = info(first)
    assert meta["seed"] == 1234 and meta["all_seeds"] == [1234, 1235, 1236, 1237]
    assert meta["infotexts"][1].startswith(
        "a photo of a dog\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1235, Size: 64x64"
    )
    # The PNG carries the same infotext in A1111's "parameters" chunk.
    assert decode(first["images"][2]).info["parameters"] == meta["infotexts"][2]
    assert first["parameters"]["seed"] == 1234 and "unknown_field" not in first["parameters"]
    # Image i of a job uses seed+i on its own generator: the 3rd image is the seed-1236 image.
    single = txt2img(client, seed=1236)
    assert np.abs(pixels(single["images"][0]) - pixels(first["images"][2])).max() <= 2
    other = txt2img(client, seed=99)
    assert not np.array_equal(pixels(other["images"][0]), pixels(single["images"][0]))
    # seed -1 picks a random seed, reported so the image can be made again.
    rnd = txt2img(client, seed=-1, sampler_name="DPM++ 2M Karras", negative_prompt="blurry")
    seed = info(rnd)["seed"]
    assert seed >= 0 and "Negative prompt: blurry" in info(rnd)["infotexts"][0]
    assert np.array_equal(
        pixels(txt2img(client, seed=seed, sampler_name="DPM++ 2M Karras", negative_prompt="blurry")["images"][0]),
        pixels(rnd["images"][0]),
    )
    # send_images false: no images, the rest as usual; any prompt text comes back exactly
    quiet = txt2img(client, seed=5, send_images=False, prompt='ein "Hund" \\ am Strand, 犬\n2')
    assert quiet["images"] == [] and quiet["parameters"]["prompt"] == 'ein "Hund" \\ am Strand, 犬\n2'
    assert info(quiet)["seed"] == 5


def test_eight_concurrent_clients_served_in_order(client, server):
    worker = server.backend.worker
    results: dict[int, dict] = {}
    finished: list[int] = []

    def call(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            r = c.post(f"{API}/txt2img", json={"prompt": f"a dog {i}", "seed": 100 + i, **SIZE})
            results[i] = {"status": r.status_code, "json": r.json()}
            finished.append(i)

    threads = []
    slowest_poll = 0.0
    for i in range(8):
        before = worker.submitted
        t = threading.Thread(target=call, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.time() + 60
        while worker.submitted == before and time.time() < deadline:  # this client is queued before the next
            time.sleep(0.01)
        began = time.time()
        assert client.get(f"{API}/progress", params={"skip_current_image": True}).status_code == 200
        slowest_poll = max(slowest_poll, time.time() - began)
    for t in threads:
        t.join(300)
    assert all(results[i]["status"] == 200 for i in range(8))
    job_ids = [info(results[i]["json"])["job_id"] for i in range(8)]
    assert job_ids == sorted(job_ids) and len(set(job_ids)) == 8
    assert finished == list(range(8))
    assert [info(results[i]["json"])["seed"] for i in range(8)] == [100 + i for i in range(8)]
    assert slowest_poll < 5, "the HTTP side must answer while the worker generates"


def _wait_for_step(client, steps: int, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = client.get(f"{API}/progress").json()
        if p["state"]["sampling_steps"] == steps and p["state"]["sampling_step"] >= 1:
            return p
        time.sleep(0.05)
    raise AssertionError("the long job never started")


def test_interrupt_stops_only_the_current_job(client, server):
    reference = txt2img(client, seed=7)
    out: dict[str, dict] = {}

    def post(name: str, **fields) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            out[name] = c.post(f"{API}/txt2img", json={"prompt": "a photo of a dog", **SIZE, **fields}).json()

    long = threading.Thread(target=post, args=("long",), kwargs={"steps": 400, "seed": 5, "n_iter": 3})
    long.start()
    progress = _wait_for_step(client, 400)
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert progress["current_image"], "a live preview of the running job"
    before = server.backend.worker.submitted
    short = threading.Thread(target=post, args=("short",), kwargs={"seed": 7})
    short.start()
    while server.backend.worker.submitted == before:
        time.sleep(0.01)
    assert client.post(f"{API}/interrupt").status_code == 200
    long.join(120)
    short.join(120)
    meta = info(out["long"])
    assert meta["interrupted"] is True and len(out["long"]["images"]) == 1  # partial image, later batches dropped
    assert info(out["short"])["interrupted"] is False
    assert np.array_equal(pixels(out["short"]["images"][0]), pixels(reference["images"][0]))


def test_interrupt_stops_the_vae_decode_between_images(client, server, monkeypatch):
    txt2img(client, seed=3)  # the default model is loaded
    manager = server.backend.manager
    vae = manager.pipe.vae
    real, calls = vae.decode, []

    def decode_then_interrupt(*args, **kwargs):
        calls.append(args[0].shape[0])
        out = real(*args, **kwargs)
        manager.state.interrupt()  # as POST /interrupt does, while the batch is being decoded
        return out

    monkeypatch.setattr(vae, "decode", decode_then_interrupt)
    r = txt2img(client, seed=3, batch_size=4, n_iter=2)
    assert calls == [1]  # one image decoded, then the decode (and the job) stopped
    assert len(r["images"]) == 1 and info(r)["interrupted"] is True and info(r)["all_seeds"] == [3]


def test_skip_ends_the_batch_not_the_job(client, server):
    out = {}
    t = threading.Thread(target=lambda: out.update(r=txt2img(client_for(server), steps=300, n_iter=2, seed=11)))
    t.start()
    _wait_for_step(client, 300)
    client.post(f"{API}/skip")
    # the second batch starts fresh; interrupt it too so the test stays short
    deadline = time.time() + 120
    while time.time() < deadline:
        p = client.get(f"{API}/progress", params={"skip_current_image": True}).json()
        if p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.05)
    client.post(f"{API}/interrupt")
    t.join(120)
    assert len(out["r"]["images"]) == 2 and info(out["r"])["all_seeds"] == [11, 12]


def client_for(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=300)


def test_model_switch_frees_previous(client, server):
    manager = server.backend.manager
    txt2img(client, seed=1)
    old_unet = weakref.ref(manager.pipe.unet)
    assert client.post(f"{API}/options", json={"sd_model_checkpoint": "tiny-sd2"}).status_code == 200
    gc.collect()
    assert old_unet() is None, "the previous model must be released"
    assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == "tiny-sd2"
    sd2 = txt2img(client, seed=1)
    assert info(sd2)["sd_model_name"] == "tiny-sd2" and "Model: tiny-sd2" in info(sd2)["infotexts"][0]
    # override_settings switches for one job only (restored afterwards, as in A1111)
    xl = txt2img(client, seed=1, override_settings={"sd_model_checkpoint": "tiny-sdxl"})
    assert info(xl)["sd_model_name"] == "tiny-sdxl" and decode(xl["images"][0]).size == (64, 64)
    assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == "tiny-sd2"
    assert client.post(f"{API}/options", json={"sd_model_checkpoint": "tiny-sd1"}).status_code == 200
    assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == "tiny-sd1"


def test_lora_vae_clip_skip_and_save(client, server):
    base = txt2img(client, seed=21)
    lora = txt2img(client, seed=21, prompt="a photo of a dog <lora:doglora:0.8>")
    assert np.abs(pixels(lora["images"][0]) - pixels(base["images"][0])).mean() > 0.5
    assert (
        "<lora:doglora:0.8>" in info(lora)["infotexts"][0]
        and 'Lora weights: "doglora: 0.8"' in info(lora)["infotexts"][0]
    )
    zero = txt2img(client, seed=21, prompt="a photo of a dog <lora:doglora:0>")
    assert np.array_equal(pixels(zero["images"][0]), pixels(base["images"][0]))
    field = txt2img(client, seed=21, loras={"doglora": 0.8})
    assert np.array_equal(pixels(field["images"][0]), pixels(lora["images"][0]))
    assert np.array_equal(pixels(txt2img(client, seed=21)["images"][0]), pixels(base["images"][0]))  # LoRA off again

    vae = txt2img(client, seed=21, override_settings={"sd_vae": "VAE/tinyvae"})
    assert np.abs(pixels(vae["images"][0]) - pixels(base["images"][0])).mean() > 1
    assert "VAE: tinyvae" in info(vae)["infotexts"][0]
    clip = txt2img(client, seed=21, override_settings={"CLIP_stop_at_last_layers": 2})
    assert "Clip skip: 2" in info(clip)["infotexts"][0]
    assert not np.array_equal(pixels(clip["images"][0]), pixels(base["images"][0]))

    saved = txt2img(client, seed=22, save_images=True)
    day = server.backend.manager.home / "outputs" / datetime.now().strftime("%Y-%m-%d")
    files = sorted(day.glob("*-22.png"))
    assert files and infotext.read_parameters(files[-1]) == info(saved)["infotexts"][0]


def test_img2img_and_inpaint(client):
    init = decode(txt2img(client, seed=31)["images"][0]).convert("RGB")
    r = client.post(
        f"{API}/img2img",
        json={
            "prompt": "a cat",
            "init_images": [b64_png(init)],
            "denoising_strength": 0.5,
            "seed": 3,
            **SIZE,
            "steps": 4,
        },
    )
    assert r.status_code == 200, r.text
    assert "Denoising strength: 0.5" in info(r.json())["infotexts"][0] and r.json()["parameters"]["init_images"] is None
    assert decode(r.json()["images"][0]).size == (64, 64)

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    body = {"prompt": "a cat", "init_images": [b64_png(init)], "mask": b64_png(mask), "seed": 3, **SIZE, "steps": 4}
    for full_res in (True, False):
        r = client.post(
            f"{API}/img2img",
            json={
                **body,
                "mask_blur": 2,
                "inpainting_fill": 1,
                "inpaint_full_res": full_res,
                "inpaint_full_res_padding": 8,
                "denoising_strength": 1.0,
            },
        )
        assert r.status_code == 200, r.text
        out = pixels(r.json()["images"][0])
        orig = np.asarray(init, dtype=np.int16)
        assert np.abs(out[:12, :12] - orig[:12, :12]).max() <= 1, "outside the mask stays as it was"
        assert np.abs(out[28:36, 28:36] - orig[28:36, 28:36]).mean() > 2, "inside the mask is repainted"
        assert ("Inpaint area: Only masked" in info(r.json())["infotexts"][0]) is full_res


def test_inpainting_model(client, server, tiny_sd1_inpaint):
    import shutil

    shutil.copytree(tiny_sd1_inpaint, server.backend.manager.home / "models" / "tiny-inpaint")
    assert client.post(f"{API}/refresh-checkpoints").status_code == 200
    assert "tiny-inpaint" in [m["title"] for m in client.get(f"{API}/sd-models").json()]
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    override = {"sd_model_checkpoint": "tiny-inpaint"}
    r = client.post(
        f"{API}/img2img",
        json={"init_images": [b64_png(init)], "mask": b64_png(mask), "override_settings": override, **SIZE},
    )
    assert r.status_code == 200, r.text
    assert info(r.json())["is_using_inpainting_conditioning"] is True
    assert txt2img(client, override_settings=override)["images"]  # txt2img works on an inpainting model too


BAD = [
    ("txt2img", {"steps": -1}, "steps"),
    ("txt2img", {"width": 65}, "multiple of 8"),
    ("txt2img", {"sampler_name": "Euler z"}, "unknown sampler"),
    ("txt2img", {"scheduler": "Wavy"}, "unknown schedule type"),
    ("txt2img", {"batch_size": 0}, "batch_size"),
    ("txt2img", {"seed": -7}, "seed"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, "no checkpoint called 'nope'"),
    ("img2img", {"init_images": ["not base64!!"]}, "not valid base64"),
    ("img2img", {"init_images": ["aGVsbG8="]}, "not an image"),
    ("img2img", {}, "init_images is required"),
    ("img2img", {"init_images": ["@init"], "mask": ""}, "mask is empty"),
    ("img2img", {"init_images": ["@init"], "mask": "@black"}, "no white pixels"),
    ("img2img", {"init_images": ["@init"], "denoising_strength": 1.5}, "denoising_strength"),
    ("img2img", {"init_images": ["@init"], "inpainting_fill": 9}, "inpainting_fill"),
    # hostile requests: each used to answer 500 or hold the only worker for minutes
    ("img2img", {"init_images": ["@bomb"]}, "init_images[0] is 858 MP, over this server's limit of 64 MP"),
    ("img2img", {"init_images": ["@init"], "mask": "@bomb"}, "mask is 858 MP, over this server's limit"),
    ("img2img", {"init_images": ["@big"]}, "init_images[0] is 20000x3500 (67 MP), over this server's limit"),
    ("txt2img", {"width": 4096, "height": 4096, "batch_size": 64, "n_iter": 1000}, "over this server's budget"),
    ("img2img", {"init_images": ["@init"], "width": 2048, "height": 2048, "batch_size": 17}, "= 68 MP, over"),
    ("txt2img", {"prompt": "a dog <lora:doglora:nan>"}, "is not a number"),
    ("txt2img", {"prompt": "a dog <lora:doglora:abc>"}, "is not a number"),
]


@pytest.mark.parametrize(("endpoint", "fields", "reason"), BAD, ids=[f"{e}-{r}" for e, _, r in BAD])
def test_bad_requests_422_with_reason(client, endpoint, fields, reason):
    images = {"@init": b64_png(Image.new("RGB", (64, 64), "white")), "@black": b64_png(Image.new("L", (64, 64), 0))}
    images["@bomb"] = base64.b64encode(png_claiming(30_000, 30_000)).decode()  # 900 megapixels in 200 KB
    images["@big"] = base64.b64encode(png_claiming(20_000, 3_500)).decode()  # under PIL's bomb rules, over ours
    body = {
        k: ([images.get(x, x) for x in v] if k == "init_images" else images.get(v, v) if isinstance(v, str) else v)
        for k, v in fields.items()
    }
    r = client.post(f"{API}/{endpoint}", json={"prompt": "a dog", **SIZE, **body})
    assert r.status_code == 422, r.text
    assert reason in r.text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("name", ["cfg_scale", "denoising_strength", "subseed_strength"])
def test_non_finite_numbers_are_422_naming_the_field(client, name, value):
    body = '{"prompt": "a dog", "width": 64, "height": 64, "steps": 2, "' + name + '": ' + value + "}"
    r = client.post(f"{API}/txt2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert name in r.text and "finite" in r.text


def test_pixel_budget_is_configurable_and_reported(client, tmp_path):
    assert client.get(f"{API}/cmd-flags").json()["max_job_pixels"] == 64 * 1024 * 1024
    small = start(home=tmp_path / "home", port=0, ui=False, quiet=True, preload=False, max_job_pixels=64 * 64 * 2)
    with small, httpx.Client(base_url=small.url, timeout=60) as c:
        assert c.get(f"{API}/cmd-flags").json()["max_job_pixels"] == 8192
        r = c.post(f"{API}/txt2img", json={"prompt": "a dog", **SIZE, "batch_size": 3})
        assert r.status_code == 422 and "12288 pixels" not in r.text and "budget" in r.text, r.text
        r = c.post(f"{API}/img2img", json={"init_images": [b64_png(Image.new("RGB", (96, 96)))], **SIZE})
        assert r.status_code == 422 and "init_images[0] is 96x96" in r.text, r.text
        assert small.backend.worker.submitted == 0  # refused before anything was queued


def test_unknown_and_path_like_loras_are_reported_not_resolved(client, server, tmp_path):
    base = txt2img(client, seed=31)
    # A real LoRA outside the model folders, named by path (relative to the home, and absolute).
    outside = tmp_path / "outside" / "evil.safetensors"
    outside.parent.mkdir()
    shutil.copy(client.get(f"{API}/loras").json()[0]["path"], outside)
    rel = os.path.relpath(outside.with_suffix(""), server.backend.manager.home / "models")
    names = [rel, str(outside), str(outside.with_suffix("")), "nosuchlora"]
    r = txt2img(client, seed=31, prompt="a photo of a dog " + " ".join(f"<lora:{n}:1>" for n in names))
    warnings = info(r)["warnings"]
    for name in names[:3]:
        assert f"LoRA {name!r} is not a LoRA in the model folders" in " ".join(warnings), (name, warnings)
    assert "LoRA 'nosuchlora' was not found" in " ".join(warnings), warnings
    assert np.array_equal(pixels(r["images"][0]), pixels(base["images"][0]))  # nothing was applied
    assert info(base)["warnings"] == []


def test_bad_options_and_server_keeps_serving(client):
    assert client.post(f"{API}/options", json={"sd_model_checkpoint": "missing"}).status_code == 422
    assert client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 0}).status_code == 422
    assert client.post(f"{API}/options", json={"fastsd_cuda_graph": "fast"}).status_code == 422
    assert client.get(f"{API}/options").json()["fastsd_cuda_graph"] == "auto"
    assert (
        client.post(f"{API}/options", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert client.post(f"{API}/options", json={"no_such_option": 1}).status_code == 200  # ignored
    assert txt2img(client, seed=5)["images"]


def test_auth_on(tmp_path, tiny_sd1):
    root = make_home(tmp_path / "home", tiny_sd1)
    handle = start(home=root, port=0, auth="alice:s3cret", quiet=True, preload=False, ui_defaults=SIZE)
    with handle, httpx.Client(base_url=handle.url, timeout=60) as c:
        assert c.get(f"{API}/options").status_code == 401
        assert c.get(f"{API}/options", auth=("alice", "wrong")).status_code == 401
        assert c.get(f"{API}/options", auth=("alice", "s3cret")).status_code == 200
        # The schema and the docs page (which can send requests) need the login too.
        for path in ("/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"):
            assert c.get(path).status_code in (401, 404), path
        assert c.get("/docs").status_code == 401 and c.get("/openapi.json").status_code == 401
        assert c.get("/openapi.json", auth=("alice", "s3cret")).json()["paths"]["/sdapi/v1/txt2img"]
        assert "swagger" in c.get("/docs", auth=("alice", "s3cret")).text.lower()
        # The UI asks for a login: its config is refused until the login form is posted.
        assert c.get("/config").status_code == 401
        assert c.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert c.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
        assert c.get("/config").status_code == 200


def test_public_without_auth_generates_a_password(tmp_path, capsys):
    with start(home=tmp_path / "home", port=0, public=True, ui=False, quiet=True, preload=False) as handle:
        printed = capsys.readouterr().out
        assert "password" in printed and handle.auth_user == "fastsd"
        password = printed.rsplit("password ", 1)[1].strip().strip("'")
        with httpx.Client(base_url=handle.url, timeout=60) as c:
            assert c.get(f"{API}/sd-models").status_code == 401
            assert c.get(f"{API}/sd-models", auth=("fastsd", password)).status_code == 200


def test_auth_off_needs_nothing(client):
    assert client.get(f"{API}/options").status_code == 200
