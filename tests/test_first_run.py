"""The first ten minutes: a CLI that starts at once, and offline, input and output messages a person can act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    [("--help",), ("--version",), ("session", "list"), ("session", "show", "pets"), ("doctor",), ("train", "--help")],
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
