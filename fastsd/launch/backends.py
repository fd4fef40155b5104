"""AUTOMATIC1111, Forge and ComfyUI as data plus small classes.

:data:`BACKENDS` holds what differs between them as plain values (repository, pinned known-good
commit, entry script, requirement files, readiness path, where extensions go). The classes only
build the two things that need logic: the command line and the environment. Both are pure
functions of a :class:`LaunchContext`, so tests assert them exactly.

Installing a backend (:func:`install_backend`): clone into ``<home>/webui/<backend>/`` (kept on
Drive with its extensions and settings; ``--temp`` uses local disk), check out the pinned commit
or ``--ref``, create its Python environment on local disk (``pyenv``), install its requirements
there without touching torch, then clone extensions / custom nodes from git URLs.

Why the environment variables for A1111: its first start clones
``Stability-AI/stablediffusion``, which no longer exists (Dec 2025), so ``STABLE_DIFFUSION_REPO``
points at the fork A1111's own maintainers switched to (w-e-w/stablediffusion, A1111 PR #17207);
``TORCH_COMMAND`` is a no-op so it never installs its own torch; ``REQS_FILE`` points at the
requirement list fastsd actually installed (pins relaxed where they cannot be met here), so
``launch.py`` does not try to reinstall the originals.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from .. import storage
from ..errors import FastsdError, InstallError, NetworkError, UserInputError
from ..redact import child_environment, mask, mask_command
from . import pyenv

log = logging.getLogger(__name__)

A1111_SD_REPO_FORK = "https://github.com/w-e-w/stablediffusion.git"
A1111_SD_COMMIT = "cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"  # the commit A1111 has always pinned


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is, as data."""

    name: str
    title: str
    repo: str
    ref: str  # known-good commit; --ref overrides
    entry: str  # script started with the backend venv's python
    requirement_files: tuple[str, ...]
    ready_path: str  # polled until it answers 200
    extensions_dir: str  # where git-URL extensions / custom nodes are cloned
    controlnet_extension: str | None  # cloned when ControlNet is asked for; None: built in
    default_port: int = 7860
    # Variables passed on besides redact.child_environment's allow-list (what the backend reads).
    env_passthrough: tuple[str, ...] = ()


BACKENDS: dict[str, BackendSpec] = {
    "a1111": BackendSpec(
        name="a1111",
        title="AUTOMATIC1111 stable-diffusion-webui",
        repo="https://github.com/AUTOMATIC1111/stable-diffusion-webui.git",
        ref="82a973c04367123ae98bd9abdf80d9eda9b910e2",  # v1.10.1
        entry="launch.py",  # not webui.py: launch.py runs extensions' install.py
        requirement_files=("requirements_versions.txt",),
        ready_path="/sdapi/v1/options",
        extensions_dir="extensions",
        controlnet_extension="https://github.com/Mikubill/sd-webui-controlnet.git",
    ),
    "forge": BackendSpec(
        name="forge",
        title="Stable Diffusion WebUI Forge",
        repo="https://github.com/lllyasviel/stable-diffusion-webui-forge.git",
        ref="dfdcbab685e57677014f05a3309b48cc87383167",  # main, 2025-06-26 (f2.0.1v1.10.1-previous-669)
        entry="launch.py",
        requirement_files=("requirements_versions.txt",),
        ready_path="/sdapi/v1/options",
        extensions_dir="extensions",
        controlnet_extension=None,  # Forge ships ControlNet (extensions-builtin/sd_forge_controlnet)
    ),
    "comfyui": BackendSpec(
        name="comfyui",
        title="ComfyUI",
        repo="https://github.com/comfyanonymous/ComfyUI.git",
        ref="4e95c0c104240dcef27927617756e21ebab2173e",  # v0.3.41
        entry="main.py",
        requirement_files=("requirements.txt",),
        ready_path="/system_stats",
        extensions_dir="custom_nodes",
        controlnet_extension=None,  # ControlNet loaders are core nodes
        default_port=8188,
    ),
}


@dataclass(frozen=True)
class LaunchContext:
    """Everything a command line and environment are built from."""

    install_dir: Path
    python: Path
    links: Path  # the model link folder (modelfolders.build_links)
    port: int
    listen: bool = False
    auth: str | None = None  # "user:password"
    gpu: bool = True
    xformers: bool = False
    controlnet: bool = False
    ckpt: Path | None = None
    requirements_file: Path | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen else "127.0.0.1"


class Backend:
    """A backend's behaviour around its :class:`BackendSpec`."""

    spec: BackendSpec

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def command(self, ctx: LaunchContext) -> list[str]:
        """The exact argv that starts the server."""
        raise NotImplementedError

    def environment(self, ctx: LaunchContext, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment the server runs with: an allow-list of ``base`` (default ``os.environ``).

        Only what a Python web UI needs is inherited (:func:`fastsd.redact.child_environment`):
        the backend, its extensions and everything they start never see ``HF_TOKEN``,
        ``NGROK_AUTHTOKEN``, ``CIVITAI_TOKEN`` or any other secret fastsd was given.
        """
        env = child_environment(base, allow=self.spec.env_passthrough)
        venv = ctx.python.parent.parent
        env.update(
            {
                "PYTHONUNBUFFERED": "1",  # the log shows lines as they happen, not in 8 KB bursts
                "PIP_NO_INPUT": "1",
                "GRADIO_ANALYTICS_ENABLED": "False",
                "VIRTUAL_ENV": str(venv),
                "PATH": f"{ctx.python.parent}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)  # fastsd's own path must not leak modules into the backend
        return env

    def ready_url(self, ctx: LaunchContext) -> str:
        return f"http://127.0.0.1:{ctx.port}{self.spec.ready_path}"

    def describe(self, ctx: LaunchContext) -> str:
        """The command line, printable (secrets masked)."""
        return mask_command(self.command(ctx))


class A1111(Backend):
    """AUTOMATIC1111: ``launch.py`` with the API on and fastsd's model folders."""

    ENV: ClassVar[dict[str, str]] = {
        "TORCH_COMMAND": "pip --version",  # launch.py runs `python -m $TORCH_COMMAND`: a harmless no-op
        "STABLE_DIFFUSION_REPO": A1111_SD_REPO_FORK,
        "STABLE_DIFFUSION_COMMIT_HASH": A1111_SD_COMMIT,
        "COMMANDLINE_ARGS": "",  # launch.py appends this variable; an inherited one must not sneak in
    }

    def attention_flags(self, ctx: LaunchContext) -> list[str]:
        return ["--xformers"] if ctx.xformers else ["--opt-sdp-attention"]

    def precision_flags(self, ctx: LaunchContext) -> list[str]:
        return ["--no-half-vae"]

    def cpu_flags(self) -> list[str]:
        return ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-half"]

    def command(self, ctx: LaunchContext) -> list[str]:
        argv = [str(ctx.python), self.spec.entry, "--port", str(ctx.port), "--api", "--skip-python-version-check"]
        argv += self.attention_flags(ctx) + self.precision_flags(ctx)
        argv += [
            "--ckpt-dir",
            str(ctx.links / "Stable-diffusion"),
            "--lora-dir",
            str(ctx.links / "Lora"),
            "--vae-dir",
            str(ctx.links / "VAE"),
            "--embeddings-dir",
            str(ctx.links / "embeddings"),
        ]
        if ctx.controlnet:
            argv += ["--controlnet-dir", str(ctx.links / "ControlNet")]
        if ctx.ckpt is not None:
            argv += ["--ckpt", str(ctx.ckpt)]
        if ctx.listen:
            argv.append("--listen")
        if ctx.auth:
            # The extensions tab installs arbitrary code: only behind a login.
            argv += ["--gradio-auth", ctx.auth, "--api-auth", ctx.auth, "--enable-insecure-extension-access"]
        if not ctx.gpu:
            argv += self.cpu_flags()
        return argv + list(ctx.extra_args)

    def environment(self, ctx: LaunchContext, base: dict[str, str] | None = None) -> dict[str, str]:
        env = super().environment(ctx, base)
        env.update(self.ENV)
        if ctx.requirements_file is not None:
            env["REQS_FILE"] = str(ctx.requirements_file)
        return env


class Forge(A1111):
    """Forge: A1111's shape; its own attention/precision flags, no stablediffusion clone."""

    ENV: ClassVar[dict[str, str]] = {"TORCH_COMMAND": "pip --version", "COMMANDLINE_ARGS": ""}

    def attention_flags(self, ctx: LaunchContext) -> list[str]:
        return [] if ctx.xformers else ["--attention-pytorch"]  # Forge picks xformers itself when present

    def precision_flags(self, ctx: LaunchContext) -> list[str]:
        return ["--vae-in-fp32"]  # Forge's own spelling of --no-half-vae

    def cpu_flags(self) -> list[str]:
        return ["--skip-torch-cuda-test", "--always-cpu"]


class ComfyUI(Backend):
    """ComfyUI: ``main.py`` with fastsd's model folders through ``extra_model_paths.yaml``."""

    def extra_paths_file(self, ctx: LaunchContext) -> Path:
        return ctx.links / "extra_model_paths.yaml"

    def command(self, ctx: LaunchContext) -> list[str]:
        argv = [str(ctx.python), self.spec.entry, "--listen", ctx.host, "--port", str(ctx.port)]
        argv += ["--extra-model-paths-config", str(self.extra_paths_file(ctx))]
        if not ctx.gpu:
            argv.append("--cpu")
        return argv + list(ctx.extra_args)


_CLASSES: dict[str, type[Backend]] = {"a1111": A1111, "forge": Forge, "comfyui": ComfyUI}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``a1111``, ``forge`` or ``comfyui``).

    Raises:
        UserInputError: an unknown name.
    """
    key = name.strip().lower().replace("automatic1111", "a1111")
    if key not in BACKENDS:
        raise UserInputError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)} or builtin")
    return _CLASSES[key](BACKENDS[key])


# --------------------------------------------------------------------------------------------
# git


def _git(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # No tokens for git either; GIT_TERMINAL_PROMPT: a private or missing repo fails instead of asking.
    env = {**child_environment(allow=("SSH_AUTH_SOCK", "GIT_SSH_COMMAND")), "GIT_TERMINAL_PROMPT": "0"}
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)


def _git_error(what: str, proc: subprocess.CompletedProcess[str], url: str) -> FastsdError:
    text = mask((proc.stderr or proc.stdout).strip())
    last = text.splitlines()[-1] if text else f"exit code {proc.returncode}"
    if re.search(r"Could not resolve host|unable to access|Connection timed out|Failed to connect", text):
        return NetworkError(f"{what}: cannot reach {url} ({last}): check the runtime's network")
    if re.search(r"Repository not found|not found|does not exist|could not read Username", text):
        return UserInputError(f"{what}: {url} does not exist or is private ({last}): check the URL")
    return InstallError(f"{what}: {last}")


def check_git_url(url: str) -> str:
    """Refuse what git would take as an option or what is not a repository address."""
    url = url.strip()
    if not url or url.startswith("-") or any(c.isspace() for c in url):
        raise UserInputError(f"{url!r} is not a git URL: give an https:// address of a repository")
    return url


def clone_or_update(url: str, dest: Path, ref: str | None, *, echo: Callable[[str], None] = print) -> str:
    """Clone ``url`` into ``dest`` (or fetch into an existing clone) and check out ``ref``.

    The clone goes to a temporary folder next to ``dest`` and is renamed when complete, so an
    interrupted clone never looks like an install. Returns the checked-out commit.

    Raises:
        UserInputError: the repository or ref does not exist; local changes block the checkout.
        NetworkError: the host cannot be reached.
    """
    url = check_git_url(url)
    if (dest / ".git").exists():
        if ref:
            have = _git(["rev-parse", "HEAD"], cwd=dest).stdout.strip()
            if have != ref and _git(["cat-file", "-e", f"{ref}^{{commit}}"], cwd=dest).returncode != 0:
                echo(f"fetching {url}")
                proc = _git(["fetch", "--tags", "origin"], cwd=dest)
                if proc.returncode != 0:
                    raise _git_error(f"could not update {dest}", proc, url)
    elif dest.exists() and any(dest.iterdir()):
        raise UserInputError(
            f"{dest} exists and is not a git checkout: move it away or pass --temp to install on local disk"
        )
    else:
        echo(f"cloning {url} into {dest}")
        with storage.building_folder(dest, "clone") as partial:  # an existing empty dest is replaced
            proc = _git(["clone", "--quiet", url, str(partial)])
            if proc.returncode != 0:
                raise _git_error(f"could not clone {url}", proc, url)
    if ref:
        proc = _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", ref], cwd=dest)
        if proc.returncode != 0:
            text = proc.stderr or ""
            if "would be overwritten" in text:
                raise UserInputError(
                    f"local changes in {dest} block checking out {ref}: commit or discard them "
                    f"(git -C {dest} stash), or pass --temp for a fresh install"
                )
            raise UserInputError(f"{ref!r} is not a commit, tag or branch of {url}: check --ref")
    return _git(["rev-parse", "HEAD"], cwd=dest).stdout.strip()


def repo_dir_name(url: str) -> str:
    """``https://github.com/Mikubill/sd-webui-controlnet.git`` -> ``sd-webui-controlnet``."""
    name = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    name = name.removesuffix(".git")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in (".", ".."):
        raise UserInputError(f"cannot name a folder after {url!r}: give the repository's https:// URL")
    return name


def install_extensions(
    backend: Backend, install_dir: Path, urls: list[str], *, echo: Callable[[str], None] = print
) -> list[Path]:
    """Clone each extension / custom node (new ones only; existing ones are pulled fast-forward)."""
    folders = []
    base = install_dir / backend.spec.extensions_dir
    for url in urls:
        dest = base / repo_dir_name(url)
        if (dest / ".git").exists():
            proc = _git(["pull", "--ff-only", "--quiet"], cwd=dest)
            echo(f"{dest.name}: " + ("up to date" if proc.returncode == 0 else "kept as is (could not fast-forward)"))
        else:
            clone_or_update(url, dest, None, echo=echo)
        folders.append(dest)
    return folders


# --------------------------------------------------------------------------------------------
# Install


@dataclass
class Installation:
    """An installed backend ready to launch."""

    backend: Backend
    install_dir: Path
    commit: str
    python: Path
    requirements_file: Path
    extensions: list[Path] = field(default_factory=list)
    relaxed: list[pyenv.Unmeetable] = field(default_factory=list)


def install_dir_for(backend: Backend, home: Path, *, temp: bool = False) -> Path:
    """``<home>/webui/<backend>`` (persistent), or a local-disk folder with ``temp``."""
    from ..paths import cache_dir

    return (cache_dir() / "webui" / backend.name) if temp else (home / "webui" / backend.name)


def venv_dir_for(backend: Backend) -> Path:
    """The backend's venv: local disk (a venv on Drive would be thousands of slow files), per runtime."""
    from ..paths import cache_dir
    from ..runtime import fingerprint

    return cache_dir() / "webui-venv" / f"{backend.name}-{fingerprint()}"


def install_backend(
    backend: Backend,
    install_dir: Path,
    *,
    ref: str | None = None,
    extensions: list[str] | None = None,
    controlnet: bool = False,
    venv: Path | None = None,
    echo: Callable[[str], None] = print,
    installer: Callable[..., pyenv.InstallOutcome] = pyenv.install_requirements,
) -> Installation:
    """Clone/update the backend, prepare its environment, install requirements and extensions.

    Args:
        backend: from :func:`get_backend`.
        install_dir: where the checkout lives (:func:`install_dir_for`).
        ref: commit, tag or branch; default the pinned known-good commit.
        extensions: git URLs of extensions (A1111/Forge) or custom nodes (ComfyUI).
        controlnet: also install the backend's ControlNet extension when it has no built-in one.
        venv: the environment folder (default :func:`venv_dir_for`).
        echo: where progress lines go.
        installer: the requirement installer (tests pass a fake).

    Returns:
        An :class:`Installation`.
    """
    commit = clone_or_update(backend.spec.repo, install_dir, ref or backend.spec.ref, echo=echo)
    echo(f"{backend.spec.title} at {commit[:10]} in {install_dir}")
    urls = [check_git_url(u) for u in (extensions or [])]
    if controlnet and backend.spec.controlnet_extension and backend.spec.controlnet_extension not in urls:
        urls.append(backend.spec.controlnet_extension)
    ext_dirs = install_extensions(backend, install_dir, urls, echo=echo)

    python = pyenv.ensure_venv(venv or venv_dir_for(backend), echo=echo)
    lines: list[str] = []
    for name in backend.spec.requirement_files:
        lines += [r for r in pyenv.read_requirements(install_dir / name) if r not in lines]
    if backend.name == "comfyui":
        # Custom nodes declare requirements in a file; A1111/Forge extensions use install.py at launch.
        for folder in ext_dirs:
            lines += [r for r in pyenv.read_requirements(folder / "requirements.txt") if r not in lines]
    outcome = installer(python, lines, echo=echo)
    reqs_file = python.parent.parent / f"fastsd-requirements-{backend.name}.txt"
    reqs_file.write_text("".join(f"{line}\n" for line in outcome.effective))
    return Installation(backend, install_dir, commit, python, reqs_file, ext_dirs, outcome.relaxed)


def xformers_installed(python: Path) -> bool:
    """Whether ``python`` can import xformers (then A1111 gets ``--xformers``)."""
    return subprocess.run([str(python), "-c", "import xformers"], capture_output=True).returncode == 0


def context_for(inst: Installation, links: Path, **kw: object) -> LaunchContext:
    """A :class:`LaunchContext` for an installation (``kw`` sets port, listen, auth...)."""
    ctx = LaunchContext(
        install_dir=inst.install_dir, python=inst.python, links=links, port=inst.backend.spec.default_port
    )
    return replace(ctx, requirements_file=inst.requirements_file, **kw)  # type: ignore[arg-type]
