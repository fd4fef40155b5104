"""Tunnels: URL parsing from captured real-format output, error advice, token handling, health checks."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastsd import redact
from fastsd.errors import UserInputError
from fastsd.launch import tunnel

DATA = Path(__file__).parent / "data" / "tunnel_output"


def sample(name: str) -> str:
    return (DATA / name).read_text()


@pytest.fixture(autouse=True)
def _clean_secrets():
    redact.forget_all()
    yield
    redact.forget_all()


# ---- parsing


def test_cloudflared_url_from_its_log():
    assert tunnel.parse_cloudflared_url(sample("cloudflared.txt")) == (
        "https://quarterly-lemon-provisions-ref.trycloudflare.com"
    )


def test_cloudflared_api_host_is_not_the_tunnel():
    text = sample("cloudflared_dns.txt")
    assert tunnel.parse_cloudflared_url(text) is None
    assert "cannot reach Cloudflare" in tunnel.cloudflared_advice(text)


def test_cloudflared_rate_limit_advice():
    text = sample("cloudflared_ratelimit.txt")
    assert tunnel.parse_cloudflared_url(text) is None
    assert "rate-limiting" in tunnel.cloudflared_advice(text)


def test_localtunnel_url():
    assert tunnel.parse_localtunnel_url(sample("localtunnel.txt")) == "https://fast-ducks-sing.loca.lt"
    assert tunnel.parse_localtunnel_url("npm warn exec installing") is None


def test_ngrok_url_from_agent_log():
    assert tunnel.parse_ngrok_url(sample("ngrok.log")) == "https://7f3a-34-125-201-17.ngrok-free.app"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ngrok_108.txt", "allows one agent at a time"),
        ("ngrok_4018.txt", "needs a verified account and authtoken"),
        ("ngrok_107.txt", "not valid"),
    ],
)
def test_ngrok_errors_become_plain_advice(name, expected):
    advice = tunnel.ngrok_advice(sample(name))
    assert expected in advice
    assert name.split("_")[1].split(".")[0] in advice  # the code is kept for searching


def test_unknown_ngrok_error_masks_the_token():
    advice = tunnel.ngrok_advice("failed: bad thing happened, env had hf_2ZxQ8mVbN3kLpR7tYwE1aSdF4gH6jKu")
    assert "2ZxQ8mVb" not in advice
    assert "ngrok could not start" in advice
    advice = tunnel.ngrok_advice("session closed: authtoken=2ZxQ8mVbN3kLpR7tYwE1aSdF4gH_6jKu rejected")
    assert "2ZxQ8mVb" not in advice and "ngrok refused the authtoken" in advice


def test_read_until_parses_a_live_process(tmp_path):
    # A real process printing cloudflared's output the way it does (stderr, line by line).
    script = (
        "import sys, time\n"
        f"for line in open({str(DATA / 'cloudflared.txt')!r}):\n"
        "    sys.stderr.write(line); sys.stderr.flush(); time.sleep(0.01)\n"
        "time.sleep(30)\n"
    )
    proc = tunnel._spawn([sys.executable, "-c", script])
    try:
        url, text = tunnel.read_until(proc, tunnel.parse_cloudflared_url, timeout=10)
    finally:
        tunnel._stopper(proc)()
    assert url == "https://quarterly-lemon-provisions-ref.trycloudflare.com"
    assert "Requesting new quick Tunnel" in text
    assert proc.poll() is not None  # closing the tunnel ended the process


# ---- tokens and masking


def test_mask_command_hides_secret_flag_values():
    line = redact.mask_command(["python", "launch.py", "--gradio-auth", "me:pw-12345", "--api-auth=me:pw-12345"])
    assert line == "python launch.py --gradio-auth **** --api-auth=****"


def test_registered_secrets_and_token_patterns_are_masked():
    redact.register("me:topsecret99")
    text = redact.mask("login me:topsecret99 then topsecret99; hf_abcdefghijklmnopqrstuvwxyz12 NGROK_AUTHTOKEN=2abc")
    assert "topsecret99" not in text and "hf_abc" not in text and "2abc" not in text
    assert text.count("****") == 4


def test_logging_filter_masks(caplog):
    import logging

    redact.register("sEcReT-value")
    logger = logging.getLogger("fastsd.test.redact")
    logger.addFilter(redact.RedactingFilter())
    with caplog.at_level(logging.INFO, logger="fastsd.test.redact"):
        logger.info("token is %s", "sEcReT-value")
    assert "sEcReT-value" not in caplog.text and "****" in caplog.text


def test_ngrok_token_sources(monkeypatch):
    monkeypatch.setenv("NGROK_AUTHTOKEN", "env-token-123456")
    assert tunnel.ngrok_token("arg-token-123456") == "arg-token-123456"
    assert tunnel.ngrok_token() == "env-token-123456"
    assert "env-token-123456" not in redact.mask("x env-token-123456")
    monkeypatch.delenv("NGROK_AUTHTOKEN")
    with pytest.raises(UserInputError, match="Colab secret NGROK_AUTHTOKEN"):
        tunnel.ngrok_token()


def test_generated_password_is_registered():
    auth = tunnel.generate_auth()
    user, password = auth.split(":")
    assert user == "fastsd" and len(password) >= 16
    assert password not in redact.mask(f"password {password}")


def test_stale_ngrok_agents_are_killed_only_when_ours():
    pytest.importorskip("pyngrok")
    import os

    killed = []

    class Proc:
        def __init__(self, name, uid):
            self.info = {"name": name, "uids": SimpleNamespace(real=uid)}

        def kill(self):
            killed.append(self.info["name"])

    me = os.getuid()
    procs = [Proc("ngrok", me), Proc("python", me), Proc("ngrok", me + 1)]
    assert tunnel.kill_stale_ngrok(lambda attrs: procs, echo=lambda s: None) == 1
    assert killed == ["ngrok"]


# ---- health checks and local tunnels


@pytest.fixture
def local_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/")
                self.end_headers()
                return
            if self.path == "/login" and self.headers.get("Authorization") != "Basic dTpw":  # u:p
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="x"')
                self.end_headers()
                return
            if self.path == "/broken":
                self.send_response(502)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_health_check_and_none_tunnel(local_server):
    assert tunnel.health_check(f"http://127.0.0.1:{local_server}/", timeout=5) == 200
    t = tunnel.open_tunnel("none", local_server)
    assert t.url == f"http://127.0.0.1:{local_server}" and t.kind == "none"


def test_health_check_follows_redirects_and_knows_a_login_page(local_server):
    base = f"http://127.0.0.1:{local_server}"
    assert tunnel.health_check(f"{base}/moved", timeout=5) == 200  # followed to /
    assert tunnel.health_check(f"{base}/login", timeout=5) == 401  # a login page answers: the tunnel works
    assert tunnel.health_check(f"{base}/login", auth="u:p", timeout=5) == 200  # the credentials are sent
    with pytest.raises(tunnel.TunnelError, match=r"HTTP 401"):
        tunnel.health_check(f"{base}/login", auth="u:wrong", timeout=0.5, interval=0.1)
    with pytest.raises(tunnel.TunnelError, match=r"HTTP 502"):
        tunnel.health_check(f"{base}/broken", timeout=0.5, interval=0.1)


def test_health_check_failure_says_what_to_do():
    with pytest.raises(tunnel.TunnelError, match="did not answer within 1 s"):
        tunnel.health_check("http://127.0.0.1:9/", timeout=1, interval=0.2)


def test_colab_tunnel_outside_colab_is_refused(local_server):
    with pytest.raises(UserInputError, match="only inside a Colab notebook"):
        tunnel.open_tunnel("colab", local_server)


def test_colab_tunnel_uses_the_kernel_proxy(local_server, monkeypatch):
    calls = []
    fake = SimpleNamespace(eval_js=lambda js: calls.append(js) or "https://abc-7860-colab.googleusercontent.com/")
    monkeypatch.setitem(sys.modules, "google", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "google.colab", SimpleNamespace(output=fake))
    monkeypatch.setitem(sys.modules, "google.colab.output", fake)
    t = tunnel.open_tunnel("colab", local_server)
    assert calls == [f"google.colab.kernel.proxyPort({local_server})"]
    assert t.url.endswith("colab.googleusercontent.com/")


def test_gradio_share_link_is_checked_before_it_is_returned(local_server, monkeypatch):
    import gradio.networking

    seen = {}

    def fake_setup_tunnel(host, port, token, server, cert):
        seen.update(host=host, port=port, token_len=len(token))
        return f"http://127.0.0.1:{local_server}"  # stands in for https://xxxx.gradio.live

    monkeypatch.setattr(gradio.networking, "setup_tunnel", fake_setup_tunnel)
    t = tunnel.open_tunnel("gradio", local_server, echo=lambda _: None)
    assert seen == {"host": "127.0.0.1", "port": local_server, "token_len": 43}
    assert t.kind == "gradio" and t.url == f"http://127.0.0.1:{local_server}"


def test_gradio_share_failure_says_what_to_do(monkeypatch):
    import gradio.networking

    def broken(*args):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr(gradio.networking, "setup_tunnel", broken)
    with pytest.raises(tunnel.TunnelError, match="use --tunnel cloudflared or ngrok"):
        tunnel.open_tunnel("gradio", 7860, echo=lambda _: None)


def test_colab_tier(monkeypatch):
    from fastsd import runtime

    t4 = SimpleNamespace(name="Tesla T4")
    monkeypatch.setattr(runtime, "gpus", lambda: [t4])
    monkeypatch.setattr(runtime, "ram_gb", lambda: {"total_gb": 12.7, "available_gb": 11.0})
    assert tunnel.colab_tier() == "unknown"
    monkeypatch.setattr(runtime, "gpus", lambda: [SimpleNamespace(name="NVIDIA A100-SXM4-40GB")])
    assert tunnel.colab_tier() == "paid"
    monkeypatch.setattr(runtime, "gpus", lambda: [t4])
    monkeypatch.setattr(runtime, "ram_gb", lambda: {"total_gb": 51.0, "available_gb": 50.0})
    assert tunnel.colab_tier() == "paid"


def test_cached_cloudflared_must_run_or_is_removed(tmp_path, monkeypatch):
    """A cached binary is kept only when it runs and says it is cloudflared; a damaged one is deleted."""
    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # none on PATH: the cache is what counts
    monkeypatch.setattr(tunnel.platform, "system", lambda: "Linux")
    monkeypatch.setattr(tunnel.platform, "machine", lambda: "x86_64")
    with pytest.raises(tunnel.TunnelError, match="not installed"):
        tunnel.cloudflared_binary(fetch=False)
    cached = tmp_path / "cache" / "bin" / "cloudflared"
    cached.parent.mkdir(parents=True)

    cached.write_text("#!/bin/sh\necho 'cloudflared version 2025.10.1 (built 2025-10-20-1200 UTC)'\n")
    cached.chmod(0o755)
    assert tunnel.cloudflared_binary(fetch=False) == cached

    cached.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")  # e.g. a truncated download
    with pytest.raises(tunnel.TunnelError, match="does not run here"):
        tunnel.cloudflared_binary(fetch=False)
    assert not cached.exists()  # fetched again next time

    cached.write_text("#!/bin/sh\necho 'some other tool 1.0'\n")  # runs, but is not cloudflared
    cached.chmod(0o755)
    with pytest.raises(tunnel.TunnelError, match="does not run here"):
        tunnel.cloudflared_binary(fetch=False)
    assert not cached.exists()


# What a CLI run logs after fastsd's logging setup: pyngrok relays the agent's lines, uvicorn
# configures its own handlers when it starts, a library logs an exception quoting a signed URL.
_LOGGING_RUN = r"""
import logging, logging.config, os, sys
from fastsd.cli import main

main(["model", "get", "no-such-model"])  # any command: it sets up logging the way every command does
token, civitai = os.environ["NGROK_AUTHTOKEN"], os.environ["CIVITAI_TOKEN"]
logging.getLogger("pyngrok.process.ngrok").info(
    't=2025-06-01T10:00:00 lvl=eror msg="session closed" err="authentication failed: Your authtoken: %s"', token
)
logging.getLogger("pyngrok.ngrok").warning("Opening tunnel with config {'authtoken': %r}", token)
logging.getLogger("fastsd.launch.tunnel").warning("ngrok agent env: NGROK_AUTHTOKEN=%s", token)
import uvicorn.config
logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
logging.getLogger("uvicorn.error").error("request with key %s failed", civitai)
try:
    raise ConnectionError(f"GET https://civitai.com/api/download/models/1?token={civitai} failed")
except ConnectionError:
    logging.getLogger("httpx").exception("download failed")
"""


def test_library_log_lines_with_tokens_are_masked(tmp_path):
    import secrets as _secrets

    from conftest import REPO

    token = "2" + _secrets.token_hex(14) + "_" + _secrets.token_hex(10)
    civitai = _secrets.token_hex(16)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "FASTSD_HOME": str(tmp_path / "home"),
        "NGROK_AUTHTOKEN": token,
        "CIVITAI_TOKEN": civitai,
    }
    proc = subprocess.run([sys.executable, "-c", _LOGGING_RUN], env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Your authtoken: ****" in out and "NGROK_AUTHTOKEN=****" in out  # the lines were logged, masked
    assert "request with key ****" in out and "ConnectionError" in out
    assert token not in out and token[:12] not in out
    assert civitai not in out
