"""The first ten minutes: a CLI that starts at once, and offline, input and output messages a person can act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

HEAVY = ("torch", "diffusers", "transformers")

# Runs the CLI in-process and reports which heavy libraries it imported, whatever the exit.
_PROBE = """
import json, sys
from fastsd.cli import main
HEAVY = ("torch", "diffusers", "transformers")
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
sys.stdout.flush()
print(json.dumps({"exit": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}), file=sys.stderr)
"""


def _imports_of(*args: str, home) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTSD_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("session", "list"),
        ("session", "show", "pets"),
        ("doctor",),
        ("train", "--help"),
        ("caption", "--help"),
        ("ask", "--help"),
        ("eval", "pets", "--show"),
    ],
)
def test_light_commands_do_not_import_torch(args, home, cli):
    assert cli("session", "new", "pets", env={"FASTSD_HOME": str(home)}).returncode == 0
    seen = _imports_of(*args, home=home)
    assert seen["exit"] in (0, None), seen
    assert seen["heavy"] == [], f"fastsd {' '.join(args)} imported {seen['heavy']}"


# ----- item 3: offline and network errors in one line, fast -----------------------------------

NO_HUB = (
    "fastsd: error: cannot reach the Hugging Face Hub (no network). Put the model at {path} and pass "
    "--model {path}, or set HF_HUB_OFFLINE=1 to use the cache"
)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _online(endpoint: str, home) -> dict:
    """Environment of a CLI run that may go online, with the Hub at ``endpoint`` (never the real one)."""
    return {
        "HF_HUB_OFFLINE": "",
        "TRANSFORMERS_OFFLINE": "",
        "HF_ENDPOINT": endpoint,
        "FASTSD_HOME": str(home),
        "HF_TOKEN": "",
    }


def _timed(cli, *args, env):
    import time

    started = time.monotonic()
    result = cli(*args, env=env, timeout=120)
    return result, time.monotonic() - started


def test_model_get_without_network_says_where_to_put_the_model(cli, home):
    result, seconds = _timed(cli, "model", "get", "sd15", env=_online(f"http://127.0.0.1:{_closed_port()}", home))
    assert result.returncode == 1
    assert result.stderr.strip() == NO_HUB.format(path=home / "models" / "sd15")
    assert "Retrying" not in result.stderr + result.stdout
    assert seconds < 5


def test_train_on_a_hub_model_without_network_fails_fast(cli, home, tmp_path):
    from PIL import Image

    Image.new("RGB", (512, 512), (90, 120, 200)).save(tmp_path / "a.png")
    env = {"FASTSD_HOME": str(home)}
    assert cli("session", "new", "dog", "--base-model", "sd15", env=env).returncode == 0
    assert cli("session", "add", "dog", str(tmp_path / "a.png"), env=env).returncode == 0
    result, seconds = _timed(
        cli, "train", "dog", "--method", "lora", env=_online(f"http://127.0.0.1:{_closed_port()}", home)
    )
    assert result.returncode == 1
    assert result.stderr.strip() == NO_HUB.format(path=home / "models" / "sd15")
    assert seconds < 5


def test_ocr_without_network_fails_fast_with_the_same_line(cli, home, tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 100), (255, 255, 255)).save(tmp_path / "page.png")
    env = _online(f"http://127.0.0.1:{_closed_port()}", home)
    result, seconds = _timed(cli, "ocr", str(tmp_path / "page.png"), env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == NO_HUB.format(path=home / "models" / "zai-org--GLM-OCR")
    assert seconds < 5


def test_offline_mode_names_the_path_and_the_variable(cli, home):
    result = cli(
        "model", "get", "hf:org/never-downloaded", env={**_online("http://127.0.0.1:9", home), "HF_HUB_OFFLINE": "1"}
    )
    path = home / "models" / "org--never-downloaded"
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"fastsd: error: cannot download org/never-downloaded: HF_HUB_OFFLINE is set and it is not in the cache; "
        f"put the model at {path} and pass --model {path}, or unset HF_HUB_OFFLINE"
    )


@pytest.fixture
def gated_hub():
    """A local Hub that answers every request as a gated repo does (401 + X-Error-Code: GatedRepo)."""
    import http.server
    import threading

    class Gated(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = b'{"error": "Access to model org/gated is restricted. You must have access to it and be authenticated."}'
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/gated is restricted.")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_gated_repo_names_the_licence_page_and_the_token_variable(cli, home, gated_hub):
    result = cli("model", "get", "hf:org/gated", env=_online(gated_hub, home))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "fastsd: error: org/gated is gated: accept its licence at https://huggingface.co/org/gated (logged in), "
        "then set HF_TOKEN (environment variable, or the Colab secret HF_TOKEN) to a token of that account"
    )
    with_token = cli("model", "get", "hf:org/gated", env={**_online(gated_hub, home), "HF_TOKEN": "hf_" + "x" * 30})
    assert with_token.returncode == 2
    assert with_token.stderr.strip() == (
        "fastsd: error: org/gated is gated and HF_TOKEN's account has not been granted access: accept the licence "
        "at https://huggingface.co/org/gated while logged in as that account, then run again"
    )


def test_a_network_failure_elsewhere_is_one_line_not_unexpected():
    import httpx

    from fastsd.models.fetch import connection_failure_message

    err = httpx.ConnectError(
        "[Errno -2] Name or service not known", request=httpx.Request("GET", "https://civitai.com/x")
    )
    assert connection_failure_message(err) == (
        "cannot reach civitai.com (ConnectError: [Errno -2] Name or service not known); check the network and try again"
    )
    assert connection_failure_message(ValueError("no")) is None


# ----- item 4: inputs are checked before any model loads --------------------------------------


def test_ocr_of_a_missing_file_says_so_before_any_model(cli, home, tmp_path):
    result, seconds = _timed(cli, "ocr", "nothere.pdf", env={"FASTSD_HOME": str(home)})
    assert result.returncode == 2
    assert result.stderr.strip() == "fastsd: error: nothere.pdf: no such file (or the pattern matches nothing)"
    assert seconds < 5


def test_webui_ngrok_without_a_token_fails_before_the_model_loads(cli, home, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")  # loading it would fail with another message: the token comes first
    result = cli(
        "webui", "--tunnel", "ngrok", "--model", str(broken), env={"FASTSD_HOME": str(home), "NGROK_AUTHTOKEN": ""}
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fastsd: error: ngrok needs an authtoken: add it as the Colab secret NGROK_AUTHTOKEN (key icon on the left), "
        "set NGROK_AUTHTOKEN, or pass --ngrok-token; get one at https://dashboard.ngrok.com/get-started/your-authtoken"
    ]


def test_session_new_refuses_an_unknown_base_model_and_stores_paths_absolute(cli, home, tmp_path):
    env = {"FASTSD_HOME": str(home)}
    bad = cli("session", "new", "typo", "--base-model", "nonsense", env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "fastsd: error: nonsense is not a known model name (sd15, sd15-inpaint, sd21-512, sd21-768, sdxl, "
        "sdxl-refiner, sd35-medium, sd35-large, sd35-large-turbo, flux1-dev, flux1-schnell), a URL, hf:org/repo, "
        "or an existing path"
    )
    assert not (home / "sessions" / "typo").exists()
    for spec in ("sdxl", "hf:org/repo", "https://example.com/m.safetensors"):
        assert cli("session", "new", f"ok{len(spec)}", "--base-model", spec, env=env).returncode == 0
    (tmp_path / "models" / "mine").mkdir(parents=True)
    rel = cli("session", "new", "rel", "--base-model", "models/mine", env=env, cwd=tmp_path)
    assert rel.returncode == 0, rel.stderr
    info = json.loads((home / "sessions" / "rel" / "session.json").read_text())
    assert info["base_model"] == str(tmp_path / "models" / "mine")


# ----- item 5: output a person reads ----------------------------------------------------------


def test_train_says_its_plan_in_words_and_its_summary_once_and_records_the_model(home, tiny_sd1, capsys, caplog):
    import logging

    import torch

    from fastsd.cli import main
    from fastsd.session import Session

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads make tiny models slower
    s = Session.create("pup", home, resolution=64, class_word="dog")
    for i in range(2):
        _noise_png(s.instance_dir / f"img{i}.png", 64, 64, seed=i)
    try:
        with caplog.at_level(logging.INFO):
            code = main(
                ["train", "pup", "--model", str(tiny_sd1), "--method", "lora", "--steps", "1", "--resolution", "64",
                 "--allow-resolution", "--no-export"]
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert code == 0, out.err
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("fastsd")]
    assert out.out.startswith("finished: step 1/1") and out.out.count("finished:") == 1
    assert not [m for m in logged if "finished:" in m] and "finished:" not in out.err
    assert [m for m in logged if m.startswith("plan:")] == [
        "plan: LoRA rank 4 on cpu in fp32 with the adamw optimizer; no gradient checkpointing; channels-last layout"
    ]
    assert Session.open("pup", home).info["base_model"] == str(tiny_sd1)


def test_train_help_has_a_line_and_a_default_for_every_flag(cli):
    result = cli("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for shown in (
        "--batch-size N images per step and GPU (default: 1)",
        "--channels-last on|off channels-last memory layout (default: on)",
        "--warmup-steps N steps of linear LR warm-up (default: 0)",
        "--save-every N save a resumable checkpoint every N steps (default: 500)",
        "--steps N UNet steps (default full: 1500, lora: 1000)",
    ):
        assert shown in text
    from fastsd.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert [a.dest for a in train._actions if a.option_strings and not a.help] == []


def _noise_png(path, width, height, seed=0):
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")).save(path)


def test_session_add_names_the_source_of_a_duplicate_and_says_the_short_side(cli, home, tmp_path):
    import shutil

    env = {"FASTSD_HOME": str(home)}
    assert cli("session", "new", "d", env=env).returncode == 0
    _noise_png(tmp_path / "dog.jpg", 640, 480)
    shutil.copy(tmp_path / "dog.jpg", tmp_path / "copy.jpg")
    first = cli("session", "add", "d", str(tmp_path / "dog.jpg"), env=env)
    assert first.stdout.splitlines()[1] == (
        f"  warning: {tmp_path / 'dog.jpg'} is 640x480: short side 480 < 512, upscaled, it will train blurry"
    )
    again = cli("session", "add", "d", str(tmp_path / "copy.jpg"), env=env)
    assert again.stdout.splitlines()[1] == (
        f"  duplicate: {tmp_path / 'copy.jpg'} is the same picture as {tmp_path / 'dog.jpg'} (in the session as dog.png)"
    )


def test_a_big_photo_opens_without_pils_raw_warning(monkeypatch, tmp_path):
    import io
    import warnings

    from PIL import Image

    from fastsd.images import open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 40)  # 80x50 is then "big", as 12000x10000 is by default
    buf = io.BytesIO()
    Image.new("RGB", (80, 50), (10, 20, 30)).save(buf, format="JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(buf.getvalue()).size == (80, 50)


def test_meaningless_library_lines_are_dropped_and_meaningful_ones_kept(caplog, monkeypatch):
    import logging

    from fastsd import liblogs

    liblogs.quiet()
    vae_log = logging.getLogger("diffusers.models.modeling_utils")
    monkeypatch.setattr(vae_log, "propagate", True)  # diffusers' own handler is not caplog's
    with caplog.at_level(logging.WARNING):
        vae_log.warning("There are modules in AutoencoderKL that should be kept in float32: []. Casting directly")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for"
        )
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'"
        )
        vae_log.warning("There are modules in AutoencoderKL that should be kept in float32: ['decoder'].")
    assert [r.getMessage() for r in caplog.records] == [
        "There are modules in AutoencoderKL that should be kept in float32: ['decoder']."
    ]


# ----- item 7: one repository URL; a failed install is one line ---------------------------------


def _setup_cell_pip_line() -> str:
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "fastsd_dreambooth.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    return next(line for line in first.source.splitlines() if line.startswith("!pip install"))


def test_a_failed_install_in_the_setup_cell_is_one_line(tmp_path):
    # The cell's shell line as IPython runs it: {install_from} filled in, $$ -> $, pip from this Python.
    where = tmp_path / "no-such-checkout"
    line = _setup_cell_pip_line()[1:].replace("{install_from}", str(where)).replace("$$", "$")
    line = line.replace("/tmp/fastsd-pip.log", str(tmp_path / "pip.log"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=120)
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        f"fastsd: error: could not install fastsd from {where}: ERROR: Invalid requirement: 'fastsd @ {where}' "
        f"(pip's output: {tmp_path / 'pip.log'})"
    ]


def test_the_repository_url_comes_from_the_package_metadata(tmp_path):
    import shutil

    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "notebooks").mkdir()
    shutil.copy(REPO / "notebooks" / "build.py", tmp_path / "notebooks" / "build.py")
    setup = tmp_path / "setup.py"
    setup.write_text(setup.read_text().replace("https://github.com/fastsd/fastsd", "https://github.com/someone/fork"))
    stale = subprocess.run(
        [sys.executable, "notebooks/build.py", "--check"], cwd=tmp_path, capture_output=True, text=True
    )
    assert stale.returncode == 1 and "README.md" in stale.stderr
    subprocess.run([sys.executable, "notebooks/build.py"], cwd=tmp_path, check=True, capture_output=True)
    readme = (tmp_path / "README.md").read_text()
    notebook = (tmp_path / "notebooks" / "fastsd_webui.ipynb").read_text()
    assert "fastsd/fastsd" not in readme and "fastsd/fastsd" not in notebook
    assert "https://colab.research.google.com/github/someone/fork/blob/main/notebooks/fastsd_webui.ipynb" in readme
    assert "git+https://github.com/someone/fork" in readme
    assert "https://colab.research.google.com/github/someone/fork/blob/main/notebooks/fastsd_webui.ipynb" in notebook
    assert 'install_from = \\"git+https://github.com/someone/fork\\"' in notebook


@pytest.mark.parametrize(
    ("name", "repo"),
    [("sd35-large", "stabilityai/stable-diffusion-3.5-large"), ("flux1-dev", "black-forest-labs/FLUX.1-dev")],
)
def test_gated_registry_models_name_their_licence_page(cli, home, gated_hub, name, repo):
    result = cli("model", "get", name, env=_online(gated_hub, home))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"fastsd: error: {repo} is gated: accept its licence at https://huggingface.co/{repo} (logged in), "
        "then set HF_TOKEN (environment variable, or the Colab secret HF_TOKEN) to a token of that account"
    )


def test_an_interrupted_command_exits_130_under_python_m(tmp_path):
    """Ctrl-C caught by fastsd ends ``python -m fastsd`` with 130 and its one line, also when the
    interrupt landed in code run from a string (a dataclass being made while modules import),
    which CPython would otherwise answer by killing the process with SIGINT at exit (-2)."""
    (tmp_path / "interrupted_cli.py").write_text(
        "import argparse\n"
        "from fastsd import cli\n"
        "def parser():\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.set_defaults(func=lambda args: exec('raise KeyboardInterrupt'))\n"
        "    return p\n"
        "cli.build_parser = parser\n"
        "cli.entry()\n"
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_cli"], env=env, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stderr) == (130, "fastsd: interrupted\n")
