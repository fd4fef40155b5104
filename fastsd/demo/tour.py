"""``fastsd demo``: the main job end to end, through the library's real calls, offline and without a GPU.

The tour, one step at a time (each a small function of :class:`Tour`): get the models (tiny
random-weight SD1 and GLM-OCR built into the local cache, or ``--model``), create a session from
generated photos, train a LoRA and export it, start the built-in server, generate an image with
the LoRA through the A1111 API over HTTP, convert the model to a single file, OCR a generated PDF
page, stop the server. Everything lands in the demo's own fastsd home (``<home>/demo``), never in
the user's sessions or models. With the tiny models the images are noise and the OCR text is
gibberish: the tour proves the machinery, not the art.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DemoStepError, FastsdError, UserInputError
from ..paths import fastsd_home, resolve_home

#: The demo's session; its LoRA is exported as ``demo-lora-step-<N>``.
SESSION = "demo"
#: Marks a folder as the demo's own home, so a rerun may replace what an earlier run left there.
MARKER = ".fastsd-demo"
TRAIN_STEPS = 4
TRAIN_RESOLUTION = 64
#: Generation size and steps on the tiny model (a real one uses its native size and 20 steps).
TINY_SIZE, TINY_STEPS = 64, 4
TINY_OCR_TOKENS = 24
PROMPT = "a photo of sks dog"


@dataclass
class StepReport:
    """One finished step: its title, what it did (one line) and how long it took."""

    title: str
    detail: str
    seconds: float


@dataclass
class Tour:
    """What the steps share: settings first, then what earlier steps made."""

    home: Path  # the demo's own fastsd home
    model_spec: str | None  # --model; None: the tiny SD1
    ocr_spec: str | None  # --ocr-model; None: the tiny GLM-OCR
    root: str | None  # the user's fastsd home (--root), where --model specs are found or fetched
    model: Path | None = None  # the base model as a Diffusers folder
    ocr_model: str | None = None
    session: Any = None
    lora: Path | None = None
    server: Any = None
    files: dict[str, Path] = field(default_factory=dict)  # what -> where, in the order made

    @property
    def tiny(self) -> bool:
        return self.model_spec is None


@dataclass
class DemoResult:
    """What :func:`run_demo` did: the steps, the files it made, and the real commands behind them."""

    home: Path
    tiny: bool
    steps: list[StepReport]
    files: dict[str, Path]
    commands: list[str]
    seconds: float

    def report(self) -> str:
        """The lines printed after the steps: where each result is, what it proves, the real commands."""
        width = max(len(label) for label in self.files)
        lines = [f"demo finished in {self.seconds:.0f} s; results (in {self.home}):"]
        lines += [f"  {label + ':':<{width + 1}} {path}" for label, path in self.files.items()]
        if self.tiny:
            lines.append(
                "The image is noise and the OCR text is gibberish: the models have random weights. "
                "This proves the machinery, not the art."
            )
        lines.append("The real thing, on a GPU machine that reaches the Hugging Face Hub:")
        lines += [f"  {command}" for command in self.commands]
        return "\n".join(lines)


# ---- the steps: each returns its one-line detail ----------------------------------------------


def prepare(tour: Tour) -> str:
    """Make the demo home (or reuse an earlier demo's), and get the models."""
    home = tour.home
    if home.is_dir() and any(home.iterdir()) and not (home / MARKER).is_file():
        raise UserInputError(
            f"{home} is not empty and was not made by fastsd demo (no {MARKER} file): "
            "move it away, or pass --root DIR to run the demo in DIR/demo"
        )
    from .. import storage

    fastsd_home(home)
    storage.write_text(home / MARKER, "made by fastsd demo; a rerun replaces its results\n")
    from ..session import list_sessions, remove_session

    if SESSION in list_sessions(home):
        remove_session(SESSION, home)  # refused (locked) while another demo trains in it
    shutil.rmtree(home / "ocr" / "demo-page", ignore_errors=True)  # else the OCR rerun skips the page

    if tour.tiny:
        from .tiny import cached_pipeline

        tour.model = cached_pipeline("sd1")
        model_note = "tiny SD1 (random weights)"
    else:
        from ..models.load import local_model

        tour.model = local_model(tour.model_spec, want="diffusers", home=tour.root)
        model_note = (
            str(tour.model) if Path(str(tour.model_spec)) == tour.model else f"{tour.model_spec} ({tour.model})"
        )
    if tour.ocr_spec is None:
        from .tiny_ocr import cached_glm_ocr

        tour.ocr_model = str(cached_glm_ocr())
        ocr_note = "tiny GLM-OCR (random weights)"
    else:
        tour.ocr_model = ocr_note = tour.ocr_spec
    return f"{model_note} and {ocr_note}"


def make_session(tour: Tour) -> str:
    """Generate photos and add them to a new session, as ``session new`` + ``session add`` do."""
    from ..session import Session
    from .inputs import write_photos

    photos = tour.home / "photos"
    write_photos(photos)
    tour.files["photos"] = photos
    tour.session = Session.create(SESSION, tour.home, base_model=str(tour.model), class_word="dog")
    report = tour.session.add_images(photos, progress=False)
    if report.failed or not tour.session.images():
        raise FastsdError(f"adding the generated photos failed: {report.failed}")
    tour.files["session"] = tour.session.path
    size = tour.session.training_size()
    return f"session {SESSION!r} with {len(tour.session.images())} generated photos, cropped to {size} px"


def train_lora(tour: Tour) -> str:
    """Train a LoRA for a few steps at 64 px and export it (kohya format), as ``fastsd train`` does."""
    from ..train import TrainConfig, train

    config = TrainConfig(
        method="lora", unet_steps=TRAIN_STEPS, resolution=TRAIN_RESOLUTION, save_every=0, seed=0, progress=False
    )
    result = train(tour.session, config)
    if result.stopped or not result.models:
        raise FastsdError(f"training stopped ({result.stopped or 'no LoRA exported'})")
    tour.lora = tour.session.path / result.models[-1]
    tour.files["LoRA"] = tour.lora
    loss = f", last loss {result.final_loss:.3f}" if result.final_loss is not None else ""
    return f"{result.steps} LoRA steps at {TRAIN_RESOLUTION} px{loss}; exported {tour.lora.name}"


def start_server(tour: Tour) -> str:
    """Start the built-in web UI + A1111 API on a free local port."""
    from ..webui.server import start

    tour.server = start(str(tour.model), port=0, home=tour.home, ui=True, quiet=True)
    return f"built-in web UI at {tour.server.url}/ (A1111 API at {tour.server.api_url})"


def txt2img(tour: Tour) -> str:
    """POST /sdapi/v1/txt2img with the LoRA tag in the prompt, as any A1111 client would."""
    from .. import storage
    from ..models.detect import diffusers_family

    assert tour.lora is not None and tour.server is not None
    lora = tour.lora.stem
    size = TINY_SIZE if tour.tiny else diffusers_family(tour.model)["native_resolution"]
    payload = {
        "prompt": f"{PROMPT} <lora:{lora}:1>",
        "negative_prompt": "blurry",
        "steps": TINY_STEPS if tour.tiny else 20,
        "width": size,
        "height": size,
        "seed": 1,
        "sampler_name": "Euler",
        "cfg_scale": 7,
    }
    answer = _post_json(f"{tour.server.api_url}/txt2img", payload)
    info = json.loads(answer["info"])
    applied = info.get("extra_generation_params", {}).get("Lora weights", {})
    if lora not in applied:
        raise FastsdError(f"the server did not apply the LoRA {lora} (applied: {applied or 'none'})")
    path = tour.home / "outputs" / "demo-txt2img.png"
    storage.write_bytes(path, base64.b64decode(answer["images"][0]))
    tour.files["image (txt2img)"] = path
    return f"{size}x{size} image, {payload['steps']} steps, LoRA {lora} applied at weight {applied[lora]:g}"


def to_single_file(tour: Tour) -> str:
    """Convert the base model to one .safetensors file for A1111/Forge/ComfyUI, as ``fastsd convert`` does."""
    from ..models.convert import convert
    from ..session import human_size

    name = "tiny-sd1" if tour.tiny else Path(str(tour.model)).name
    path = convert(tour.model, tour.home / "models" / f"{name}.safetensors", overwrite=True)
    tour.files["single file"] = path
    return f"{path.name} ({human_size(path.stat().st_size)})"


def read_pdf(tour: Tour) -> str:
    """Draw a page of text, save it as a PDF and OCR it to Markdown, as ``fastsd ocr`` does."""
    from ..ocr import ocr
    from .inputs import write_pdf_page

    pdf = write_pdf_page(tour.home / "documents" / "demo-page.pdf")
    tour.files["PDF page"] = pdf
    tiny = tour.ocr_spec is None
    options: dict[str, Any] = {"max_new_tokens": TINY_OCR_TOKENS} if tiny else {}
    job = ocr([pdf], out=tour.home / "ocr", model=tour.ocr_model, local_files_only=tiny, progress=False, **options)
    pages = list(job)
    if job.summary.failed or not pages:
        reasons = "; ".join(f"{src}: {why}" for src, why in job.summary.failed) or "no page was read"
        raise FastsdError(f"OCR of {pdf} failed: {reasons}")
    markdown = Path(pages[0].folder) / "document.md"
    tour.files["OCR (Markdown)"] = markdown
    return f"{len(pages)} page, {pages[0].tokens} tokens{' of gibberish' if tiny else ''} in {markdown.name}"


def stop_server(tour: Tour) -> str:
    """Stop the server and free the model."""
    if tour.server is not None:
        tour.server.stop()
        tour.server = None
    return "stopped, model released"


#: The tour, in order: (title, step).
STEPS: list[tuple[str, Callable[[Tour], str]]] = [
    ("models", prepare),
    ("session", make_session),
    ("train", train_lora),
    ("server", start_server),
    ("txt2img", txt2img),
    ("convert", to_single_file),
    ("ocr", read_pdf),
    ("stop", stop_server),
]


# ---- running the tour --------------------------------------------------------------------------


def run_demo(
    model: str | None = None,
    *,
    ocr_model: str | None = None,
    root: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole tour in ``<home>/demo`` and return where everything is.

    Args:
        model: a base model spec (``sd15``, a path...; found or fetched in the home ``root``);
            default: the tiny random-weight SD1, built once into the local cache.
        ocr_model: a GLM-OCR Hub id or folder; default: the tiny random-weight GLM-OCR.
        root: the fastsd home (the usual rule when None); the demo works in ``<root>/demo``.
        echo: called with one line per finished step (the CLI prints them).

    Raises:
        DemoStepError: a step failed; the message names it and the cause (the server is stopped).

    Example:
        >>> result = run_demo(root="/tmp/fastsd")  # doctest: +SKIP
        >>> print(result.report())  # doctest: +SKIP
    """
    import torch

    tour = Tour(resolve_home(root) / "demo", model, ocr_model, str(root) if root else None)
    start = time.perf_counter()
    done: list[StepReport] = []
    threads = torch.get_num_threads()
    if tour.tiny:
        # Tiny models gain nothing from more threads, and on a busy 2-core machine extra threads
        # made the 4 training steps take 45 s instead of 1.5 s.
        torch.set_num_threads(1)
    try:
        for number, (title, step) in enumerate(STEPS, 1):
            t0 = time.perf_counter()
            try:
                detail = step(tour)
            except ModuleNotFoundError:
                raise  # the CLI says which package is missing and how to install it
            except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the step
                raise DemoStepError(f"demo step {number}/{len(STEPS)} ({title}) failed: {_one_line(err)}", err) from err
            done.append(StepReport(title, detail, time.perf_counter() - t0))
            echo(f"[{number}/{len(STEPS)}] {title:<8} {detail} ({done[-1].seconds:.1f} s)")
    finally:
        if tour.server is not None:
            tour.server.stop()
        torch.set_num_threads(threads)
    return DemoResult(tour.home, tour.tiny, done, tour.files, real_commands(tour), time.perf_counter() - start)


def real_commands(tour: Tour) -> list[str]:
    """The commands that do each step for real (on a GPU, with SD1.5 from the Hub)."""
    base = tour.model_spec or "sd15"
    folder = tour.model if not tour.tiny else resolve_home(tour.root) / "models" / "sd15"
    return [
        f"fastsd session new mydog --base-model {base} --class dog",
        "fastsd session add mydog ./photos",
        "fastsd train mydog --method lora",
        "fastsd webui --backend builtin   # A1111 API; prompt: a photo of sks dog <lora:mydog-lora-step-1000:1>",
        f"fastsd convert {folder} model.safetensors",
        "fastsd ocr scan.pdf   # GLM-OCR (zai-org/GLM-OCR) to Markdown",
    ]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, FastsdError) else f"{type(err).__name__}: {text}"


def _post_json(url: str, payload: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """POST JSON to the local server (never through a proxy) and return the JSON answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise FastsdError(f"{url} answered HTTP {err.code}: {detail}") from err
