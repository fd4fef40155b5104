"""Supervision against a real child process standing in for a web UI (tests/fake_webui.py)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from fastsd.launch.supervise import BackendError, Supervisor, likely_cause

FAKE = str(Path(__file__).with_name("fake_webui.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def make(tmp_path, *extra, path="/sdapi/v1/options", **kw) -> tuple[Supervisor, int, list[str]]:
    port = free_port()
    echoed: list[str] = []
    sup = Supervisor(
        "fake",
        [sys.executable, FAKE, "--port", str(port), *extra],
        ready_url=f"http://127.0.0.1:{port}{path}",
        log_path=tmp_path / "live" / "webui-fake.log",
        mirror_path=tmp_path / "home" / "logs" / "webui-fake.log",
        echo=echoed.append,
        poll_interval=0.1,
        stop_grace=3,
        restart_delay=0.1,
        **kw,
    )
    return sup, port, echoed


def test_ready_by_http_polling_and_output_teed_to_log(tmp_path):
    sup, port, echoed = make(tmp_path, "--delay", "0.8", ready_timeout=20)
    with sup:
        started = time.monotonic()
        assert sup.wait_ready() == f"http://127.0.0.1:{port}/sdapi/v1/options"
        assert time.monotonic() - started >= 0.7  # not before the endpoint answered
    log = (tmp_path / "home" / "logs" / "webui-fake.log").read_text()
    assert "Commit hash: 82a973c04367123ae98bd9abdf80d9eda9b910e2" in log
    assert "Version: v1.10.1" in echoed
    assert "[fastsd] stopped fake" in log


def test_comfyui_style_readiness_on_system_stats(tmp_path):
    sup, port, _ = make(tmp_path, "--style", "comfyui", path="/system_stats", ready_timeout=20)
    with sup:
        assert sup.wait_ready().endswith("/system_stats")


def test_readiness_with_basic_auth(tmp_path):
    import urllib.error
    import urllib.request

    sup, port, _ = make(tmp_path, "--auth", "me:s3cret-pass", auth="me:s3cret-pass", ready_timeout=20)
    with sup:
        sup.wait_ready()  # polls with the login
        with pytest.raises(urllib.error.HTTPError) as refused:  # the server really demands it
            urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=5)
        assert refused.value.code == 401


def test_timeout_message_has_tail_and_cause(tmp_path):
    sup, _, _ = make(tmp_path, "--hang", ready_timeout=1.5)
    with pytest.raises(BackendError) as info, sup:
        sup.wait_ready()
    msg = str(info.value)
    assert "did not answer" in msg and "within 2 s" in msg
    assert "still starting or hangs" in msg
    assert "Commit hash: 82a973c04367123ae98bd9abdf80d9eda9b910e2" in msg  # the log tail
    assert not sup.running


def test_crash_before_ready_names_the_cause_and_restart_is_bounded(tmp_path):
    counter = tmp_path / "starts.txt"
    sup, _, _ = make(
        tmp_path,
        "--fail",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB",
        "--counter",
        str(counter),
        ready_timeout=20,
        max_restarts=2,
    )
    with pytest.raises(BackendError) as info, sup:
        sup.wait_ready()
    assert len(counter.read_text().split()) == 3  # first start + 2 restarts, then it gives up
    msg = str(info.value)
    assert "exited with code 1 after 2 restart(s)" in msg
    assert "the GPU ran out of memory" in msg
    assert "CUDA out of memory" in "\n".join(info.value.tail)


def test_crash_after_ready_is_restarted(tmp_path):
    counter = tmp_path / "starts.txt"
    sup, _, _ = make(tmp_path, "--crash-after", "0.3", "--counter", str(counter), ready_timeout=20, max_restarts=1)
    with pytest.raises(BackendError) as info, sup:
        sup.wait_ready()
        sup.wait()  # crash -> restart -> ready -> crash -> bound reached
    assert len(counter.read_text().split()) == 2
    assert "after 1 restart(s)" in str(info.value)


def test_clean_stop_leaves_no_process_behind(tmp_path):
    pidfile = tmp_path / "pids"
    sup, _, _ = make(tmp_path, "--child", "--pidfile", str(pidfile), ready_timeout=20)
    with sup:
        sup.wait_ready()
        pid, child = map(int, pidfile.read_text().split())
        assert alive(pid) and alive(child)
    for _ in range(50):
        if not alive(pid) and not alive(child):
            break
        time.sleep(0.1)
    assert not alive(pid) and not alive(child)


def test_interrupt_stops_the_server(tmp_path):
    pidfile = tmp_path / "pids"
    sup, _, _ = make(tmp_path, "--child", "--pidfile", str(pidfile), ready_timeout=20)
    with pytest.raises(KeyboardInterrupt), sup:
        sup.wait_ready()
        raise KeyboardInterrupt  # what Ctrl-C / a cell interrupt raises in the waiting thread
    pid, child = map(int, pidfile.read_text().split())
    time.sleep(0.3)
    assert not alive(pid) and not alive(child)


def test_secrets_are_masked_in_the_log(tmp_path):
    sup, _, _ = make(tmp_path, "--auth", "me:hunter2-long", auth="me:hunter2-long", ready_timeout=20)
    with sup:
        sup.wait_ready()
    log = (tmp_path / "live" / "webui-fake.log").read_text()
    assert "hunter2-long" not in log
    assert "--auth ****" in log


def fake_secrets(monkeypatch) -> dict[str, str]:
    """Tokens as fastsd's users set them (random, so a hit in a log is no coincidence)."""
    import secrets as _secrets

    values = {
        "HF_TOKEN": "hf_" + _secrets.token_hex(17),
        "NGROK_AUTHTOKEN": "2" + _secrets.token_hex(16) + "_" + _secrets.token_hex(8),
        "CIVITAI_TOKEN": _secrets.token_hex(16),
        "OPENAI_API_KEY": "sk-" + _secrets.token_hex(20),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.mark.parametrize("backend", ["a1111", "comfyui"])
def test_backend_process_gets_no_tokens_and_its_log_has_none(tmp_path, monkeypatch, backend):
    from fastsd import redact
    from fastsd.launch.backends import LaunchContext, get_backend

    redact.forget_all()
    tokens = fake_secrets(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache"))  # caches are passed on, tokens are not
    port = free_port()
    be = get_backend(backend)
    ctx = LaunchContext(install_dir=tmp_path, python=Path(sys.executable), links=tmp_path / "links", port=port)
    echoed: list[str] = []
    # The stand-in prints every variable it got, then a token it read on its own (say, an
    # extension's config file holding the same Civitai key): both must stay out of the log.
    argv = [sys.executable, FAKE, "--port", str(port), "--style", "comfyui", "--print-env"]
    argv += ["--say", f"civitai helper: using API key {tokens['CIVITAI_TOKEN']}"]
    sup = Supervisor(
        f"webui-{backend}",
        argv,
        ready_url=f"http://127.0.0.1:{port}/system_stats",
        env=be.environment(ctx),
        log_path=tmp_path / "live" / "webui.log",
        mirror_path=tmp_path / "home" / "logs" / f"webui-{backend}.log",
        echo=echoed.append,
        poll_interval=0.1,
        ready_timeout=20,
    )
    with sup:
        sup.wait_ready()
    log = (tmp_path / "home" / "logs" / f"webui-{backend}.log").read_text()
    assert f"HF_HOME={tmp_path / 'hf-cache'}" in log and "PATH=" in log  # it did print its environment
    assert "civitai helper: using API key ****" in log
    for name, value in tokens.items():
        assert f"{name}=" not in log, name  # the variable never reached the backend
        assert value not in log and value not in "\n".join(echoed), name


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory.", "GPU ran out of memory"),
        ("RuntimeError: Torch is not able to use GPU; add --skip-torch-cuda-test", "cannot use a GPU"),
        ("OSError: [Errno 98] Address already in use", "port is taken"),
        ("ModuleNotFoundError: No module named 'open_clip'", "(open_clip)"),
        ("fatal: repository 'https://github.com/Stability-AI/stablediffusion.git/' not found", "could not be fetched"),
        ("safetensors_rust.SafetensorError: Error while deserializing header: MetadataIncompleteBuffer", "damaged"),
        ("OSError: [Errno 28] No space left on device", "disk is full"),
        ("ImportError: cannot import name 'cached_download' from 'huggingface_hub'", "does not match"),
    ],
)
def test_failure_lines_map_to_causes(line, expected):
    assert expected in likely_cause(["Loading...", line])


def test_killed_by_exit_code():
    assert "RAM" in likely_cause(["Loading weights"], -9)
    assert likely_cause(["all fine"], 1) is None
