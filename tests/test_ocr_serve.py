"""``fastsd ocr serve`` on the tiny GLM-OCR: OpenAI client, concurrent clients, the GLM-OCR SDK, auth, limits."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from fastsd.ocr.engine import OpenAIEngine, PageJob, TransformersEngine
from fastsd.ocr.serve import ServeLimits, start

KEY = "test-key-0123456789"


def noise(seed: int, size=(200, 160)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(url: str, prompt: str = "Text Recognition:", **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return {"model": "glm-ocr", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture(scope="module")
def engine(tiny_glm_ocr):
    return TransformersEngine(str(tiny_glm_ocr), device="cpu", max_new_tokens=12, local_files_only=True)


@pytest.fixture(scope="module")
def server(engine):
    limits = ServeLimits(max_tokens=12, batch_wait_ms=200, max_body_bytes=2 * 2**20, max_image_pixels=4_000_000)
    srv = start(engine_obj=engine, port=0, limits=limits, quiet=True)
    yield srv
    srv.stop()


def expected(engine, image: Image.Image, prompt: str = "Text Recognition:") -> str:
    size = engine.grid.fit(*image.size)
    return engine.run([PageJob(0, image.resize(size, Image.Resampling.BICUBIC), prompt)])[0].text


def test_openai_client_chat_stream_and_models(server, engine):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    assert [m.id for m in client.models.list().data][0] == "glm-ocr"
    image = noise(1)
    r = client.chat.completions.create(**body(data_uri(image)), max_tokens=12, temperature=0.0)
    assert r.choices[0].message.content == expected(engine, image)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(**body(data_uri(image)), max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    short = client.chat.completions.create(**body(data_uri(image)), max_tokens=1)
    assert short.usage.completion_tokens == 1
    # a text-only request (the SDK's connection check) is answered too
    hello = client.chat.completions.create(
        model="glm-ocr", messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert hello.choices[0].message.role == "assistant"


def test_concurrent_clients_are_batched_and_none_mixed_up(server, engine):
    images = [noise(10 + i, (160 + 28 * (i % 3), 200)) for i in range(8)]
    prompts = ["Table Recognition:" if i % 4 == 3 else "Text Recognition:" for i in range(8)]
    want = [expected(engine, im, p) for im, p in zip(images, prompts, strict=True)]
    assert len(set(want)) > 1, "the pages must read differently for the test to see a mix-up"
    got: dict[int, str] = {}
    before = server.batcher.batches

    def client(i: int) -> None:
        r = httpx.post(server.base_url + "/chat/completions", json=body(data_uri(images[i]), prompts[i]), timeout=120)
        got[i] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(8)] == want
    assert server.batcher.largest_batch > 1 and server.batcher.batches - before < 8


def test_fastsd_openai_engine_talks_to_the_server(server, engine):
    client = OpenAIEngine(server.base_url, model="glm-ocr", max_new_tokens=12, concurrency=4)
    images = [noise(30 + i).resize((196, 168)) for i in range(3)]
    gens = client.run([PageJob(i, im, "Text Recognition:") for i, im in enumerate(images)])
    assert [g.text for g in gens] == [expected(engine, im) for im in images]


def test_bad_requests_get_one_4xx_and_the_server_goes_on(server, engine, tmp_path):
    from webui_fixtures import png_claiming

    url = server.base_url + "/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json"), 400, "not valid JSON"),
        (httpx.post(url, json=body("data:image/png;base64,AAAA")), 400, "readable image"),
        (httpx.post(url, json=body("file:///etc/passwd")), 400, "data: URI or an http(s) URL"),
        (httpx.post(url, json=body(data_uri(noise(1)), max_tokens=10_000)), 400, "over this server's limit"),
        (httpx.post(url, json=body(data_uri(noise(1)), max_tokens=0)), 400, "positive integer"),
        (httpx.post(url, json={**body(data_uri(noise(1))), "model": "gpt-4o"}), 404, "not served here"),
        (httpx.post(url, json={"messages": []}), 400, "non-empty"),
        (httpx.post(url, json={"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400, "unsupported"),
        (httpx.post(url, content=b"x" * (3 * 2**20)), 413, "limit"),
    ]
    two = body(data_uri(noise(1)))
    two["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": data_uri(noise(2))}})
    cases.append((httpx.post(url, json=two), 400, "one image per request"))
    bomb = "data:image/png;base64," + base64.b64encode(png_claiming(20_000, 20_000)).decode()
    cases.append((httpx.post(url, json=body(bomb)), 413, "MP"))
    for resp, status, words in cases:
        assert resp.status_code == status, (resp.status_code, resp.text)
        err = resp.json()["error"]
        assert words in err["message"] and err["code"] == status
    ok = httpx.post(url, json=body(data_uri(noise(3)), max_tokens=12), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected(engine, noise(3))


def test_auth_on_and_off_and_public_servers_get_a_key(engine, capsys):
    with start(engine_obj=engine, port=0, api_key=KEY, quiet=True) as srv:
        url = srv.base_url
        assert httpx.get(url + "/models").status_code == 401
        assert httpx.get(url + "/models", headers={"Authorization": "Bearer wrong-key-123"}).status_code == 401
        r = httpx.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "glm-ocr"
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
        import openai

        client = openai.OpenAI(base_url=url, api_key=KEY)
        assert client.chat.completions.create(**body(data_uri(noise(4))), max_tokens=2).choices
    with start(engine_obj=engine, host="0.0.0.0", port=0) as srv:
        printed = capsys.readouterr().out
        assert srv.api_key and srv.api_key in printed and "needs a key" in printed
        assert httpx.get(srv.base_url + "/models").status_code == 401
        assert not srv.batcher.limits.allow_urls  # a public server does not fetch URLs for strangers
        r = httpx.post(srv.base_url + "/chat/completions", json=body("http://127.0.0.1:1/x.png"),
                       headers={"Authorization": f"Bearer {srv.api_key}"})  # fmt: skip
        assert r.status_code == 400 and "does not fetch image URLs" in r.json()["error"]["message"]


def test_image_urls_are_fetched_on_a_loopback_server(server, engine, tmp_path):
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    noise(5).save(tmp_path / "page.png")

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{files.server_address[1]}"
        r = httpx.post(server.base_url + "/chat/completions", json=body(f"{base}/page.png", max_tokens=12), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected(engine, noise(5))
        r = httpx.post(server.base_url + "/chat/completions", json=body(f"{base}/missing.png"), timeout=60)
        assert r.status_code == 400 and "404" in r.json()["error"]["message"]
    finally:
        files.shutdown()


def test_glmocr_sdk_self_hosted_mode_runs_against_the_server(server, tmp_path, tiny_glm_ocr, monkeypatch):
    """The official SDK, unchanged, in self-hosted mode: its page loader, region crops, OCR client and formatter."""
    # the SDK turns PIL's decompression-bomb limit off for the whole process when imported: put it back after
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    glmocr = pytest.importorskip("glmocr")
    from glmocr.config import load_config
    from glmocr.layout import BaseLayoutDetector, PPDocLayoutDetector
    from glmocr.pipeline import Pipeline

    from fastsd.demo.tiny_layout import save_pp_doclayout
    from fastsd.ocr.layout import LayoutDetector, LayoutSettings

    layout_dir = save_pp_doclayout(tmp_path / "layout", bias={"text": 4.0, "table": 4.0}, anchors=True)
    cfg = load_config(None, mode="selfhosted", ocr_api_host="127.0.0.1", ocr_api_port=server.port)
    cfg.pipeline.layout.model_dir = str(layout_dir)
    cfg.pipeline.layout.device = "cpu"
    cfg.pipeline.page_loader.max_tokens = 8
    cfg.pipeline.max_workers = 8

    class FastsdLayout(BaseLayoutDetector):
        """The SDK's layout interface over fastsd's detector (its own needs torchvision)."""

        batch_size = 2

        def start(self):
            self.detector = LayoutDetector(str(layout_dir), device="cpu", settings=LayoutSettings(input_size=320))

        def stop(self):
            pass

        def process(self, images, save_visualization=False, global_start_idx=0, use_polygon=False):
            out = []
            for regions in self.detector.detect(images):
                out.append([
                    {"index": r.index, "label": r.label, "score": r.score, "bbox_2d": r.bbox_2d, "polygon": [],
                     "task_type": r.task}
                    for r in regions
                ])  # fmt: skip
            return out, {}

    import importlib.util

    # the SDK's own detector uses transformers' image processor, which needs torchvision (not in CI)
    own = PPDocLayoutDetector is not None and importlib.util.find_spec("torchvision") is not None
    detector = PPDocLayoutDetector(cfg.pipeline.layout) if own else None
    pipeline = Pipeline(cfg.pipeline, layout_detector=detector or FastsdLayout(cfg.pipeline.layout))
    pipeline.start()
    try:
        noise(7, (400, 500)).save(tmp_path / "page.png")
        request = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'page.png'}"}}]}]}  # fmt: skip
        results = list(pipeline.process(request))
    finally:
        pipeline.stop()
    assert len(results) == 1
    data = results[0].json_result
    pages = data if isinstance(data, list) else __import__("json").loads(data)
    assert pages and pages[0], "the SDK got regions read by the server"
    for rec in pages[0]:
        assert {"index", "label", "content", "bbox_2d"} <= set(rec)
    assert glmocr is not None


def test_cli_serve_answers_with_a_key_and_refuses_inputs(tmp_path, home, cli, tiny_glm_ocr):
    import os
    import socket
    import subprocess
    import sys
    import time

    from conftest import REPO

    r = cli("ocr", "serve", "scan.pdf")
    assert r.returncode == 2 and "./serve" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTSD_HOME": str(home), "FASTSD_OCR_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsd", "ocr", "serve", "--model", str(tiny_glm_ocr), "--device", "cpu",
         "--port", str(port), "--max-new-tokens", "6"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(base + "/v1/chat/completions", json=body(data_uri(noise(8)))).status_code == 401
        r = httpx.post(
            base + "/v1/chat/completions", json=body(data_uri(noise(8)), max_tokens=6), headers=auth, timeout=60
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 6
        r = httpx.post(base + "/v1/chat/completions", json=body(data_uri(noise(8)), max_tokens=7), headers=auth)
        assert r.status_code == 400  # over --max-new-tokens
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert KEY not in out  # the key from the environment is never printed


def test_layout_mode_through_fastsd_openai_engine_and_the_server(server, tmp_path):
    from fastsd.demo.tiny_layout import save_pp_doclayout
    from fastsd.ocr import ocr
    from fastsd.ocr.layout import LayoutDetector, LayoutSettings

    layout = save_pp_doclayout(tmp_path / "layout", bias={"text": 4.0, "table": 4.0}, anchors=True)
    detector = LayoutDetector(str(layout), device="cpu", settings=LayoutSettings(input_size=320), local_files_only=True)
    noise(9, (300, 400)).save(tmp_path / "page.png")
    before = server.batcher.batches
    results = list(ocr([str(tmp_path / "page.png")], out=tmp_path / "out", engine="openai", base_url=server.url,
                       max_new_tokens=6, layout=True, layout_obj=detector, progress=False))  # fmt: skip
    assert len(results) == 1 and results[0].regions
    assert not [w for w in results[0].warnings if "could not be read" in w or "server said" in w], results[0].warnings
    assert server.batcher.batches > before  # the regions were read by the server


def test_fastsd_ocr_client_sends_the_servers_key_from_the_environment(engine, tmp_path, monkeypatch):
    """`fastsd ocr --engine openai` against a `fastsd ocr serve` with a key: the key comes from
    FASTSD_OCR_API_KEY (as the server reads it), so the page is read, not refused with a 401."""
    from fastsd.ocr import ocr

    noise(7, (196, 168)).save(tmp_path / "page.png")
    monkeypatch.setenv("FASTSD_OCR_API_KEY", KEY)
    with start(engine_obj=engine, port=0, api_key=KEY, quiet=True) as srv:
        results = list(ocr([str(tmp_path / "page.png")], out=tmp_path / "out", engine="openai", base_url=srv.url,
                           max_new_tokens=6, layout=False, progress=False))  # fmt: skip
        assert srv.batcher.batches >= 1  # the server read it
    assert len(results) == 1 and not [w for w in results[0].warnings if "401" in w or "server said" in w]
