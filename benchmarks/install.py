"""Time ``fastsd install --features train`` cold (registry) and warm (wheel cache) in fresh venvs.

Each venv starts the way a Colab runtime does: torch already installed (here the CPU build
``torch==2.13.0`` from this machine's disk), plus fastsd's small core requirements. Then:

* cold: empty wheel cache, empty uv cache: resolve and download from the registry, fill the cache;
* warm: a second fresh venv, empty uv cache (a new runtime), same wheel cache: offline install.

Prints one JSON line per measurement. Usage: ``python benchmarks/install.py [--features train]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fresh_runtime(path: Path) -> Path:
    """A venv with torch and fastsd's core requirements, like a new Colab runtime."""
    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True)
    core = ["numpy", "safetensors", "huggingface_hub", "tqdm", "pillow<13", "psutil", "packaging", "uv"]
    subprocess.run([python, "-m", "pip", "install", "-q", *core], check=True)
    return python


def timed_install(python: Path, features: str, wheelhouse: Path, uv_cache: Path) -> tuple[float, str]:
    env = {**os.environ, "UV_CACHE_DIR": str(uv_cache), "PIP_NO_CACHE_DIR": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [python, "-m", "fastsd", "install", "--features", features, "--wheelhouse", str(wheelhouse)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"install failed ({proc.returncode})")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="train")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fastsd-bench-install-"))
    wheelhouse = work / "wheelhouse"
    try:
        for phase in ("cold", "warm"):
            python = fresh_runtime(work / f"venv-{phase}")
            seconds, out = timed_install(python, args.features, wheelhouse, work / f"uv-cache-{phase}")
            source = out.strip().splitlines()[-1]
            n_pkgs = sum(1 for line in out.splitlines() if line.startswith(("installed ", "upgraded ", "changed ")))
            print(
                json.dumps(
                    {
                        "benchmark": "install",
                        "phase": phase,
                        "features": args.features,
                        "seconds": round(seconds, 2),
                        "packages": n_pkgs,
                        "summary": source,
                        "python": platform.python_version(),
                        "cpus": os.cpu_count(),
                    }
                ),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
