"""Resumable training states: written to local disk, then synced into the session (verified, last K kept).

A state folder holds::

    weights.safetensors   the trained weights (fp32 masters; LoRA: the adapter tensors only)
    rng.safetensors       torch CPU/CUDA RNG states and the noise generator's state
    optimizer.pt          optimizer state (torch.save; loaded only with ``weights_only=True``)
    state.json            step, phase, config, data order, GradScaler, python/numpy RNG, loss history

The learning-rate schedule is a pure function of the step, so the step is its state. Only a
folder that :meth:`fastsd.session.Session.record_checkpoint` listed counts as complete.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserInputError

WEIGHTS = "weights.safetensors"
RNG = "rng.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def capture_rng(noise_gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All RNG states: tensors (torch CPU, every CUDA device, the noise generator) and JSON (python, numpy)."""
    tensors = {"torch_cpu": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], noise_gen: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch_cpu"])
    noise_gen.set_state(tensors["noise"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_local(
    folder: Path,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    noise_gen: torch.Generator,
) -> Path:
    """Write a complete state into ``folder`` (a local scratch folder, not Drive)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}, folder / WEIGHTS)
    rng_tensors, rng_meta = capture_rng(noise_gen)
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, folder / RNG)
    torch.save(optimizer, folder / OPTIMIZER)
    (folder / STATE).write_text(json.dumps({**state, "rng": rng_meta}))
    return folder


def load(folder: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a state folder: ``{"weights", "optimizer", "state", "rng"}`` (never unpickles objects).

    Raises:
        UserInputError: a file is missing or unreadable.
    """
    try:
        state = json.loads((folder / STATE).read_text())
        weights = load_file(folder / WEIGHTS, device=str(device))
        rng = load_file(folder / RNG)
        optimizer = torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserInputError(
            f"checkpoint {folder} is unreadable ({err}): resume from an older one or start over"
        ) from err
    return {"weights": weights, "optimizer": optimizer, "state": state, "rng": rng}


def save_to_session(session: Any, step: int, keep: int, **parts: Any) -> dict[str, Any]:
    """Save locally, copy into the session (verified sha256), list it, prune to the newest ``keep``.

    Args:
        session: the :class:`fastsd.session.Session`.
        step: the completed step the state belongs to.
        keep: how many checkpoints the session keeps.
        parts: ``weights``, ``optimizer``, ``state``, ``noise_gen`` for :func:`save_local`.

    Returns:
        The manifest entry.
    """
    from .. import storage

    # The scratch folder is named by its owner (host, pid), so the leftovers of killed runs are
    # recognised and removed, before they fill the runtime's disk.
    with storage.scratch_folder(f"ckpt-{step}", "train") as scratch:
        save_local(scratch, **parts)
        entry = session.record_checkpoint(step, scratch)
    session.prune_checkpoints(keep)
    return entry


def latest(session: Any) -> tuple[dict[str, Any], Path] | None:
    """The newest listed checkpoint whose files verify, with its folder (older ones tried in turn)."""
    for entry in reversed(session.checkpoints()):
        if session.verify_checkpoint(entry):
            return entry, session.path / entry["path"]
    return None
