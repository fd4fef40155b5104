"""What the Colab notebooks call: setup, uploads, the caption editor, galleries, confirmations.

The notebooks in ``notebooks/`` are forms: each cell reads its fields and calls one or two
functions from here or from the library. Everything with logic lives here, so it is tested and
the same in Colab, Jupyter and Kaggle.

Rules the helpers keep:

- Re-running a cell is safe: sessions are opened when they exist, a web UI started by an earlier
  run of a cell is stopped before a new one starts, uploads never overwrite.
- Nothing waits on ``input()``: choices are form fields, confirmations are buttons.
- An error is one line: :func:`setup` registers an IPython handler that shows a
  :class:`~fastsd.errors.FastsdError` as ``fastsd: error: ...`` without a traceback (the cell
  still fails, so "Run all" stops there).
- Widgets use only what ipywidgets 7 (Colab) and 8 share; the one API that differs,
  ``FileUpload.value``, is read by :func:`upload_entries` in both forms.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FastsdError, UserInputError
from .paths import cache_dir, fastsd_home
from .redact import install_logging
from .runtime import environment
from .session import human_size
from .storage import png_bytes
from .train.config import TrainConfig

if TYPE_CHECKING:
    from PIL import Image

    from .images import AddReport
    from .session import Session

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- setup and errors


def show_error(shell: Any, etype: type, evalue: BaseException, tb: Any, tb_offset: Any = None) -> None:
    """IPython custom-exception handler: a :class:`FastsdError` as one line, no traceback."""
    print(f"fastsd: error: {evalue}", file=sys.stderr, flush=True)


def _register_error_handler() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.set_custom_exc((FastsdError,), show_error)
    return True


def _log_to_cell() -> None:
    """Show fastsd's INFO messages in the cell output (once, however often setup runs)."""
    logger = logging.getLogger("fastsd")
    if not any(getattr(h, "_fastsd_notebook", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._fastsd_notebook = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    install_logging([h for h in logger.handlers if getattr(h, "_fastsd_notebook", False)])


def setup(*, drive: bool = True, home: str | os.PathLike[str] | None = None) -> Path:
    """First call of every notebook: one-line errors, log messages in the cell, Drive, the home.

    Args:
        drive: mount Google Drive (in Colab) so the fastsd home is ``MyDrive/fastsd`` and
            sessions, models and outputs survive the runtime.
        home: an explicit fastsd home (else the usual rule: ``FASTSD_HOME``, Drive, ``~/fastsd``).

    Returns:
        The fastsd home.
    """
    _register_error_handler()
    # trio (imported by some web libraries) warns when any custom exception handler exists; ours is deliberate
    warnings.filterwarnings("ignore", message="IPython detected, but you already have a custom exception handler")
    _log_to_cell()
    from .liblogs import quiet

    quiet()
    if drive:
        from .colab import mount_drive

        mount_drive()
    root = fastsd_home(home)
    on_drive = "on Google Drive" if _on_drive(root) else "on this machine's disk (lost with the runtime)"
    print(f"fastsd home: {root}  ({on_drive})")
    return root


def _on_drive(path: Path) -> bool:
    from .paths import drive_dir

    drive = drive_dir()
    return drive is not None and (path == drive or drive in path.parents)


# ---------------------------------------------------------------- models


def model_path(spec: str, *, home: str | os.PathLike[str] | None = None, diffusers: bool = False) -> Path | None:
    """A model for a form field (blank: None), through :func:`fastsd.models.load.local_model`.

    Args:
        spec: a path, a registry name (``sd15``, ``sdxl``...), ``hf:org/repo``, or a URL.
        home: the fastsd home downloads go to.
        diffusers: the caller needs a Diffusers folder (training): a single file is converted once
            into the local conversion cache.

    Raises:
        UserInputError: a path that does not exist and is no downloadable spec.
        FastsdError: a failed download or conversion.
    """
    from .models.load import local_model

    spec = (spec or "").strip()
    if not spec:
        return None
    if spec.startswith(("/", "./", "~")) and not Path(spec).expanduser().exists():
        raise UserInputError(f"{spec} does not exist: check the path (is Drive connected?)")
    return local_model(spec, want="diffusers" if diffusers else "any", home=home)


# ---------------------------------------------------------------- sessions


def open_session(
    name: str,
    *,
    base_model: str | os.PathLike[str] | None = None,
    resolution: int | None = None,
    instance_token: str = "sks",
    class_word: str = "person",
    home: str | os.PathLike[str] | None = None,
) -> Session:
    """Open the session ``name`` (saying where it stands), or create it.

    A session that has not trained yet takes the form's values; one that has keeps its base
    model, subject and size (changing them mid-training would spoil it) and says so.

    Raises:
        UserInputError: a bad name, or a session folder whose ``session.json`` is unreadable.
    """
    from .session import Session, normalize_name

    name = normalize_name(name)
    root = fastsd_home(home)
    wanted = {
        "base_model": str(base_model) if base_model else None,
        "resolution": int(resolution) if resolution else None,  # 0/None: the base model's native size
        "instance_token": instance_token.strip() or "sks",
        "class_word": class_word.strip(),
    }
    if not (root / "sessions" / name / "session.json").is_file():
        session = Session.create(name, root, **wanted)
        print(f"created session {name} in {session.path}")
        return session
    session = Session.open(name, root)
    trained = bool((session.info.get("progress") or {}).get("step")) or bool(session.checkpoints())
    changes = {k: v for k, v in wanted.items() if v is not None and session.info.get(k) != v}
    if changes and not trained:
        session.update(**changes)
    elif changes:
        kept = ", ".join(f"{k} {session.info.get(k)!r} (form: {v!r})" for k, v in changes.items())
        print(f"session {name} has trained already, so it keeps its settings: {kept}")
    print(session_status(session))
    return session


def session_status(session: Session) -> str:
    """What the session holds and what to do next, in plain words (also offers to resume)."""
    lines = [session.describe()]
    progress = session.info.get("progress") or {}
    step, total = int(progress.get("step") or 0), progress.get("total_steps")
    latest = session.latest_checkpoint()
    if not session.images():
        lines.append("next: add images (the Images cell)")
    elif latest and total and latest["step"] < total:
        lines.append(
            f"training stopped at step {latest['step']} of {total}: run the Train cell with 'resume' ticked "
            "to continue from there"
        )
    elif latest and total and latest["step"] >= total:
        lines.append(
            "training is complete: try the model, or raise the steps and run Train with 'resume' ticked to go on"
        )
    elif step == 0:
        lines.append("next: check the captions, then train")
    return "\n".join(lines)


# ---------------------------------------------------------------- images and uploads


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


def _upload_folder(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=_mkdir(cache_dir() / "uploads")))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _colab_files() -> list[tuple[str, bytes]]:
    """Colab's upload dialog; Colab's own copies of the files in the working folder are removed."""
    from .colab import upload_files

    uploaded = upload_files()
    for name, data in uploaded.items():
        copy = Path.cwd() / Path(name).name
        if copy.is_file() and copy.stat().st_size == len(data):
            copy.unlink()
    return list(uploaded.items())


def _upload_widget(on_files: Callable[[list[tuple[str, bytes]]], None], accept: str, label: str) -> Any:
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


def add_images(session: Session, source: str = "", *, crop: str = "smart", size: int | None = None) -> Any:
    """Add instance images: from ``source`` (Drive folders, files or zips, comma-separated), else an upload.

    Args:
        session: the session.
        source: paths, comma- or newline-separated; blank opens the upload dialog.
        crop: ``smart`` (around faces/the subject), ``center`` or ``none``.
        size: crop size; default the session's resolution.

    Returns:
        The :class:`~fastsd.images.AddReport` (its summary is printed); outside Colab, with no
        ``source``, the upload widget shown instead (the files are added when its button is pressed).
    """
    paths = _split(source)
    if not paths:
        return upload_images(session, crop=crop, size=size)
    report = session.add_images(paths, crop=crop, size=size)
    print(report.summary())
    return report


def upload_images(session: Session, *, crop: str = "smart", size: int | None = None) -> Any:
    """Upload photos (and zips, and ``.txt`` captions) from this computer into the session.

    In Colab this is Colab's upload dialog and returns the :class:`~fastsd.images.AddReport`;
    elsewhere a ``FileUpload`` widget with an "Add to session" button is shown and returned.
    """
    if environment() == "colab":
        return _add_uploads(session, _colab_files(), crop, size)
    return _upload_widget(
        lambda entries: _add_uploads(session, entries, crop, size), "image/*,.zip,.txt,.heic,.heif", "Add to session"
    )


def _add_uploads(session: Session, entries: list[tuple[str, bytes]], crop: str, size: int | None) -> AddReport:
    if not entries:
        raise UserInputError("nothing was uploaded: choose files in the dialog, or give a folder on Drive")
    folder = _upload_folder("images")
    try:
        save_uploads(entries, folder)
        report = session.add_images(folder, crop=crop, size=size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(report.summary())
    return report


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


def auto_caption(
    session: Session, engine: str = "off", *, style: str = "sentence", base_url: str = "", model: str = ""
) -> Any:
    """The notebook's optional captioning step before the editor (``fastsd caption`` in a cell).

    ``engine`` ``off`` does nothing; ``local`` or ``openai`` captions the images that have no caption
    yet, printing each, and frees the model afterwards so training has the GPU.
    Returns the :class:`fastsd.vlm.caption.CaptionRun`, or None when off.
    """
    if engine == "off":
        return None
    from .vlm.caption import caption_session
    from .vlm.engines import make_engine

    def show(name: str, text: str | None, error: str | None) -> None:
        print(f"{name}: {text}" if error is None else f"failed: {name}: {error}")

    vlm = make_engine(engine, model=model.strip() or None, base_url=base_url.strip() or None)
    try:
        run = caption_session(session, vlm, style=style, progress=show)
    finally:
        vlm.close()
    print(run.summary())
    return run


def caption_editor(session: Session, *, thumb: int = 128) -> CaptionEditor:
    """Show the caption editor for a session's images (list, preview, edit, save); returns it."""
    from IPython.display import display

    editor = CaptionEditor(session, thumb=thumb)
    display(editor.widget)
    return editor


# ---------------------------------------------------------------- training


def train_config(
    session: Session,
    *,
    method: str = "full",
    steps: int = 0,
    text_encoder_steps: int = -1,
    learning_rate: float = 0.0,
    resolution: int = 0,
    save_every: int = TrainConfig.save_every,
    sample_every: int = 0,
    sample_prompt: str = "",
    prior_preservation: bool = False,
    class_images: int = TrainConfig.num_class_images,
    resume: bool = True,
    **extra: Any,
) -> Any:
    """A :class:`fastsd.train.TrainConfig` from the Train form; 0 / -1 / blank mean "the default".

    Args:
        method: ``full`` or ``lora``.
        steps: UNet steps (0: the method's default).
        text_encoder_steps: text-encoder steps (-1: the method's default; 0: frozen).
        learning_rate: UNet learning rate (0: the method's default).
        resolution: training size (0: the session's, else the base model's native size).
        save_every: resumable checkpoint every N steps (on Drive).
        sample_every: sample images every N steps (0: none).
        sample_prompt: prompt for samples (blank: ``a photo of <token> <class>``).
        prior_preservation / class_images: prior-preservation loss with this many class images.
        resume: continue from the latest complete checkpoint when there is one.
        extra: any other :class:`~fastsd.train.TrainConfig` field.
    """
    return TrainConfig(
        method=method,
        unet_steps=steps or None,
        te_steps=None if text_encoder_steps < 0 else text_encoder_steps,
        unet_lr=learning_rate or None,
        resolution=resolution or None,  # None: the session's, else the base model's native size (resolve)
        save_every=save_every,
        sample_every=sample_every,
        sample_prompts=[sample_prompt.strip()] if sample_prompt.strip() else [],
        prior_preservation=prior_preservation,
        num_class_images=class_images,
        resume=resume,
        **extra,
    )


def train(session: Session, *, score: str = "auto", **form: Any) -> Any:
    """Train the session with the Train form's values (see :func:`train_config`); samples show inline.

    ``score`` (``auto``: on GPUs) scores the final export with :func:`fastsd.eval.evaluate` and
    shows the table and image grid (:func:`show_eval`).

    Re-running the cell continues from the latest checkpoint (``resume``); when training is
    already complete it says so instead of starting over.

    Returns:
        The :class:`fastsd.train.TrainResult`, or None when there was nothing left to train.
    """
    from .train import resolve
    from .train import train as run_train

    config = train_config(session, **form)
    resolved, _ = resolve(config, session_info=session.info, num_images=len(session.images()))
    latest = session.latest_checkpoint()
    if config.resume and latest and latest["step"] >= resolved.total_steps:
        print(
            f"session {session.name} is trained to step {latest['step']} of {resolved.total_steps} already: "
            "raise the steps to train more, or untick resume to start over"
        )
        return None

    def on_sample(step: int, paths: list[Path]) -> None:
        show_images(paths, columns=min(4, len(paths)), titles=[f"step {step}: {Path(p).name}" for p in paths])

    result = run_train(session, config, on_sample=on_sample)
    print(result.summary())
    wanted = {"on": True, "off": False}.get(str(score))
    if wanted is None:
        import torch

        wanted = torch.cuda.is_available()
    if wanted and not result.stopped and result.models:
        from .eval import evaluate

        evaluate(session, export=result.models[-1], steps=config.sample_steps, size=config.resolution)
        show_eval(session)
    return result


def show_eval(session: Session) -> Any:
    """The likeness scores of every scored export as a small table, and the latest one's image grid."""
    from IPython.display import HTML, display

    rows = []
    for m in session.models():
        scores = m["eval"].get("metrics") if isinstance(m.get("eval"), dict) else None
        if isinstance(scores, dict):
            rows.append((Path(m["file"]).name, {k: v for k, v in scores.items() if isinstance(v, (int, float))}))
    if not rows:
        print(f"no export of {session.name} has scores yet")
        return None
    names = sorted({k for _, r in rows for k in r}, key=["dino", "clip_i", "clip_t", "pres", "div_dino"].index)
    head = "".join(f"<th>{html.escape(n.upper().replace('_', '-'))}</th>" for n in names)
    body = "".join(
        f"<tr><td><code>{html.escape(name)}</code></td>"
        + "".join(f"<td>{r[n]:.3f}</td>" if n in r else "<td>-</td>" for n in names)
        + "</tr>"
        for name, r in rows
    )
    table = HTML(f"<table><tr><th>export</th>{head}</tr>{body}</table>")
    display(table)
    latest = session.latest_model() or {}
    grid = (latest.get("eval") or {}).get("grid") if isinstance(latest.get("eval"), dict) else None
    if isinstance(grid, str) and (session.path / grid).resolve().parent == session.samples_dir.resolve():
        show_images([session.path / grid], columns=1, titles=["eval images (prompt per row)"])
    return table


# ---------------------------------------------------------------- trying the model

#: Built-in servers started by :func:`try_model`, by session name (one per session; re-runs reuse it).
_TRY_SERVERS: dict[str, tuple[str, Any]] = {}


def latest_model(session: Session) -> dict[str, Any]:
    """The session's newest exported model entry (by step, then listing order).

    Raises:
        UserInputError: nothing exported yet.
    """
    entry = session.latest_model()
    if entry is None:
        raise UserInputError(f"session {session.name} has no exported model yet: run the Train cell first")
    return entry


def try_model(
    session: Session,
    prompt: str = "",
    *,
    count: int = 4,
    steps: int = 25,
    seed: int = -1,
    cfg_scale: float = 7.0,
    size: int = 0,
    show_ui: bool = False,
    home: str | os.PathLike[str] | None = None,
) -> Any:
    """Generate a grid with the session's newest model in the built-in web UI, optionally shown inline.

    A full model is loaded as the checkpoint; a LoRA is applied to the session's base model
    (``<lora:name:1>`` in the prompt). The server stays up for the next run of the cell (same
    model: reused) and for the inline UI.

    Returns:
        The server handle (``.url``, ``.stop()``).

    Raises:
        UserInputError: nothing exported yet, or a LoRA whose session has no base model.
        FastsdError: the server did not start or the generation failed (with the server's reason).
    """
    import httpx

    entry = latest_model(session)
    file = session.path / entry["file"]
    prompt = prompt.strip() or f"a photo of {session.default_prompt()}"
    if entry["kind"] == "lora":
        model = str(session.info.get("base_model") or "")
        if not model:
            raise UserInputError(f"session {session.name} has no base model to apply its LoRA to: run the Session cell")
        prompt = f"{prompt} <lora:{file.stem}:1>"
    else:
        model = str(file)
    handle = _try_server(session.name, model, home)
    size = int(size or session.training_size())
    with contextlib.suppress(httpx.HTTPError):  # a reused server: list the LoRA a new run exported
        httpx.post(f"{handle.url}/sdapi/v1/refresh-loras", timeout=60)
    body = {
        "prompt": prompt,
        "steps": int(steps),
        "batch_size": int(count),
        "seed": int(seed),
        "cfg_scale": float(cfg_scale),
        "width": size,
        "height": size,
        "save_images": True,
    }
    try:
        reply = httpx.post(f"{handle.url}/sdapi/v1/txt2img", json=body, timeout=None)
    except httpx.HTTPError as err:
        raise FastsdError(f"the built-in web UI did not answer ({err}): run the cell again") from err
    if reply.status_code != 200:
        detail = reply.text[:300]
        raise FastsdError(f"generating failed ({reply.status_code}): {detail}")
    data = reply.json()
    images = [_decode_png(s) for s in data.get("images", [])]
    seeds = (json.loads(data.get("info") or "{}") or {}).get("all_seeds") or []
    titles = [f"seed {s}" for s in seeds] if len(seeds) == len(images) else None
    show_images(images, columns=min(4, max(1, len(images))), titles=titles, size=max(256, min(size, 512)))
    if show_ui:
        handle.show()
    return handle


def _decode_png(data: str) -> Image.Image:
    from PIL import Image

    raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data)
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


def _try_server(key: str, model: str, home: str | os.PathLike[str] | None) -> Any:
    from .webui import server

    running = _TRY_SERVERS.get(key)
    if running is not None:
        if running[0] == model and getattr(running[1], "running", True):
            return running[1]
        running[1].stop()
        del _TRY_SERVERS[key]
    handle = server.start(model, host="127.0.0.1", port=0, home=fastsd_home(home))
    _TRY_SERVERS[key] = (model, handle)
    return handle


# ---------------------------------------------------------------- exports and freeing space


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def exports(session: Session, *, download: bool = False) -> list[Path]:
    """List the session's exported models (path, kind, step, size); optionally download the newest.

    Returns:
        The model files, oldest first.
    """
    files = []
    for m in session.models():
        path = session.path / m["file"]
        files.append(path)
        step = f", step {m['step']}" if m.get("step") is not None else ""
        print(f"{path}  ({m['kind']}{step}, {human_size(m['size'])})")
    if not files:
        print(f"session {session.name} has no exported model yet: run the Train cell first")
        return files
    print("web UIs started by fastsd list these models by themselves; A1111/ComfyUI elsewhere: copy the file")
    if download:
        newest = session.path / latest_model(session)["file"]
        if environment() == "colab":
            from .colab import download_file

            download_file(newest)
        else:
            print(f"download: not in Colab; the file is {newest}")
    return files


class RemoveConfirm:
    """A delete button that asks before deleting a session, or only its checkpoints.

    ``what``: ``session`` (everything) or ``checkpoints`` (the resumable states, the bulk of a
    session; exported models, images and captions stay). :meth:`request`, :meth:`confirm` and
    :meth:`cancel` are what the buttons call (and what the tests call).
    """

    def __init__(self, name: str, *, home: str | os.PathLike[str] | None = None, what: str = "session") -> None:
        import ipywidgets as w

        from .session import Session

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
            from .session import remove_session

            path = remove_session(self.session.name, self.home)
            text = f"deleted session {self.session.name} ({path})"
        else:
            with self.session.lock(command="delete checkpoints"):
                steps = self.session.prune_checkpoints(0)
            text = f"deleted checkpoint(s) of step {', '.join(map(str, steps))}" if steps else "no checkpoints"
        if _on_drive(self.session.path):
            text += "; Drive keeps deleted files in its trash for 30 days: empty the trash to get the space now"
        self.done = True
        self.message.value = html.escape(text)
        return text

    def cancel(self) -> str:
        self.choice.layout.display = "none"
        self.message.value = "kept"
        return "kept"


def confirm_remove(
    session_name: str, home: str | os.PathLike[str] | None = None, *, what: str = "session"
) -> RemoveConfirm:
    """Show a delete button with a confirmation step (never ``input()``); returns it."""
    from IPython.display import display

    remover = RemoveConfirm(session_name, home=home, what=what)
    display(remover.widget)
    return remover


# ---------------------------------------------------------------- web UI

#: The web UI a notebook started (one per kernel: starting another stops it first).
_WEBUI: dict[str, Any] = {}


def webui(
    backend: str = "builtin",
    *,
    model: str | os.PathLike[str] | None = None,
    tunnel: str = "auto",
    user: str = "",
    password: str = "",
    controlnet: str = "",
    extensions: str = "",
    port: int = 0,
    ngrok_token: str = "",
    home: str | os.PathLike[str] | None = None,
    timeout: float = 900.0,
) -> Any:
    """Start a web UI in the background and print its URL; a UI started earlier by this kernel stops first.

    Args:
        backend: ``builtin``, ``a1111``, ``forge`` or ``comfyui``.
        model: a model file/folder to load first (see :func:`model_path`); A1111, Forge and ComfyUI
            get a Diffusers folder converted once to a single file (:func:`fastsd.models.load.local_model`).
        tunnel: ``auto`` (Colab's proxy in Colab, else none), ``colab``, ``ngrok``, ``cloudflared``,
            ``localtunnel``, ``gradio`` (built-in only) or ``none``.
        user / password: a login for the UI; blank: none, or a generated one when the tunnel is public.
        controlnet / extensions: comma-separated ControlNet names and extension git URLs.
        port: local port (0: the backend's default).
        ngrok_token: blank: ``NGROK_AUTHTOKEN`` from the environment or Colab's secrets.
        timeout: seconds to wait for a backend's first start (installs take minutes).

    Returns:
        The :class:`fastsd.launch.launcher.RunningUI` (``.url``, ``.stop()``, ``.log_tail()``).

    Raises:
        FastsdError: the UI did not start (the message carries the cause and the log's last lines).
    """
    from .launch.launcher import WebUIOptions, start

    if bool(user.strip()) != bool(password):
        raise UserInputError("give both a username and a password for the login, or neither")
    if _WEBUI:
        stop_webui()
    opts = WebUIOptions(
        backend=backend,
        tunnel=None if tunnel in ("", "auto") else tunnel,
        model=str(model) if model else None,
        port=port or None,
        auth=f"{user.strip()}:{password}" if password else None,
        controlnet=_split(controlnet),
        extensions=_split(extensions),
        ngrok_token=ngrok_token.strip() or None,
        timeout=timeout,
        root=str(fastsd_home(home)),
    )
    ui = start(opts)
    ui.detach()
    _WEBUI["ui"] = ui
    print(f"open the web UI: {ui.url}")
    if ui.log_path:
        print(f"log: {ui.log_path}")
    return ui


def list_models(home: str | os.PathLike[str] | None = None) -> None:
    """Print the models every web UI started by fastsd lists (``<home>/models`` and sessions' exports)."""
    from .launch.modelfolders import collect_models

    found = collect_models(fastsd_home(home))
    if not found:
        print("no model files in fastsd/models or in sessions yet")
    for kind, rel, _ in found:
        print(f"{kind:<10} {rel}")


def stop_webui() -> None:
    """Stop the web UI this kernel started, if any."""
    ui = _WEBUI.pop("ui", None)
    if ui is None:
        print("no web UI is running")
        return
    ui.stop()
    print(f"stopped the {ui.backend} web UI")


def _split(text: str) -> list[str]:
    return [p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip()]


# ---------------------------------------------------------------- OCR


def ocr_inputs(source: str = "") -> Any:
    """The files to OCR: ``source`` paths (comma-separated files, folders, globs), else an upload.

    Returns:
        The input paths; outside Colab with no ``source``, the upload widget shown instead, whose
        button saves the files and prints the folder to put in the documents field.
    """
    paths = _split(source)
    if paths:
        missing = [p for p in paths if not any(c in p for c in "*?[") and not Path(p).expanduser().exists()]
        if missing:
            raise UserInputError(f"not found: {', '.join(missing)}: check the paths (is Drive connected?)")
        return [Path(p).expanduser() for p in paths]
    if environment() == "colab":
        entries = _colab_files()
        if not entries:
            raise UserInputError("nothing was uploaded: choose files in the dialog, or give a path")
        folder = _upload_folder("ocr")
        files = save_uploads(entries, folder)
        print(f"uploaded {len(files)} file(s): {', '.join(p.name for p in files)}")
        return [folder]

    def saved(entries: list[tuple[str, bytes]]) -> None:
        folder = _upload_folder("ocr")
        save_uploads(entries, folder)
        print(
            f"saved {len(entries)} file(s) in {folder}: put this folder in the documents field and run the cell again"
        )

    return _upload_widget(saved, ".pdf,image/*,.tif,.tiff", "Save files")


def ocr(
    inputs: Sequence[str | os.PathLike[str]] | None,
    *,
    task: str = "text",
    schema: str = "",
    pages: str = "",
    dpi: int = 200,
    quantize: str = "none",
    model: str = "",
    batch_size: int = 0,
    max_tokens: int = 0,
    out: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """Run OCR with a progress bar; results are written page by page under ``<home>/ocr`` (Drive).

    Args:
        inputs: from :func:`ocr_inputs`.
        task: ``text`` (Markdown), ``table`` (HTML), ``formula`` (LaTeX) or ``extract`` (JSON).
        schema: for ``extract``: JSON text (a template such as ``{"total": ""}`` or a JSON Schema)
            or the path of a JSON file.
        pages: page ranges such as ``1-5,8``; blank: all.
        dpi: PDF render resolution.
        quantize: ``none``, ``8bit`` or ``4bit``.
        model: GLM-OCR Hub id or local folder; blank: the default model.
        batch_size: pages per batch; 0 sizes batches from free VRAM.
        max_tokens: most tokens generated per page (0: the default); a cap on runaway pages.
        out: output folder (default ``<home>/ocr``).

    Returns:
        The :class:`fastsd.ocr.PageResult` of every page (skipped ones: done by an earlier run).
    """
    from .ocr import ocr as run_ocr

    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise UserInputError("no input files: run the Documents cell first (a path, or the folder of an upload)")
    options: dict[str, Any] = {
        "task": task,
        "schema": _schema(schema),
        "pages": pages.strip() or None,
        "dpi": int(dpi),
        "quantize": quantize,
        "batch_size": int(batch_size) or None,
        "out": out,
        "root": str(fastsd_home(home)),
    }
    if model.strip():
        options["model"] = model.strip()
    if max_tokens:
        options["max_new_tokens"] = int(max_tokens)
    run = run_ocr([str(p) for p in inputs], **options)
    results = list(run)
    s = run.summary
    print(
        f"OCR: {s.documents} document(s), {s.pages} page(s): {s.done} done, {s.skipped} already done earlier, "
        f"{s.warnings} with warnings, in {s.seconds:.1f} s; results in {s.out_dir}"
    )
    for source, reason in s.failed:
        print(f"  failed: {source}: {reason}")
    return results


def _schema(text: str) -> Any:
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as err:
            raise UserInputError(f"the schema is not valid JSON ({err}): fix it, or give a .json file") from err
    return text


def preview_markdown(result: Any) -> str:
    """A page result as Markdown: text as is, tables (HTML) as is, formulas in ``$$``, JSON in a code block."""
    head = f"**{result.document}, page {result.page}**" + (" (from an earlier run)" if result.skipped else "")
    if result.task == "formula":
        body = f"$$\n{result.text.strip()}\n$$"
    elif result.task == "extract":
        data = result.data if result.data is not None else result.text
        body = "```json\n" + (json.dumps(data, indent=2, ensure_ascii=False) if not isinstance(data, str) else data)
        body += "\n```"
    else:
        body = result.text
    warn = "".join(f"\n\n> warning: {w}" for w in result.warnings)
    return f"{head}\n\n{body}{warn}"


def preview_ocr(results: Sequence[Any] | None, pages: int = 3) -> None:
    """Show the first ``pages`` results inline as Markdown, with where the files are."""
    from IPython.display import Markdown, display

    if not results:
        print("nothing to preview: run the OCR cell first")
        return
    for result in list(results)[: max(1, int(pages))]:
        display(Markdown(preview_markdown(result)))
    folders = sorted({r.folder for r in results if r.folder})
    print("files: " + ", ".join(folders))
