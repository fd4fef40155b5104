"""Instance images: sources, decoding, duplicates, bad files, smart/center/none crops, captions."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastsd import crop, images
from fastsd.crop import crop_image, focal_point
from fastsd.errors import UserInputError
from fastsd.images import collect, open_image
from fastsd.models.registry import check_resolution
from fastsd.session import Session

BACKGROUND = (118, 150, 96)  # a flat lawn
SUBJECT = (230, 30, 40)


def _scene(size=(1200, 600), blob_center=(1000, 300), radius=110) -> Image.Image:
    """A flat background with a high-contrast subject (a striped red disc) off centre."""
    img = Image.new("RGB", size, BACKGROUND)
    d = ImageDraw.Draw(img)
    cx, cy = blob_center
    d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=SUBJECT)
    for x in range(cx - radius, cx + radius, 24):
        d.line((x, cy - radius // 2, x, cy + radius // 2), fill=(255, 255, 255), width=6)
    return img


def _subject_fraction(img: Image.Image) -> float:
    """Share of red subject pixels in an image."""
    a = np.asarray(img).astype(int)
    red = (a[..., 0] > 180) & (a[..., 1] < 90) & (a[..., 2] < 100)
    return float(red.mean())


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def session(home):
    return Session.create("imgs", home, instance_token="zwx", class_word="dog", resolution=512)


# ---------------------------------------------------------------- sizes and decoding


@pytest.mark.parametrize("size", [64, 448, 512, 576, 768, 1024])
def test_good_sizes(size):
    assert check_resolution(size) == size


@pytest.mark.parametrize(
    ("size", "why"), [(500, "multiple of 64"), (0, "multiple of 64"), (1088, "above"), (2048, "above")]
)
def test_bad_sizes_are_refused(size, why):
    with pytest.raises(UserInputError, match=why):
        check_resolution(size)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a phone photo taken upright
    data = _jpeg(Image.new("RGB", (600, 400), (10, 200, 10)), exif=exif.tobytes())
    img = open_image(data, suffix=".jpg")
    assert img.size == (400, 600) and img.mode == "RGB"


def test_transparency_becomes_white_and_modes_become_rgb():
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(buf, format="PNG")
    img = open_image(buf.getvalue(), suffix=".png")
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buf, format="BMP")
    assert open_image(buf.getvalue(), suffix=".bmp").getpixel((1, 1)) == (90, 90, 90)


def test_draft_decodes_big_jpegs_small_but_not_below_the_training_size():
    data = _jpeg(Image.new("RGB", (4000, 3000), (9, 9, 9)))
    img = open_image(data, suffix=".jpg", draft_size=512)
    assert min(img.size) >= 512 and img.width <= 2000


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not an image"),
        (b"hello world, not a picture", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 50, "not an image"),
    ],
)
def test_corrupt_images_raise_with_a_reason(data, reason):
    with pytest.raises(images.ImageReadError, match=reason):
        open_image(data, suffix=".jpg")


def test_truncated_png_is_corrupt():
    buf = io.BytesIO()
    _scene((300, 300)).save(buf, format="PNG")
    with pytest.raises(images.ImageReadError, match="corrupt or truncated"):
        open_image(buf.getvalue()[: len(buf.getvalue()) // 2], suffix=".png")


# ---------------------------------------------------------------- cropping


def test_smart_crop_keeps_an_off_centre_subject_that_center_crop_cuts():
    img = _scene((1200, 600), blob_center=(1000, 300))
    smart, info = crop_image(img, "smart", 512)
    center, _ = crop_image(img, "center", 512)
    assert smart.size == center.size == (512, 512)
    assert info["focus"] in ("saliency", "face")
    whole = _subject_fraction(img.crop(info["box"]))
    assert whole > 0.07  # the disc is in the crop...
    left, top, right, bottom = info["box"]
    assert left <= 1000 - 110 and right >= 1000 + 110  # ...entirely
    assert _subject_fraction(center) < 0.01  # the middle square misses it


def test_smart_crop_in_a_tall_image():
    img = _scene((600, 1400), blob_center=(300, 180))
    out, info = crop_image(img, "smart", 512)
    left, top, right, bottom = info["box"]
    assert top <= 180 - 110 and bottom >= 180 + 110
    assert _subject_fraction(out) > 0.07
    assert _subject_fraction(crop_image(img, "center", 512)[0]) < 0.01


def test_faces_win_over_saliency(monkeypatch):
    """A face on the left beats a loud object on the right (face detection itself is OpenCV's)."""
    img = _scene((1200, 600), blob_center=(1000, 300))
    monkeypatch.setattr(crop, "detect_faces", lambda im: [(100, 200, 120, 150)])
    x, y, how = focal_point(img)
    assert how == "face" and (x, y) == (160, 275)
    _, info = crop_image(img, "smart", 512)
    assert info["box"][0] == 0 and info["focus"] == "face"


def test_several_faces_are_kept_together_when_they_fit(monkeypatch):
    img = Image.new("RGB", (1600, 600), BACKGROUND)
    monkeypatch.setattr(crop, "detect_faces", lambda im: [(700, 100, 100, 100), (1000, 120, 90, 90)])
    x, _, _ = focal_point(img)
    assert x == pytest.approx((700 + 1090) / 2)
    monkeypatch.setattr(crop, "detect_faces", lambda im: [(100, 100, 150, 150), (1400, 100, 100, 100)])
    x, _, _ = focal_point(img)  # too far apart for one crop: the largest face
    assert x == pytest.approx(175)


@pytest.mark.skipif(not crop.face_detection_available(), reason="this OpenCV ships no Haar cascade")
def test_haar_detector_finds_no_face_in_a_flat_scene():
    assert crop.detect_faces(_scene()) == []


def test_flat_image_falls_back_to_the_centre():
    img = Image.new("RGB", (900, 600), BACKGROUND)
    x, y, how = focal_point(img)
    assert how == "center" or abs(x - 450) < 5


def test_none_keeps_aspect_in_multiples_of_64():
    out, info = crop_image(_scene((1500, 1000)), "none", 512)
    w, h = out.size
    assert w % 64 == 0 and h % 64 == 0
    assert abs(w / h - 1.5) < 0.1
    assert 0.8 * 512 * 512 <= w * h <= 1.05 * 512 * 512
    assert not info["upscaled"]


def test_small_images_are_upscaled_and_flagged():
    out, info = crop_image(_scene((400, 300), blob_center=(200, 150), radius=50), "smart", 512)
    assert out.size == (512, 512) and info["upscaled"]


def test_unknown_crop_mode():
    with pytest.raises(UserInputError, match="smart, center, none"):
        crop_image(_scene(), "fancy", 512)


# ---------------------------------------------------------------- gathering


def test_collect_from_folder_zip_and_file_with_captions(tmp_path):
    _write(tmp_path / "in" / "a.jpg", _jpeg(_scene()))
    _write(tmp_path / "in" / "a.txt", b"zwx dog on grass\n")
    _write(tmp_path / "in" / "sub" / "b.png", b"x")
    _write(tmp_path / "in" / ".hidden.jpg", b"x")
    _write(tmp_path / "in" / "notes.pdf", b"%PDF")
    with zipfile.ZipFile(tmp_path / "in" / "more.zip", "w") as z:
        z.writestr("photos/c.webp", b"x")
        z.writestr("photos/c.caption", "zwx dog asleep")
        z.writestr("__MACOSX/photos/._c.webp", b"x")
    _write(tmp_path / "single.JPG", b"x")
    _write(tmp_path / "single.txt", b"a single one")
    found, failed = collect([tmp_path / "in", tmp_path / "single.JPG", tmp_path / "missing.png"])
    names = {Path(c.name.split(":")[-1]).name: c.caption for c in found}
    assert names == {
        "a.jpg": "zwx dog on grass",
        "b.png": None,
        "c.webp": "zwx dog asleep",
        "single.JPG": "a single one",
    }
    reasons = {Path(n).name: r for n, r in failed}
    assert "unsupported format (.pdf)" in reasons["notes.pdf"]
    assert reasons["missing.png"] == "no such file or folder"


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    _write(tmp_path / "in" / "a.jpg", _jpeg(_scene()))
    real_walk = os.walk

    def walk(top, onerror=None, **kw):
        onerror(PermissionError(13, "Permission denied", str(Path(top) / "locked")))
        yield from real_walk(top, onerror=onerror, **kw)

    monkeypatch.setattr(os, "walk", walk)
    found, failed = collect([tmp_path / "in"])
    assert len(found) == 1
    assert failed == [(str(tmp_path / "in" / "locked"), "folder is unreadable: Permission denied")]


# ---------------------------------------------------------------- adding to a session


def test_add_images_reports_duplicates_and_bad_files_and_adds_the_rest(session, tmp_path):
    photo = _jpeg(_scene())
    _write(tmp_path / "in" / "dog (1).jpg", photo)
    _write(tmp_path / "in" / "copy of dog.jpg", photo)  # same bytes, another name
    _write(tmp_path / "in" / "other.png", b"")
    Image.new("RGB", (800, 800), (20, 40, 200)).save(tmp_path / "in" / "other.png")
    _write(tmp_path / "in" / "broken.jpg", photo[: len(photo) // 3])
    _write(tmp_path / "in" / "fake.webp", b"this is text")
    _write(tmp_path / "in" / "readme.md", b"# hi")
    report = session.add_images(tmp_path / "in", progress=False)
    assert report.added == ["copy_of_dog.png", "other.png"]  # sorted by source name
    assert report.duplicates == [(str(tmp_path / "in" / "dog (1).jpg"), "copy_of_dog.png")]
    failed = {Path(n).name: r for n, r in report.failed}
    assert set(failed) == {"broken.jpg", "fake.webp", "readme.md"}
    assert "corrupt or truncated" in failed["broken.jpg"]
    assert "not an image" in failed["fake.webp"]
    assert "unsupported format (.md)" in failed["readme.md"]
    for name in report.added:
        with Image.open(session.instance_dir / name) as im:
            assert im.size == (512, 512) and im.mode == "RGB"
    text = report.summary()
    assert "added 2 image(s), skipped 1 duplicate(s), 3 file(s) failed" in text and "broken.jpg" in text
    # adding the same photo again later is a duplicate too, even under another name
    _write(tmp_path / "again" / "x.jpg", photo)
    again = session.add_images(tmp_path / "again", progress=False)
    assert again.added == [] and len(again.duplicates) == 1
    assert len(session.images()) == 2


def test_zero_images_is_an_error_naming_what_was_seen(session, tmp_path):
    _write(tmp_path / "in" / "notes.pdf", b"%PDF")
    with pytest.raises(UserInputError, match=r"no images found in .*notes\.pdf: unsupported format"):
        session.add_images(tmp_path / "in", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no images found"):
        session.add_images(tmp_path / "empty", progress=False)


def test_same_stem_gets_a_new_name(session, tmp_path):
    _write(tmp_path / "a" / "dog.jpg", _jpeg(_scene()))
    _write(tmp_path / "b" / "dog.png", b"")
    Image.new("RGB", (600, 600), (1, 2, 3)).save(tmp_path / "b" / "dog.png")
    report = session.add_images([tmp_path / "a", tmp_path / "b"], progress=False)
    assert report.added == ["dog.png", "dog-2.png"]


def test_caption_modes(session, tmp_path):
    _write(tmp_path / "in" / "my_dog (3).jpg", _jpeg(_scene()))
    _write(tmp_path / "in" / "with_text.jpg", _jpeg(_scene(blob_center=(200, 300))))
    _write(tmp_path / "in" / "with_text.txt", b"zwx dog\nin the snow\n")
    session.add_images(tmp_path / "in", progress=False)  # auto: external captions only
    assert session.captions() == {"my_dog_3.png": "zwx dog", "with_text.png": "zwx dog in the snow"}

    other = Session.create("fn", session.path.parent.parent)
    other.add_images(tmp_path / "in", captions="filename", progress=False)
    assert other.captions()["my_dog_3.png"] == "my dog"
    assert other.captions()["with_text.png"] == "with text"

    tok = Session.create("tok", session.path.parent.parent, instance_token="ohwx", class_word="man")
    tok.add_images(tmp_path / "in", captions="token", progress=False)
    assert set(tok.captions().values()) == {"ohwx man"}
    assert list(tok.captions_dir.iterdir()) == []
    with pytest.raises(UserInputError, match="caption mode"):
        tok.add_images(tmp_path / "in", captions="blip", progress=False)


def test_add_with_crop_modes_and_sizes(session, tmp_path):
    _write(tmp_path / "wide.jpg", _jpeg(_scene((1200, 600), blob_center=(1000, 300))))
    session.add_images(tmp_path / "wide.jpg", crop="none", size=768, progress=False)
    with Image.open(session.instance_dir / "wide.png") as im:
        assert im.width % 64 == 0 and im.height % 64 == 0 and im.width > im.height
    assert session.info["images"]["wide.png"]["crop"] == "none"
    with pytest.raises(UserInputError, match="multiple of 64"):
        session.add_images(tmp_path / "wide.jpg", size=700, progress=False)


def test_small_image_warning(session, tmp_path):
    _write(tmp_path / "tiny.jpg", _jpeg(_scene((300, 200), blob_center=(150, 100), radius=40)))
    report = session.add_images(tmp_path / "tiny.jpg", progress=False)
    assert report.added == ["tiny.png"]
    assert report.warnings and "300x200: short side 200 < 512, upscaled" in report.warnings[0]


def test_heic_without_pillow_heif_is_explained(session, tmp_path):
    pytest.importorskip("PIL")
    try:
        import pillow_heif  # noqa: F401

        pytest.skip("pillow-heif is installed here")
    except ImportError:
        pass
    _write(tmp_path / "in" / "phone.HEIC", b"\0\0\0\x18ftypheic")
    _write(tmp_path / "in" / "ok.jpg", _jpeg(_scene()))
    report = session.add_images(tmp_path / "in", progress=False)
    assert report.added == ["ok.png"]
    assert "needs pillow-heif" in dict(report.failed)[str(tmp_path / "in" / "phone.HEIC")]


def test_damaged_zip_and_bad_zip_member(session, tmp_path):
    _write(tmp_path / "bad.zip", b"PK\x03\x04 nope")
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("a.jpg", _jpeg(_scene()))
        z.writestr("b.jpg", b"not really")
    report = session.add_images([tmp_path / "bad.zip", good], progress=False)
    assert report.added == ["a.png"]
    failed = dict(report.failed)
    assert "not a readable zip" in failed[str(tmp_path / "bad.zip")]
    assert "not an image" in failed[f"{good}:b.jpg"]


def test_scattered_texture_does_not_drag_a_centred_subject_to_the_edge():
    rng = np.random.default_rng(0)
    a = np.full((600, 1200, 3), BACKGROUND, dtype=np.uint8)
    noise = rng.integers(0, 60, size=(600, 1200, 1), dtype=np.uint8)
    a = np.clip(a.astype(int) + noise - 30, 0, 255).astype(np.uint8)  # grass texture everywhere
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    d.ellipse((500, 200, 700, 400), fill=SUBJECT)
    _, info = crop_image(img, "smart", 512)
    left, _, right, _ = info["box"]
    assert left <= 500 and right >= 700


def test_detect_faces_scales_boxes_back_and_sorts_by_size(monkeypatch):
    """The OpenCV 4 cascade call as Colab has it, with a stand-in cascade (OpenCV 5 ships none)."""
    seen = {}

    class FakeCascade:
        def detectMultiScale(self, gray, scaleFactor, minNeighbors, minSize):  # noqa: N802, N803 - OpenCV's names
            seen["shape"] = gray.shape
            return np.array([[10, 20, 30, 30], [100, 50, 60, 60]])

    monkeypatch.setattr(crop, "_face_cascade", lambda: FakeCascade())
    boxes = crop.detect_faces(Image.new("RGB", (1280, 960)))
    assert seen["shape"] == (480, 640)  # detection runs on a 640-px copy
    assert boxes == [(200, 100, 120, 120), (20, 40, 60, 60)]
    monkeypatch.setattr(crop, "_face_cascade", lambda: None)
    assert crop.detect_faces(Image.new("RGB", (100, 100))) == []
