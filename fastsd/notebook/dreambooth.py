"""The DreamBooth notebook: sessions, images, captions (with the optional auto-caption step),
training with inline samples, the eval table, trying the model, exports and freeing space.

Re-running a cell is safe: sessions are opened when they exist, training resumes from the latest
checkpoint, and :func:`try_model` reuses the built-in server it started for the same model.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FastsdError, UserInputError
from ..paths import fastsd_home
from ..runtime import environment
from ..session import human_size
from ..train.config import TrainConfig
from .fields import split_field
from .widgets import CaptionEditor, RemoveConfirm, colab_files, save_uploads, show_images, upload_folder, upload_widget

if TYPE_CHECKING:
    from PIL import Image

    from ..images import AddReport
    from ..session import Session


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
    from ..session import Session, normalize_name

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
    paths = split_field(source)
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
        return _add_uploads(session, colab_files(), crop, size)
    return upload_widget(
        lambda entries: _add_uploads(session, entries, crop, size), "image/*,.zip,.txt,.heic,.heif", "Add to session"
    )


def _add_uploads(session: Session, entries: list[tuple[str, bytes]], crop: str, size: int | None) -> AddReport:
    if not entries:
        raise UserInputError("nothing was uploaded: choose files in the dialog, or give a folder on Drive")
    folder = upload_folder("images")
    try:
        save_uploads(entries, folder)
        report = session.add_images(folder, crop=crop, size=size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(report.summary())
    return report


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
    from ..vlm.caption import caption_session
    from ..vlm.engines import make_engine

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
    method: str = "auto",
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
        method: ``auto`` (``full``; ``lora`` for SD3.5/FLUX.1), ``full`` or ``lora``.
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
    from ..train import resolve
    from ..train import train as run_train

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
        from ..eval import evaluate

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
    from ..eval.run import METRICS

    names = [n for n in METRICS if any(n in r for _, r in rows)]
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
    from ..webui import server

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
            from ..colab import download_file

            download_file(newest)
        else:
            print(f"download: not in Colab; the file is {newest}")
    return files


def confirm_remove(
    session_name: str, home: str | os.PathLike[str] | None = None, *, what: str = "session"
) -> RemoveConfirm:
    """Show a delete button with a confirmation step (never ``input()``); returns it."""
    from IPython.display import display

    remover = RemoveConfirm(session_name, home=home, what=what)
    display(remover.widget)
    return remover
