"""Captions: a tiny Qwen3-VL on CPU and a stand-in endpoint write captions into the session; the editor shows them."""

from __future__ import annotations

import pytest
from chat_standin import serve
from PIL import Image

from fastsd.session import Session
from fastsd.vlm.caption import CLIP_TOKENS, bind_subject, caption_session, fit_caption, token_counter
from fastsd.vlm.engines import EndpointVlm, LocalVlm, VlmRequest

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (9, 9, 9)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def session(home, tmp_path, tiny_sd1):
    src = tmp_path / "photos"
    src.mkdir()
    for i, rgb in enumerate(COLOURS):
        Image.new("RGB", (96, 80), rgb).save(src / f"img{i}.png")
    s = Session.create("rex", home, base_model=str(tiny_sd1), instance_token="zwx", class_word="dog")
    s.add_images(src, crop="center", size=64, progress=False)
    return Session.open("rex", home)


def test_bind_subject_puts_token_and_class_first():
    assert (
        bind_subject("A photo of a dog lying on a sofa.", "sks", "dog", "sentence")
        == "photo of sks dog lying on a sofa"
    )
    assert (
        bind_subject("Caption: The dog, wet, sits in snow.", "sks", "dog", "sentence")
        == "photo of sks dog wet, sits in snow"
    )
    assert (
        bind_subject("Snow falls on a red barn.", "sks", "dog", "sentence")
        == "photo of sks dog, Snow falls on a red barn"
    )
    assert bind_subject("Tags: dog, snow, Snow, the dog, soft light", "sks", "dog", "tags") == (
        "photo of sks dog, snow, soft light"
    )


def test_fit_caption_fits_clip_with_the_real_tokenizer(tiny_sd1):
    count = token_counter("sd1", tiny_sd1)
    long = "photo of sks dog, " + ", ".join(f"extraordinarily detailed item{i}" for i in range(60))
    fitted = fit_caption(long, count, CLIP_TOKENS)
    assert count(fitted) <= CLIP_TOKENS < count(long)
    assert fitted.startswith("photo of sks dog, ") and not fitted.endswith(",")


def test_local_tiny_qwen3_vl_answers_a_batch(tiny_vlm):
    engine = LocalVlm(str(tiny_vlm), device="cpu", batch_size=3)
    reqs = [
        VlmRequest(Image.new("RGB", (60 + 20 * i, 50), (i * 40, 0, 0)), "Describe.", max_new_tokens=6) for i in range(4)
    ]
    replies = engine.answer(reqs)
    assert len(replies) == 4 and all(r.error is None and 0 < r.tokens <= 6 for r in replies)
    # batched (left-padded) decoding gives what one-at-a-time decoding gives
    alone = LocalVlm(str(tiny_vlm), device="cpu", batch_size=1).answer(reqs[:2])
    assert [r.text for r in alone] == [r.text for r in replies[:2]]


def test_local_engine_captions_the_session_and_the_editor_shows_them(session, tiny_vlm):
    from fastsd.notebook import CaptionEditor

    session.set_caption("img1.png", "my own caption")
    engine = LocalVlm(str(tiny_vlm), device="cpu", batch_size=2)
    run = caption_session(session, engine, style="tags", max_tokens=8)
    assert sorted(run.written) == ["img0.png", "img2.png", "img3.png"] and run.kept == ["img1.png"], run.failed
    assert not run.failed
    for name, text in run.written.items():
        assert session.caption(name) == text and text.startswith("photo of zwx dog")
    assert session.caption("img1.png") == "my own caption"
    editor = CaptionEditor(session)
    assert editor.boxes["img0.png"].value == run.written["img0.png"]
    # a rerun keeps everything; --overwrite replaces
    assert caption_session(session, engine).written == {}
    assert sorted(caption_session(session, engine, overwrite=True, max_tokens=4).written) == [
        f"img{i}.png" for i in range(4)
    ]


def test_endpoint_captions_concurrently_and_a_malformed_reply_fails_only_its_image(session, monkeypatch):
    def reply(prompt, image):
        return "A photo of a dog resting on a wooden floor by a window, warm afternoon light."

    monkeypatch.setenv("MY_VLM_KEY", "sk-secret-value-12345")
    with serve(malformed_rgb=(9, 9, 9), busy=1, delay=0.1, reply=reply) as (url, st):
        engine = EndpointVlm(url, model="glm-4.5v", key_name="MY_VLM_KEY", concurrency=4)
        engine.client.backoff = 0.01
        run = caption_session(session, engine, style="sentence")
        engine.close()
    assert list(run.failed) == ["img3.png"] and "malformed" in run.failed["img3.png"]
    assert sorted(run.written) == ["img0.png", "img1.png", "img2.png"]
    assert session.caption("img0.png") == "photo of zwx dog resting on a wooden floor by a window, warm afternoon light"
    assert not session.has_own_caption("img3.png")
    assert st.max_in_flight >= 2 and st.statuses[0] in (429, 503)
    assert set(st.auth) == {"Bearer sk-secret-value-12345"}
    assert st.requests[-1]["model"] == "glm-4.5v"


def test_cli_caption_through_an_endpoint(cli, session, home):
    with serve(malformed_rgb=(9, 9, 9)) as (url, st):
        r = cli("caption", "rex", "--engine", "openai", "--base-url", url, "--model", "m", "--style", "tags",
                env={"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": "sk-cli-secret-999999"})  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "failed: img3.png" in r.stderr and "3 caption(s) written, 1 failed" in r.stdout
    assert "sk-cli-secret-999999" not in r.stdout + r.stderr
    assert Session.open("rex", home).has_own_caption("img0.png")


def test_cli_caption_checks_inputs_before_loading(cli, home):
    Session.create("empty", home)
    r = cli("caption", "empty", env={"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "no instance images" in r.stderr
    r = cli("caption", "nope", env={"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2


def test_notebook_auto_caption_step(session, capsys):
    from fastsd import notebook as nb

    assert nb.auto_caption(session, "off") is None and not session.has_own_caption("img0.png")
    with serve(malformed_rgb=(9, 9, 9)) as (url, _):
        run = nb.auto_caption(session, "openai", style="tags", base_url=url, model="m")
    out = capsys.readouterr().out
    assert sorted(run.written) == ["img0.png", "img1.png", "img2.png"]
    assert "failed: img3.png" in out and "3 caption(s) written, 1 failed" in out
    assert nb.CaptionEditor(session).boxes["img1.png"].value == session.caption("img1.png") == run.written["img1.png"]
