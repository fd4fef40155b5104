"""``fastsd ocr serve`` on the tiny GLM-OCR: OpenAI client, concurrency, the SDK, auth, limits, streams, sampling."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

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


def concurrently(fn, n: int) -> None:
    """Run ``fn(0) .. fn(n - 1)`` on n threads at once (n clients) and wait for all of them."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


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
    before, gathered_before = server.batcher.batches, len(server.batcher.gathered)

    def client(i: int) -> None:
        r = httpx.post(server.base_url + "/chat/completions", json=body(data_uri(images[i]), prompts[i]), timeout=120)
        got[i] = r.json()["choices"][0]["message"]["content"]

    concurrently(client, 8)
    assert [got[i] for i in range(8)] == want
    assert server.batcher.largest_batch > 1 and server.batcher.batches - before < 8
    # each batch says how it was gathered: sizes that add up to the requests, and why it closed
    gathered = list(server.batcher.gathered)[gathered_before:]
    assert sum(g.size for g in gathered) == 8 and all(g.closed in ("full", "quiet", "cap") for g in gathered)


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


# --------------------------------------------------------------------------- sampling and streaming
def streamed(client, **kw) -> tuple[list[str], str | None]:
    """The content pieces of a streamed answer and its finish reason."""
    chunks = list(client.chat.completions.create(**kw, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return pieces, chunks[-1].choices[0].finish_reason


def test_streaming_sends_text_as_it_decodes_and_joins_to_the_answer(server, engine):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    for seed in (1, 2):
        image = noise(seed)
        want = client.chat.completions.create(**body(data_uri(image)), max_tokens=12)
        pieces, finish = streamed(client, **body(data_uri(image)), max_tokens=12)
        assert len(pieces) > 1, "streamed in one piece: not while decoding"
        assert "".join(pieces) == want.choices[0].message.content == expected(engine, image)
        assert finish == want.choices[0].finish_reason
    # the wire format: role first, usage with the finish, then [DONE]
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body(data_uri(noise(1)), stream=True),
                      timeout=60) as resp:  # fmt: skip
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1
    assert events[-1]["choices"][0]["finish_reason"] and events[-1]["usage"]["completion_tokens"] >= 1


def test_sampling_is_seeded_per_request_and_greedy_at_temperature_0(server, engine):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    url, greedy = data_uri(noise(2)), expected(engine, noise(2))

    def ask(**kw) -> str:
        return client.chat.completions.create(**body(url), max_tokens=12, **kw).choices[0].message.content

    first = ask(temperature=1.0, seed=7)
    assert ask(temperature=1.0, seed=7) == first, "the same seed must give the same answer"
    others = {ask(temperature=1.0, seed=s) for s in range(4)}
    assert len(others | {first}) > 1 and any(t != greedy for t in others)
    assert ask(temperature=0.0, seed=7) == ask(temperature=0.0, seed=8) == greedy
    assert ask(temperature=1.0, seed=3, extra_body={"top_k": 1}) == greedy  # only the argmax is left
    assert ask(temperature=1.0, seed=3, top_p=1e-6) == greedy
    pieces, _ = streamed(client, **body(url), max_tokens=12, temperature=1.0, seed=7)
    assert "".join(pieces) == first
    # the seed alone decides: the same answer when the request shares a batch with others
    got: dict[int, str] = {}

    def client_thread(i: int) -> None:
        extra = {"temperature": 1.0, "seed": 7} if i == 0 else {}
        got[i] = client.chat.completions.create(**body(url if i == 0 else data_uri(noise(40 + i))), max_tokens=12,
                                                **extra).choices[0].message.content  # fmt: skip

    before = server.batcher.batches
    concurrently(client_thread, 4)
    assert server.batcher.batches - before < 4, "the requests were not batched"
    assert got[0] == first and [got[i] for i in (1, 2, 3)] == [expected(engine, noise(40 + i)) for i in (1, 2, 3)]


def test_concurrent_streaming_clients_are_all_answered_and_none_mixed_up(server, engine):
    import openai

    images = [noise(20 + i, (160 + 28 * (i % 3), 200)) for i in range(6)]
    prompts = ["Table Recognition:" if i % 3 == 2 else "Text Recognition:" for i in range(6)]
    sampled = {"temperature": 0.9, "seed": 11}
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    want = [expected(engine, im, p) for im, p in zip(images, prompts, strict=True)]
    want[5] = client.chat.completions.create(**body(data_uri(images[5]), prompts[5]), max_tokens=12,
                                             **sampled).choices[0].message.content  # fmt: skip
    assert len(set(want)) > 1
    got: dict[int, tuple[list[str], str | None]] = {}

    def stream_client(i: int) -> None:
        extra = sampled if i == 5 else {}
        got[i] = streamed(openai.OpenAI(base_url=server.base_url, api_key="unused"),
                          **body(data_uri(images[i]), prompts[i]), max_tokens=12, **extra)  # fmt: skip

    before = server.batcher.batches
    concurrently(stream_client, 6)
    assert ["".join(got[i][0]) for i in range(6)] == want
    assert all(got[i][1] in ("stop", "length") for i in range(6))
    assert server.batcher.batches - before < 6, "the streams were not batched"


def test_a_client_that_disconnects_mid_stream_stops_its_row(engine):
    limits = ServeLimits(max_tokens=400, batch_wait_ms=50, stream_every=2)
    with start(engine_obj=engine, port=0, limits=limits, quiet=True) as srv:
        url = srv.base_url + "/chat/completions"
        with httpx.stream("POST", url, json=body(data_uri(noise(1)), max_tokens=400, stream=True),
                          timeout=60) as resp:  # fmt: skip
            for line in resp.iter_lines():
                if '"content":' in line and '"content": ""' not in line:
                    break  # the first text: hang up
        deadline = time.time() + 60
        while srv.batcher.abandoned == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert srv.batcher.abandoned == 1, "the row of the client that left went on decoding"
        ok = httpx.post(url, json=body(data_uri(noise(3)), max_tokens=12), timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected(engine, noise(3))


def test_bad_sampling_settings_get_a_400_and_the_server_goes_on(server, engine):
    url = server.base_url + "/chat/completions"
    for extra, param in [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": "lucky"}, "seed"),
        ({"seed": True}, "seed"),
        ({"n": 2}, "n"),
    ]:
        resp = httpx.post(url, json=body(data_uri(noise(1)), **extra), timeout=60)
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"] == param
    for stream in (False, True):
        ok = httpx.post(url, json=body(data_uri(noise(3)), max_tokens=12, stream=stream), timeout=60)
        assert ok.status_code == 200
    assert ok.text.rstrip().endswith("data: [DONE]")


def test_a_server_on_plain_generate_refuses_sampling_and_serves_greedy(tiny_glm_ocr):
    stock = TransformersEngine(str(tiny_glm_ocr), device="cpu", max_new_tokens=6, fast=False, local_files_only=True)
    with start(engine_obj=stock, port=0, limits=ServeLimits(max_tokens=6), quiet=True) as srv:
        url = srv.base_url + "/chat/completions"
        hot = httpx.post(url, json=body(data_uri(noise(1)), temperature=0.5), timeout=60)
        assert hot.status_code == 400 and "greedily only" in hot.json()["error"]["message"]
        ok = httpx.post(url, json=body(data_uri(noise(1)), max_tokens=6, stream=True), timeout=60)
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")


def test_sampler_draws_from_the_tempered_distribution_within_top_k_and_top_p():
    import torch

    from fastsd.ocr.sampling import RowSampler, Sampling

    logits = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, -3.0])
    n = 6000

    def draws(**kw) -> torch.Tensor:
        sampler = RowSampler([Sampling(seed=s, **kw) for s in range(n)], 6, torch.device("cpu"))
        return sampler.choose(logits.expand(n, 6).clone(), torch.zeros(1, dtype=torch.long))

    freq = torch.bincount(draws(temperature=0.7), minlength=6).float() / n
    assert torch.allclose(freq, (logits / 0.7).softmax(-1), atol=0.02), freq
    assert set(draws(temperature=1.0, top_k=2).tolist()) == {0, 1}
    probs = logits.softmax(-1)  # 0.50, 0.30, 0.11, ...: the nucleus of 0.7 is the first two
    assert probs[0] < 0.7 <= probs[0] + probs[1]
    assert set(draws(temperature=1.0, top_p=0.7).tolist()) == {0, 1}
    assert set(draws(temperature=0.0).tolist()) == {0}
    # each step draws afresh; the same (seed, step) draws the same
    one = RowSampler([Sampling(1.0, seed=5)], 6, torch.device("cpu"))
    steps = [one.choose(logits[None], torch.tensor([t])).item() for t in range(64)]
    assert len(set(steps)) > 2 and steps == [one.choose(logits[None], torch.tensor([t])).item() for t in range(64)]


def test_fast_decoder_samples_rows_alone_and_keeps_greedy_rows_exact(engine):
    from fastsd.ocr.fast import FastGlmOcr
    from fastsd.ocr.sampling import Sampling

    images = [noise(50 + i).resize(engine.grid.fit(200, 160)) for i in range(3)]
    inputs = engine.processor.encode(images, ["Text Recognition:"] * 3)
    fast = FastGlmOcr(engine.model)
    kw = {"max_new_tokens": 10, "eos_token_ids": engine.eos_token_ids, "pad_token_id": engine.pad_token_id,
          "repetition_penalty": 1.1}  # fmt: skip
    greedy = [r.tokens for r in fast.generate(inputs, **kw)]
    hot = Sampling(temperature=1.2, top_p=0.95, top_k=50, seed=9)
    mixed = [r.tokens for r in fast.generate(inputs, sampling=[None, hot, Sampling(seed=9)], **kw)]
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2] and mixed[1] != greedy[1]
    alone = engine.processor.encode(images[1:2], ["Text Recognition:"])
    assert fast.generate(alone, sampling=[hot], **kw)[0].tokens == mixed[1]


def test_settled_text_is_never_taken_back_by_the_guard_or_the_strip():
    import random

    from fastsd.ocr.prompts import repetition, settled

    rng = random.Random(0)
    pieces = ["| a | b |\n", "ab", "abc", " ", "\n", "x", "Total: 5\n", "<td></td>", "  \n", "Größe "]
    cuts = sent_chars = final_chars = 0
    for _ in range(300):
        parts = [rng.choice(pieces) * (rng.randint(2, 40) if rng.random() < 0.3 else 1) for _ in range(30)]
        text = "".join(parts)
        cut = repetition(text)
        final = (text if cut is None else text[:cut]).strip()
        cuts += cut is not None
        at, end = 0, 0
        while end < len(text):
            end = min(len(text), end + rng.randint(1, 7))
            at = settled(text[:end], at)
            assert final.startswith(text[:at].lstrip()), (text, end, text[:at])
        sent_chars += len(text[:at].strip())
        final_chars += len(final)
    assert cuts > 20, "the texts must hit the guard for the test to mean anything"
    assert sent_chars > 0.8 * final_chars, "settled keeps back much more than the guard can remove"


def test_text_stream_gives_whole_characters_and_only_what_the_answer_keeps(engine):
    import random

    from fastsd.ocr.engine import _guarded
    from fastsd.ocr.stream import TextStream

    rng = random.Random(1)
    texts = [
        "  Größe: 5 €\n你好，世界 🎉\n| a | b |\n| c | d |\nend  ",
        "Title\n" + "| 1 | 2 |\n" * 12 + "tail",  # a runaway line: the guard keeps one copy
        "x = " + "<td></td>" * 40,  # a runaway unit without newlines
    ]
    for text in texts:
        ids = engine.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        final = _guarded(engine.processor.decode(ids))[0].strip()
        stream, pieces, end = TextStream(engine.processor.decode), [], 0
        while end < len(ids):
            end = min(len(ids), end + rng.randint(1, 5))
            pieces.append(stream.feed(ids[:end]))
        given = "".join(pieces)
        assert "\ufffd" not in given and final.startswith(given), (text, given)
        assert len(given) > 0.5 * len(final), "the stream held back most of the answer"


def test_a_request_whose_client_left_while_queued_is_not_decoded(server, engine):
    from fastsd.ocr.batcher import Pending

    heard: list[str | None] = []
    gone = Pending(noise(1).resize(engine.grid.fit(200, 160)), "Text Recognition:", 12, listener=heard.append)
    gone.cancelled.set()
    before = server.batcher.largest_batch, server.batcher.abandoned
    server.batcher._run([gone])  # what the batcher thread does with a batch of it
    assert gone.future.cancelled() and heard == [None]
    assert (server.batcher.largest_batch, server.batcher.abandoned) == before


def test_requests_arriving_just_after_a_small_batch_started_join_it(engine, monkeypatch):
    # 32 clients' first pages trickle in: the first one alone must not hold the other 31 for a whole decode
    from fastsd.ocr.batcher import Batcher, Pending

    seeds = [0, 1, 2, 3]
    fitted = [noise(s).resize(engine.grid.fit(200, 160), Image.Resampling.BICUBIC) for s in seeds]
    batcher = Batcher(engine, ServeLimits(max_tokens=12, max_batch=8, batch_wait_ms=1))
    late = [Pending(im, "Text Recognition:", 12) for im in fitted[1:]]
    real, sent = engine._generate, []

    def arriving(jobs, **kw):  # the other clients' requests land while the first one's batch decodes
        if not sent:
            sent.append(True)
            for p in late:
                batcher.submit(p)
        return real(jobs, **kw)

    monkeypatch.setattr(engine, "_generate", arriving)
    try:
        first = batcher.submit(Pending(fitted[0], "Text Recognition:", 12))
        answers = [f.result(timeout=120)[0] for f in [first, *[p.future for p in late]]]
    finally:
        batcher.stop()
    monkeypatch.undo()
    assert answers == [expected(engine, noise(s)) for s in seeds]  # the restarted row lost nothing
    assert batcher.restarts == 1 and [g.size for g in batcher.gathered] == [1, 4]
    assert batcher.gathered[1].closed.endswith("joined") and batcher.largest_batch == 4


def test_the_halves_of_a_batch_that_ran_out_of_memory_are_all_answered(engine, monkeypatch):
    # a batch that runs out of memory is decoded in halves; requests queued meanwhile must not make a
    # half restart (it would take the other half's place and leave it unanswered)
    import torch

    from fastsd.ocr.batcher import Batcher, Pending

    fitted = [noise(s).resize(engine.grid.fit(200, 160), Image.Resampling.BICUBIC) for s in range(7)]
    batcher = Batcher(engine, ServeLimits(max_tokens=12, max_batch=8, batch_wait_ms=200))
    first, late = [Pending(im, "Text Recognition:", 12) for im in fitted[:4]], fitted[4:]
    real, sent = engine._generate, []

    def tight(jobs, **kw):
        if len(jobs) == 4:  # the gathered batch does not fit; others arrive meanwhile
            if not sent:
                sent.append([batcher.submit(Pending(im, "Text Recognition:", 12)) for im in late])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(jobs, **kw)

    monkeypatch.setattr(engine, "_generate", tight)
    try:
        for p in first:
            batcher.submit(p)
        answers = [p.future.result(timeout=120)[0] for p in first] + [f.result(timeout=120)[0] for f in sent[0]]
    finally:
        batcher.stop()
    monkeypatch.undo()
    assert answers == [expected(engine, noise(s)) for s in range(7)]
