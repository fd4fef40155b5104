"""Do the installed packages work *together*? The check behind ``doctor``'s and ``install``'s "ready".

A version range per package is not enough: on 2026-11-21 transformers 5.24.0 began to require
peft >= 0.22.0, a release that did not exist, while every range fastsd declared was still met. Two
kinds of declared minimum are compared here with what is installed, without importing anything:

- the ``Requires-Dist`` lines of each installed distribution's metadata (no extras), and
- minimums that libraries declare in their *code* and enforce at run time (:data:`CODE_MINIMA`),
  read from the installed source file as text.

:func:`import_problems` then tries, in a child process, the imports each feature needs
(``features.IMPORTS``), which catches what no declaration tells (a missing compiled module, a
renamed symbol). Both feed :func:`fastsd.doctor.feature_status`.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .features import IMPORTS

#: Minimums declared in library code, not in metadata: (package, file in it, constant, package it
#: constrains). Found by reading each library's version checks; extend when a release adds one.
CODE_MINIMA: tuple[tuple[str, str, str, str], ...] = (
    ("transformers", "transformers/integrations/peft.py", "MIN_PEFT_VERSION", "peft"),
    ("transformers", "transformers/utils/import_utils.py", "ACCELERATE_MIN_VERSION", "accelerate"),
    ("transformers", "transformers/utils/import_utils.py", "BITSANDBYTES_MIN_VERSION", "bitsandbytes"),
    ("diffusers", "diffusers/utils/constants.py", "MIN_PEFT_VERSION", "peft"),
    ("diffusers", "diffusers/utils/constants.py", "MIN_TRANSFORMERS_VERSION", "transformers"),
)


@dataclass(frozen=True)
class Conflict:
    """``package`` (at ``version``) needs ``other`` in ``specifier``, and ``installed`` is not in it."""

    package: str
    version: str
    other: str
    specifier: str
    installed: str

    def __str__(self) -> str:
        spec = ", ".join(f"{s.operator} {s.version}" for s in sorted(SpecifierSet(self.specifier), key=str))
        return f"{self.package} {self.version} needs {self.other} {spec} (installed {self.installed})"


def _installed(names: Iterable[str]) -> dict[str, importlib.metadata.Distribution]:
    found = {}
    for name in names:
        try:
            found[canonicalize_name(name)] = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _code_minimum(dist: importlib.metadata.Distribution, relpath: str, constant: str) -> str | None:
    try:
        text = dist.locate_file(relpath).read_text(encoding="utf-8")  # type: ignore[union-attr]
    except (OSError, AttributeError, UnicodeDecodeError):
        return None
    match = re.search(rf"^{constant}\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    return match.group(1) if match else None


def _declared(dist: importlib.metadata.Distribution) -> Iterable[Requirement]:
    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            yield req


def conflicts(packages: Iterable[str]) -> list[Conflict]:
    """Declared minimums among ``packages`` that the installed versions break.

    Only pairs inside ``packages`` are compared (a feature's own requirements), and only where both
    sides are installed: a missing package is :func:`fastsd.install.unmet`'s business.
    """
    dists = _installed(packages)
    versions = {name: dist.version for name, dist in dists.items()}
    found: list[Conflict] = []

    def check(package: str, other: str, specifier: str) -> None:
        other = canonicalize_name(other)
        if other not in versions or other == package:
            return
        try:
            ok = Requirement(f"{other}{specifier}").specifier.contains(Version(versions[other]), prereleases=True)
        except (InvalidRequirement, InvalidVersion):
            return
        if not ok:
            found.append(Conflict(package, versions[package], other, specifier, versions[other]))

    for name, dist in dists.items():
        for req in _declared(dist):
            if req.specifier:
                check(name, req.name, str(req.specifier))
    for package, relpath, constant, other in CODE_MINIMA:
        dist = dists.get(package)
        minimum = _code_minimum(dist, relpath, constant) if dist is not None else None
        if minimum:
            check(package, other, f">={minimum}")
    return sorted(set(found), key=str)


_PROBE = """
import json, sys
out = {}
for feature, lines in json.loads(sys.argv[1]).items():
    for line in lines:
        try:
            exec(line, {})
        except Exception as err:
            out.setdefault(feature, []).append(f"{line!r} failed: {type(err).__name__}: {err}".splitlines()[0])
print(json.dumps(out))
"""


def import_problems(features: Iterable[str], timeout: float = 180) -> dict[str, list[str]]:
    """Feature -> the imports it needs that fail here (tried in a child process, so the caller
    stays free of torch and a crashing import cannot take it down)."""
    wanted = {f: list(IMPORTS.get(f, ())) for f in features}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(wanted)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {f: [f"importing what {f} needs took over {timeout:.0f} s"] for f in wanted}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {f: [f"the import check crashed: {tail}"] for f in wanted}
