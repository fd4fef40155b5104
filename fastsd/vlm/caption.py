"""Captions for a session's instance images, written by a vision-language model.

DreamBooth and LoRA quality depends on captions: the subject is bound to the instance token by
captions that name it (``photo of sks dog, ...``) while the rest of the caption describes what is
*not* the subject (setting, pose, lighting), so the token does not absorb the background. Each
caption is cut to what the text encoder reads (75 CLIP tokens between BOS and EOS; 256 for the T5
of SD3/Flux), at a comma or word boundary. Existing captions are kept unless ``overwrite``; each
caption is written as soon as it is made, so an interrupted run resumes where it stopped; an
image that fails is named in the result and the others go on.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError

log = logging.getLogger(__name__)

STYLES = ("sentence", "tags")
#: Content tokens the text encoder reads: CLIP's 77 minus BOS/EOS; T5 families read more.
CLIP_TOKENS = 75
T5_TOKENS = 256
T5_FAMILIES = ("sd3", "flux")


def caption_prompt(style: str, class_word: str) -> str:
    """The instruction sent with each image."""
    if style == "tags":
        return (
            f"List comma-separated tags describing this photo of a {class_word}: the {class_word}'s pose and "
            "expression, clothing or accessories, the setting and background, lighting, camera angle and style. "
            "Lower-case tags of one to three words, most important first, no sentences, at most 20 tags."
        )
    if style == "sentence":
        return (
            f"Write one caption for this photo of a {class_word}, as used to train an image generator: one "
            f"sentence that calls the subject 'the {class_word}' and describes its pose, what it wears or holds, "
            "the setting and background, lighting and camera angle. Do not describe what the subject looks "
            "like (colours, breed, face). At most 40 words, no preamble."
        )
    raise UserInputError(f"unknown caption style {style!r}; choose {' or '.join(STYLES)}")


_LABEL = re.compile(r"^\s*(?:(?:here is|here's)[^:]*:|caption:|tags:)\s*", re.I)
_PHOTO_OF = re.compile(
    r"^(?:(?:a|an|the|this)\s+)?(?:(?:close-up|closeup)\s+)?(?:photo(?:graph)?|picture|image)\s+(?:of|shows|showing)\s+",
    re.I,
)


def bind_subject(text: str, token: str, class_word: str, style: str) -> str:
    """The model's text as a training caption that starts ``photo of <token> <class>``.

    Labels ("Caption:", "Tags:"), "a photo of" preambles, quotes and a trailing full stop go. In
    tags, tags that only repeat the class word go. In a sentence that starts with the subject
    ("a dog lying on a sofa"), the subject becomes ``photo of sks dog lying on a sofa``; any other
    sentence follows the subject after a comma.
    """
    subject = f"{token} {class_word}".strip()
    text = " ".join(text.replace("\n", " ").split()).strip().strip("\"'").strip()
    text = _PHOTO_OF.sub("", _LABEL.sub("", text)).strip().rstrip(".").strip()
    if style == "tags":
        seen: list[str] = []
        for tag in (t.strip().strip(".").lower() for t in text.split(",")):
            plain = re.sub(r"^(?:a|an|the)\s+", "", tag)
            if tag and plain not in (class_word.lower(), subject.lower(), token.lower()) and tag not in seen:
                seen.append(tag)
        return ", ".join([f"photo of {subject}", *seen])
    lead = re.match(rf"^(?:(?:an?|the)\s+)?(?:{re.escape(token)}\s+)?{re.escape(class_word)}\b[,]?\s*", text, re.I)
    if lead:
        rest = text[lead.end() :]
        return f"photo of {subject} {rest}".strip()
    return f"photo of {subject}, {text}" if text else f"photo of {subject}"


def token_counter(family: str | None, base_model: Path | None) -> Callable[[str], int]:
    """Counts text-encoder tokens: the base model's own CLIP tokenizer when it is local, else an estimate.

    The estimate counts words and punctuation marks and adds a quarter (rare words split into
    several BPE pieces), so a caption cut by it fits CLIP with room to spare.
    """
    folder = base_model / "tokenizer" if base_model is not None else None
    if folder is not None and folder.is_dir() and family not in T5_FAMILIES:
        try:
            from transformers import CLIPTokenizer

            tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
        except (OSError, ValueError) as err:
            log.debug("no CLIP tokenizer in %s (%s); estimating lengths", folder, err)
    return lambda text: math.ceil(len(re.findall(r"\w+|[^\w\s]", text)) * 1.25)


def fit_caption(text: str, count: Callable[[str], int], limit: int) -> str:
    """``text`` cut to at most ``limit`` tokens: whole comma-separated parts first, then whole words."""
    if count(text) <= limit:
        return text
    parts = text.split(", ")
    while len(parts) > 1 and count(", ".join(parts)) > limit:
        parts.pop()
    text = ", ".join(parts)
    words = text.split()
    while len(words) > 1 and count(" ".join(words)) > limit:
        words.pop()
    return " ".join(words).rstrip(",;:")


@dataclass
class CaptionRun:
    """What a captioning run did: captions written, images kept as they were, failures by image."""

    written: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = f"; {len(self.written) / self.seconds:.2f} images/s" if self.seconds and self.written else ""
        kept = f", {len(self.kept)} kept (they had captions; --overwrite replaces them)" if self.kept else ""
        return f"{len(self.written)} caption(s) written{kept}, {len(self.failed)} failed{rate}"


def _base_model_folder(session: Any) -> Path | None:
    """The session's base model as a local folder if it is already on disk (never downloads for this)."""
    spec = session.info.get("base_model")
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    local = session.path.parent.parent / "models" / spec  # where fetch puts a registry model
    return local if local.is_dir() else None


def caption_session(
    session: Any,
    engine: Any,
    *,
    style: str = "sentence",
    overwrite: bool = False,
    max_tokens: int | None = None,
    progress: Callable[[str, str | None, str | None], None] | None = None,
) -> CaptionRun:
    """Caption every instance image of ``session`` with ``engine`` (see the module docstring).

    Args:
        session: a :class:`fastsd.session.Session`.
        engine: a :class:`fastsd.vlm.engines.VlmEngine`.
        style: ``sentence`` or ``tags``.
        overwrite: replace captions images already have.
        max_tokens: text-encoder token limit (default: 75 for CLIP families, 256 for T5 ones).
        progress: called with (image name, caption or None, error or None) after each image.
    """
    import time

    from PIL import Image

    from .engines import VlmRequest

    if style not in STYLES:
        raise UserInputError(f"unknown caption style {style!r}; choose {' or '.join(STYLES)}")
    token = session.info.get("instance_token") or ""
    class_word = session.info.get("class_word") or "subject"
    family = session.info.get("family")
    limit = max_tokens or (T5_TOKENS if family in T5_FAMILIES else CLIP_TOKENS)
    count = token_counter(family, _base_model_folder(session))
    prompt = caption_prompt(style, class_word)
    run = CaptionRun()
    todo = []
    for path in session.images():
        if session.has_own_caption(path) and not overwrite:
            run.kept.append(path.name)
        else:
            todo.append(path)
    chunk = max(1, int(getattr(engine, "batch_size", 0) or getattr(getattr(engine, "client", None), "concurrency", 8)))
    start = time.perf_counter()
    for pos in range(0, len(todo), chunk):
        paths, requests = [], []
        for path in todo[pos : pos + chunk]:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except Exception as err:  # noqa: BLE001 - a broken file fails its own image only
                run.failed[path.name] = f"could not be read ({type(err).__name__}: {err})"
                if progress:
                    progress(path.name, None, run.failed[path.name])
                continue
            paths.append(path)
            requests.append(VlmRequest(image, prompt, max_new_tokens=limit + 32))  # the cut is by CLIP tokens
        for path, reply in zip(paths, engine.answer(requests) if requests else [], strict=True):
            if reply.error or not reply.text.strip():
                run.failed[path.name] = reply.error or "the model returned an empty caption"
                if progress:
                    progress(path.name, None, run.failed[path.name])
                continue
            text = fit_caption(bind_subject(reply.text, token, class_word, style), count, limit)
            session.set_caption(path, text)
            run.written[path.name] = text
            if progress:
                progress(path.name, text, None)
    run.seconds = time.perf_counter() - start
    return run
