"""The notebooks' widgets: uploads, image grids and thumbnails, the caption editor, confirm-before-delete.

Widgets use only what ipywidgets 7 (Colab) and 8 share; the one API that differs,
``FileUpload.value``, is read by :func:`upload_entries` in both forms. Each widget's logic works
without a frontend (its methods are what the buttons call), so it is tested directly.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FastsdError, UserInputError
from ..paths import cache_dir
from ..session import human_size
from ..storage import png_bytes
from .start import on_drive

if TYPE_CHECKING:
    from PIL import Image

    from ..session import Session


def upload_entries(value: Any) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` pairs from a ``FileUpload`` widget's value, in ipywidgets 7 or 8 form.

    ipywidgets 8: a tuple of dicts with ``name`` and ``content`` (a memoryview). ipywidgets 7:
    a dict mapping the file name to ``{"metadata": {...}, "content": bytes}``. Names are reduced
    to their last part (a browser never sends folders, but a hand-made value could).
    """
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for name, entry in value.items():
            content = entry.get("content", b"") if isinstance(entry, dict) else entry
            meta = entry.get("metadata", {}) if isinstance(entry, dict) else {}
            items.append((meta.get("name") or name, content))
    else:
        for entry in value or ():
            items.append((entry["name"], entry["content"]))
    out = []
    for name, content in items:
        clean = Path(str(name).replace("\\", "/")).name
        if clean and clean not in (".", ".."):
            out.append((clean, bytes(content)))
    return out


def save_uploads(entries: Iterable[tuple[str, bytes]], folder: str | os.PathLike[str]) -> list[Path]:
    """Write uploaded files into ``folder`` (created); a repeated name gets ``-2``, ``-3``..."""
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in entries:
        path = dest / name
        n = 2
        while path.exists():
            path = dest / f"{Path(name).stem}-{n}{Path(name).suffix}"
            n += 1
        path.write_bytes(data)
        written.append(path)
    return written


def upload_folder(prefix: str) -> Path:
    """A new, empty folder under the cache's ``uploads`` for one batch of uploaded files."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=_mkdir(cache_dir() / "uploads")))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def colab_files() -> list[tuple[str, bytes]]:
    """Colab's upload dialog; Colab's own copies of the files in the working folder are removed."""
    from ..colab import upload_files

    uploaded = upload_files()
    for name, data in uploaded.items():
        copy = Path.cwd() / Path(name).name
        if copy.is_file() and copy.stat().st_size == len(data):
            copy.unlink()
    return list(uploaded.items())


def upload_widget(on_files: Callable[[list[tuple[str, bytes]]], None], accept: str, label: str) -> Any:
    """Show a ``FileUpload`` and a button that passes the chosen files to ``on_files`` (outside Colab).

    A :class:`~fastsd.errors.FastsdError` from ``on_files`` is printed as one line under the button.
    """
    import ipywidgets as w
    from IPython.display import display

    picker = w.FileUpload(accept=accept, multiple=True)
    button = w.Button(description=label, button_style="primary")
    out = w.Output()

    def clicked(_: Any) -> None:
        with out:
            out.clear_output()
            entries = upload_entries(picker.value)
            if not entries:
                print("choose files first")
                return
            try:
                on_files(entries)
            except FastsdError as err:
                print(f"fastsd: error: {err}")

    button.on_click(clicked)
    box = w.VBox([w.HBox([picker, button]), out])
    display(box)
    return box


# ---------------------------------------------------------------- galleries


def _to_pil(image: str | os.PathLike[str] | Image.Image) -> Image.Image:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as img:
        img.load()
        return img.copy()


def thumbnail_bytes(image: str | os.PathLike[str] | Image.Image, size: int = 256) -> bytes:
    """A PNG thumbnail (longest side ``size``) of a path or PIL image."""
    img = _to_pil(image)
    img = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB")
    img.thumbnail((size, size))
    return png_bytes(img)


def images_html(
    images: Sequence[str | os.PathLike[str] | Image.Image],
    *,
    columns: int = 4,
    titles: Sequence[str] | None = None,
    size: int = 256,
) -> str:
    """An HTML grid of images (embedded PNG thumbnails) with optional titles under each."""
    if titles is not None and len(titles) != len(images):
        raise UserInputError(f"{len(images)} image(s) but {len(titles)} title(s): give one title per image")
    cells = []
    for i, image in enumerate(images):
        data = base64.b64encode(thumbnail_bytes(image, size)).decode()
        title = titles[i] if titles is not None else (Path(image).name if isinstance(image, (str, os.PathLike)) else "")
        caption = f'<div style="font-size:12px;word-break:break-all">{html.escape(str(title))}</div>' if title else ""
        cells.append(f'<div><img src="data:image/png;base64,{data}" style="max-width:100%"/>{caption}</div>')
    columns = max(1, int(columns))
    return (
        f'<div class="fastsd-grid" style="display:grid;grid-template-columns:repeat({columns},'
        f'minmax(0,{size}px));gap:8px">' + "".join(cells) + "</div>"
    )


def show_images(
    images: Sequence[str | os.PathLike[str] | Image.Image],
    columns: int = 4,
    titles: Sequence[str] | None = None,
    *,
    size: int = 256,
) -> Any:
    """Show images (paths or PIL images) in a grid in the cell output; returns the HTML object.

    Plain HTML, not widgets: it stays visible in a saved notebook and on GitHub.
    """
    from IPython.display import HTML, display

    if not images:
        print("no images to show")
        return None
    obj = HTML(images_html(images, columns=columns, titles=titles, size=size))
    display(obj)
    return obj


# ---------------------------------------------------------------- caption editor


class CaptionEditor:
    """One row per instance image: thumbnail, name, caption box, Save; plus "Save all".

    The widget is :attr:`widget`; the logic (:meth:`save`, :meth:`save_all`) works without a
    frontend, so it is tested directly.
    """

    def __init__(self, session: Session, *, thumb: int = 128) -> None:
        import ipywidgets as w

        self.session = session
        self.boxes: dict[str, Any] = {}
        self.status = w.HTML()
        rows = []
        for path in session.images():
            box = w.Textarea(value=session.caption(path), layout=w.Layout(width="100%", height="60px"))
            self.boxes[path.name] = box
            save = w.Button(description="Save", layout=w.Layout(width="80px"))
            save.on_click(lambda _, name=path.name: self._report(self.save(name), name))
            image = w.Image(value=thumbnail_bytes(path, thumb), format="png", layout=w.Layout(width=f"{thumb}px"))
            label = w.HTML(f"<code>{html.escape(path.name)}</code>")
            rows.append(w.HBox([image, w.VBox([label, box], layout=w.Layout(width="100%")), save]))
        save_all = w.Button(description="Save all", button_style="primary")
        save_all.on_click(lambda _: self._report_all(self.save_all()))
        if not rows:
            self.status.value = "this session has no images yet: add some first"
        head = w.HTML(
            f"<b>{len(rows)} image(s)</b> &middot; empty caption = the default "
            f"<code>{html.escape(session.default_prompt())}</code>"
        )
        self.widget = w.VBox([head, *rows, w.HBox([save_all, self.status])])

    def save(self, name: str) -> bool:
        """Write the caption of image ``name`` when it changed. Returns True when written."""
        text = self.boxes[name].value.strip()
        if text == self.session.caption(name) or (not text and not self.session.has_own_caption(name)):
            return False
        self.session.set_caption(name, text)
        if not text:
            self.boxes[name].value = self.session.default_prompt()
        return True

    def save_all(self) -> int:
        """Write every changed caption. Returns how many were written."""
        return sum(self.save(name) for name in self.boxes)

    def _report(self, changed: bool, name: str) -> None:
        self.status.value = f"saved {html.escape(name)}" if changed else f"{html.escape(name)}: no change"

    def _report_all(self, count: int) -> None:
        self.status.value = f"saved {count} caption(s)" if count else "no changes to save"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class RemoveConfirm:
    """A delete button that asks before deleting a session, or only its checkpoints.

    ``what``: ``session`` (everything) or ``checkpoints`` (the resumable states, the bulk of a
    session; exported models, images and captions stay). :meth:`request`, :meth:`confirm` and
    :meth:`cancel` are what the buttons call (and what the tests call).
    """

    def __init__(self, name: str, *, home: str | os.PathLike[str] | None = None, what: str = "session") -> None:
        import ipywidgets as w

        from ..session import Session

        if what not in ("session", "checkpoints"):
            raise UserInputError(f"unknown thing to remove {what!r}: use session or checkpoints")
        self.session = Session.open(name, home)
        self.home = home
        self.what = what
        self.done = False
        self.message = w.HTML()
        label = f"Delete session {name}" if what == "session" else f"Delete {name}'s checkpoints"
        self.ask = w.Button(description=label, button_style="danger", layout=w.Layout(width="auto"))
        self.yes = w.Button(description="Yes, delete", button_style="danger")
        self.no = w.Button(description="Cancel")
        self.ask.on_click(lambda _: self.request())
        self.yes.on_click(lambda _: self.confirm())
        self.no.on_click(lambda _: self.cancel())
        self.choice = w.HBox([self.yes, self.no], layout=w.Layout(display="none"))
        self.widget = w.VBox([self.ask, self.choice, self.message])

    def targets(self) -> list[Path]:
        """What would be deleted."""
        if self.what == "session":
            return [self.session.path]
        return [self.session.path / c["path"] for c in self.session.checkpoints()]

    def request(self) -> str:
        """First press: say what would go and how much space it frees; show Yes / Cancel."""
        targets = self.targets()
        if not targets:
            self.message.value = "nothing to delete: the session has no checkpoints"
            return self.message.value
        size = human_size(sum(_size(t) for t in targets))
        if self.what == "session":
            text = f"Delete session {self.session.name} and everything in it ({size}: images, checkpoints, models)?"
        else:
            text = f"Delete {len(targets)} checkpoint(s) of {self.session.name} ({size})? Exported models stay."
        self.message.value = html.escape(text) + " This cannot be undone."
        self.choice.layout.display = "flex"
        return text

    def confirm(self) -> str:
        """Second press: delete."""
        self.choice.layout.display = "none"
        if self.what == "session":
            from ..session import remove_session

            path = remove_session(self.session.name, self.home)
            text = f"deleted session {self.session.name} ({path})"
        else:
            with self.session.lock(command="delete checkpoints"):
                steps = self.session.prune_checkpoints(0)
            text = f"deleted checkpoint(s) of step {', '.join(map(str, steps))}" if steps else "no checkpoints"
        if on_drive(self.session.path):
            text += "; Drive keeps deleted files in its trash for 30 days: empty the trash to get the space now"
        self.done = True
        self.message.value = html.escape(text)
        return text

    def cancel(self) -> str:
        self.choice.layout.display = "none"
        self.message.value = "kept"
        return "kept"
