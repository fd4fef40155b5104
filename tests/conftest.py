"""Shared fixtures: tiny offline models (built once per test session), a temp fastsd home, no network."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fastsd.demo.tiny import save_tiny_pipeline  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Refuse connections to anything but loopback: a test that reaches the internet fails."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (
            host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX
        ):
            raise OSError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on the 2 shared CI cores, more make tiny models slower (up to 10x)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty fastsd home in a temp folder, also set as FASTSD_HOME."""
    root = tmp_path / "fastsd-home"
    monkeypatch.setenv("FASTSD_HOME", str(root))
    monkeypatch.delenv("FASTSD_DRIVE_DIR", raising=False)
    return root


def _tiny(kind: str, tmp_path_factory) -> Path:
    return save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """Folder of a tiny SD1.x Diffusers pipeline."""
    return _tiny("sd1", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd1_inpaint(tmp_path_factory) -> Path:
    """Folder of a tiny SD1.x inpainting pipeline (9-channel UNet)."""
    return _tiny("sd1-inpaint", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """Folder of a tiny SD2.x 768-v pipeline (v-prediction)."""
    return _tiny("sd2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """Folder of a tiny SDXL base pipeline."""
    return _tiny("sdxl", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """Folder of a tiny SD3.5 Medium-shaped pipeline (MMDiT-X, two CLIPs with projection, T5)."""
    return _tiny("sd3", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """Folder of a tiny FLUX.1-dev-shaped pipeline (double + single blocks, guidance embedder, CLIP-L, T5)."""
    return _tiny("flux", tmp_path_factory)


REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: float = 300, input: str | None = None
):
    """Run ``python -m fastsd ARGS`` from this checkout in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fastsd", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        input=input,
    )


@pytest.fixture
def cli():
    """The :func:`run_cli` helper as a fixture."""
    return run_cli


@pytest.fixture(scope="session")
def tiny_glm_ocr(tmp_path_factory) -> Path:
    """Folder of a tiny random-weight GLM-OCR model with its processor files (offline)."""
    from fastsd.demo.tiny_ocr import save_tiny_glm_ocr

    return save_tiny_glm_ocr(tmp_path_factory.mktemp("tiny-glm-ocr"))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """Folder of a tiny random-weight Qwen3-VL (the default captioner's architecture)."""
    from fastsd.demo.tiny_vlm import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))
