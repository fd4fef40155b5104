"""Where fastsd runs and on what: environment, Python, torch, GPUs, RAM, disk, package versions.

Facts only: :mod:`fastsd.doctor` puts them together for ``fastsd doctor``; the pieces are used
elsewhere to choose precision, memory settings and the wheel-cache fingerprint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Versions reported by ``fastsd doctor``.
REPORTED_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "peft",
    "safetensors",
    "huggingface_hub",
    "gradio",
    "pypdfium2",
    "pyngrok",
    "uv",
)

GIB = 1024**3


def environment() -> str:
    """``colab``, ``kaggle``, ``jupyter`` or ``terminal``.

    Colab is recognised by its ``google.colab`` module or any ``COLAB_*`` variable (Colab sets
    ``COLAB_RELEASE_TAG``, ``COLAB_GPU``...), Kaggle by ``KAGGLE_KERNEL_RUN_TYPE``.
    """
    if any(k.startswith("COLAB_") for k in os.environ) or _module_present("google.colab"):
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ or "KAGGLE_URL_BASE" in os.environ:
        return "kaggle"
    if "ipykernel" in sys.modules:
        return "jupyter"
    return "terminal"


def env_switch(name: str) -> bool | None:
    """The on/off override an environment variable gives a measured default: ``1`` on, ``0`` off, else None."""
    value = os.environ.get(name)
    return value == "1" if value in ("0", "1") else None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class GPU:
    """One CUDA device as fastsd sees it."""

    index: int
    name: str
    compute_capability: str
    vram_total_gb: float
    vram_free_gb: float
    bf16: bool  # real bf16 math, not emulation (False on a T4)


def gpus() -> list[GPU]:
    """The CUDA GPUs torch can use (empty without torch or CUDA).

    A per-process cap (``torch.cuda.set_per_process_memory_fraction``) shrinks what a card reports:
    a 14.5 GiB cap on a large card plans, presets and budgets as a 15 GB T4 does.
    """
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free, total = 0, props.total_memory
        fraction = _memory_fraction(torch, i)
        if fraction < 1.0:
            total = int(fraction * total)
            free = min(free, max(0, total - torch.cuda.memory_reserved(i)))
        found.append(
            GPU(
                index=i,
                name=props.name,
                compute_capability=f"{props.major}.{props.minor}",
                vram_total_gb=round(total / GIB, 2),
                vram_free_gb=round(free / GIB, 2),
                # bf16 tensor cores arrive with Ampere (8.0); older cards only emulate it.
                bf16=props.major >= 8,
            )
        )
    return found


def _memory_fraction(torch: Any, index: int) -> float:
    """The per-process cap on card ``index`` as a share of it (1.0 uncapped, or on a torch without the getter)."""
    return getattr(torch.cuda, "get_per_process_memory_fraction", lambda _d=None: 1.0)(index)


def usable_vram_bytes(device: Any = None) -> int:
    """Bytes of GPU memory this process can still allocate: free on the card plus its own cached blocks,
    and never more than a per-process cap (``torch.cuda.set_per_process_memory_fraction``) leaves.

    Batch sizes chosen from free memory alone overshoot under a cap (the card is still "free"), which
    is how a smaller card is emulated on a large one, and how a user keeps room for a second model.
    """
    import torch

    # torch.device("cuda") has no index, which get_per_process_memory_fraction refuses: name the card
    index = device if isinstance(device, int) else (torch.device(device).index if device is not None else None)
    device = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    cap = _memory_fraction(torch, device) * total
    return int(max(0, min(free + cached, cap - allocated)))


def torch_info() -> dict[str, Any]:
    """torch's version, the CUDA it was built for, and whether a GPU is usable."""
    try:
        import torch
    except ImportError:
        return {"version": None, "cuda_build": None, "cuda_available": False}
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": bool(torch.cuda.is_available()),
    }


def fingerprint(cuda_build: str | None = "ask-torch") -> str:
    """The runtime fingerprint wheel caches and lock files are keyed by.

    ``cp<py>-torch<version>-<cuda tag>``, e.g. ``cp313-torch2.11.0-cu128`` for today's Colab. Two
    runtimes with the same fingerprint can share compiled wheels.

    Args:
        cuda_build: the CUDA version torch was built for, when the caller already knows it (None:
            a CPU build); by default torch is asked, which imports it when its version string
            carries no ``+cuXYZ`` tag.
    """
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    version = package_version("torch")
    if version is None:
        return f"{py}-notorch"
    base, _, local = version.partition("+")
    tag = local or "cpu"
    if not local:
        cuda = cuda_build
        if cuda == "ask-torch":
            try:
                import torch

                cuda = torch.version.cuda
            except ImportError:
                cuda = None
        tag = "cu" + cuda.replace(".", "") if cuda else "cpu"
    return f"{py}-torch{base}-{tag}"


#: Seconds ``fastsd doctor`` waits for the child process that asks torch about CUDA.
TORCH_PROBE_TIMEOUT = 120.0


def torch_facts() -> tuple[dict[str, Any], list[GPU]]:
    """:func:`torch_info` and :func:`gpus`, asked in a child process so this one never imports torch.

    ``fastsd doctor`` runs in a fresh CLI process that should start at once; importing torch (and
    initialising CUDA) there costs seconds and pins GPU memory. The child runs this module's own
    functions, so the facts are the same as in-process. Without torch nothing is started.
    """
    import json
    import subprocess

    if package_version("torch") is None:
        return {"version": None, "cuda_build": None, "cuda_available": False}, []
    package_root = str(Path(__file__).resolve().parent.parent)
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from dataclasses import asdict; "
        "from fastsd.runtime import gpus, torch_info; "
        "print(json.dumps({'torch': torch_info(), 'gpus': [asdict(g) for g in gpus()]}))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, package_root],
            capture_output=True,
            text=True,
            timeout=TORCH_PROBE_TIMEOUT,
            check=False,
        )
        facts = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, OSError, ValueError, IndexError):
        # torch is installed but cannot start (broken install, CUDA hang): report its version only.
        return {"version": package_version("torch"), "cuda_build": None, "cuda_available": False}, []
    return facts["torch"], [GPU(**g) for g in facts["gpus"]]


def disk_free_gb(path: Path) -> dict[str, Any] | None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None
    return {"path": str(path), "free_gb": round(usage.free / GIB, 1), "total_gb": round(usage.total / GIB, 1)}


def ram_gb() -> dict[str, float]:
    """Total and available system RAM in GiB."""
    import psutil

    vm = psutil.virtual_memory()
    return {"total_gb": round(vm.total / GIB, 1), "available_gb": round(vm.available / GIB, 1)}
