"""Page layout with PP-DocLayoutV3: regions, their labels, the task each is read with, reading order.

The official GLM-OCR SDK finds regions with PP-DocLayoutV3 before it reads them; this module does
the same through transformers' ``PPDocLayoutV3ForObjectDetection``, with the SDK's facts as data:
the 25 class labels, the label -> task table (``text``/``table``/``formula`` are read with their
prompt, ``skip`` is kept but not read, e.g. pictures, ``abandon`` is dropped: headers, footers,
page numbers), the score threshold (0.3, per class overridable), class-aware NMS, the rule that a
picture covering most of the page is not a region, the containment merge (a box mostly inside
another is dropped, except a small ``reference`` box, which drops its container), and the model's
own reading order. :class:`LayoutSettings` holds all of it and can be overridden from a JSON file.

Pre- and post-processing are done here on the model's device, batched: transformers' image
processor for this model needs torchvision, which fastsd does not require. Its facts are kept:
pages are resized to 800x800 (bicubic, no antialias), scaled to 0..1 and not normalised.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FastsdError, UserInputError

log = logging.getLogger(__name__)

DEFAULT_LAYOUT_MODEL = "PaddlePaddle/PP-DocLayoutV3_safetensors"

#: PP-DocLayoutV3's classes by id (the checkpoint's id2label).
LABELS: tuple[str, ...] = (
    "abstract",
    "algorithm",
    "aside_text",
    "chart",
    "content",
    "display_formula",
    "doc_title",
    "figure_title",
    "footer",
    "footer_image",
    "footnote",
    "formula_number",
    "header",
    "header_image",
    "image",
    "inline_formula",
    "number",
    "paragraph_title",
    "reference",
    "reference_content",
    "seal",
    "table",
    "text",
    "vertical_text",
    "vision_footnote",
)

#: What is done with each label (the GLM-OCR SDK's ``label_task_mapping``).
LABEL_TASKS: dict[str, str] = {
    **dict.fromkeys(
        (
            "abstract",
            "algorithm",
            "content",
            "doc_title",
            "figure_title",
            "paragraph_title",
            "reference_content",
            "text",
            "vertical_text",
            "vision_footnote",
            "seal",
            "formula_number",
        ),
        "text",
    ),
    "table": "table",
    "display_formula": "formula",
    "inline_formula": "formula",
    "chart": "skip",
    "image": "skip",
    **dict.fromkeys(
        ("header", "footer", "number", "footnote", "aside_text", "reference", "footer_image", "header_image"),
        "abandon",
    ),
}

REGION_TASKS = ("text", "table", "formula", "skip", "abandon")
#: Labels never dropped for lying inside another box (the SDK's preserve list).
PRESERVED = ("image", "seal", "chart")


@dataclass
class LayoutSettings:
    """Thresholds and tables of the layout step (defaults: the GLM-OCR SDK's config).

    Attributes:
        threshold: minimum score of a region.
        threshold_by_label: per-label minimum scores that replace ``threshold``.
        label_tasks: label -> ``text``/``table``/``formula``/``skip``/``abandon``; labels not listed are dropped.
        nms: class-aware non-maximum suppression (IoU 0.6 same class, 0.98 across classes).
        small_merge: labels whose box drops a box containing it (others: the contained box is dropped).
        unclip: (width, height) factors that grow each box around its centre.
        input_size: the square side pages are resized to for the model.
        min_region_px: regions thinner than this (pixels, either side) are dropped as misreadings.
    """

    threshold: float = 0.3
    threshold_by_label: dict[str, float] = field(default_factory=dict)
    label_tasks: dict[str, str] = field(default_factory=lambda: dict(LABEL_TASKS))
    nms: bool = True
    small_merge: tuple[str, ...] = ("reference",)
    unclip: tuple[float, float] = (1.0, 1.0)
    input_size: int = 800
    min_region_px: int = 4

    def __post_init__(self) -> None:
        def bad(msg: str) -> UserInputError:
            return UserInputError(f"layout settings: {msg}")

        for name, value in {"threshold": self.threshold, **self.threshold_by_label}.items():
            if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
                raise bad(f"threshold {name}={value!r} must be a number between 0 and 1")
        for label, task in self.label_tasks.items():
            if task not in REGION_TASKS:
                raise bad(f"label {label!r} maps to {task!r}; use one of {', '.join(REGION_TASKS)}")
        if len(self.unclip) != 2 or any(float(u) <= 0 for u in self.unclip):
            raise bad(f"unclip {self.unclip!r} must be two positive factors")
        self.unclip = (float(self.unclip[0]), float(self.unclip[1]))
        self.small_merge = tuple(self.small_merge)

    @classmethod
    def load(cls, source: str | Path | dict | None = None, **overrides: Any) -> LayoutSettings:
        """Defaults, updated by a JSON file or dict (same keys as the attributes), then ``overrides``.

        ``label_tasks`` in the file may be given either label -> task or, as the SDK's YAML has it,
        task -> [labels]; given labels replace the defaults one by one (the rest stay).

        Raises:
            UserInputError: unreadable file, unknown key, bad value.
        """
        data: dict[str, Any] = {}
        if isinstance(source, dict):
            data = dict(source)
        elif source is not None:
            p = Path(source)
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise UserInputError(f"layout settings {p}: not a readable JSON file ({err})") from None
            if not isinstance(data, dict):
                raise UserInputError(f"layout settings {p}: must be a JSON object")
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(
                f"layout settings: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        tasks = dict(LABEL_TASKS)
        given = data.pop("label_tasks", None) or {}
        if not isinstance(given, dict):
            raise UserInputError("layout settings: label_tasks must be an object")
        for key, value in given.items():
            if isinstance(value, list):  # SDK style: task -> [labels]
                tasks.update(dict.fromkeys(value, key))
            else:
                tasks[key] = value
        return cls(label_tasks=tasks, **data)

    def fingerprint(self) -> str:
        """A short stable id of these settings (a rerun with other settings redoes the pages)."""
        import hashlib

        raw = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


@dataclass
class Region:
    """One detected region: its label, task, score, pixel box on the page, 0-1000 box, reading order."""

    index: int
    label: str
    task: str
    score: float
    box: tuple[int, int, int, int]
    bbox_2d: list[int]


def _iou_matrix(b: Any) -> Any:
    """Pairwise IoU of (N, 4) boxes with the SDK's +1 pixel convention."""
    import numpy as np

    x1 = np.maximum(b[:, None, 0], b[None, :, 0])
    y1 = np.maximum(b[:, None, 1], b[None, :, 1])
    x2 = np.minimum(b[:, None, 2], b[None, :, 2])
    y2 = np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1 + 1, 0, None) * np.clip(y2 - y1 + 1, 0, None)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area[:, None] + area[None, :] - inter)


def _nms(cls: Any, scores: Any, boxes: Any, iou_same: float = 0.6, iou_diff: float = 0.98) -> list[int]:
    import numpy as np

    iou = _iou_matrix(boxes)
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        cur = order.pop(0)
        keep.append(cur)
        order = [i for i in order if iou[cur, i] < (iou_same if cls[cur] == cls[i] else iou_diff)]
    return keep


def _contained(boxes: Any) -> Any:
    """``m[i, j]``: box i lies at least 80% inside box j (i != j)."""
    import numpy as np

    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(area[:, None] > 0, inter / area[:, None], 0.0)
    m = frac >= 0.8
    np.fill_diagonal(m, False)
    return m


def postprocess(
    scores: Any, labels: Any, boxes: Any, order: Any, size: tuple[int, int], settings: LayoutSettings, id2label: dict
) -> list[Region]:
    """One page's detections (numpy, pixel xyxy boxes, scores above the threshold) -> ordered regions.

    The GLM-OCR SDK's steps: per-label thresholds, NMS, drop a picture covering most of the page,
    containment merge, reading order, unclip, clip to the page, label -> task (abandon dropped).
    """
    import numpy as np

    width, height = size
    names = [id2label.get(int(c), f"class_{int(c)}") for c in labels]
    keep = np.array(
        [s >= settings.threshold_by_label.get(n, settings.threshold) for s, n in zip(scores, names, strict=True)],
        dtype=bool,
    )
    scores, labels, boxes, order = scores[keep], labels[keep], boxes[keep], order[keep]
    names = [n for n, k in zip(names, keep, strict=True) if k]
    if len(scores) and settings.nms:
        idx = _nms(labels, scores, boxes)
        scores, labels, boxes, order = scores[idx], labels[idx], boxes[idx], order[idx]
        names = [names[i] for i in idx]
    if len(scores) > 1:  # a picture that is nearly the whole page is the page, not a region
        limit = (0.82 if width > height else 0.93) * width * height
        cb = np.clip(boxes, 0, [width, height, width, height])
        area = (cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])
        ok = np.array([not (n == "image" and a > limit) for n, a in zip(names, area, strict=True)], dtype=bool)
        if ok.any():
            scores, labels, boxes, order = scores[ok], labels[ok], boxes[ok], order[ok]
            names = [n for n, k in zip(names, ok, strict=True) if k]
    if len(scores) > 1:
        inside = _contained(boxes)
        preserved = np.array([n in PRESERVED for n in names], dtype=bool)
        small = np.array([n in settings.small_merge for n in names], dtype=bool)
        inside[preserved, :] = False
        # "large" labels: a box inside one of them goes; "small" labels: a box holding one goes
        drop = (inside & ~small[None, :]).any(1)
        small_in = inside & small[:, None]
        holds, held = small_in.any(0), small_in.any(1)
        drop |= holds & ~held
        ok = ~drop
        scores, labels, boxes, order = scores[ok], labels[ok], boxes[ok], order[ok]
        names = [n for n, k in zip(names, ok, strict=True) if k]
    sequence = np.argsort(order, kind="stable")
    regions: list[Region] = []
    uw, uh = settings.unclip
    for i in sequence:
        task = settings.label_tasks.get(names[i])
        if task is None or task == "abandon":
            continue
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        if (uw, uh) != (1.0, 1.0):
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * uw, (y2 - y1) * uh
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        x1, x2 = (max(0.0, min(v, width)) for v in (x1, x2))
        y1, y2 = (max(0.0, min(v, height)) for v in (y1, y2))
        box = (int(x1), int(y1), int(x2), int(y2))
        if box[2] - box[0] < settings.min_region_px or box[3] - box[1] < settings.min_region_px:
            continue
        norm = [int(x1 / width * 1000), int(y1 / height * 1000), int(x2 / width * 1000), int(y2 / height * 1000)]
        regions.append(Region(len(regions), names[i], task, float(scores[i]), box, norm))
    return regions


def order_sequence(order_logits: Any) -> Any:
    """Each query's rank in reading order from the model's pairwise order logits (PP-DocLayoutV3's rule)."""
    import torch

    p = torch.sigmoid(order_logits)
    votes = p.triu(diagonal=1).sum(dim=1) + (1.0 - p.transpose(1, 2)).tril(diagonal=-1).sum(dim=1)
    pointers = torch.argsort(votes, dim=1)
    ranks = torch.arange(p.shape[1], device=p.device).expand(p.shape[0], -1)
    return torch.empty_like(pointers).scatter_(1, pointers, ranks)


class LayoutDetector:
    """PP-DocLayoutV3 through transformers, batched on one device.

    Args:
        model: Hub id (default PaddlePaddle/PP-DocLayoutV3_safetensors) or local folder.
        device: ``cuda``/``cpu`` (default: cuda when available).
        settings: thresholds and tables (default: the SDK's).
        batch_size: pages per forward pass.
    """

    def __init__(
        self,
        model: str = DEFAULT_LAYOUT_MODEL,
        *,
        device: str | None = None,
        settings: LayoutSettings | None = None,
        batch_size: int = 8,
        local_files_only: bool = False,
    ) -> None:
        if not local_files_only and not Path(model).expanduser().exists():
            from ..models.fetch import hub_repo_offline
            from ..paths import resolve_home

            suggested = resolve_home() / "models" / model.replace("/", "--")
            local_files_only = hub_repo_offline(model, suggested)
        import torch
        from transformers import PPDocLayoutV3ForObjectDetection

        self.model_id = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.settings = settings or LayoutSettings()
        self.batch_size = max(1, batch_size)
        try:
            net = PPDocLayoutV3ForObjectDetection.from_pretrained(model, local_files_only=local_files_only)
        except OSError as err:
            raise FastsdError(f"could not load PP-DocLayoutV3 from {model}: {err}") from err
        self.model = net.eval().to(self.device)
        cfg_labels = {int(k): v for k, v in (net.config.id2label or {}).items()}
        generic = all(str(v).startswith("LABEL_") for v in cfg_labels.values())
        self.id2label = dict(enumerate(LABELS)) if generic or not cfg_labels else cfg_labels

    def _pixels(self, images: list) -> Any:
        import numpy as np
        import torch
        import torch.nn.functional as F

        side = self.settings.input_size
        out = []
        for im in images:
            t = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).to(self.device)
            t = t.permute(2, 0, 1)[None].float()
            t = F.interpolate(t, size=(side, side), mode="bicubic", align_corners=False, antialias=False)
            out.append(t.clamp_(0, 255) / 255.0)
        return torch.cat(out)

    def detect(self, images: list) -> list[list[Region]]:
        """Regions of each page image (PIL), in reading order, ``skip``-task regions included."""
        import torch

        results: list[list[Region]] = []
        low = min([self.settings.threshold, *self.settings.threshold_by_label.values()])
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            with torch.inference_mode():
                out = self.model(pixel_values=self._pixels(chunk))
                probs = out.logits.sigmoid().flatten(1)
                n_cls = out.logits.shape[2]
                scores, index = probs.topk(out.logits.shape[1], dim=-1)
                labels, query = index % n_cls, index // n_cls
                cxcy, wh = out.pred_boxes.split(2, dim=-1)
                xyxy = torch.cat([cxcy - wh / 2, cxcy + wh / 2], dim=-1)
                xyxy = xyxy.gather(1, query[..., None].expand(-1, -1, 4))
                order = order_sequence(out.order_logits).gather(1, query)
            for row, im in enumerate(chunk):
                w, h = im.size
                keep = scores[row] >= low
                scale = torch.tensor([w, h, w, h], device=xyxy.device, dtype=xyxy.dtype)
                results.append(
                    postprocess(
                        scores[row][keep].float().cpu().numpy(),
                        labels[row][keep].cpu().numpy(),
                        (xyxy[row][keep] * scale).float().cpu().numpy(),
                        order[row][keep].cpu().numpy(),
                        (w, h),
                        self.settings,
                        self.id2label,
                    )
                )
        return results
