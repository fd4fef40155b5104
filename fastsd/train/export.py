"""Exports a run leaves in the session's ``models/``: single-file fp16 checkpoints and LoRA files.

A fully fine-tuned model is saved as a Diffusers folder on local scratch disk, then converted to
one A1111/ComfyUI ``.safetensors`` by :func:`fastsd.models.convert.diffusers_to_single_file`
(imported only when needed). A LoRA is written directly in kohya's format, an SD3/FLUX LoRA in
diffusers' peft layout with the ``transformer.`` prefix (:mod:`.lora`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import storage
from . import lora


def export_full(pipeline: Any, dst: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipeline`` as one fp16 single-file checkpoint at ``dst``."""
    from ..models.convert import diffusers_to_single_file  # torch-heavy: only when exporting

    with storage.scratch_folder("export", "train") as scratch:  # owner-named: a killed export's is cleaned
        pipeline.save_pretrained(scratch, safe_serialization=True)
        return Path(diffusers_to_single_file(scratch, dst, half=True, overwrite=True, metadata=metadata))


def export_lora(modules: dict[str, Any], dst: Path, *, rank: int, alpha: float, family: str) -> Path:
    """Write the LoRA adapters of ``modules`` (component -> model) as a kohya LoRA file at ``dst``."""
    tensors = lora.kohya_state_dict(modules, alpha, family)
    return lora.save_kohya(dst, tensors, rank=rank, alpha=alpha, family=family)


def export_step(session: Any, models: Any, c: Any, step: int, device: Any, *, te_trained: bool, te_frozen: bool,
                before_record: Callable[[], Any] = lambda: None) -> str:  # fmt: skip
    """The model of ``step`` in the session's ``models/``: one fp16 single file, or a kohya LoRA; its recorded file.

    Args:
        te_trained: the run trains the text encoders (a LoRA then carries their adapters).
        te_frozen: the text encoders are offloaded for good (they go back to the CPU after a full export).
        before_record: runs once the file is written, before it is listed in ``session.json`` (the trainer
            finishes a state being written in the background there: the manifest has one writer at a time).
    """
    from .sampling import eager

    full = c.method == "full"
    dst = session.models_dir / f"{session.name}-{'lora-' if not full else ''}step-{step}.safetensors"
    if full:
        models.text_encoders_to(device)
        models.vae.to(device)
        with eager():
            export_full(models.pipeline(), dst, metadata={"fastsd_session": session.name, "step": str(step)})
        models.vae.to("cpu")
        if te_frozen:
            models.text_encoders_to("cpu")
        before_record()
        return str(session.record_model(dst, kind="full", step=step)["file"])
    if models.flow:  # SD3/FLUX: the transformer's adapters in diffusers' layout
        tensors = lora.diffusers_state_dict(models.denoiser, c.lora_alpha, c.lora_rank)
        lora.save_diffusers(dst, tensors, rank=c.lora_rank, alpha=c.lora_alpha, family=models.family)
        before_record()
        return str(session.record_model(dst, kind="lora", step=step)["file"])
    comps = models.components()
    parts = {n: comps[n] for n in ["unet", *(models.te_names if te_trained else [])]}
    export_lora(parts, dst, rank=c.lora_rank, alpha=c.lora_alpha, family=models.family)
    before_record()
    return str(session.record_model(dst, kind="lora", step=step)["file"])
