"""``fastsd demo`` through the front door: offline, no GPU, every result it prints exists."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest

RESULTS = {"photos", "session", "LoRA", "image (txt2img)", "single file", "PDF page", "OCR (Markdown)"}


def _closed_port() -> int:
    """A loopback port nothing listens on: a Hub client pointed there fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(stdout: str) -> dict[str, Path]:
    """The ``label: path`` lines of the demo's report."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "results (in" in line)
    found = {}
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        label, path = line.strip().split(": ", 1)
        found[label] = Path(path.strip())
    return found


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


@pytest.mark.slow
def test_demo_runs_offline_and_every_printed_result_exists(tmp_path, cli):
    root, cache = tmp_path / "home", tmp_path / "cache"
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "FASTSD_CACHE": str(cache),
    }
    # what an earlier demo run left: the rerun replaces it (an old session would refuse a new one)
    from fastsd.session import Session

    Session.create("demo", root / "demo").update(base_model="old")
    (root / "demo" / ".fastsd-demo").write_text("")
    stale_page = root / "demo" / "ocr" / "demo-page" / "page_0001.md"
    stale_page.parent.mkdir(parents=True)
    stale_page.write_text("old")

    res = cli("--root", str(root), "demo", env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = [line for line in res.stdout.splitlines() if line.startswith("[")]
    assert [s.split()[0] for s in steps] == [f"[{i}/8]" for i in range(1, 9)]
    assert all(s.endswith(" s)") for s in steps)
    assert "random weights" in res.stdout and "not the art" in res.stdout
    assert "fastsd train mydog --method lora" in res.stdout

    files = _results(res.stdout)
    assert set(files) == RESULTS
    for label, path in files.items():
        assert path.exists(), f"{label}: {path} is missing"
        assert path.is_relative_to(root / "demo"), f"{label}: {path} is outside the demo home"
    assert list(root.iterdir()) == [root / "demo"], "the demo wrote outside its own home"
    assert any(k.startswith("lora_unet_") for k in _header(files["LoRA"]))
    assert any(k.startswith("model.diffusion_model.") for k in _header(files["single file"]))
    from PIL import Image

    with Image.open(files["image (txt2img)"]) as image:
        assert image.size == (64, 64)
    assert (cache / "tiny" / "sd1-v1" / "model_index.json").is_file()
    assert Session.open("demo", root / "demo").info["base_model"] != "old"
    assert stale_page.read_text() != "old"


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, cli):
    mine = tmp_path / "home" / "demo"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    res = cli("--root", str(tmp_path / "home"), "demo", env={"FASTSD_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [
        f"fastsd: error: demo step 1/8 (models) failed: {mine} is not empty and was not made by fastsd demo "
        "(no .fastsd-demo file): move it away, or pass --root DIR to run the demo in DIR/demo"
    ]
    assert (mine / "notes.txt").read_text() == "keep me"
