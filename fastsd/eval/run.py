"""``fastsd eval``: generate the paper's prompt set with a session's export and score it against the photos.

For one export (the latest by default): each evaluation prompt is generated ``images_per_prompt``
times with fixed seeds (image j of prompt i uses seed ``seed + i * images_per_prompt + j``, so two
exports see the same noise), then DINO, CLIP-I and CLIP-T are computed (see
:mod:`fastsd.eval.metrics`). With ``prior`` (the session trained with prior preservation), the
bare class prompt is generated too, for PRES, and DIV is computed: LPIPS between the images of
each prompt (:mod:`fastsd.eval.lpips`), or ``div_dino`` when the LPIPS weights are not available
(the result's settings say why). The numbers are recorded on the export's
entry in ``session.json`` (``session show`` lists them), written to TensorBoard under
``logs/eval`` and returned with a contact sheet of the images in ``samples/``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError

log = logging.getLogger(__name__)

#: What each number means, for tables and TensorBoard.
METRICS = {
    "dino": "DINO ViT-S/16 similarity to the photos (higher: more like the subject)",
    "clip_i": "CLIP image similarity to the photos (higher: more like the subject)",
    "clip_t": "CLIP similarity of each image to its prompt (higher: follows prompts)",
    "pres": "DINO similarity of class-prompt images to the photos (lower: prior preserved)",
    "div": "LPIPS (AlexNet, v0.1) between a prompt's images (higher: more diverse)",
    "div_dino": "1 - DINO similarity within a prompt's images (higher: more diverse; stands in for LPIPS)",
}


@dataclass
class EvalResult:
    """The scores of one export, and where its images went."""

    export: str
    step: int | None
    metrics: dict[str, float]
    prompts: int
    images_per_prompt: int
    seconds: float
    grid: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "prompts": self.prompts,
            "images_per_prompt": self.images_per_prompt,
            "seconds": round(self.seconds, 1),
            "grid": self.grid,
            **self.settings,
        }


def pick_export(session: Any, export: str | None) -> dict[str, Any]:
    """The session's model entry to evaluate: ``export`` (file name or path), else the latest by step."""
    models = session.models()
    if not models:
        raise UserInputError(f"session {session.name} has no exported model yet: train it first (fastsd train)")
    if export:
        for m in models:
            if export in (m["file"], Path(m["file"]).name, Path(m["file"]).stem):
                return m
        names = ", ".join(Path(m["file"]).name for m in models)
        raise UserInputError(f"session {session.name} has no export {export!r}; it has {names}")
    return session.latest_model()


def _pipeline(session: Any, entry: dict[str, Any], dtype: Any, device: str) -> Any:
    from ..models.load import load_pipeline

    home = session.path.parent.parent
    path = session.path / entry["file"]
    if entry.get("kind") == "lora":
        base = session.info.get("base_model")
        if not base:
            raise UserInputError(f"session {session.name} has a LoRA export but no base model to apply it to")
        pipe = load_pipeline(base, torch_dtype=dtype, home=home)
        pipe.load_lora_weights(str(path))
    else:
        base = Path(session.info.get("base_model") or "").expanduser()
        config = base if base.is_dir() and (base / "model_index.json").is_file() else None  # the export's own configs
        pipe = load_pipeline(path, torch_dtype=dtype, home=home, config=config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _lpips(spec: str | None, home: str | os.PathLike[str] | None) -> tuple[Any, str]:
    """The LPIPS network for DIV (on the CPU until scoring), or None and why DIV is ``div_dino`` instead.

    ``spec`` names the weights (registry name, Hub id or folder) and must load; without one the
    default ``lpips-alex`` is fetched, and when it cannot be (no network, a changed file) DIV falls
    back to ``div_dino`` with the reason, so an offline run still scores. ``off`` skips LPIPS.
    """
    from ..errors import ModelFormatError, NetworkError
    from ..models.registry import DEFAULT_LPIPS
    from .lpips import load_lpips
    from .scorers import model_folder

    if spec == "off":
        return None, "LPIPS turned off (--lpips off)"
    try:
        return load_lpips(model_folder(spec or DEFAULT_LPIPS, home, "--lpips")), ""
    except (NetworkError, ModelFormatError) as err:
        if spec:
            raise
        log.warning("DIV is div_dino (1 - DINO similarity), not LPIPS: %s", err)
        return None, f"the LPIPS weights ({DEFAULT_LPIPS}) are not available: {err}"


def _generate(pipe: Any, prompts: list[str], n: int, seed: int, size: int, steps: int, device: str) -> list[Any]:
    """``n`` images per prompt, image j of prompt i from seed ``seed + i*n + j``; one prompt per call."""
    import torch

    images = []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator("cpu").manual_seed(seed + i * n + j) for j in range(n)]
        out = pipe(
            prompt,
            num_images_per_prompt=n,
            generator=gens,
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=7.5,
        )
        images += out.images
    return images


def _contact_sheet(images: list[Any], columns: int, cell: int = 128) -> Any:
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for k, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((cell, cell)), ((k % columns) * cell, (k // columns) * cell))
    return sheet


def _tensorboard(session: Any, entry: dict[str, Any], metrics: dict[str, float]) -> None:
    """Scalars under ``eval/<metric>`` at the export's step, in the session's ``logs/eval``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: eval scores are in session.json only")
        return
    from .. import storage

    with tempfile.TemporaryDirectory(prefix="fastsd-eval-tb-") as tmp:  # event files never written on Drive
        writer = SummaryWriter(tmp)
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, global_step=entry.get("step") or 0)
        writer.close()
        dest = session.logs_dir / "eval"
        for f in Path(tmp).iterdir():
            storage.copy_file(f, dest / f"{Path(entry['file']).stem}.{f.name}", verify_sha256=False)


def evaluate(
    session: Any,
    *,
    export: str | None = None,
    dino: str | None = None,
    clip: str | None = None,
    lpips: str | None = None,
    prompts: int | None = None,
    images_per_prompt: int = 4,
    prior: bool | None = None,
    seed: int = 0,
    steps: int = 50,
    size: int | None = None,
    device: str | None = None,
    home: str | os.PathLike[str] | None = None,
) -> EvalResult:
    """Score one export of ``session`` (a :class:`fastsd.session.Session`); see the module docstring.

    Args:
        export: export file name (default: the latest).
        dino, clip: scoring models (registry names, Hub ids or folders).
        lpips: LPIPS weights for DIV (a name, Hub id or folder with the two files of
            :mod:`fastsd.eval.lpips`); default ``lpips-alex`` if it can be fetched, else DIV is
            ``div_dino``; ``off``: ``div_dino``.
        prompts: use only the first N evaluation prompts (default all 25).
        images_per_prompt: images per prompt (the paper's 4).
        prior: also PRES and DIV (default: when the session has class images). DIV is the paper's:
            mean LPIPS between the images of one evaluation prompt, averaged over prompts.
        seed, steps, size: generation settings (size: default the session's training size).
    """
    import torch

    from ..models.registry import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_LPIPS
    from .lpips import within_group_lpips
    from .metrics import mean_matched_cosine, mean_pairwise_cosine, within_group_diversity
    from .prompts import class_prompt, eval_prompts

    photos = session.images()
    if not photos:
        raise UserInputError(f"session {session.name} has no instance images to compare with")
    if images_per_prompt < 1 or (prompts is not None and prompts < 1):
        raise UserInputError("--prompts and --images-per-prompt must be at least 1")
    entry = pick_export(session, export)
    token = session.info.get("instance_token") or ""
    cls = session.info.get("class_word") or "subject"
    pairs = eval_prompts(token, cls, prompts)
    if prior is None:
        prior = any((session.path / "class_images").glob("*/*"))
    if prior and images_per_prompt < 2:
        raise UserInputError("DIV compares images of one prompt: use --images-per-prompt 2 or more with --prior")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    size = size or session.training_size()
    start = time.perf_counter()
    from .scorers import Scorers, model_folder

    # the scoring models are fetched before minutes of generation, so a missing one fails first
    dino = str(model_folder(dino or DEFAULT_DINO, home, "--dino"))
    clip = str(model_folder(clip or DEFAULT_CLIP, home, "--clip"))
    lpips_model, div_fallback = _lpips(lpips, home) if prior else (None, "")

    from PIL import Image

    real = []
    for p in photos:
        with Image.open(p) as im:
            real.append(im.convert("RGB"))
    pipe = _pipeline(session, entry, dtype, device)
    try:
        generated = _generate(pipe, [p for p, _ in pairs], images_per_prompt, seed, size, steps, device)
        class_images = (
            _generate(pipe, [class_prompt(cls)] * 1, max(images_per_prompt, 4), seed + 10_000, size, steps, device)
            if prior
            else []
        )
    finally:
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    scorers = Scorers(dino, clip, device=device, home=home)
    try:
        real_dino, gen_dino = scorers.dino_embed(real), scorers.dino_embed(generated)
        real_clip, gen_clip = scorers.clip_image_embed(real), scorers.clip_image_embed(generated)
        texts = [t for _, t in pairs for _ in range(images_per_prompt)]
        metrics = {
            "dino": mean_pairwise_cosine(gen_dino, real_dino),
            "clip_i": mean_pairwise_cosine(gen_clip, real_clip),
            "clip_t": mean_matched_cosine(gen_clip, scorers.clip_text_embed(texts)),
        }
        if prior:
            metrics["pres"] = mean_pairwise_cosine(scorers.dino_embed(class_images), real_dino)
            if lpips_model is not None:
                metrics["div"] = within_group_lpips(lpips_model.to(device), generated, images_per_prompt)
            else:
                metrics["div_dino"] = within_group_diversity(gen_dino, images_per_prompt)
    finally:
        scorers.close()
        del lpips_model
    metrics = {k: round(v, 4) for k, v in metrics.items()}

    from .. import storage

    sheet = _contact_sheet(generated + class_images, images_per_prompt)
    grid = session.samples_dir / f"eval-{Path(entry['file']).stem}.png"
    storage.write_bytes(grid, storage.png_bytes(sheet))
    result = EvalResult(
        entry["file"],
        entry.get("step"),
        metrics,
        len(pairs),
        images_per_prompt,
        time.perf_counter() - start,
        grid=grid.relative_to(session.path).as_posix(),
        settings={
            "seed": seed,
            "steps": steps,
            "size": size,
            "dino_model": dino or DEFAULT_DINO,
            "clip_model": clip or DEFAULT_CLIP,
            **({"lpips_model": lpips or DEFAULT_LPIPS} if "div" in metrics else {}),
            **({"div_fallback": div_fallback} if "div_dino" in metrics else {}),
        },  # fmt: skip
    )
    session.record_eval(entry["file"], result.to_dict())
    _tensorboard(session, entry, metrics)
    return result


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Exports side by side: one row per export, one column per metric it has."""
    names = [m for m in METRICS if any(m in r for _, r in rows)]
    width = max([len("export"), *(len(n) for n, _ in rows)])
    lines = ["  ".join(["export".ljust(width), *(n.rjust(8) for n in names)])]
    for label, r in rows:
        lines.append("  ".join([label.ljust(width), *(f"{r[n]:8.4f}" if n in r else " " * 7 + "-" for n in names)]))
    return "\n".join(lines)
