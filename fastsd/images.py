"""Instance images: gather them from files, folders and zips, clean them up, crop them, caption them.

What a user drops in is rarely training-ready: phone photos lie on their side (EXIF orientation),
PNGs carry alpha, the same photo comes twice, a folder holds a stray PDF or a broken download.
:func:`add_images` takes all of it, adds what it can and says, by name, what it skipped and why.

Cropping (``smart``, ``center``, ``none``) is :mod:`fastsd.crop`'s.

Images smaller than the training size are upscaled, with a warning: they train blurry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .crop import CROP_MODES, crop_image, face_detection_available
from .errors import UserInputError
from .models.registry import check_resolution

if TYPE_CHECKING:
    from PIL import Image

    from .session import Session

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
HEIC_SUFFIXES = (".heic", ".heif")
CAPTION_SUFFIXES = (".txt", ".caption")
#: auto: an external .txt/.caption next to the image, else the ``<token> <class>`` prompt;
#: filename: the cleaned file name (``my_dog (3).jpg`` -> ``my dog``); token: always the prompt.
CAPTION_MODES = ("auto", "filename", "token")
#: Members of a zip larger than this are refused rather than read into memory (zip bombs).
MAX_MEMBER_BYTES = 256 * 1024 * 1024
#: Saved format of cropped images: lossless, read by every trainer.
SAVE_SUFFIX = ".png"
#: PNG text key holding the sha256 of the photo a saved image was made from. An image that landed
#: in ``instance_images/`` but whose record did not (the add was killed in between) is still
#: recognised by it, so adding the same photos again never duplicates them.
SOURCE_KEY = "fastsd-source-sha256"


def filename_caption(stem: str) -> str:
    """Caption from a file name as Colab users know it: ``my_dog (3)`` -> ``my dog``."""
    text = re.sub(r"\(\d+\)", " ", stem)
    text = re.sub(r"[_\-]+", " ", text)
    text = re.sub(r"\d+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- gathering sources


@dataclass
class Candidate:
    """One file that may be an image: where it came from, how to read it, its external caption."""

    name: str  # shown in reports: a path, or ``archive.zip:member``
    stem: str
    suffix: str
    read: Callable[[], bytes]
    caption: str | None = None


@dataclass
class AddReport:
    """What :func:`add_images` did.

    Attributes:
        added: file names (in ``instance_images/``) of the images added.
        duplicates: ``(source, existing image)`` pairs skipped as exact duplicates.
        failed: ``(source, reason)`` pairs: corrupt, unsupported or unreadable inputs.
        warnings: notes on images that were added (upscaled, no face found...).
        originals: for each existing image a duplicate matched, the file it was added from.
    """

    added: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    originals: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """Plain-text report, one line per skipped file."""
        lines = [
            f"added {len(self.added)} image(s), skipped {len(self.duplicates)} duplicate(s), "
            f"{len(self.failed)} file(s) failed"
        ]
        lines += [
            f"  duplicate: {src} is the same picture as {self._original(existing)}" for src, existing in self.duplicates
        ]
        lines += [f"  failed: {src}: {reason}" for src, reason in self.failed]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _original(self, existing: str) -> str:
        source = self.originals.get(existing)
        return f"{source} (in the session as {existing})" if source and source != existing else existing


def _read_caption(data: bytes) -> str:
    return " ".join(data.decode("utf-8", errors="replace").split())


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX" or name == "Thumbs.db" or name == "desktop.ini"


def _group(entries: list[tuple[str, str, Callable[[], bytes]]], failed: list[tuple[str, str]]) -> list[Candidate]:
    """Turn (display name, file name, reader) of one folder into candidates, pairing captions by stem."""
    captions: dict[str, Callable[[], bytes]] = {}
    for _display, fname, read in entries:
        p = Path(fname)
        if p.suffix.lower() in CAPTION_SUFFIXES:
            captions.setdefault(p.stem, read)
    out = []
    for display, fname, read in entries:
        p = Path(fname)
        suffix = p.suffix.lower()
        if suffix in CAPTION_SUFFIXES:
            continue
        if suffix not in IMAGE_SUFFIXES + HEIC_SUFFIXES:
            what = f"({suffix})" if suffix else "(no file extension)"
            failed.append((display, f"unsupported format {what}: use jpg, png, webp or bmp"))
            continue
        caption = None
        if p.stem in captions:
            try:
                caption = _read_caption(captions[p.stem]()) or None
            except OSError as err:
                failed.append((display, f"its caption file is unreadable: {err.strerror or err}"))
        out.append(Candidate(display, p.stem, suffix, read, caption))
    return out


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _from_zip(path: Path, failed: list[tuple[str, str]]) -> list[Candidate]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        failed.append((str(path), f"not a readable zip file ({err})"))
        return []
    folders: dict[str, list[tuple[str, str, Callable[[], bytes]]]] = {}
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if info.is_dir():
            continue
        parts = info.filename.split("/")
        if any(_hidden(part) for part in parts):
            continue
        display = f"{path}:{info.filename}"
        if info.file_size > MAX_MEMBER_BYTES:
            failed.append((display, f"too large ({info.file_size // (1024 * 1024)} MiB) for an image"))
            continue

        def read(info: zipfile.ZipInfo = info) -> bytes:
            try:
                return archive.read(info)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise OSError(f"damaged zip member ({err})") from err

        folders.setdefault("/".join(parts[:-1]), []).append((display, parts[-1], read))
    out: list[Candidate] = []
    for entries in folders.values():
        out += _group(entries, failed)
    return out


def _from_folder(root: Path, failed: list[tuple[str, str]]) -> list[Candidate]:
    out: list[Candidate] = []

    def onerror(err: OSError) -> None:
        failed.append((str(err.filename or root), f"folder is unreadable: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        here = Path(dirpath)
        entries = []
        for fname in sorted(filenames):
            if _hidden(fname):
                continue
            path = here / fname
            if path.suffix.lower() == ".zip":
                out += _from_zip(path, failed)
                continue
            entries.append((str(path), fname, _file_reader(path)))
        out += _group(entries, failed)
    return out


def _from_file(path: Path, failed: list[tuple[str, str]]) -> list[Candidate]:
    if path.suffix.lower() == ".zip":
        return _from_zip(path, failed)
    entries = [(str(path), path.name, _file_reader(path))]
    for suffix in CAPTION_SUFFIXES:
        sibling = path.with_suffix(suffix)
        if sibling.is_file() and path.suffix.lower() not in CAPTION_SUFFIXES:
            entries.append((str(sibling), sibling.name, _file_reader(sibling)))
    return _group(entries, failed)


def collect(sources: Iterable[str | os.PathLike[str]]) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Expand files, folders (recursively) and zips into image candidates.

    Hidden files, ``__MACOSX`` and caption files are not candidates; caption files
    (``<stem>.txt`` / ``<stem>.caption`` in the same folder) become the candidates' captions.

    Returns:
        ``(candidates, failed)``: failed holds ``(name, reason)`` for missing paths, unreadable
        folders, bad zips and files of an unsupported type.
    """
    candidates: list[Candidate] = []
    failed: list[tuple[str, str]] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            candidates += _from_folder(path, failed)
        elif path.is_file():
            candidates += _from_file(path, failed)
        elif path.exists():
            failed.append((str(path), "not a file or folder"))
        else:
            failed.append((str(path), "no such file or folder"))
    return candidates, failed


# ---------------------------------------------------------------- decoding


class ImageReadError(Exception):
    """An input that is not a usable image; ``str()`` is the reason shown to the user."""


def _register_heif() -> None:
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImageReadError("HEIC/HEIF needs pillow-heif: pip install pillow-heif, or convert it to jpg") from err
    pillow_heif.register_heif_opener()


@contextlib.contextmanager
def large_images_allowed() -> Iterator[None]:
    """Open big photos without PIL's raw ``DecompressionBombWarning``.

    PIL warns above ~89 MP (a 12000x10000 scan is a real photo, not an attack) and refuses above
    twice that with ``DecompressionBombError``, which callers still turn into a message.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def open_image(data: bytes, *, suffix: str = "", draft_size: int | None = None) -> Image.Image:
    """Decode image bytes into an upright RGB image.

    EXIF orientation is applied (phone photos), transparency is flattened onto white, palette
    and greyscale images become RGB. With ``draft_size`` a JPEG is decoded at a reduced scale
    that still keeps both sides at least that large (much faster for 12+ MP photos).

    Raises:
        ImageReadError: not an image, truncated, or too large to decode safely.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if suffix in HEIC_SUFFIXES:
        _register_heif()
    try:
        with large_images_allowed():
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                # draft() picks the largest 1/2^k scale that keeps the requested box; account for
                # a 90-degree EXIF rotation by asking for a square box.
                img.draft("RGB", (draft_size, draft_size))
            img.load()
        img = ImageOps.exif_transpose(img) or img
    except UnidentifiedImageError as err:
        raise ImageReadError("not an image, or a format Pillow cannot read") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"too many pixels to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageReadError(f"corrupt or truncated image ({err})") from err
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


# ---------------------------------------------------------------- adding to a session


def _unrecorded_sources(session: Session, names: set[str]) -> dict[str, str]:
    """Source sha256 -> file name of instance images that carry a source hash but have no record."""
    from PIL import Image

    found: dict[str, str] = {}
    for name in sorted(names):
        try:
            with Image.open(session.instance_dir / name) as img:
                digest = img.info.get(SOURCE_KEY)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if isinstance(digest, str) and digest:
            found.setdefault(digest, name)
    return found


def _safe_stem(stem: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:60]
    return cleaned or "image"


def _unique_stem(stem: str, taken: set[str]) -> str:
    candidate, n = stem, 2
    while candidate.lower() in taken:
        candidate = f"{stem}-{n}"
        n += 1
    taken.add(candidate.lower())
    return candidate


def add_images(
    session: Session,
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    crop: str = "smart",
    size: int | None = None,
    captions: str = "auto",
    progress: bool = True,
) -> AddReport:
    """Add instance images to a session: decode, de-duplicate, crop, save, caption.

    Each image is saved as PNG in ``instance_images/`` with the safe-write helper, carrying its
    source photo's sha256 in a PNG text chunk, and is then recorded in ``session.json``
    (``images``) at once, image by image. Adding the same photo again is skipped, also after an
    add that was killed at any moment: an image saved but not yet recorded is recognised by the
    hash inside it (and its record is completed).
    A caption is written to ``captions/<stem>.txt`` when one comes with the image (``auto``) or
    from its file name (``filename``); otherwise the session's ``<token> <class>`` prompt applies.

    Args:
        session: the session to add to (the caller holds its lock; :meth:`Session.add_images` does).
        sources: files, folders and zips (one or a list).
        crop: ``smart`` (default), ``center`` or ``none``.
        size: training size; default the session's (:meth:`fastsd.session.Session.training_size`).
        captions: ``auto`` (default), ``filename`` or ``token``.
        progress: show a progress bar.

    Returns:
        An :class:`AddReport`. Bad files are in ``failed``, never raised.

    Raises:
        UserInputError: bad crop/caption mode or size, or no image files at all in ``sources``
            (the message names what was looked at and why each file was refused).
        StorageError: writing to the session failed (disk full...); images saved before stay.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    size = check_resolution(int(size)) if size else session.training_size()
    if crop not in CROP_MODES:
        raise UserInputError(f"crop mode {crop!r} is unknown: use one of {', '.join(CROP_MODES)}")
    if captions not in CAPTION_MODES:
        raise UserInputError(f"caption mode {captions!r} is unknown: use one of {', '.join(CAPTION_MODES)}")
    candidates, failed = collect(sources)
    report = AddReport(failed=failed)
    if not candidates:
        looked = ", ".join(str(s) for s in sources) or "(nothing)"
        reasons = "; ".join(f"{n}: {r}" for n, r in failed[:5])
        raise UserInputError(
            f"no images found in {looked}" + (f" ({reasons})" if reasons else "") + ": add jpg, png, webp or bmp files"
        )
    records: dict[str, Any] = session.info.setdefault("images", {})
    present = {p.name for p in session.images()}
    known = {rec["sha256"]: fname for fname, rec in records.items() if fname in present and rec.get("sha256")}
    unrecorded = _unrecorded_sources(session, present - {f for f in records if records[f].get("sha256")})
    taken = {p.stem.lower() for p in session.instance_dir.iterdir()}

    from tqdm.auto import tqdm

    bar = tqdm(candidates, desc="adding images", unit="img", disable=not progress or len(candidates) < 4)
    try:
        for cand in bar:
            try:
                data = cand.read()
            except OSError as err:
                report.failed.append((cand.name, f"unreadable: {err.strerror or err}"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in known:
                report.duplicates.append((cand.name, known[digest]))
                report.originals[known[digest]] = records.get(known[digest], {}).get("source", "")
                continue
            if digest in unrecorded:  # saved by an add that was killed before recording it
                fname = unrecorded.pop(digest)
                records[fname] = {"source": cand.name, "sha256": digest, "crop": crop}
                session.save()
                known[digest] = fname
                report.duplicates.append((cand.name, fname))
                continue
            try:
                img = open_image(data, suffix=cand.suffix, draft_size=size)
                out, info = crop_image(img, crop, size)
            except ImageReadError as err:
                report.failed.append((cand.name, str(err)))
                continue
            stem = _unique_stem(_safe_stem(cand.stem), taken)
            fname = stem + SAVE_SUFFIX
            encoded = storage.png_bytes(out, {SOURCE_KEY: digest})
            # caption, then image, then record: a kill between any two leaves nothing that a
            # re-run duplicates (the caption is rewritten, the image is known by its hash)
            text = cand.caption if captions == "auto" else filename_caption(cand.stem) if captions == "filename" else ""
            if text:
                session.set_caption(fname, text)
            storage.write_bytes(session.instance_dir / fname, encoded)
            known[digest] = fname
            records[fname] = {
                "source": cand.name,
                "sha256": digest,
                "crop": crop,
                "focus": info["focus"],
            }
            session.save()
            report.added.append(fname)
            if info["upscaled"]:
                report.warnings.append(
                    f"{cand.name} is {img.width}x{img.height}: short side {min(img.size)} < {size}, "
                    "upscaled, it will train blurry"
                )
    finally:
        bar.close()
    if crop == "smart" and report.added and not face_detection_available():
        log.debug("face detection unavailable in this OpenCV: smart crop used saliency only")
    return report
