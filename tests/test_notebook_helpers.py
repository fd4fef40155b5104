"""fastsd.notebook without a frontend: upload parsing (ipywidgets 7 and 8), captions, removal, status."""

from __future__ import annotations

import datetime
import json
import types
from pathlib import Path

import pytest

from fastsd import notebook as nb
from fastsd.errors import FastsdError, UserInputError
from fastsd.notebook import dreambooth as nb_dreambooth
from fastsd.notebook import reading as nb_ocr  # the modules, where the cells' private names live
from fastsd.notebook import servers as nb_webui
from fastsd.session import Session, list_sessions


def _png(path: Path, color=(200, 80, 40), size=(520, 520)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def session(home, tmp_path) -> Session:
    s = Session.create("rex", home, instance_token="zwx", class_word="dog")
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "a.png", (10, 20, 30))
    _png(src / "b.png", (200, 100, 0))
    s.add_images(src, crop="center", progress=False)
    return s


def _fake_checkpoint(session: Session, step: int, tmp_path: Path, total: int) -> None:
    state = tmp_path / f"state-{step}"
    state.mkdir()
    (state / "weights.safetensors").write_bytes(b"x" * 1000)
    session.record_checkpoint(step, state)
    session.update(progress={"step": step, "total_steps": total})


# ---------------------------------------------------------------- uploads


def test_upload_value_ipywidgets8():
    value = (
        {"name": "dog 1.jpg", "type": "image/jpeg", "size": 3, "content": memoryview(b"abc"), "last_modified": 0},
        {"name": "caps.zip", "type": "application/zip", "size": 2, "content": memoryview(b"PK")},
    )
    assert nb.upload_entries(value) == [("dog 1.jpg", b"abc"), ("caps.zip", b"PK")]


def test_upload_value_ipywidgets7():
    value = {
        "dog.png": {"metadata": {"name": "dog.png", "type": "image/png", "size": 4}, "content": b"\x89PNG"},
        "dog.txt": {"metadata": {"name": "dog.txt"}, "content": b"zwx dog on a sofa"},
    }
    assert nb.upload_entries(value) == [("dog.png", b"\x89PNG"), ("dog.txt", b"zwx dog on a sofa")]


def test_upload_names_lose_folders_and_empty_values_are_empty():
    value = ({"name": "../../etc/passwd", "content": b"x"}, {"name": "C:\\photos\\me.jpg", "content": b"y"})
    assert nb.upload_entries(value) == [("passwd", b"x"), ("me.jpg", b"y")]
    assert nb.upload_entries(()) == [] and nb.upload_entries({}) == [] and nb.upload_entries(None) == []


def test_save_uploads_never_overwrites(tmp_path):
    first = nb.save_uploads([("a.png", b"1"), ("a.png", b"2")], tmp_path / "up")
    second = nb.save_uploads([("a.png", b"3")], tmp_path / "up")
    assert [p.name for p in first + second] == ["a.png", "a-2.png", "a-3.png"]
    assert [p.read_bytes() for p in first + second] == [b"1", b"2", b"3"]


def test_add_images_from_paths(session, tmp_path, capsys):
    more = tmp_path / "more"
    more.mkdir()
    _png(more / "c.png", (0, 200, 0))
    report = nb.add_images(session, f" {more} , ")
    assert report.added == ["c.png"] and len(session.images()) == 3
    assert "added 1 image(s)" in capsys.readouterr().out
    with pytest.raises(UserInputError, match="no images found"):
        nb.add_images(session, str(tmp_path / "empty-does-not-exist"))


# ---------------------------------------------------------------- galleries


def test_images_html_grid(tmp_path):
    from PIL import Image

    html = nb.images_html([_png(tmp_path / "x.png"), Image.new("RGB", (64, 32))], columns=3, titles=["<b>", "two"])
    assert html.count("data:image/png;base64,") == 2
    assert "repeat(3," in html and "&lt;b&gt;" in html and "<b>" not in html
    with pytest.raises(UserInputError, match="one title per image"):
        nb.images_html([tmp_path / "x.png"], titles=["a", "b"])
    assert len(nb.thumbnail_bytes(Image.new("RGBA", (1000, 500)), 100)) > 0


# ---------------------------------------------------------------- captions


def test_caption_editor_saves_changes_only(session):
    editor = nb.CaptionEditor(session)
    assert sorted(editor.boxes) == ["a.png", "b.png"]
    assert all(box.value == "zwx dog" for box in editor.boxes.values())
    assert editor.save_all() == 0  # nothing changed: no caption files written
    assert not any(session.captions_dir.iterdir())
    editor.boxes["a.png"].value = "  zwx dog on a red sofa "
    assert editor.save_all() == 1
    assert session.caption("a.png") == "zwx dog on a red sofa"
    assert session.caption("b.png") == "zwx dog"
    assert editor.save("a.png") is False
    editor.boxes["a.png"].value = ""  # empty: back to the default prompt
    assert editor.save("a.png") is True
    assert session.caption("a.png") == "zwx dog" and editor.boxes["a.png"].value == "zwx dog"
    # a fresh editor shows what was saved
    editor.boxes["b.png"].value = "zwx dog, side view"
    editor.save("b.png")
    assert nb.CaptionEditor(session).boxes["b.png"].value == "zwx dog, side view"


# ---------------------------------------------------------------- sessions


def test_open_session_creates_then_reopens(home, capsys):
    s = nb.open_session("rex", base_model="/models/a", resolution=512, instance_token="zwx", class_word="dog")
    assert "created session rex" in capsys.readouterr().out
    # not trained yet: the form's new values are taken
    s = nb.open_session("rex", base_model="/models/b", resolution=768, instance_token="zwx", class_word="puppy")
    out = capsys.readouterr().out
    assert s.info["base_model"] == "/models/b" and s.info["class_word"] == "puppy" and s.info["resolution"] == 768
    assert "session rex" in out and "next: add images" in out
    assert list_sessions(home) == ["rex"]


def test_trained_session_keeps_its_settings_and_offers_resume(session, tmp_path, capsys):
    _fake_checkpoint(session, 2, tmp_path, total=4)
    s = nb.open_session("rex", base_model="/other", instance_token="zwx", class_word="cat")
    out = capsys.readouterr().out
    assert s.info["class_word"] == "dog" and s.info["base_model"] is None
    assert "keeps its settings" in out and "class_word 'dog' (form: 'cat')" in out
    assert "training stopped at step 2 of 4" in out and "'resume' ticked" in out
    _fake_checkpoint(session, 4, tmp_path, total=4)
    assert "training is complete" in nb.session_status(Session.open("rex"))


def test_remove_checkpoints_asks_first(session, tmp_path):
    _fake_checkpoint(session, 2, tmp_path, total=4)
    remover = nb.RemoveConfirm("rex", what="checkpoints")
    assert remover.choice.layout.display == "none"
    text = remover.request()
    assert "Delete 1 checkpoint(s) of rex (1000 bytes)" in text and remover.choice.layout.display == "flex"
    assert remover.cancel() == "kept" and Session.open("rex").checkpoints()
    remover.request()
    assert "step 2" in remover.confirm()
    assert Session.open("rex").checkpoints() == [] and not (session.path / "checkpoints" / "step-000002").exists()
    assert len(Session.open("rex").images()) == 2  # images stay
    assert "nothing to delete" in nb.RemoveConfirm("rex", what="checkpoints").request()


def test_remove_session_asks_first(session, home):
    remover = nb.RemoveConfirm("rex")
    assert "Delete session rex and everything in it" in remover.request()
    assert list_sessions(home) == ["rex"]  # asking deletes nothing
    assert "deleted session rex" in remover.confirm()
    assert list_sessions(home) == [] and not session.path.exists()
    with pytest.raises(UserInputError, match="no session named rex"):
        nb.RemoveConfirm("rex")
    with pytest.raises(UserInputError):
        nb.RemoveConfirm("rex", what="everything")


def test_latest_model_and_exports(session, capsys):
    with pytest.raises(UserInputError, match="no exported model yet"):
        nb.latest_model(session)
    for step, kind in ((2, "lora"), (4, "lora")):
        f = session.models_dir / f"rex-lora-step-{step}.safetensors"
        f.write_bytes(b"y" * step)
        session.record_model(f, kind=kind, step=step)
    assert nb.latest_model(session)["step"] == 4
    files = nb.exports(session)
    out = capsys.readouterr().out
    assert [p.name for p in files] == ["rex-lora-step-2.safetensors", "rex-lora-step-4.safetensors"]
    assert "(lora, step 4, 4 bytes)" in out


# ---------------------------------------------------------------- models, web UI, OCR arguments


def test_model_path_local_and_missing(tmp_path, home):
    (tmp_path / "m").mkdir()
    assert nb.model_path(str(tmp_path / "m")) == (tmp_path / "m").resolve()
    assert nb.model_path("  ") is None
    with pytest.raises(UserInputError, match="does not exist"):
        nb.model_path(str(tmp_path / "nope"))
    with pytest.raises(UserInputError, match="not a model file"):
        nb.model_path(str(_png(tmp_path / "x.png")), diffusers=True)


def test_webui_login_needs_both_parts(home):
    with pytest.raises(UserInputError, match="both a username and a password"):
        nb.webui("builtin", user="me")


def test_ocr_arguments(tmp_path, home):
    with pytest.raises(UserInputError, match="no input files"):
        nb.ocr(None)
    with pytest.raises(UserInputError, match="not valid JSON"):
        nb_ocr._schema("{total: }")
    assert nb_ocr._schema(' {"total": ""} ') == {"total": ""}
    assert nb_ocr._schema("/drive/schema.json") == "/drive/schema.json"
    with pytest.raises(UserInputError, match="not found"):
        nb.ocr_inputs(str(tmp_path / "missing.pdf"))
    (tmp_path / "a.pdf").write_bytes(b"%PDF")
    assert nb.ocr_inputs(f"{tmp_path / 'a.pdf'}, {tmp_path}/*.png") == [tmp_path / "a.pdf", Path(f"{tmp_path}/*.png")]


def test_preview_markdown_by_task():
    page = dict(document="inv", page=1, warnings=[], skipped=False, data=None)
    text = nb.preview_markdown(types.SimpleNamespace(task="text", text="# Invoice", **page))
    assert text == "**inv, page 1**\n\n# Invoice"
    formula = nb.preview_markdown(types.SimpleNamespace(task="formula", text="E=mc^2", **page))
    assert "$$\nE=mc^2\n$$" in formula
    page["data"], page["warnings"] = {"total": "17"}, ["no closing brace"]
    extract = nb.preview_markdown(types.SimpleNamespace(task="extract", text="{...", **page))
    assert json.loads(extract.split("```json\n")[1].split("\n```")[0]) == {"total": "17"}
    assert "> warning: no closing brace" in extract


def test_fastsd_error_handler_prints_one_line(capsys):
    nb.show_error(None, FastsdError, FastsdError("disk full: free space"), None)
    assert capsys.readouterr().err == "fastsd: error: disk full: free space\n"


def test_train_config_from_the_form(session):
    pytest.importorskip("fastsd.train")
    c = nb.train_config(session, method="lora", steps=0, text_encoder_steps=-1, learning_rate=0, sample_prompt=" ")
    assert (c.method, c.unet_steps, c.te_steps, c.unet_lr) == ("lora", None, None, None)  # the method's defaults
    assert c.resolution is None and c.sample_prompts == [] and c.resume is True  # resolve(): session's, else native
    c = nb.train_config(
        session,
        steps=10,
        text_encoder_steps=0,
        learning_rate=1e-5,
        resolution=64,
        sample_prompt="zwx dog",
        resume=False,
    )
    assert (c.unet_steps, c.te_steps, c.unet_lr, c.resolution) == (10, 0, 1e-5, 64)
    assert c.sample_prompts == ["zwx dog"] and c.resume is False


def test_upload_widget_outside_colab_adds_on_click(session, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nb_dreambooth, "environment", lambda: "jupyter")
    data = _png(tmp_path / "new dog.png", (0, 0, 250)).read_bytes()
    box = nb.add_images(session, "")  # outside Colab: an upload widget instead of Colab's dialog
    picker, button = box.children[0].children
    button.click()
    assert len(session.images()) == 2 and "choose files first" in capsys.readouterr().out
    picker.value = (
        {
            "name": "new dog.png",
            "type": "image/png",
            "size": len(data),
            "content": memoryview(data),
            "last_modified": datetime.datetime.now(datetime.timezone.utc),
        },
    )
    button.click()
    assert [p.name for p in Session.open("rex").images()] == ["a.png", "b.png", "new_dog.png"]
    button.click()  # the same files again: duplicates, nothing added
    assert len(Session.open("rex").images()) == 3


def test_backends_get_a_single_file_for_a_diffusers_folder(home, tiny_sd1, monkeypatch, tmp_path):
    from fastsd.models.detect import detect

    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    installs = []

    def install_stops_here(backend, *a, **k):
        installs.append(backend.name)
        raise RuntimeError("installing stops the test here")

    monkeypatch.setattr("fastsd.launch.backends.install_backend", install_stops_here)
    with pytest.raises(RuntimeError, match="stops the test"):
        nb.webui("a1111", model=tiny_sd1, tunnel="none")
    [single] = (tmp_path / "cache" / "converted").glob("*.safetensors")
    assert detect(single).precision == "fp16" and detect(single).family == "sd1"
    mtime = single.stat().st_mtime_ns
    with pytest.raises(RuntimeError, match="stops the test"):
        nb.webui("comfyui", model=tiny_sd1, tunnel="none")  # converted once, reused
    assert list((tmp_path / "cache" / "converted").glob("*.safetensors")) == [single]
    assert single.stat().st_mtime_ns == mtime and installs == ["a1111", "comfyui"]
    nb_webui._WEBUI.clear()
