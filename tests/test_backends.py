"""Backends: exact command lines and environments, model-folder linking, git, requirements, the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastsd import redact, storage
from fastsd.errors import InstallError, UserInputError
from fastsd.launch import backends, controlnet, launcher, modelfolders, pyenv
from fastsd.session import Session

PY = Path("/venv/bin/python")
INSTALL = Path("/home/fastsd/webui/a1111")
LINKS = Path("/cache/webui-links/a1111")


def ctx(**kw) -> backends.LaunchContext:
    base = backends.LaunchContext(install_dir=INSTALL, python=PY, links=LINKS, port=7860)
    return replace(base, **kw)


# ---- command lines and environments, exactly


def test_a1111_command_default():
    assert backends.get_backend("a1111").command(ctx()) == [
        "/venv/bin/python", "launch.py", "--port", "7860", "--api", "--skip-python-version-check",
        "--opt-sdp-attention", "--no-half-vae",
        "--ckpt-dir", "/cache/webui-links/a1111/Stable-diffusion",
        "--lora-dir", "/cache/webui-links/a1111/Lora",
        "--vae-dir", "/cache/webui-links/a1111/VAE",
        "--embeddings-dir", "/cache/webui-links/a1111/embeddings",
    ]  # fmt: skip


def test_a1111_command_with_auth_listen_xformers_controlnet_ckpt():
    argv = backends.get_backend("automatic1111").command(
        ctx(auth="me:pw-1234", listen=True, xformers=True, controlnet=True, ckpt=Path("/m/x.safetensors"), port=7861)
    )
    assert argv == [
        "/venv/bin/python", "launch.py", "--port", "7861", "--api", "--skip-python-version-check",
        "--xformers", "--no-half-vae",
        "--ckpt-dir", "/cache/webui-links/a1111/Stable-diffusion",
        "--lora-dir", "/cache/webui-links/a1111/Lora",
        "--vae-dir", "/cache/webui-links/a1111/VAE",
        "--embeddings-dir", "/cache/webui-links/a1111/embeddings",
        "--controlnet-dir", "/cache/webui-links/a1111/ControlNet",
        "--ckpt", "/m/x.safetensors",
        "--listen",
        "--gradio-auth", "me:pw-1234", "--api-auth", "me:pw-1234", "--enable-insecure-extension-access",
    ]  # fmt: skip


def test_insecure_extension_access_only_with_auth():
    assert "--enable-insecure-extension-access" not in backends.get_backend("a1111").command(ctx(listen=True))
    assert "--enable-insecure-extension-access" not in backends.get_backend("forge").command(ctx(listen=True))


def test_a1111_cpu_flags():
    assert backends.get_backend("a1111").command(ctx(gpu=False))[-4:] == [
        "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
    ]  # fmt: skip


def test_a1111_environment_exact():
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/work/fastsd", "HOME": "/root", "COMMANDLINE_ARGS": "--share"}
    env = backends.get_backend("a1111").environment(ctx(requirements_file=Path("/venv/fastsd-req.txt")), base)
    assert env == {
        "HOME": "/root",
        "PATH": "/venv/bin:/usr/bin",
        "PYTHONUNBUFFERED": "1",
        "PIP_NO_INPUT": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "VIRTUAL_ENV": "/venv",
        "TORCH_COMMAND": "pip --version",
        "STABLE_DIFFUSION_REPO": "https://github.com/w-e-w/stablediffusion.git",
        "STABLE_DIFFUSION_COMMIT_HASH": "cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf",
        "COMMANDLINE_ARGS": "",
        "REQS_FILE": "/venv/fastsd-req.txt",
    }


def test_forge_command_and_environment_exact():
    forge = backends.get_backend("forge")
    assert forge.command(ctx(auth="me:pw-1234", controlnet=True)) == [
        "/venv/bin/python", "launch.py", "--port", "7860", "--api", "--skip-python-version-check",
        "--attention-pytorch", "--vae-in-fp32",
        "--ckpt-dir", "/cache/webui-links/a1111/Stable-diffusion",
        "--lora-dir", "/cache/webui-links/a1111/Lora",
        "--vae-dir", "/cache/webui-links/a1111/VAE",
        "--embeddings-dir", "/cache/webui-links/a1111/embeddings",
        "--controlnet-dir", "/cache/webui-links/a1111/ControlNet",
        "--gradio-auth", "me:pw-1234", "--api-auth", "me:pw-1234", "--enable-insecure-extension-access",
    ]  # fmt: skip
    assert "--attention-pytorch" not in forge.command(ctx(xformers=True))
    assert forge.command(ctx(gpu=False))[-2:] == ["--skip-torch-cuda-test", "--always-cpu"]
    env = forge.environment(ctx(), {"PATH": "/bin"})
    assert env["TORCH_COMMAND"] == "pip --version" and env["COMMANDLINE_ARGS"] == ""
    assert "STABLE_DIFFUSION_REPO" not in env  # Forge clones no stablediffusion repository


def test_comfyui_command_and_environment_exact():
    comfy = backends.get_backend("comfyui")
    c = ctx(port=8188, links=Path("/cache/webui-links/comfyui"))
    assert comfy.command(c) == [
        "/venv/bin/python", "main.py", "--listen", "127.0.0.1", "--port", "8188",
        "--extra-model-paths-config", "/cache/webui-links/comfyui/extra_model_paths.yaml",
    ]  # fmt: skip
    assert comfy.command(replace(c, listen=True, gpu=False))[2:4] == ["--listen", "0.0.0.0"]
    assert comfy.command(replace(c, gpu=False))[-1] == "--cpu"
    assert comfy.environment(c, {"PATH": "/bin"}) == {
        "PATH": "/venv/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        "PIP_NO_INPUT": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "VIRTUAL_ENV": "/venv",
    }
    assert comfy.ready_url(c) == "http://127.0.0.1:8188/system_stats"
    assert backends.get_backend("a1111").ready_url(ctx()) == "http://127.0.0.1:7860/sdapi/v1/options"


def test_printed_command_masks_the_password():
    line = backends.get_backend("a1111").describe(ctx(auth="me:pw-9876"))
    assert "pw-9876" not in line and "--gradio-auth **** --api-auth ****" in line


def test_backends_are_pinned_to_commits():
    for spec in backends.BACKENDS.values():
        assert len(spec.ref) == 40 and int(spec.ref, 16) >= 0
    with pytest.raises(UserInputError, match="choose from a1111, forge, comfyui"):
        backends.get_backend("invoke")


# ---- model folders


def write_safetensors(path: Path, keys: list[str], size: int = 0) -> Path:
    """A valid safetensors file: one fp16 scalar per key, each in its own 2 bytes (+ ``size`` padding)."""
    header = {k: {"dtype": "F16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]} for i, k in enumerate(keys)}
    if size:
        header[f"pad.{len(keys)}"] = {
            "dtype": "U8",
            "shape": [size],
            "data_offsets": [2 * len(keys), 2 * len(keys) + size],
        }
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0" * len(keys) + b"\0" * size)
    return path


@pytest.fixture
def model_home(tmp_path, home):
    from fastsd.paths import fastsd_home

    root = fastsd_home(home)
    m = root / "models"
    write_safetensors(m / "dreamshaper_8.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    write_safetensors(m / "lora" / "add_detail.safetensors", ["lora_unet_down_blocks_0.lora_down.weight"])
    write_safetensors(m / "sdxl_vae.safetensors", ["encoder.conv_in.weight", "decoder.conv_out.weight"])
    write_safetensors(m / "controlnet" / "sd15" / "canny.safetensors", ["control_model.input_hint_block.0.weight"])
    write_safetensors(m / "sdxl-base" / "unet" / "diffusion_pytorch_model.safetensors", ["down_blocks.0.x"])
    (m / "sdxl-base" / "model_index.json").write_text("{}")
    (m / "broken.safetensors").write_bytes(b"\x10\x00")  # truncated download
    s = Session.create("my_dog", root, base_model="sd15")
    exported = write_safetensors(s.models_dir / "my_dog-step-500.safetensors", ["model.diffusion_model.out.0.weight"])
    s.record_model(exported, kind="full", step=500)
    lora = write_safetensors(s.models_dir / "my_dog-lora.safetensors", ["unet.up.lora.down.weight"])
    s.record_model(lora, kind="lora", step=500)
    write_safetensors(s.models_dir / "half-written.safetensors", ["model.diffusion_model.x"])  # not in manifest
    return root


def test_model_folder_linking(model_home, tmp_path):
    links = tmp_path / "links"
    linked = modelfolders.build_links(model_home, links)
    found = sorted(str(item.link.relative_to(links)) for item in linked)
    assert found == [
        "ControlNet/sd15/canny.safetensors",
        "Lora/add_detail.safetensors",
        "Lora/sessions/my_dog/my_dog-lora.safetensors",
        "Stable-diffusion/dreamshaper_8.safetensors",
        "Stable-diffusion/sessions/my_dog/my_dog-step-500.safetensors",
        "VAE/sdxl_vae.safetensors",
    ]
    link = links / "Stable-diffusion/sessions/my_dog/my_dog-step-500.safetensors"
    assert link.is_symlink() and link.resolve() == (model_home / "sessions/my_dog/models/my_dog-step-500.safetensors")

    (model_home / "models" / "dreamshaper_8.safetensors").unlink()
    modelfolders.build_links(model_home, links)
    assert not (links / "Stable-diffusion/dreamshaper_8.safetensors").exists()
    assert (links / "Lora/add_detail.safetensors").is_symlink()


def test_comfy_extra_model_paths(tmp_path):
    assert modelfolders.comfy_extra_paths(Path("/l")) == (
        "# Written by fastsd at every launch: edits are overwritten.\n"
        "fastsd:\n"
        "    base_path: /l\n"
        "    checkpoints: Stable-diffusion\n"
        "    loras: Lora\n"
        "    vae: VAE\n"
        "    controlnet: ControlNet\n"
        "    embeddings: embeddings\n"
    )


# ---- git


def git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def bare_repo(tmp_path):
    """A local bare repository with two commits: (url, first commit, second commit)."""
    work = tmp_path / "src"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    git("config", "user.email", "t@example.com", cwd=work)
    git("config", "user.name", "t", cwd=work)
    (work / "launch.py").write_text("print('v1')\n")
    (work / "requirements_versions.txt").write_text("# pins\nPillow==9.5.0\ntorch\n-r extra.txt\n--prefer-binary\n")
    (work / "extra.txt").write_text("einops==0.4.1  # comment\n")
    git("add", "-A", cwd=work)
    git("commit", "-qm", "one", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    (work / "launch.py").write_text("print('v2')\n")
    git("commit", "-qam", "two", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work)
    bare = tmp_path / "webui.git"
    git("clone", "-q", "--bare", str(work), str(bare))
    return str(bare), first, second


def test_clone_pin_and_update(bare_repo, tmp_path):
    url, first, second = bare_repo
    dest = tmp_path / "home" / "webui" / "a1111"
    assert backends.clone_or_update(url, dest, first, echo=lambda s: None) == first
    assert (dest / "launch.py").read_text() == "print('v1')\n"
    assert not list(dest.parent.glob(f"{storage.TEMP_PREFIX}*"))  # the clone was built aside, then renamed
    assert backends.clone_or_update(url, dest, second, echo=lambda s: None) == second
    with pytest.raises(UserInputError, match="is not a commit, tag or branch"):
        backends.clone_or_update(url, dest, "no-such-ref", echo=lambda s: None)
    (dest / "launch.py").write_text("edited\n")
    with pytest.raises(UserInputError, match="local changes"):
        backends.clone_or_update(url, dest, first, echo=lambda s: None)


def test_clone_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist or is private"):
        backends.clone_or_update(str(tmp_path / "missing.git"), tmp_path / "d", None, echo=lambda s: None)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x").write_text("x")
    with pytest.raises(UserInputError, match="not a git checkout"):
        backends.clone_or_update(str(tmp_path / "any.git"), tmp_path / "occupied", None)
    with pytest.raises(UserInputError, match="not a git URL"):
        backends.check_git_url("--upload-pack=evil")


def test_install_backend_with_extensions(bare_repo, tmp_path, monkeypatch):
    url, first, second = bare_repo
    spec = replace(backends.BACKENDS["a1111"], repo=url, ref=first, controlnet_extension=url)
    backend = backends.A1111(spec)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    monkeypatch.setattr(pyenv, "ensure_venv", lambda path, echo=print: venv / "bin" / "python")
    seen = {}

    def fake_installer(python, lines, echo=print):
        seen["lines"] = lines
        return pyenv.InstallOutcome(effective=["Pillow>=9.5.0", "einops==0.4.1"])

    inst = backends.install_backend(
        backend, tmp_path / "a1111", extensions=[url], controlnet=True, venv=venv, echo=lambda s: None,
        installer=fake_installer,
    )  # fmt: skip
    assert inst.commit == first
    assert seen["lines"] == ["Pillow==9.5.0", "torch", "einops==0.4.1"]
    assert inst.requirements_file.read_text() == "Pillow>=9.5.0\neinops==0.4.1\n"
    assert [p.name for p in inst.extensions] == ["webui"]  # the same URL is cloned once
    assert (tmp_path / "a1111" / "extensions" / "webui" / "launch.py").is_file()


# ---- requirements


def test_plan_requirements():
    plan = pyenv.plan_requirements(
        ["torch", "torchvision==0.1", "numpy>=1.0", "Pillow==9.5.0", "newpkg", "clip @ https://x/y.zip"],
        {"torch": "2.8.0", "torchvision": "0.23.0", "numpy": "2.1.0", "pillow": "11.0.0"},
    )
    assert plan.protected == ["torch", "torchvision==0.1"]
    assert plan.met == ["numpy>=1.0"]
    assert plan.install == ["Pillow==9.5.0", "newpkg"]
    assert plan.direct == ["clip @ https://x/y.zip"]


PIP_BUILD_FAILURE = """\
Collecting transformers==4.30.2
  Downloading transformers-4.30.2-py3-none-any.whl.metadata (113 kB)
Collecting tokenizers!=0.11.3,<0.14,>=0.11.1 (from transformers==4.30.2)
  Downloading tokenizers-0.13.3.tar.gz (314 kB)
  Installing build dependencies: started
  Installing build dependencies: finished with status 'done'
Building wheels for collected packages: tokenizers
  Building wheel for tokenizers (pyproject.toml): started
  Building wheel for tokenizers (pyproject.toml): finished with status 'error'
  error: subprocess-exited-with-error

  × Building wheel for tokenizers (pyproject.toml) did not run successfully.
  │ exit code: 1
  ╰─> [62 lines of output]
      error: can't find Rust compiler
      [end of output]

  note: This error originates from a subprocess, and is likely not a problem with pip.
  ERROR: Failed building wheel for tokenizers
Failed to build tokenizers
ERROR: Failed to build installable wheels for some pyproject.toml based projects (tokenizers)
"""

PIP_NO_DIST = """\
ERROR: Could not find a version that satisfies the requirement scikit-image==0.21.0 (from versions: 0.22.0, 0.24.0)
ERROR: No matching distribution found for scikit-image==0.21.0
"""

PIP_TORCH_CONFLICT = """\
ERROR: Cannot install xformers==0.0.20 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested (constraint) torch==2.8.0
    xformers 0.0.20 depends on torch==2.0.1

To fix this you could try to:
1. loosen the range of package versions you've specified
"""


def test_explain_pip_failures():
    (f,) = pyenv.explain_failure(PIP_BUILD_FAILURE, ["transformers==4.30.2", "einops"], "3.12")
    assert f.requirement == "transformers==4.30.2"
    assert f.reason == "its dependency tokenizers: no prebuilt wheel for Python 3.12 and building it from source failed"
    (f,) = pyenv.explain_failure(PIP_NO_DIST, ["scikit-image==0.21.0"], "3.12")
    assert str(f) == "scikit-image==0.21.0 (no release of it installs on Python 3.12 from the index)"
    (f,) = pyenv.explain_failure(PIP_TORCH_CONFLICT, ["xformers==0.0.20"], "3.12")
    assert "another torch than the runtime's" in f.reason


def test_relax():
    assert pyenv.relax("Pillow==9.5.0") == "Pillow>=9.5.0"
    assert pyenv.relax("foo[bar]==1.0; python_version>'3'") == 'foo[bar]>=1.0; python_version > "3"'
    assert pyenv.relax("foo~=1.0") == "foo"


def test_read_requirements(bare_repo, tmp_path):
    url, first, _ = bare_repo
    dest = tmp_path / "c"
    backends.clone_or_update(url, dest, first, echo=lambda s: None)
    assert pyenv.read_requirements(dest / "requirements_versions.txt") == ["Pillow==9.5.0", "torch", "einops==0.4.1"]


def test_install_requirements_relaxes_then_names_what_cannot_be_met():
    calls = []

    def runner(python, reqs, constraints):
        calls.append((list(reqs), constraints.read_text()))
        if len(calls) == 1:
            return SimpleNamespace(returncode=1, stdout=PIP_NO_DIST, stderr="")
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    lines = ["torch", "scikit-image==0.21.0", "zzz-not-installed-pkg==1.0"]
    out = pyenv.install_requirements(Path(sys.executable), lines, echo=lambda s: None, runner=runner)
    assert calls[0][0] == ["scikit-image==0.21.0", "zzz-not-installed-pkg==1.0"]
    assert "torch==" in calls[0][1]  # the runtime's torch is pinned through the constraints
    assert calls[1][0] == ["scikit-image>=0.21.0", "zzz-not-installed-pkg==1.0"]
    assert out.effective == ["scikit-image>=0.21.0", "zzz-not-installed-pkg==1.0"]

    def always_fails(python, reqs, constraints):
        return SimpleNamespace(returncode=1, stdout=PIP_NO_DIST.replace("0.21.0", "0.21.0"), stderr="")

    with pytest.raises(InstallError, match=r"cannot be met on this runtime: scikit-image"):
        pyenv.install_requirements(Path(sys.executable), lines, echo=lambda s: None, runner=always_fails)


# ---- ControlNet by family


def test_controlnet_family_rules(tmp_path, tiny_sdxl):
    from fastsd.models.convert import diffusers_to_single_file

    (m,) = controlnet.resolve(["canny"], "sd15")  # the model registry's table
    assert m.source == "hf:lllyasviel/control_v11p_sd15_canny/diffusion_pytorch_model.safetensors"
    assert m.filename == "control_v11p_sd15_canny.safetensors"  # not the repo's generic file name
    (xl,) = controlnet.resolve(["canny"], "sdxl")
    assert xl.source.startswith("hf:diffusers/controlnet-canny-sdxl-1.0/")
    with pytest.raises(UserInputError, match="'sketch' is for sdxl, the base model is sd15"):
        controlnet.resolve(["sketch"], "sd15")
    with pytest.raises(UserInputError, match="sdxl ControlNet but the base model is sd15"):
        controlnet.resolve(["hf:xinsir/controlnet-canny-sdxl-1.0/x.safetensors"], "sd15")
    with pytest.raises(UserInputError, match="pass --family"):
        controlnet.resolve(["canny"], None)
    ckpt = diffusers_to_single_file(tiny_sdxl, tmp_path / "xl.safetensors")
    assert controlnet.base_family(str(ckpt), None) == "sdxl"
    assert controlnet.base_family("sd21-768", None) == "sd21"


# ---- launcher policy


def test_tunnel_choice_in_colab_free_tier():
    said = []
    assert launcher.choose_tunnel(None, env="colab", tier=lambda: "unknown", echo=said.append) == "colab"
    assert "free tier does not allow" in said[0] and "cannot tell for sure" in said[0]
    said.clear()
    assert launcher.choose_tunnel(None, env="colab", tier=lambda: "paid", echo=said.append) == "colab"
    assert launcher.choose_tunnel("ngrok", env="colab", tier=lambda: "paid", echo=said.append) == "ngrok"
    assert said == []
    assert launcher.choose_tunnel(None, env="terminal", echo=said.append) == "none"


def test_public_tunnel_gets_a_generated_login():
    redact.forget_all()
    said = []
    auth = launcher.resolve_auth(None, "cloudflared", False, said.append)
    assert auth and auth.startswith("fastsd:")
    assert auth.split(":")[1] in said[0]  # shown once to the user...
    assert auth.split(":")[1] not in redact.mask(said[0])  # ...and masked everywhere else
    assert launcher.resolve_auth(None, "colab", False, said.append) is None
    with pytest.raises(UserInputError, match="user:password"):
        launcher.check_auth("nopassword")


def test_cli_refuses_comfyui_on_a_tunnel_without_login(cli, home):
    proc = cli("webui", "--backend", "comfyui", "--tunnel", "cloudflared")
    assert proc.returncode == 2
    assert "ComfyUI has no login of its own" in proc.stderr


def test_cli_refuses_comfyui_with_listen_before_installing_anything(cli, home):
    # ComfyUI cannot ask for a password, so --listen (0.0.0.0) would serve it to anyone on the network.
    for extra in ((), ("--auth", "me:pw-1234")):
        proc = cli("webui", "--backend", "comfyui", "--listen", "--tunnel", "none", *extra)
        assert proc.returncode == 2, proc.stderr
        assert "does not expose it with --listen" in proc.stderr and "Traceback" not in proc.stderr
        assert not (home / "webui" / "comfyui").exists()  # refused before any clone or install


def test_cli_bad_auth(cli, home):
    proc = cli("webui", "--backend", "a1111", "--auth", "x")
    assert proc.returncode == 2 and "--auth must be user:password" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_builtin_end_to_end(home, tiny_sd1):
    pytest.importorskip("fastsd.webui.server")
    from conftest import REPO

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTSD_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsd", "webui", "--backend", "builtin", "--tunnel", "none", "--port", str(port),
         "--model", str(tiny_sd1)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "web UI ready:" in line:
                break
        assert any(f"web UI ready: http://127.0.0.1:{port}" in ln for ln in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200
        # Ctrl-C stops it within 10 s even while the model is still loading on a busy machine.
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)
        assert time.monotonic() - interrupted < 10
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
