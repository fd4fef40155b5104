"""OCR with GLM-OCR on the tiny fixture: documents, prompts, batching, guard, resume, bad inputs, openai engine."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image, ImageDraw

from fastsd.errors import UserInputError
from fastsd.ocr import ocr
from fastsd.ocr.documents import open_document, parse_page_ranges, select_pages
from fastsd.ocr.engine import OpenAIEngine, PageJob, TransformersEngine
from fastsd.ocr.fast import FastGlmOcr
from fastsd.ocr.processor import PatchGrid, load_processor
from fastsd.ocr.prompts import build_prompt, load_schema, parse_extraction, repetition, schema_template

GRID = PatchGrid(min_pixels=112 * 112, max_pixels=224 * 224)


def page_image(text: str, size=(300, 400)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((20, 20), text, fill="black")
    return im


def make_pdf(path, sizes=((300, 400), (300, 400), (400, 300)), resolution=72.0):
    ims = [page_image(f"Page {i + 1}", s) for i, s in enumerate(sizes)]
    ims[0].save(path, save_all=True, append_images=ims[1:], resolution=resolution)
    return path


@pytest.fixture(scope="module")
def engine(tiny_glm_ocr):
    return TransformersEngine(str(tiny_glm_ocr), device="cpu", max_new_tokens=12, local_files_only=True)


# --------------------------------------------------------------------------- fixture
def test_tiny_glm_ocr_generates_tokens_on_cpu(tiny_glm_ocr):
    from transformers import GlmOcrForConditionalGeneration

    proc = load_processor(str(tiny_glm_ocr), local_files_only=True)
    model = GlmOcrForConditionalGeneration.from_pretrained(tiny_glm_ocr).eval()
    inputs = proc.encode([page_image("hello")], ["Text Recognition:"])
    assert proc.prompt_text("Text Recognition:") == (
        "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Text Recognition:<|assistant|>\n"
    )
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == inputs["image_grid_thw"].prod().item() // 4 <= 64
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


# --------------------------------------------------------------------------- documents
def test_pdf_pages_render_on_the_patch_grid(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf")
    doc = open_document(pdf, GRID, dpi=200)
    assert doc.error is None and doc.page_count == 3 and [p.number for p in doc.pages] == [1, 2, 3]
    for page in doc.pages:
        w, h = page.size
        assert w % 28 == 0 and h % 28 == 0 and 2 * w * h <= 224 * 224
        assert page.render().size == page.size
    assert doc.pages[0].size[1] > doc.pages[0].size[0] and doc.pages[2].size[0] > doc.pages[2].size[1]
    big = PatchGrid(max_pixels=10**9)
    low, high = open_document(pdf, big, dpi=100).pages[0], open_document(pdf, big, dpi=200).pages[0]
    assert high.size[0] > low.size[0]  # 300 pt wide: ~420 px at 100 dpi, ~840 at 200
    poster = make_pdf(tmp_path / "poster.pdf", sizes=((2000, 2500),), resolution=72.0)  # 2500 pt tall
    assert max(open_document(poster, big, dpi=200).pages[0].size) <= 3500 + 28


def test_page_ranges():
    assert parse_page_ranges("1-5,8") == [(1, 5), (8, 8)]
    assert select_pages(parse_page_ranges("1-5,8,10-"), 12) == [1, 2, 3, 4, 5, 8, 10, 11, 12]
    assert select_pages(parse_page_ranges("2, 2-3"), 3) == [2, 3]
    assert select_pages(None, 3) == [1, 2, 3]
    for bad in ("0", "5-2", "a", "1-2-3"):
        with pytest.raises(UserInputError):
            parse_page_ranges(bad)


def test_page_range_selects_pages_and_multipage_tiff(tmp_path):
    doc = open_document(make_pdf(tmp_path / "d.pdf"), GRID, pages="2-")
    assert [p.number for p in doc.pages] == [2, 3]
    assert "selects none" in open_document(tmp_path / "d.pdf", GRID, pages="9").error
    tif = tmp_path / "scan.tiff"
    page_image("one").save(tif, save_all=True, append_images=[page_image("two", (400, 300))])
    doc = open_document(tif, GRID)
    assert doc.page_count == 2 and doc.pages[1].render().size == doc.pages[1].size
    assert doc.pages[0].size != doc.pages[1].size


def _encrypted_pdf(path):
    """A one-page PDF with the standard security handler (RC4-40, user password 'secret')."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
    from cryptography.hazmat.primitives.ciphers import Cipher

    pad = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")

    def rc4(key, data):
        return Cipher(ARC4(key), mode=None).encryptor().update(data)

    user = (b"secret" + pad)[:32]
    o = rc4(hashlib.md5((b"owner" + pad)[:32]).digest()[:5], user)
    p_flags, file_id = -4, b"0123456789abcdef"
    key = hashlib.md5(user + o + struct.pack("<i", p_flags) + file_id).digest()[:5]
    u = rc4(key, pad)
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + o.hex().encode() + b"> /U <" + u.hex().encode() + b"> /P -4 >>",
    ]
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for i, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    fid = file_id.hex().encode()
    out.write(b"trailer\n<< /Size 5 /Root 1 0 R /Encrypt 4 0 R /ID [<" + fid + b"> <" + fid + b">] >>\n")
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    path.write_bytes(out.getvalue())
    return path


def test_bad_inputs_are_reported_per_document(tmp_path, monkeypatch):
    import pypdfium2 as pdfium

    (tmp_path / "corrupt.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    assert "damaged" in open_document(tmp_path / "corrupt.pdf", GRID).error
    assert "password" in open_document(_encrypted_pdf(tmp_path / "locked.pdf"), GRID).error
    empty = pdfium.PdfDocument.new()
    empty.save(str(tmp_path / "empty.pdf"))
    assert "no pages" in open_document(tmp_path / "empty.pdf", GRID).error
    (tmp_path / "notes.docx").write_bytes(b"PK")
    assert "unsupported file type .docx" in open_document(tmp_path / "notes.docx", GRID).error
    page_image("x", (400, 400)).save(tmp_path / "huge.png")
    monkeypatch.setattr("fastsd.ocr.documents.MAX_IMAGE_PIXELS", 100_000)
    assert "limit" in open_document(tmp_path / "huge.png", GRID).error
    assert "no such file" in open_document(tmp_path / "missing.png", GRID).error


# --------------------------------------------------------------------------- prompts, schema, guard
def test_prompts_for_each_task():
    assert build_prompt("text") == "Text Recognition:"
    assert build_prompt("table") == "Table Recognition:"
    assert build_prompt("formula") == "Formula Recognition:"
    assert build_prompt("extract", {"name": "", "address": {"city": ""}}) == (
        '请按下列JSON格式输出图中信息:\n{\n    "name": "",\n    "address": {\n        "city": ""\n    }\n}'
    )
    with pytest.raises(UserInputError):
        build_prompt("extract", None)


def test_schema_loading_and_extraction_parsing(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"total": "12", "items": [{"name": "x"}]}))
    assert load_schema(f) == {"total": "", "items": [{"name": ""}]}
    js = {"type": "object", "properties": {"date": {"type": "string"}, "buyer": {"properties": {"vat": {}}}}}
    assert schema_template(js) == {"date": "", "buyer": {"vat": ""}}
    for bad in ("[1, 2]", "{}", "{not json"):
        f.write_text(bad)
        with pytest.raises(UserInputError):
            load_schema(f)
    data, warns = parse_extraction(
        '```json\n{"date": "2024-01-02", "buyer": {"vat": "X"}}\n```', {"date": "", "buyer": {"vat": ""}}
    )
    assert data == {"date": "2024-01-02", "buyer": {"vat": "X"}} and warns == []
    data, warns = parse_extraction('{"date": "1", "extra": 2}', {"date": "", "total": ""})
    assert warns == ["extraction: missing key total", "extraction: unexpected key extra"]
    assert parse_extraction("no json here", {"a": ""}) == (None, ["extraction: the output is not a JSON object"])


def test_repetition_guard_detects_runaway_lines():
    text = "# Invoice\nTotal: 5\n" + "| 1 | 2 |\n" * 12
    cut = repetition(text)
    assert text[:cut] == "# Invoice\nTotal: 5\n| 1 | 2 |"
    assert repetition("a\nb\nc\n" * 3) is None  # a repeated block of different lines is content
    assert repetition("x" + "<td></td>" * 30) is not None  # no newlines: a short unit repeated
    assert repetition("Normal paragraph text.\n" * 3) is None


def test_fast_decoder_stops_a_row_and_others_continue(tiny_glm_ocr, engine):
    inputs = engine.processor.encode([page_image("a"), page_image("b")], ["Text Recognition:"] * 2)
    res = FastGlmOcr(engine.model).generate(
        inputs,
        max_new_tokens=40,
        min_new_tokens=40,
        eos_token_ids=engine.eos_token_ids,
        pad_token_id=engine.pad_token_id,
        check_every=8,
        should_stop=lambda row, toks: row == 0 and len(toks) >= 8,
    )
    assert res[0].finish == "stopped" and len(res[0].tokens) < 40
    assert res[1].finish == "length" and len(res[1].tokens) == 40


# --------------------------------------------------------------------------- batching
def test_batched_equals_one_at_a_time_and_stock_generate(tiny_glm_ocr, engine):
    jobs = [
        PageJob(i, page_image(f"line {i}", size), "Text Recognition:" if i != 2 else "Table Recognition:")
        for i, size in enumerate([(300, 400), (300, 400), (200, 200), (500, 300)])
    ]
    batched = engine.run(jobs)  # mixed sizes and prompts: left padding in play
    single = [engine.run([j])[0] for j in jobs]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    stock = TransformersEngine(str(tiny_glm_ocr), device="cpu", max_new_tokens=12, fast=False, local_files_only=True)
    assert [g.text for g in stock.run(jobs)] == [g.text for g in batched]


def test_oom_halves_the_batch(engine, monkeypatch):
    calls = []
    real = engine._generate

    def flaky(jobs):
        calls.append(len(jobs))
        if len(jobs) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(jobs)

    monkeypatch.setattr(engine, "_generate", flaky)
    out = engine.run([PageJob(i, page_image(str(i)), "Text Recognition:") for i in range(4)])
    assert [g.key for g in out] == [0, 1, 2, 3] and calls == [4, 2, 1, 1, 2, 1, 1]
    assert engine.batch_size_for((300, 400)) == 1


# --------------------------------------------------------------------------- runs, output, resume
def test_run_writes_outputs_and_resume_skips_done_pages(tmp_path, engine):
    pdf = make_pdf(tmp_path / "report.pdf")
    out = tmp_path / "out"
    first = list(ocr([str(pdf)], out=out, pages="1-2", engine_obj=engine, progress=False))
    assert [(r.page, r.skipped) for r in first] == [(1, False), (2, False)]
    folder = out / "report"
    data = json.loads((folder / "document.json").read_text())
    assert [p["page"] for p in data["pages"]] == [1, 2]
    rec = data["pages"][0]
    assert {"source", "page", "width", "height", "task", "text", "seconds", "warnings"} <= rec.keys()
    assert rec["source"] == str(pdf) and rec["task"] == "text" and rec["width"] % 28 == 0
    assert (folder / "page_0001.md").read_text().strip() == rec["text"]
    assert "<!-- page 2 -->" in (folder / "document.md").read_text()

    run = ocr([str(pdf)], out=out, engine_obj=engine, progress=False)
    second = list(run)
    assert sorted((r.page, r.skipped) for r in second) == [(1, True), (2, True), (3, False)]
    assert run.summary.done == 1 and run.summary.skipped == 2
    assert second[0].text == first[0].text
    assert [p["page"] for p in json.loads((folder / "document.json").read_text())["pages"]] == [1, 2, 3]
    # another task is other work: nothing is skipped
    again = list(ocr([str(pdf)], task="table", out=out, engine_obj=engine, progress=False))
    assert not any(r.skipped for r in again)


def test_extract_task_records_parsed_json(tmp_path, engine, monkeypatch):
    answer = engine.processor.tokenizer.encode('{"total": "9.50"}')
    monkeypatch.setattr(engine, "_generate", lambda jobs: [(answer, "eos") for _ in jobs])
    page_image("receipt").save(tmp_path / "r.png")
    (res,) = ocr(
        [str(tmp_path / "r.png")],
        task="extract",
        schema={"total": "", "date": ""},
        out=tmp_path / "o",
        engine_obj=engine,
        progress=False,
    )
    assert res.data == {"total": "9.50"}, res
    assert res.warnings == ["extraction: missing key date"]
    rec = json.loads((tmp_path / "o" / "r" / "document.json").read_text())["pages"][0]
    assert rec["data"] == {"total": "9.50"} and rec["prompt"].startswith("请按下列JSON格式输出图中信息:")


def test_cli_reports_failures_and_exit_codes(tmp_path, cli, home, tiny_glm_ocr):
    page_image("hello").save(tmp_path / "ok.png")
    (tmp_path / "bad.pdf").write_bytes(b"garbage")
    r = cli(
        "ocr",
        str(tmp_path / "ok.png"),
        str(tmp_path / "bad.pdf"),
        "--model",
        str(tiny_glm_ocr),
        "--device",
        "cpu",
        "--max-new-tokens",
        "8",
        "--layout",
        "off",
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 1, r.stderr
    assert "failed: " in r.stderr and "bad.pdf" in r.stderr
    assert "2 document(s), 1 page(s): 1 done" in r.stdout
    assert (tmp_path / "out" / "ok" / "page_0001.md").is_file()
    (tmp_path / "schema.json").write_text("[]")
    r = cli("ocr", str(tmp_path / "ok.png"), "--task", "extract", "--schema", str(tmp_path / "schema.json"))
    assert r.returncode == 2 and "schema" in r.stderr
    missing = tmp_path / "no-such-model"  # a typo in a model folder: said as one, not as a Hub failure
    for args in (("ocr", str(tmp_path / "ok.png")), ("ocr", "serve", "--host", "0.0.0.0", "--port", "0")):
        r = cli(*args, "--model", str(missing))
        assert r.returncode == 2 and f"{missing}: no such file or folder" in r.stderr, r.stderr
        assert "needs a key" not in r.stdout  # a server that never started prints no key


def png_claiming(path, width: int, height: int):
    """A tiny PNG file whose header claims ``width`` x ``height``."""
    from webui_fixtures import png_claiming as claiming

    path.write_bytes(claiming(width, height))
    return path


def test_cli_image_bomb_fails_its_document_only(tmp_path, cli, home, tiny_glm_ocr):
    page_image("page 0").save(tmp_path / "ok0.png")
    page_image("page 1").save(tmp_path / "ok1.png")
    png_claiming(tmp_path / "bomb.png", 20_000, 20_000)  # 400 MP: PIL raises DecompressionBombError
    r = cli(
        "ocr", str(tmp_path), "--model", str(tiny_glm_ocr), "--device", "cpu", "--max-new-tokens", "4",
        "--layout", "off", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr and "DecompressionBomb" not in r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "bomb.png" in failed[0] and "400 MP" in failed[0] and "limit" in failed[0], failed
    assert "3 document(s), 2 page(s): 2 done" in r.stdout, r.stdout
    assert all((tmp_path / "out" / f"ok{i}" / "page_0001.md").is_file() for i in range(2))


def test_large_allowed_image_gets_a_readable_line_not_pils_warning(tmp_path, caplog):
    import warnings

    big = png_claiming(tmp_path / "big.png", 10_000, 9_500)  # 95 MP: under fastsd's limit, over PIL's warning
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="fastsd.ocr"):
        warnings.simplefilter("always")
        doc = open_document(big, GRID)
    assert doc.error is None and len(doc.pages) == 1
    assert not [w for w in caught if "DecompressionBomb" in type(w.message).__name__], [str(w.message) for w in caught]
    assert "big.png: image 10000x9500 (95 MP) is very large; decoding it needs about 0.4 GB of RAM" in caplog.text


# --------------------------------------------------------------------------- openai engine
class _ChatServer(BaseHTTPRequestHandler):
    requests: list[dict] = []
    lock = threading.Lock()
    malformed = 0  # this many replies come back without choices

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.requests.append(body)
            broken = _ChatServer.malformed > 0
            _ChatServer.malformed -= broken
        if broken:
            data = b'{"choices": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        content = body["messages"][0]["content"]
        prompt = next(c["text"] for c in content if c["type"] == "text")
        image = Image.open(io.BytesIO(base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])))
        text = "row\n" * 20 if "Table" in prompt else f"{prompt} {image.size[0]}x{image.size[1]}"
        reply = {
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"completion_tokens": 7},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _ChatServer.requests = []
    _ChatServer.malformed = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_openai_engine_sends_prompts_and_images(tmp_path, chat_server):
    pdf = make_pdf(tmp_path / "scan.pdf")
    run = ocr([str(pdf)], engine="openai", base_url=chat_server, out=tmp_path / "out", concurrency=3, progress=False)
    results = sorted(run, key=lambda r: r.page)
    assert len(_ChatServer.requests) == 3
    body = _ChatServer.requests[0]
    assert body["model"] == "zai-org/GLM-OCR" and body["temperature"] == 0.0 and body["repetition_penalty"] == 1.1
    for r in results:
        assert r.text == f"Text Recognition: {r.width}x{r.height}"
        assert r.width % 28 == 0 and r.height % 28 == 0
    assert (tmp_path / "out" / "scan" / "document.md").is_file()
    eng = OpenAIEngine(chat_server, concurrency=2)
    (g,) = eng.run([PageJob("t", page_image("t"), "Table Recognition:")])
    assert g.finish == "repetition" and g.text == "row" and g.warnings


def test_a_page_the_server_failed_is_reported_and_read_again_on_a_rerun(tmp_path, chat_server):
    page = tmp_path / "page.png"
    page_image("p").save(page)
    _ChatServer.malformed = 1
    first = ocr([str(page)], engine="openai", base_url=chat_server, out=tmp_path / "out", progress=False)
    (r,) = list(first)
    assert r.finish == "error" and first.summary.done == 0
    assert first.summary.failed and "page 1 could not be read" in first.summary.failed[0][1]
    again = ocr([str(page)], engine="openai", base_url=chat_server, out=tmp_path / "out", progress=False)
    (r2,) = list(again)
    assert not r2.skipped and r2.finish != "error" and r2.text.startswith("Text Recognition:")
    assert again.summary.done == 1 and not again.summary.failed


def test_openai_engine_needs_base_url():
    with pytest.raises(UserInputError):
        OpenAIEngine("")


def test_quantized_load_arguments_for_ocr_and_vlm_engines():
    import torch

    from fastsd.ocr.engine import quantized_load

    assert quantized_load("none", torch.float16, "cuda:0") == {}
    nf4 = quantized_load("4bit", torch.float16, "cuda:0")
    cfg = nf4["quantization_config"]
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_compute_dtype == torch.float16
    assert nf4["device_map"] == {"": "cuda:0"}
    assert quantized_load("8bit", torch.float16, "cuda:0")["quantization_config"].load_in_8bit
