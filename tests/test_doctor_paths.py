"""fastsd doctor, the fastsd home rule, and the CLI's error contract."""

from __future__ import annotations

import json

import pytest

from fastsd.doctor import advice
from fastsd.errors import UserInputError
from fastsd.paths import fastsd_home, resolve_home
from fastsd.runtime import GPU, environment, fingerprint


def test_doctor_json_is_one_stable_object(cli, tmp_path):
    result = cli("doctor", "--json", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in (
        "environment",
        "python",
        "torch",
        "gpus",
        "ram",
        "disk",
        "fingerprint",
        "packages",
        "features",
        "advice",
    ):
        assert key in report
    assert report["environment"] == "terminal"
    assert report["torch"]["version"].startswith("2.")
    for name in ("diffusers", "transformers", "accelerate", "bitsandbytes", "peft", "safetensors", "gradio"):
        assert name in report["packages"]
    assert set(report["features"]) == {"train", "webui", "ocr"}
    assert all(isinstance(f["missing"], list) for f in report["features"].values())
    assert report["disk"]["home"]["free_gb"] > 0


def test_doctor_text_mentions_hardware(cli, tmp_path):
    result = cli("doctor", "--root", str(tmp_path))
    assert result.returncode == 0
    assert "torch" in result.stdout and "feature  train" in result.stdout


def test_colab_is_detected_by_env(monkeypatch):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-2026")
    assert environment() == "colab"


def test_t4_advice_says_fp16_and_lora():
    t4 = GPU(index=0, name="Tesla T4", compute_capability="7.5", vram_total_gb=14.7, vram_free_gb=14.5, bf16=False)
    tips = " ".join(advice([t4], {"total_gb": 12.7}, {"version": "2.11.0+cu128"}))
    assert "fp16" in tips and "GradScaler" in tips
    assert "SDXL full fine-tuning will not fit" in tips and "LoRA" in tips
    assert "streaming converter" in tips  # 12.7 GB RAM


def test_fingerprint_shape():
    fp = fingerprint()
    assert fp.startswith("cp3") and "-torch2." in fp


def test_home_resolution_order(monkeypatch, tmp_path):
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    monkeypatch.setenv("FASTSD_DRIVE_DIR", str(drive))
    monkeypatch.delenv("FASTSD_HOME", raising=False)
    assert resolve_home() == drive / "fastsd"
    monkeypatch.setenv("FASTSD_HOME", str(tmp_path / "env-home"))
    assert resolve_home() == tmp_path / "env-home"
    assert resolve_home(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("FASTSD_HOME")
    monkeypatch.setenv("FASTSD_DRIVE_DIR", str(tmp_path / "not-mounted"))
    assert resolve_home() == resolve_home().home() / "fastsd"


def test_home_is_created_with_its_folders(tmp_path):
    home = fastsd_home(tmp_path / "h")
    assert all((home / d).is_dir() for d in ("sessions", "models", "outputs", "ocr", "wheels"))


def test_unwritable_home_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the home folder should go")
    with pytest.raises(UserInputError, match=r"is not writable .*pass --root DIR or set FASTSD_HOME"):
        fastsd_home(blocker / "home")


def test_cli_errors_are_one_line_without_traceback(cli):
    result = cli("install", "--features", "nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fastsd: error: unknown feature 'nope': choose from train, webui, ocr or all (e.g. --features train,webui)"
    ]
    debug = cli("install", "--features", "nope", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_usage_errors_exit_2(cli):
    assert cli("no-such-command").returncode == 2
    assert cli().returncode == 2
    assert cli("--version").stdout.startswith("fastsd ")
