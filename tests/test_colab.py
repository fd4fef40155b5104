"""fastsd.colab against the stand-in google.colab: Drive, secrets, proxy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

STANDIN = Path(__file__).parent / "colab_standin"


def _drop_google_modules() -> None:
    for name in [m for m in sys.modules if m == "google" or m.startswith("google.")]:
        del sys.modules[name]


@pytest.fixture
def colab(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(STANDIN))
    _drop_google_modules()
    monkeypatch.setenv("COLAB_RELEASE_TAG", "standin")
    drive = tmp_path / "drive" / "MyDrive"
    monkeypatch.setenv("STANDIN_DRIVE", str(drive))
    monkeypatch.setenv("FASTSD_DRIVE_DIR", str(drive))
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "calls.log"))
    monkeypatch.delenv("FASTSD_HOME", raising=False)
    yield tmp_path
    _drop_google_modules()  # the stand-in must not leak into later tests as a "real" Colab


def test_mount_drive_makes_home_on_drive(colab):
    from fastsd.colab import mount_drive
    from fastsd.paths import resolve_home

    assert resolve_home() != colab / "drive" / "MyDrive" / "fastsd"  # not mounted yet
    assert mount_drive() == colab / "drive" / "MyDrive"
    assert resolve_home() == colab / "drive" / "MyDrive" / "fastsd"
    mount_drive()  # a re-run cell does not mount twice
    assert (colab / "calls.log").read_text().count("drive.mount") == 1


def test_secret_env_then_colab(colab, monkeypatch):
    from fastsd.colab import secret

    monkeypatch.setenv("STANDIN_SECRETS", '{"HF_TOKEN": "hf_from_colab"}')
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert secret("HF_TOKEN") == "hf_from_colab"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert secret("HF_TOKEN") == "hf_from_env"
    assert secret("NGROK_AUTHTOKEN") is None


def test_proxy_url(colab):
    from fastsd.colab import proxy_url

    assert proxy_url(7860) == "http://127.0.0.1:7860/"


def test_colab_py_is_the_only_module_that_imports_google_colab():
    import re

    import fastsd

    pattern = re.compile(r"^\s*(from google\.colab\b|import google\.colab\b|from google import colab\b)", re.M)
    root = Path(fastsd.__file__).parent
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "colab.py" and pattern.search(p.read_text())
    ]
    assert offenders == []
