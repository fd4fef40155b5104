"""Where fastsd runs and on what: environment, Python, torch, GPUs, RAM, disk, package versions.

``doctor_report()`` gathers it all into one JSON-ready dict (``fastsd doctor``); the pieces are
used elsewhere to choose precision, memory settings and the wheel-cache fingerprint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from . import __version__
from .features import CORE, FEATURES, TORCH, requirements_for

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
    """The CUDA GPUs torch can use (empty without torch or CUDA)."""
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


def _disk_free_gb(path: Path) -> dict[str, Any] | None:
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


def feature_status(check_imports: bool = True) -> dict[str, dict[str, Any]]:
    """For each feature: ready or not, and why not.

    A feature is ready when torch and its requirements are installed in range (``missing``), no
    installed package's declared minimum of another is broken (``conflicts``, see
    :mod:`fastsd.compat`), and, with ``check_imports``, the imports it needs work (``imports``).
    ``reason`` is the one line to show when it is not ready.
    """
    from .compat import conflicts, import_problems
    from .install import unmet

    out: dict[str, dict[str, Any]] = {}
    for name, (purpose, _) in FEATURES.items():
        reqs = [TORCH, *CORE, *requirements_for([name])]
        missing = [
            f"{item.requirement} {'not installed' if item.installed is None else f'needed (installed {item.installed})'}"
            for item in unmet(reqs)
        ]
        clashes = [str(c) for c in conflicts(Requirement(r).name for r in reqs)]
        out[name] = {"purpose": purpose, "missing": missing, "conflicts": clashes, "imports": []}
    if check_imports:
        clean = [n for n, f in out.items() if not f["missing"] and not f["conflicts"]]
        for name, problems in (import_problems(clean) if clean else {}).items():
            out[name]["imports"] = problems
    for name, f in out.items():
        # A broken pair first: it is the cause; an excluded version of one side repeats it.
        named = {c.split(" ", 1)[0] for c in f["conflicts"]}
        rest = [m for m in f["missing"] if Requirement(m.split(" ", 1)[0]).name not in named]
        problems = [*f["conflicts"], *rest, *f["imports"]]
        f["ready"] = not problems
        f["reason"] = f"{'; '.join(problems)}; run fastsd install --features {name}" if problems else ""
    return out


def advice(gpu_list: list[GPU], ram: dict[str, float], torch_meta: dict[str, Any]) -> list[str]:
    """Concrete advice for the hardware found, as sentences."""
    tips: list[str] = []
    if torch_meta["version"] is None:
        tips.append("torch is not installed: install the build for your GPU from pytorch.org first.")
    elif not gpu_list:
        tips.append(
            "No CUDA GPU: training and generation will be very slow on the CPU. "
            "In Colab choose Runtime > Change runtime type > T4 GPU."
        )
    for gpu in gpu_list:
        if not gpu.bf16:
            tips.append(
                f"GPU {gpu.index} ({gpu.name}) has no real bf16: fastsd trains in fp16 with a "
                "GradScaler and keeps fp32 master weights."
            )
        else:
            tips.append(f"GPU {gpu.index} ({gpu.name}) supports bf16: training uses bf16 mixed precision.")
        if gpu.vram_total_gb < 20:
            tips.append(
                f"GPU {gpu.index} has {gpu.vram_total_gb:.0f} GiB: SDXL full fine-tuning will not fit, "
                "use LoRA for SDXL; SD1.5/SD2 full DreamBooth fits with 8-bit Adam."
            )
        elif gpu.vram_total_gb < 40:
            tips.append(
                f"GPU {gpu.index} has {gpu.vram_total_gb:.0f} GiB: SDXL full fine-tuning needs 8-bit Adam and gradient checkpointing."
            )
    if ram.get("total_gb", 0) < 16:
        tips.append(
            f"{ram.get('total_gb')} GiB of RAM: convert models with fastsd's streaming converter "
            "(it needs under 0.5 GB) rather than tools that load the whole model."
        )
    return tips


def doctor_report(home: Path | None = None) -> dict[str, Any]:
    """Everything ``fastsd doctor`` prints, as one JSON-ready dict with stable keys.

    Args:
        home: the fastsd home whose disk space to report (None: resolve it without creating it).
    """
    from .paths import drive_dir, resolve_home

    home = home or resolve_home()
    torch_meta, gpu_list = torch_facts()
    ram = ram_gb()
    drive = drive_dir()
    return {
        "fastsd": __version__,
        "environment": environment(),
        "platform": platform.platform(),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "torch": torch_meta,
        "gpus": [asdict(g) for g in gpu_list],
        "ram": ram,
        "disk": {"home": _disk_free_gb(home), "drive": _disk_free_gb(drive) if drive else None},
        "home": str(home),
        "drive_mounted": drive is not None,
        "fingerprint": fingerprint(torch_meta["cuda_build"]),
        "packages": {name: package_version(name) for name in REPORTED_PACKAGES},
        "features": feature_status(),
        "advice": advice(gpu_list, ram, torch_meta),
    }
