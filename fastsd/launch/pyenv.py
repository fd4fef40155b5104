"""The Python environment a web UI backend runs in, and installing its requirements.

A1111 and Forge pin old versions (``gradio==3.41.2``, ``fastapi==0.94.0``...) that would break
fastsd's own UI if installed into the runtime's Python. So each backend gets a virtual
environment on local disk created with ``--system-site-packages``: it *sees* the runtime's torch
(and its CUDA libraries) and everything else installed there, while the backend's pins are
installed into the venv where they shadow, never replace, the runtime's packages.

Installing follows ``fastsd.install``'s rules: what is already met is skipped (:func:`fastsd.install.unmet`),
torch and its siblings (:data:`fastsd.features.PROTECTED`) are never installed and are pinned
to the runtime's versions through a constraints file. pip is used rather than uv because uv
does not see system site packages and would install a second torch. When a pinned requirement
cannot be met on this runtime (no wheel for this Python and the source build fails, or it needs
another torch), it is named with the reason and retried once with the pin relaxed to a lower
bound; if that fails too, the install stops naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import InstallError, NetworkError
from ..features import PROTECTED
from ..install import _NETWORK_PATTERNS, unmet
from ..redact import child_environment, mask

log = logging.getLogger(__name__)

_DUMP_INSTALLED = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
)


def venv_python(venv: Path) -> Path:
    """The interpreter inside ``venv``."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(venv: Path, *, base_python: str = sys.executable, echo: Callable[[str], None] = print) -> Path:
    """Create ``venv`` (with system site packages) unless it already works; returns its python.

    Raises:
        InstallError: neither ``venv`` nor ``uv venv`` could create it.
    """
    python = venv_python(venv)
    if python.is_file() and subprocess.run([str(python), "-c", "import pip"], capture_output=True).returncode == 0:
        return python
    echo(f"creating the backend's Python environment in {venv} (sees the runtime's torch)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    attempts = [[base_python, "-m", "venv", "--system-site-packages", "--clear", str(venv)]]
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]

        attempts.append([find_uv_bin(), "venv", "--system-site-packages", "--seed", "--python", base_python, str(venv)])
    except (ImportError, FileNotFoundError):
        pass
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0 and python.is_file():
            return python
        errors.append((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"])
    raise InstallError(
        f"could not create a Python environment in {venv} ({errors[0][0]}): "
        "install python3-venv (apt-get install python3-venv) or uv (pip install uv) and try again"
    )


def installed_in(python: str | os.PathLike[str]) -> dict[str, str]:
    """Distributions importable by ``python`` (its venv plus system site packages), name -> version."""
    proc = subprocess.run([str(python), "-c", _DUMP_INSTALLED], capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"could not list the packages of {python}: {proc.stderr.strip()[-300:]}")
    found: dict[str, str] = {}
    for name, version in json.loads(proc.stdout).items():
        found.setdefault(canonicalize_name(name), version)
    return found


def read_requirements(path: Path, _seen: set[Path] | None = None) -> list[str]:
    """Requirement lines of a ``requirements.txt`` (comments, options and blanks dropped; ``-r`` followed)."""
    seen = _seen if _seen is not None else set()
    path = path.resolve()
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    out: list[str] = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            out += read_requirements(path.parent / line.split(None, 1)[1].strip(), seen)
            continue
        if line.startswith("-"):
            continue  # index options and -e: fastsd installs from the index it is configured with
        if line not in out:
            out.append(line)
    return out


@dataclass
class RequirementPlan:
    """A backend's requirements sorted into what to install, what is met, and what is kept."""

    install: list[str] = field(default_factory=list)
    met: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    direct: list[str] = field(default_factory=list)  # URLs / non-PEP 508 lines, passed to pip as they are


def plan_requirements(lines: Iterable[str], installed: dict[str, str]) -> RequirementPlan:
    """Sort requirement lines against ``installed`` (see :class:`RequirementPlan`)."""
    plan = RequirementPlan()
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            plan.direct.append(line)
            continue
        if canonicalize_name(req.name) in PROTECTED:
            plan.protected.append(line)
        elif req.url:
            plan.direct.append(line)
        elif unmet([line], installed):
            plan.install.append(line)
        else:
            plan.met.append(line)
    return plan


@dataclass(frozen=True)
class Unmeetable:
    """A requirement that could not be installed here, and why (in words)."""

    requirement: str
    reason: str

    def __str__(self) -> str:
        return f"{self.requirement} ({self.reason})"


_COLLECTING = re.compile(r"^\s*Collecting ([A-Za-z0-9_.\-\[\]]+)[^\n(]*(?:\(from ([A-Za-z0-9_.\-]+))?", re.M)
_NO_DIST = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")
_BUILD_FAIL = (
    re.compile(r"Failed to build ([A-Za-z0-9_.\- ]+?)\s*$", re.M),
    re.compile(r"Failed building wheel for ([A-Za-z0-9_.\-]+)"),
    re.compile(r"Building wheel for ([A-Za-z0-9_.\-]+) \(pyproject\.toml\) did not run successfully"),
    re.compile(r"Getting requirements to build wheel[^\n]*\n(?:.*\n){0,3}?.*?(?:for|×) ([A-Za-z0-9_.\-]+)"),
)
_CONFLICT = re.compile(r"The conflict is caused by:\n((?:[ \t]+\S.*\n?)+)")
_CONFLICT_LINE = re.compile(r"^[ \t]+(?:The user requested (?:\(constraint\) )?)?([A-Za-z0-9_.\-]+)[ =<>!~]", re.M)


def explain_failure(output: str, requested: Iterable[str], python_version: str | None = None) -> list[Unmeetable]:
    """Which of ``requested`` a failed pip run could not meet, with the reason in plain words.

    A failure in a dependency (``tokenizers`` pulled in by ``transformers==4.30.2``) is charged to the
    requested requirement that pulled it in, since that is the pin the user can change.
    """
    pyver = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    by_name = {}
    for line in requested:
        try:
            by_name[canonicalize_name(Requirement(line).name)] = line
        except InvalidRequirement:
            continue
    parents: dict[str, str] = {}
    for child, parent in _COLLECTING.findall(output):
        if parent:
            parents.setdefault(canonicalize_name(child.split("[")[0]), canonicalize_name(parent))

    def owner(name: str) -> str | None:
        name = canonicalize_name(name)
        for _ in range(10):
            if name in by_name:
                return name
            if name not in parents:
                return None
            name = parents[name]
        return None

    found: dict[str, Unmeetable] = {}

    def add(name: str, reason: str) -> None:
        top = owner(name)
        if top is None or top in found:
            return
        via = "" if top == canonicalize_name(name) else f"its dependency {name}: "
        found[top] = Unmeetable(by_name[top], via + reason)

    for name in _NO_DIST.findall(output):
        add(name, f"no release of it installs on Python {pyver} from the index")
    for pattern in _BUILD_FAIL:
        for group in pattern.findall(output):
            for name in group.split():
                add(name, f"no prebuilt wheel for Python {pyver} and building it from source failed")
    for block in _CONFLICT.findall(output):
        names = _CONFLICT_LINE.findall(block)
        torch_conflict = any(canonicalize_name(n) in PROTECTED for n in names)
        for name in names:
            if canonicalize_name(name) in PROTECTED:
                continue
            add(
                name,
                "it needs another torch than the runtime's, and fastsd never replaces torch"
                if torch_conflict
                else "its dependencies conflict with the other requirements",
            )
    return list(found.values())


def relax(requirement: str) -> str:
    """``Pillow==9.5.0`` -> ``Pillow>=9.5.0``; anything else -> just the name (with extras and marker)."""
    req = Requirement(requirement)
    pins = [s for s in req.specifier if s.operator in ("==", "===")]
    spec = f">={pins[0].version}" if pins and "*" not in pins[0].version else ""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{extras}{spec}{marker}"


@dataclass
class InstallOutcome:
    """What :func:`install_requirements` did."""

    effective: list[str]  # the requirement lines the backend should now consider (relaxed ones replaced)
    installed: list[str] = field(default_factory=list)
    relaxed: list[Unmeetable] = field(default_factory=list)


def _pip(python: Path, reqs: list[str], constraints: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(python),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--prefer-binary",
        "-c",
        str(constraints),
    ]
    log.debug("running %s", mask(" ".join(cmd + reqs)))
    # Requirements' build scripts are third-party code: they get no tokens either.
    env = {**child_environment(), "PIP_NO_INPUT": "1"}
    return subprocess.run([*cmd, *reqs], capture_output=True, text=True, env=env)


def install_requirements(
    python: Path,
    lines: list[str],
    *,
    echo: Callable[[str], None] = print,
    runner: Callable[[Path, list[str], Path], subprocess.CompletedProcess[str]] = _pip,
) -> InstallOutcome:
    """Install the unmet ``lines`` into ``python``'s environment, torch untouched.

    Args:
        python: the backend venv's interpreter.
        lines: requirement lines (from :func:`read_requirements`).
        echo: where one-line progress messages go.
        runner: runs the installer (tests pass a fake); gets (python, requirements, constraints).

    Returns:
        An :class:`InstallOutcome`; ``effective`` is what to write as the backend's requirement file.

    Raises:
        InstallError: a requirement cannot be met even relaxed (named, with the reason).
        NetworkError: the package index could not be reached.
    """
    installed = installed_in(python)
    plan = plan_requirements(lines, installed)
    for line in plan.protected:
        name = canonicalize_name(Requirement(line).name)
        if name in installed:
            echo(f"kept the runtime's {name} {installed[name]} (the backend asks for {line!r})")
    effective = [line for line in lines if line not in plan.protected]
    todo = plan.install + plan.direct
    outcome = InstallOutcome(effective)
    if not todo:
        echo(f"all {len(lines)} requirement(s) of the backend are met")
        return outcome
    with tempfile.TemporaryDirectory(prefix="fastsd-webui-reqs-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{n}=={installed[n]}\n" for n in PROTECTED if n in installed))
        echo(f"installing {len(todo)} requirement(s) into the backend's environment (pip)")
        proc = runner(python, todo, constraints)
        if proc.returncode != 0:
            output = (proc.stdout or "") + (proc.stderr or "")
            if _NETWORK_PATTERNS.search(output) and "No matching distribution" not in output:
                raise NetworkError("pip could not reach the package index: check the runtime's network and try again")
            failed = explain_failure(output, todo)
            if not failed:
                sys.stderr.write(f"---- pip output ----\n{mask(output.strip())}\n---- end of pip output ----\n")
                raise InstallError("pip could not install the backend's requirements (its output is above)")
            swap = {f.requirement: relax(f.requirement) for f in failed}
            for f in failed:
                echo(f"cannot install {f.requirement} here: {f.reason}; trying {swap[f.requirement]}")
            todo = [swap.get(r, r) for r in todo]
            proc = runner(python, todo, constraints)
            if proc.returncode != 0:
                output = (proc.stdout or "") + (proc.stderr or "")
                again = explain_failure(output, todo) or failed
                raise InstallError(
                    "the backend's requirements cannot be met on this runtime: "
                    + "; ".join(str(f) for f in again)
                    + " — try another --ref of the backend, or another runtime"
                )
            outcome.relaxed = failed
            outcome.effective = [swap.get(r, r) for r in effective]
        outcome.installed = todo
    echo(f"installed {len(todo)} requirement(s)" + (f", {len(outcome.relaxed)} relaxed" if outcome.relaxed else ""))
    return outcome
