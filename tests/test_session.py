"""Sessions: layout, names, manifest of checkpoints/models, captions, import, removal, description."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from fastsd import storage
from fastsd.errors import SessionLockedError, UserInputError
from fastsd.session import SUBDIRS, Session, filename_caption, import_session, list_sessions, remove_session


def _temp_files(root: Path) -> list[Path]:
    return list(root.rglob(f"{storage.TEMP_PREFIX}*"))


def _checkpoint_source(folder: Path, step: int) -> Path:
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "weights.safetensors").write_bytes(bytes([step % 251]) * 300_000)
    (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


# ---------------------------------------------------------------- layout and names


def test_create_makes_layout_and_manifest(home):
    s = Session.create("my dog", home, base_model="sd15", resolution=512, instance_token="zwx", class_word="dog")
    assert s.name == "my_dog"
    assert s.path == home / "sessions" / "my_dog"
    for sub in SUBDIRS:
        assert (s.path / sub).is_dir(), sub
    info = json.loads((s.path / "session.json").read_text())
    assert info["base_model"] == "sd15" and info["checkpoints"] == [] and info["models"] == []
    assert s.default_prompt() == "zwx dog"
    assert s.class_images_dir("photo of a Dog!").name == "photo_of_a_dog"
    assert list_sessions(home) == ["my_dog"]
    assert Session.open("my dog", home).info == info


def test_create_twice_is_refused_unless_exist_ok(home):
    Session.create("a", home)
    with pytest.raises(UserInputError, match="already exists"):
        Session.create("a", home)
    assert Session.create("a", home, exist_ok=True).name == "a"


@pytest.mark.parametrize(
    "bad, why",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a/b", "not allowed"),
        ("a\\b", "not allowed"),
        ("..", "not allowed"),
        ("../escape", "not allowed"),
        ("x" * 65, "at most 64"),
        ("dög", "not allowed"),
        ("a.b", "not allowed"),
    ],
)
def test_bad_names_are_refused(home, bad, why):
    with pytest.raises(UserInputError, match=why):
        Session.create(bad, home)
    sessions = Path(home, "sessions")
    assert not sessions.exists() or list(sessions.iterdir()) == []


def test_open_missing_or_corrupt_session(home):
    with pytest.raises(UserInputError, match="no session named nope"):
        Session.open("nope", home)
    s = Session.create("c", home)
    (s.path / "session.json").write_text("{ half written")
    with pytest.raises(UserInputError, match="unreadable"):
        Session.open("c", home)


# ---------------------------------------------------------------- checkpoints and models


def test_checkpoints_record_verify_prune(home, tmp_path):
    s = Session.create("ck", home)
    for step in (100, 200, 300):
        entry = s.record_checkpoint(step, _checkpoint_source(tmp_path / f"w{step}", step))
        assert entry["path"] == f"checkpoints/step-{step:06d}"
        assert set(entry["files"]) == {"unet/weights.safetensors", "state.json"}
    assert [c["step"] for c in s.checkpoints()] == [100, 200, 300]
    assert all(s.verify_checkpoint(c) for c in s.checkpoints())
    assert s.prune_checkpoints(2) == [100]
    assert not (s.path / "checkpoints/step-000100").exists()
    again = Session.open("ck", home)
    assert [c["step"] for c in again.checkpoints()] == [200, 300]
    # A file changed behind our back: the full check notices; same size passes the quick one.
    latest = again.latest_checkpoint()
    weights = again.path / latest["path"] / "unet" / "weights.safetensors"
    weights.write_bytes(b"\x00" * weights.stat().st_size)
    assert again.verify_checkpoint(latest, quick=True)
    assert not again.verify_checkpoint(latest)
    weights.write_bytes(b"short")
    assert not again.verify_checkpoint(latest, quick=True)
    assert _temp_files(s.path) == []


def test_rerecording_a_step_replaces_it(home, tmp_path):
    s = Session.create("rr", home)
    s.record_checkpoint(100, _checkpoint_source(tmp_path / "a", 1))
    s.record_checkpoint(100, _checkpoint_source(tmp_path / "b", 2))
    (entry,) = s.checkpoints()
    assert s.verify_checkpoint(entry)
    assert (s.path / entry["path"] / "unet/weights.safetensors").read_bytes()[:1] == bytes([2])
    assert _temp_files(s.path) == []


def test_failed_checkpoint_copy_leaves_listed_ones_intact(home, tmp_path, monkeypatch):
    s = Session.create("fail", home)
    s.record_checkpoint(100, _checkpoint_source(tmp_path / "a", 1))
    real = storage.copy_file
    calls = []

    def flaky(src, dst, **kw):
        calls.append(dst)
        if len(calls) == 2:
            raise storage.StorageError("simulated: disk full")
        return real(src, dst, **kw)

    monkeypatch.setattr(storage, "copy_file", flaky)
    with pytest.raises(storage.StorageError):
        s.record_checkpoint(200, _checkpoint_source(tmp_path / "b", 2))
    monkeypatch.undo()
    again = Session.open("fail", home)
    assert [c["step"] for c in again.checkpoints()] == [100]
    assert again.verify_checkpoint(again.latest_checkpoint())
    assert _temp_files(s.path) == [] and not (s.path / "checkpoints/step-000200").exists()


def test_clean_removes_unlisted_checkpoints_and_temp_files(home, tmp_path):
    s = Session.create("cl", home)
    s.record_checkpoint(100, _checkpoint_source(tmp_path / "a", 1))
    (s.checkpoints_dir / "step-000200").mkdir()
    (s.checkpoints_dir / "step-000200" / "half.bin").write_bytes(b"x")
    (s.instance_dir / f"{storage.TEMP_PREFIX}abc-img.png").write_bytes(b"x")
    removed = s.clean()
    assert {p.name for p in removed} == {"step-000200", f"{storage.TEMP_PREFIX}abc-img.png"}
    assert [c["step"] for c in s.checkpoints()] == [100]


def test_record_model(home):
    s = Session.create("m", home)
    f = s.models_dir / "m-step-100.safetensors"
    storage.write_bytes(f, b"weights" * 100)
    entry = s.record_model(f, kind="lora", step=100)
    assert entry["file"] == "models/m-step-100.safetensors" and entry["size"] == 700
    assert entry["sha256"] == storage.sha256_file(f)
    assert Session.open("m", home).models() == [entry]


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "stem, caption",
    [
        ("my_dog (3)", "my dog"),
        ("sks man (12)", "sks man"),
        ("a-b_c", "a b c"),
        ("photo123", "photo"),
        ("IMG_0001", "IMG"),
        ("42", ""),
    ],
)
def test_filename_caption(stem, caption):
    assert filename_caption(stem) == caption


def test_caption_api(home):
    s = Session.create("cap", home, instance_token="zwx", class_word="cat")
    for n in ("a.png", "b.png"):
        storage.write_bytes(s.instance_dir / n, b"png")
    s.set_caption("a.png", "  zwx cat on a sofa \n")
    assert s.caption("a.png") == "zwx cat on a sofa"
    assert s.caption(s.instance_dir / "b.png") == "zwx cat"
    assert s.captions() == {"a.png": "zwx cat on a sofa", "b.png": "zwx cat"}
    assert s.has_own_caption("a.png") and not s.has_own_caption("b.png")
    s.remove_image("a.png")
    assert [p.name for p in s.images()] == ["b.png"] and not (s.captions_dir / "a.txt").exists()
    with pytest.raises(UserInputError, match="no image"):
        s.remove_image("a.png")


# ---------------------------------------------------------------- describe


def test_describe_in_plain_words(home, tmp_path):
    s = Session.create("desc", home, base_model="sd15", instance_token="zwx", class_word="dog")
    for n in ("1.png", "2.png", "3.png"):
        storage.write_bytes(s.instance_dir / n, b"png")
    s.set_caption("1.png", "zwx dog running")
    s.update(progress={"step": 300, "total_steps": 1200})
    s.record_checkpoint(300, _checkpoint_source(tmp_path / "a", 3))
    storage.write_bytes(s.models_dir / "desc-step-300.safetensors", b"m" * 2048)
    s.record_model(s.models_dir / "desc-step-300.safetensors", step=300)
    text = s.describe(verify=True)
    assert "base model   sd15" in text
    assert '3 instance image(s): 1 with their own caption, 2 captioned "zwx dog"' in text
    assert "step 300 of 1200 (25%)" in text
    assert "1 complete (sha256 checked): step 300" in text
    assert "model        models/desc-step-300.safetensors (full, step 300, 2.0 KiB)" in text
    summary = s.summary()
    assert summary["images"] == 3 and summary["own_captions"] == 1 and summary["checkpoints"][0]["ok"]
    # a damaged checkpoint is called out
    (s.path / "checkpoints/step-000300/state.json").unlink()
    assert "damaged      step 300" in s.describe()


# ---------------------------------------------------------------- import and removal


def _session_with_work(home, tmp_path, name="src") -> Session:
    s = Session.create(name, home, base_model="sd15")
    storage.write_bytes(s.instance_dir / "a.png", b"png-a")
    s.set_caption("a.png", "zwx dog")
    s.record_checkpoint(100, _checkpoint_source(tmp_path / "w100", 1))
    storage.write_bytes(s.models_dir / "m.safetensors", b"model")
    s.record_model(s.models_dir / "m.safetensors", step=100)
    return s


def test_import_from_folder(home, tmp_path):
    src = _session_with_work(tmp_path / "other-home", tmp_path)
    (src.path / ".fastsd-lock.json").write_text('{"pid": 1, "host": "x"}')  # never carried over
    s = import_session(src.path, home)
    assert s.name == "src" and s.path == home / "sessions" / "src"
    assert s.caption("a.png") == "zwx dog" and s.info["base_model"] == "sd15"
    assert s.verify_checkpoint(s.latest_checkpoint()) and len(s.models()) == 1
    assert not (s.path / ".fastsd-lock.json").exists()
    with pytest.raises(UserInputError, match="already exists.*--name"):
        import_session(src.path, home)
    assert import_session(src.path.parent, home, name="copy2").name == "copy2"  # one folder down works too
    assert _temp_files(home / "sessions") == []


def test_import_from_zip_drops_incomplete_checkpoint_and_unsafe_paths(home, tmp_path):
    src = _session_with_work(tmp_path / "other-home", tmp_path)
    src.record_checkpoint(200, _checkpoint_source(tmp_path / "w200", 2))
    archive = tmp_path / "shared.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.path.rglob("*"):
            if f.is_file() and "step-000200/unet" not in f.as_posix():  # an interrupted upload
                z.write(f, "my_dog/" + f.relative_to(src.path).as_posix())
        z.writestr("my_dog/../../evil.txt", "x")
        z.writestr("__MACOSX/my_dog/._a.png", "x")
    s = import_session(archive, home, name="zipped")
    assert [c["step"] for c in s.checkpoints()] == [100]
    assert not (s.path / "checkpoints/step-000200").exists()
    assert not (tmp_path / "evil.txt").exists() and not (home / "evil.txt").exists()
    assert not (home / "sessions" / "evil.txt").exists()


def test_import_refuses_what_is_not_a_session(home, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no session found"):
        import_session(tmp_path / "empty", home)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="not a readable zip"):
        import_session(bad, home)
    with pytest.raises(UserInputError, match="no such file"):
        import_session(tmp_path / "missing", home)
    assert list_sessions(home) == []


def test_remove_session_respects_lock(home):
    s = Session.create("gone", home)
    (s.path / ".fastsd-lock.json").write_text(
        json.dumps({"pid": 1, "host": "another-colab", "since": 0, "heartbeat": 9e12, "token": "t"})
    )
    with pytest.raises(SessionLockedError, match=r"in use by another process \(pid 1 on another-colab, since "):
        remove_session("gone", home)
    assert s.path.is_dir()
    remove_session("gone", home, force=True)
    assert not s.path.exists() and list_sessions(home) == []
    assert list(Path(home, "sessions").iterdir()) == []
