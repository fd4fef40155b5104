"""Install what fastsd's features need, fast, without ever touching the runtime's torch.

How an install goes:

1. :func:`plan` compares each feature's requirements (``features.py``) with what is installed.
   torch is only checked: too old or missing stops the install with a message.
2. The wheel cache for this runtime's fingerprint (``runtime.fingerprint()``) is tried first:
   when its wheels cover the plan and their sha256 still match, the install runs offline from
   it (``--no-index --find-links``): seconds instead of minutes. A damaged cache is bypassed.
3. Otherwise uv (bootstrapped with pip when missing; pip when that fails) installs from the
   index, pinned to the locks: the one under ``wheels/`` for this runtime's fingerprint when there
   is one, then the tested set (``wheels/tested.txt``, what CI ran the suite against) for the rest.
   ``latest=True`` (``--latest``) resolves fresh within the ranges instead, and says it is untested.
   torch and its siblings are always pinned to their installed versions.
4. The exact wheels of everything that was added are then stored in the cache, for next time.

Each step prints one line per package; an installer failure shows the installer's own output.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from . import storage
from .compat import Conflict, conflicts
from .errors import FastsdError, InstallError, NetworkError, UserInputError
from .features import CORE, FEATURES, PROTECTED, TORCH, TORCH_HINT, requirements_for
from .runtime import environment, fingerprint

log = logging.getLogger(__name__)


def _lock_dir() -> Path:
    # Installed: wheels/ ships as the package fastsd._wheels. From a checkout: the repo's wheels/.
    checkout = Path(__file__).resolve().parent.parent / "wheels"
    if checkout.is_dir():
        return checkout
    try:
        import importlib.resources

        return Path(str(importlib.resources.files("fastsd._wheels")))
    except (ImportError, TypeError):
        return checkout


LOCK_DIR = _lock_dir()
#: The tested set: exact versions of everything the extras pull, that the suite passed with in CI.
TESTED_LOCK = "tested.txt"
MANIFEST = "manifest.json"

_NETWORK_PATTERNS = re.compile(
    r"(Failed to fetch|Could not connect|NewConnectionError|Name or service not known|"
    r"Temporary failure in name resolution|dns error|Network is unreachable|"
    r"Connection refused|No matching distribution found|timed out|client error \(Connect\))",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------------
# What is missing


@dataclass
class Needed:
    """A requirement that the environment does not meet."""

    requirement: Requirement
    installed: str | None
    features: list[str] = field(default_factory=list)
    #: Set when the installed version is in range but breaks another package's declared minimum.
    conflict: str | None = None

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def action(self) -> str:
        if self.conflict:
            return "change"
        return "install" if self.installed is None else "upgrade"

    def __str__(self) -> str:
        if self.conflict:
            return f"{self.requirement} ({self.conflict})"
        if self.installed is None:
            return f"{self.requirement} (not installed)"
        return f"{self.requirement} (installed {self.installed})"


def installed_versions() -> dict[str, str]:
    """Every installed distribution, canonical name -> version (re-read on each call)."""
    importlib.invalidate_caches()
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def _satisfied(req: Requirement, version: str | None) -> bool:
    if version is None:
        return False
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def unmet(requirements: Iterable[str], installed: dict[str, str] | None = None) -> list[Needed]:
    """The requirements (strings like ``"diffusers>=0.32"``) not met by the environment.

    Requirements whose environment marker does not apply here are skipped.
    """
    installed = installed_versions() if installed is None else installed
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = installed.get(canonicalize_name(req.name))
        if not _satisfied(req, version):
            out.append(Needed(req, version))
    return out


def parse_features(value: str | Iterable[str] | None) -> list[str]:
    """``"train,webui"`` / ``["all"]`` -> validated feature names.

    Raises:
        UserInputError: an unknown feature name.
    """
    if value is None:
        return list(FEATURES)
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item == "all":
            return list(FEATURES)
        if item not in FEATURES:
            raise UserInputError(
                f"unknown feature {item!r}: choose from {', '.join(FEATURES)} or all (e.g. --features train,webui)"
            )
        if item not in names:
            names.append(item)
    if not names:
        raise UserInputError(f"no feature named: choose from {', '.join(FEATURES)} or all")
    return names


def check_torch(installed: dict[str, str] | None = None) -> str:
    """Return the installed torch version, or stop when it is missing or too old.

    fastsd never installs, upgrades or downgrades torch: the runtime's CUDA build is the one to use.
    """
    installed = installed_versions() if installed is None else installed
    req = Requirement(TORCH)
    version = installed.get("torch")
    if version is None:
        raise InstallError(f"torch is not installed (fastsd never installs it): {TORCH_HINT}; then run this again")
    if not _satisfied(req, version):
        raise InstallError(
            f"torch {version} is older than fastsd needs ({req.specifier}); fastsd never replaces torch: "
            "use a runtime with a newer torch (Colab's current one has it)"
        )
    return version


def plan(
    features: list[str],
    installed: dict[str, str] | None = None,
    pins: dict[str, str] | None = None,
    clashes: list[Conflict] | None = None,
) -> list[Needed]:
    """What ``fastsd install --features ...`` would install, upgrade or change, torch excluded.

    Args:
        features: feature names.
        installed: name -> version (default: this environment).
        pins: the locks' exact versions; a package caught in a conflict is moved to its pin.
        clashes: broken declared minimums (default: :func:`fastsd.compat.conflicts` of this
            environment when ``installed`` is not given, else none).
    """
    if clashes is None:
        clashes = (
            conflicts(Requirement(r).name for r in requirements_for(features) + list(CORE)) if installed is None else []
        )
    installed = installed_versions() if installed is None else installed
    reqs = [r for r in CORE if canonicalize_name(Requirement(r).name) not in PROTECTED]
    owners: dict[str, list[str]] = {str(Requirement(r)): ["core"] for r in reqs}
    for feature in features:
        for r in requirements_for([feature]):
            owners.setdefault(str(Requirement(r)), []).append(feature)
            if r not in reqs:
                reqs.append(r)
    needed = unmet(reqs, installed)
    for item in needed:
        item.features = owners.get(str(item.requirement), [])
    # Two requirements on one package (e.g. transformers>=4.46 and >=5.1): keep one line each name.
    merged: dict[str, Needed] = {}
    for item in needed:
        if item.name in merged:
            prev = merged[item.name]
            prev.requirement = Requirement(
                f"{prev.requirement.name}{prev.requirement.specifier & item.requirement.specifier}"
            )
            prev.features += [f for f in item.features if f not in prev.features]
        else:
            merged[item.name] = item
    for clash in clashes:
        _plan_conflict(clash, merged, installed, pins or {}, owners)
    return list(merged.values())


def _plan_conflict(
    clash: Conflict,
    merged: dict[str, Needed],
    installed: dict[str, str],
    pins: dict[str, str],
    owners: dict[str, list[str]],
) -> None:
    """Resolve a broken pair: move each side to its tested pin; without pins, raise the other side."""

    def users(name: str) -> list[str]:
        return sorted({f for r, fs in owners.items() if canonicalize_name(Requirement(r).name) == name for f in fs})

    moved = False
    for name in (clash.package, clash.other):
        pin = pins.get(name)
        if pin and pin != installed.get(name) and name not in PROTECTED:
            merged[name] = Needed(Requirement(f"{name}=={pin}"), installed.get(name), users(name), str(clash))
            moved = True
    if not moved and clash.other not in merged and clash.other not in PROTECTED:
        req = Requirement(f"{clash.other}{clash.specifier}")
        merged[clash.other] = Needed(req, installed.get(clash.other), users(clash.other), str(clash))


# --------------------------------------------------------------------------------------------
# Lock files


@dataclass
class Lock:
    """A human-readable lock: ``name==version`` lines.

    Two kinds: a runtime lock (``# fingerprint: cp313-torch2.11.0-cu128``) pins what one runtime
    lacks and is refused elsewhere; the tested set (``# tested: <fingerprint of the CI machine>``,
    :data:`TESTED_LOCK`) pins everything the extras pull and applies anywhere.
    """

    path: Path
    fingerprint: str | None
    pins: dict[str, str]
    tested_on: str | None = None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Lock:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise UserInputError(f"cannot read lock file {path}: {err.strerror or err}") from err
        fp = tested = None
        pins: dict[str, str] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line.startswith("# fingerprint:"):
                fp = line.split(":", 1)[1].strip()
            elif line.startswith("# tested:"):
                tested = line.split(":", 1)[1].strip()
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement as err:
                raise UserInputError(f"{path}:{n}: not a requirement line: {raw!r}") from err
            spec = list(req.specifier)
            if len(spec) != 1 or spec[0].operator != "==":
                raise UserInputError(f"{path}:{n}: a lock pins exact versions (name==version), got {raw!r}")
            pins[canonicalize_name(req.name)] = spec[0].version
        if fp is None and tested is None:
            raise UserInputError(
                f"{path} has no '# fingerprint: ...' or '# tested: ...' line: it is not a fastsd lock file"
            )
        return cls(path, fp, pins, tested)


def find_lock(fp: str) -> Lock | None:
    """The shipped lock for fingerprint ``fp`` (``wheels/<fp>.txt``), if there is one."""
    path = LOCK_DIR / f"{fp}.txt"
    return Lock.read(path) if path.is_file() else None


def tested_lock() -> Lock | None:
    """The tested set shipped with fastsd (``wheels/tested.txt``)."""
    path = LOCK_DIR / TESTED_LOCK
    return Lock.read(path) if path.is_file() else None


def choose_locks(fp: str, lock: str | os.PathLike[str] | None = None, latest: bool = False) -> list[Lock]:
    """The locks an install pins to, most specific first: an explicit ``lock``; else this runtime's
    own lock (if shipped) and the tested set. ``latest`` pins to none.

    Raises:
        UserInputError: ``lock`` is a runtime lock for another fingerprint, or ``lock`` with ``latest``.
    """
    if latest:
        if lock:
            raise UserInputError("--lock and --latest contradict each other: pass one")
        return []
    if lock:
        chosen = Lock.read(lock)
        if chosen.fingerprint is not None and chosen.fingerprint != fp:
            raise UserInputError(
                f"lock {chosen.path} is for {chosen.fingerprint}, this runtime is {fp}: "
                "pass the lock for this runtime, or none (fastsd then uses its tested set)"
            )
        return [chosen]
    return [lk for lk in (find_lock(fp), tested_lock()) if lk is not None]


def merged_pins(locks: list[Lock]) -> dict[str, str]:
    """One name -> version table from ``locks``; earlier (more specific) locks win."""
    pins: dict[str, str] = {}
    for lk in reversed(locks):
        pins.update(lk.pins)
    return pins


# --------------------------------------------------------------------------------------------
# Wheel cache


def default_wheelhouse(fp: str) -> Path:
    """``<home>/wheels/<fp>`` on Drive in Colab (it outlives the runtime), else ``~/.cache``."""
    from .paths import cache_dir, drive_dir, resolve_home

    if environment() == "colab" and drive_dir() is not None:
        return resolve_home() / "wheels" / fp
    return cache_dir() / "wheels" / fp


class Wheelhouse:
    """A folder of wheels plus ``manifest.json`` (file -> name, version, sha256)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, str]] = {}
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                self.entries = json.loads(manifest.read_text()).get("wheels", {})
            except (OSError, ValueError):
                self.entries = {}  # damaged manifest: treated as an empty cache

    def verify(self) -> list[str]:
        """Check every listed wheel against its sha256; drop the bad ones. Returns the problems."""
        problems = []
        for fname, meta in list(self.entries.items()):
            wheel = self.path / fname
            if not wheel.is_file():
                problems.append(f"{fname} is missing")
            elif storage.sha256_file(wheel) != meta.get("sha256"):
                problems.append(f"{fname} is damaged (sha256 mismatch)")
            else:
                continue
            del self.entries[fname]
        return problems

    def covers(self, needed: list[Needed]) -> bool:
        """True when each needed requirement has a wheel here that satisfies it."""
        for item in needed:
            if not any(
                canonicalize_name(m["name"]) == item.name and _satisfied(item.requirement, m["version"])
                for m in self.entries.values()
            ):
                return False
        return True

    def add(self, wheels: Iterable[Path], fp: str) -> list[str]:
        """Copy wheels in (safe writes, verified) and rewrite the manifest. Returns file names."""
        added = []
        for wheel in wheels:
            name, version, _, _ = parse_wheel_filename(wheel.name)
            result = storage.copy_file(wheel, self.path / wheel.name, verify_sha256=True)
            self.entries[wheel.name] = {"name": str(name), "version": str(version), "sha256": result["sha256"]}
            added.append(wheel.name)
        storage.write_json(self.path / MANIFEST, {"fingerprint": fp, "wheels": self.entries})
        return added


# --------------------------------------------------------------------------------------------
# Running the installer


def _uv_command(bootstrap: bool) -> list[str] | None:
    exe = shutil.which("uv")
    if exe is None:
        try:
            from uv import find_uv_bin  # type: ignore[import-not-found]

            exe = find_uv_bin()
        except (ImportError, FileNotFoundError):
            exe = None
    if exe is None and bootstrap:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uv"], capture_output=True, text=True)
        if proc.returncode == 0:
            return _uv_command(bootstrap=False)
        log.warning("could not bootstrap uv with pip; using pip")
    if exe is None:
        return None
    cmd = [exe, "pip", "install", "--python", sys.executable]
    if sys.prefix == sys.base_prefix:
        cmd.append("--system")  # Colab's interpreter is a system Python, not a venv
    return cmd


def _pip_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]


def _installer(choice: str, offline: bool) -> tuple[str, list[str]]:
    if choice in ("auto", "uv"):
        cmd = _uv_command(bootstrap=not offline)
        if cmd is not None:
            return "uv", cmd
        if choice == "uv":
            raise InstallError("uv is not available and could not be installed: use --installer pip")
    return "pip", _pip_command()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"})


@dataclass
class InstallReport:
    """What an install did: per-package lines, where the wheels came from, and timings."""

    features: list[str]
    fingerprint: str
    needed: list[Needed]
    changed: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    source: str = "nothing to do"  # "wheel cache", "index", "nothing to do", "dry run"
    installer: str | None = None
    wheelhouse: Path | None = None
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0


def install(
    features: str | list[str] | None = None,
    *,
    wheelhouse: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    installer: str = "auto",
    use_cache: bool = True,
    latest: bool = False,
    echo: Callable[[str], None] = print,
) -> InstallReport:
    """Install what ``features`` need; see the module doc for the order of things.

    Args:
        features: ``"train,webui"``, a list of names, ``"all"`` or None (all).
        wheelhouse: wheel cache folder (default: :func:`default_wheelhouse` for the fingerprint).
        lock: an explicit lock file; a runtime lock must be for this runtime's fingerprint.
        latest: pin to no lock: the newest versions the ranges allow (untested; said so).
        dry_run: only report what is missing.
        installer: ``auto`` (uv, else pip), ``uv`` or ``pip``.
        use_cache: try the wheel cache first and fill it afterwards.
        echo: where the one-line-per-package messages go.

    Returns:
        An :class:`InstallReport`.

    Raises:
        UserInputError: unknown feature, a lock for another runtime.
        InstallError: torch missing/too old, or the installer failed (its output was shown).
        NetworkError: the index could not be reached and the cache could not serve the install.

    Example:
        >>> install("train", dry_run=True)  # doctest: +SKIP
        missing   bitsandbytes>=0.45  (train)
    """
    names = parse_features(features)
    started = time.perf_counter()
    before = installed_versions()
    torch_version = check_torch(before)
    fp = fingerprint()
    locks = choose_locks(fp, lock, latest)
    pins_table = merged_pins(locks)
    needed = plan(names, None, pins_table)
    report = InstallReport(names, fp, needed)
    if latest:
        echo(
            "--latest: resolving the newest versions fastsd's ranges allow; this set is untested "
            f"(the tested one is {LOCK_DIR / TESTED_LOCK})"
        )

    if dry_run or not needed:
        report.source = "dry run" if dry_run else "nothing to do"
        for item in needed:
            pin = pins_table.get(item.name)
            users = ", ".join(item.features)
            if item.conflict:
                echo(f"conflict  {item.name} {item.installed} -> {item.requirement}: {item.conflict}  ({users})")
                continue
            state = "missing " if item.installed is None else f"too old {item.installed},"
            echo(f"{state:<9} {item.requirement}" + (f" -> {pin} (lock)" if pin else "") + f"  ({users})")
        if not needed:
            echo(f"everything for {', '.join(names)} is installed")
        report.seconds = time.perf_counter() - started
        return report

    house = Wheelhouse(wheelhouse or default_wheelhouse(fp))
    report.wheelhouse = house.path
    with tempfile.TemporaryDirectory(prefix="fastsd-install-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        pins = {**pins_table, **{n: before[n] for n in PROTECTED if n in before}}  # the runtime's torch wins
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        reqs = [_pinned(item, pins_table) for item in needed]

        done = False
        if use_cache and house.entries:
            problems = house.verify()
            for problem in problems:
                echo(f"wheel cache: {problem}; not using it")
            if house.covers(needed):
                done = _install_from_cache(report, house, reqs, constraints, installer, echo)
        if not done:
            _install_from_index(report, reqs, constraints, installer, echo)

        after = installed_versions()
        if after.get("torch") != torch_version:
            raise InstallError(
                f"the installer changed torch {torch_version} -> {after.get('torch')}: this must not happen; "
                "restart the runtime and report it"
            )
        report.changed = {n: (before.get(n), v) for n, v in after.items() if before.get(n) != v}
        for name, (old, new) in sorted(report.changed.items()):
            if old is None:
                verb = f"installed {name} {new}"
            else:
                verb = f"{'upgraded' if Version(new) > Version(old) else 'changed'} {name} {old} -> {new}"
            echo(f"{verb}  (from {report.source})")
        if use_cache and report.source == "index":
            _fill_cache(report, house, after, echo)
    report.seconds = time.perf_counter() - started
    echo(f"done in {report.seconds:.1f} s ({report.installer}, from {report.source})")
    return report


def _pinned(item: Needed, pins: dict[str, str]) -> str:
    pin = pins.get(item.name)
    if pin and _satisfied(item.requirement, pin):
        return f"{item.requirement.name}=={pin}"
    return str(item.requirement)


def _install_from_cache(
    report: InstallReport,
    house: Wheelhouse,
    reqs: list[str],
    constraints: Path,
    choice: str,
    echo: Callable[[str], None],
) -> bool:
    kind, cmd = _installer(choice, offline=True)
    offline = ["--offline"] if kind == "uv" else []
    proc = _run([*cmd, *offline, "--no-index", "--find-links", str(house.path), "-c", str(constraints), *reqs])
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        echo(f"wheel cache at {house.path} could not serve this install ({last[0]}); installing from the index")
        return False
    report.installer, report.source = kind, "wheel cache"
    return True


def _install_from_index(
    report: InstallReport, reqs: list[str], constraints: Path, choice: str, echo: Callable[[str], None]
) -> None:
    kind, cmd = _installer(choice, offline=False)
    echo(f"installing {len(reqs)} requirement(s) with {kind}: {' '.join(reqs)}")
    proc = _run([*cmd, "-c", str(constraints), *reqs])
    if proc.returncode != 0 and kind == "uv" and choice == "auto" and not _NETWORK_PATTERNS.search(proc.stderr):
        echo("uv failed; trying pip")
        kind, cmd = "pip", _pip_command()
        proc = _run([*cmd, "-c", str(constraints), *reqs])
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        sys.stderr.write(f"---- {kind} output ----\n{output}\n---- end of {kind} output ----\n")
        if _NETWORK_PATTERNS.search(output):
            raise NetworkError(
                f"{kind} could not reach the package index (output above): connect to the network, "
                "or install from a wheel cache with --wheelhouse DIR"
            )
        raise InstallError(f"{kind} could not install {' '.join(reqs)} (its output is above)")
    report.installer, report.source = kind, "index"


def _fill_cache(report: InstallReport, house: Wheelhouse, after: dict[str, str], echo: Callable[[str], None]) -> None:
    specs = [f"{name}=={after[name]}" for name in sorted(report.changed) if name not in PROTECTED]
    if not specs:
        return
    with tempfile.TemporaryDirectory(prefix="fastsd-wheels-") as tmp:
        proc = _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", tmp, *specs]
        )
        if proc.returncode != 0:
            echo(f"wheel cache not updated (pip wheel failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]})")
            return
        try:
            report.cached = house.add(sorted(Path(tmp).glob("*.whl")), report.fingerprint)
        except FastsdError as err:
            echo(f"wheel cache not updated: {err}")
            return
    echo(f"cached {len(report.cached)} wheel(s) in {house.path} for the next runtime")
