"""``fastsd doctor``: what is installed and ready, and advice for the hardware found.

The facts come from :mod:`fastsd.runtime` (environment, GPUs, RAM, disk, versions) and
:mod:`fastsd.compat` / :mod:`fastsd.install` (what is missing or clashes); this module only puts
them together. Kept out of ``runtime`` so that ``runtime`` (facts, imported by ``install``) does not
import ``install`` back.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from . import __version__
from .features import CORE, FEATURES, TORCH, requirements_for
from .runtime import (
    GPU,
    REPORTED_PACKAGES,
    disk_free_gb,
    environment,
    fingerprint,
    package_version,
    ram_gb,
    torch_facts,
)


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
        "disk": {"home": disk_free_gb(home), "drive": disk_free_gb(drive) if drive else None},
        "home": str(home),
        "drive_mounted": drive is not None,
        "fingerprint": fingerprint(torch_meta["cuda_build"]),
        "packages": {name: package_version(name) for name in REPORTED_PACKAGES},
        "features": feature_status(),
        "advice": advice(gpu_list, ram, torch_meta),
    }
