"""Resumable training states, written straight into the session (hashed as written, last K kept).

A state folder holds::

    weights/<component>.safetensors   the trained weights of one component (unet, text_encoder...;
                                      fp32 masters; LoRA: the adapter tensors only)
    rng.safetensors       torch CPU/CUDA RNG states and the noise generator's state
    optimizer.pt          optimizer state (torch.save; loaded only with ``weights_only=True``)
    state.json            step, phase, config, data order, GradScaler, python/numpy RNG, loss history

States written before the split keep all weights in one ``weights.safetensors``; :func:`load`
reads both. One file per component lets a component that no longer trains (the text encoder after
its phase) be hard-linked from the previous state instead of written again
(:meth:`fastsd.session.Session.write_checkpoint`'s ``reuse``).

The learning-rate schedule is a pure function of the step, so the step is its state. Only a
folder that the session listed counts as complete.

:class:`Saver` writes the periodic states on a thread while training goes on: the step waits only
for a copy of the state in host memory (seconds), not for the write (an SD1.5 full state is
10.8 GB: 23 s on an H200's local disk, minutes on Drive). It does so only when the host has room
for the copy beside what it already holds; otherwise it writes in place, as before.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import UserInputError

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"  # all components in one file: states written before the split
WEIGHTS_DIR = "weights"
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


def state_files(
    *,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    noise_gen: torch.Generator,
    frozen: set[str] | None = None,
) -> tuple[dict[str, Callable[[BinaryIO], None]], list[str]]:
    """A state's files as producers (relative name -> writes its bytes), and the reusable ones.

    Weights are written one tensor at a time (each copied to the CPU as its turn comes, while the
    previous one is being written: :func:`fastsd.models.streamwrite.write_pieces`), so no whole
    copy of them is ever made in host memory. A component none of whose tensors requires a gradient is frozen in
    this phase: its file is offered for reuse (``frozen`` names those components when ``weights``
    are host copies, which no longer say). The RNG states are captured now, not when written.
    """
    frozen = frozen_parts(weights) if frozen is None else frozen
    rng_tensors, rng_meta = capture_rng(noise_gen)
    rng = {k: v.contiguous() for k, v in rng_tensors.items()}
    state_json = json.dumps({**state, "rng": rng_meta}).encode("utf-8")
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        by_part.setdefault(key.split(".", 1)[0], {})[key] = tensor
    files: dict[str, Callable[[BinaryIO], None]] = {}
    reuse = []
    for part, tensors in sorted(by_part.items()):
        rel = f"{WEIGHTS_DIR}/{part}.safetensors"
        files[rel] = partial(write_safetensors, tensors=tensors)
        if part in frozen:
            reuse.append(rel)
    files[RNG] = partial(write_safetensors, tensors=rng)
    files[OPTIMIZER] = partial(_torch_save, optimizer)
    files[STATE] = lambda fh: fh.write(state_json)
    return files, reuse


def write_safetensors(fh: BinaryIO, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (any device) to ``fh`` as a safetensors file, one tensor in host memory at a time."""
    from ..models.streamwrite import write_pieces
    from ..models.tensorfile import safetensors_header

    names = sorted(tensors)
    header = safetensors_header([(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names], {})
    write_pieces(fh, header, (tensors[n].detach().to("cpu").contiguous() for n in names))


def _torch_save(obj: Any, fh: BinaryIO) -> None:
    torch.save(obj, fh)


def save_local(folder: Path, **parts: Any) -> Path:
    """Write a complete state into ``folder`` (plain files: tests and tools; the trainer writes into the session)."""
    from .. import storage

    files, _ = state_files(**parts)
    for rel, produce in files.items():
        storage.write_stream(folder / rel, produce)
    return folder


def load(folder: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a state folder: ``{"weights", "optimizer", "state", "rng"}`` (never unpickles objects).

    Raises:
        UserInputError: a file is missing or unreadable.
    """
    try:
        state = json.loads((folder / STATE).read_text())
        weights = load_file(folder / WEIGHTS, device=str(device)) if (folder / WEIGHTS).is_file() else {}
        for part in sorted((folder / WEIGHTS_DIR).glob("[!.]*.safetensors")):  # never a temp file
            weights.update(load_file(part, device=str(device)))
        rng = load_file(folder / RNG)
        optimizer = torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserInputError(
            f"checkpoint {folder} is unreadable ({err}): resume from an older one or start over"
        ) from err
    return {"weights": weights, "optimizer": optimizer, "state": state, "rng": rng}


def save_to_session(session: Any, step: int, keep: int, **parts: Any) -> dict[str, Any]:
    """Write a state into the session (each byte once, hashed as written), list it, prune to the newest ``keep``.

    Args:
        session: the :class:`fastsd.session.Session`.
        step: the completed step the state belongs to.
        keep: how many checkpoints the session keeps.
        parts: ``weights``, ``optimizer``, ``state``, ``noise_gen`` for :func:`state_files`.

    Returns:
        The manifest entry.
    """
    files, reuse = state_files(**parts)
    entry = session.write_checkpoint(step, files, reuse=reuse)
    session.prune_checkpoints(keep)
    return entry


def frozen_parts(weights: dict[str, torch.Tensor]) -> set[str]:
    """Components of ``weights`` none of whose tensors requires a gradient (see :func:`state_files`)."""
    trains: dict[str, bool] = {}
    for key, tensor in weights.items():
        part = key.split(".", 1)[0]
        trains[part] = trains.get(part, False) or tensor.requires_grad
    return {part for part, yes in trains.items() if not yes}


def to_host(obj: Any) -> Any:
    """A copy of ``obj`` (tensors, and dicts/lists/tuples of them) whose tensors live in host memory."""
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t, obj)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (as :func:`to_host` walks it)."""
    from torch.utils import _pytree as pytree

    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor))


#: Host memory a background save leaves free beyond its copy: at least this, or half the copy.
HOST_HEADROOM_BYTES = 4 * 2**30


class Saver:
    """Writes training states into the session, on a background thread when the host has room.

    :meth:`save` copies the state to host memory and returns; a thread writes and lists it. The
    next :meth:`save`, and :meth:`wait`, first finish the previous one, so at most one state is in
    flight and each is listed before the next is written (its frozen files are linked to). What
    the caller does once a state is listed (``on_listed``) runs in the caller's thread, from
    :meth:`wait`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._outcome: tuple[dict[str, Any] | None, BaseException | None] = (None, None)
        self._on_listed: Callable[[dict[str, Any]], None] | None = None
        self.in_background = 0  # states handed to the thread (the run's plan reports it)
        self._said_no_room = False

    def save(
        self,
        session: Any,
        step: int,
        keep: int,
        *,
        weights: dict[str, torch.Tensor],
        optimizer: dict[str, Any],
        state: dict[str, Any],
        noise_gen: torch.Generator,
        on_listed: Callable[[dict[str, Any]], None],
        wait: bool = False,
    ) -> None:
        """Save step ``step``'s state; with ``wait`` (or no room for a copy) it is listed when this returns."""
        self.wait()
        from ..runtime import ram_gb

        size = tensor_bytes(weights) + tensor_bytes(optimizer)
        need, free = size + max(HOST_HEADROOM_BYTES, size // 2), ram_gb()["available_gb"] * 2**30
        room = free >= need
        if not (wait or room or self._said_no_room):
            self._said_no_room = True
            log.info("checkpoints are written in place: a host copy needs %.1f GiB and %.1f GiB is free",
                     need / 2**30, free / 2**30)  # fmt: skip
        if wait or not room:
            on_listed(save_to_session(session, step, keep, weights=weights, optimizer=optimizer, state=state,
                                      noise_gen=noise_gen))  # fmt: skip
            return
        frozen = frozen_parts(weights)
        host_weights, host_optimizer = to_host(weights), to_host(optimizer)
        files, reuse = state_files(weights=host_weights, optimizer=host_optimizer, state=state, noise_gen=noise_gen,
                                   frozen=frozen)  # fmt: skip
        self._on_listed = on_listed

        def write() -> None:
            try:
                entry = session.write_checkpoint(step, files, reuse=reuse)
                session.prune_checkpoints(keep)
                self._outcome = (entry, None)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
                self._outcome = (None, err)

        self.in_background += 1
        self._thread = threading.Thread(target=write, name=f"fastsd-checkpoint-{step}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> bool:
        """Whether a state is being written in the background."""
        return self._thread is not None

    def wait(self, raise_error: bool = True) -> None:
        """Finish the state in flight (if any) and run its ``on_listed``; a failed write raises here."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        (entry, err), self._outcome = self._outcome, (None, None)
        on_listed, self._on_listed = self._on_listed, None
        if err is not None:
            if raise_error:
                raise err
            log.warning("the last checkpoint could not be written: %s", err)
            return
        if on_listed is not None and entry is not None:
            on_listed(entry)


def latest(session: Any) -> tuple[dict[str, Any], Path] | None:
    """The newest listed checkpoint whose files verify, with its folder (older ones tried in turn)."""
    for entry in reversed(session.checkpoints()):
        if session.verify_checkpoint(entry):
            return entry, session.path / entry["path"]
    return None
