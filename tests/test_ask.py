"""fastsd ask: an image and a PDF page, text and --schema JSON, through the endpoint and the local engine."""

from __future__ import annotations

import json

import pytest
from chat_standin import serve
from PIL import Image, ImageDraw

from fastsd.errors import FastsdError, UserInputError
from fastsd.ocr.processor import PatchGrid
from fastsd.vlm.ask import ask, load_page
from fastsd.vlm.engines import EndpointVlm, LocalVlm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pdf(path):
    pages = []
    for i, size in enumerate(((300, 400), (400, 300))):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).text((20, 20), f"Page {i + 1}", fill="black")
        pages.append(im)
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72.0)
    return path


def test_pdf_page_is_rendered_as_ocr_renders_it(tmp_path):
    pdf = _pdf(tmp_path / "doc.pdf")
    page2 = load_page(pdf, page=2, dpi=144)
    assert page2.size == PatchGrid().fit(800, 600)  # 400x300 pt at 144 dpi, on OCR's patch grid
    with pytest.raises(UserInputError, match="selects none"):
        load_page(pdf, page=3)


def test_ask_an_image_and_a_pdf_page_through_an_endpoint(tmp_path):
    photo = tmp_path / "dog.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(photo)
    pdf = _pdf(tmp_path / "doc.pdf")
    with serve() as (url, st):
        engine = EndpointVlm(url, model="m")
        a = ask(engine, photo, "is the subject's face visible?")
        b = ask(engine, pdf, "what page is this?", page=2, dpi=72)
        engine.close()
    w, h = PatchGrid().fit(64, 48)  # images go on the same patch grid as pages
    assert a.text == f"reply to [is the subject's face visible?] {w}x{h} rgb(10, 200, 10)"
    w, h = PatchGrid().fit(400, 300)
    assert b.text.startswith(f"reply to [what page is this?] {w}x{h}") and b.page == 2
    assert st.requests[0]["temperature"] == 0.0 and "response_format" not in st.requests[0]


def test_ask_with_a_json_schema_parses_and_checks_the_answer(tmp_path):
    photo = tmp_path / "chart.png"
    Image.new("RGB", (32, 32), "white").save(photo)
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"title": {"type": "string"}, "bars": {"type": "integer"}}})
    )

    def reply(prompt, image):
        assert '"title"' in prompt and '"bars"' in prompt
        return '```json\n{"title": "Sales", "bars": 4, "extra": 1}\n```'

    with serve(reply=reply) as (url, st):
        engine = EndpointVlm(url, model="m")
        a = ask(engine, photo, "Read the chart.", schema=schema)
        engine.close()
    assert a.data == {"title": "Sales", "bars": 4, "extra": 1}
    assert a.warnings == ["extraction: unexpected key extra"]
    assert st.requests[0]["response_format"]["json_schema"]["schema"]["properties"]["bars"] == {"type": "integer"}


def test_failed_request_is_an_error_naming_the_file(tmp_path):
    photo = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(photo)
    with serve(malformed_rgb=(9, 9, 9)) as (url, _):
        engine = EndpointVlm(url, model="m")
        with pytest.raises(FastsdError, match="x.png: no answer: malformed reply"):
            ask(engine, photo, "what?")
        engine.close()


def test_local_engine_answers_about_a_pdf_page(tmp_path, tiny_vlm):
    engine = LocalVlm(str(tiny_vlm), device="cpu")
    a = ask(engine, _pdf(tmp_path / "doc.pdf"), "Summarise.", page=1, max_new_tokens=5)
    assert a.text and a.warnings == ["truncated: reached the 5-token cap (raise --max-new-tokens)"]


def test_cli_ask_json_and_bad_inputs(cli, tmp_path, home):
    photo = tmp_path / "dog.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(photo)
    env = {"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    with serve() as (url, _):
        r = cli(
            "ask",
            str(photo),
            "how many dogs?",
            "--engine",
            "openai",
            "--base-url",
            url,
            "--model",
            "m",
            "--json",
            env=env,
        )
    assert r.returncode == 0, r.stderr
    w, h = PatchGrid().fit(40, 30)
    assert json.loads(r.stdout)["text"] == f"reply to [how many dogs?] {w}x{h} rgb(1, 2, 3)"
    r = cli(
        "ask", str(tmp_path / "missing.pdf"), "q", "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", env=env
    )
    assert r.returncode == 2 and "missing.pdf" in r.stderr
    r = cli("ask", str(photo), "q", "--engine", "openai", env=env)
    assert r.returncode == 2 and "--base-url" in r.stderr
