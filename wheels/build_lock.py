"""Rebuild a lock: the tested set (``--tested``), or the lock for the runtime this script runs on.

The tested set, ``wheels/tested.txt``, is what CI and the README's test command install, and what
``fastsd install`` pins to where no runtime lock matches. Regenerate it, and run the whole suite
against it, with one command (an upgrade is then a reviewed diff of that file)::

    python wheels/build_lock.py --tested      # fresh venv, newest versions in the ranges, pytest

It makes a venv, installs torch (``--torch``, default 2.13.0: the CPU build CI uses), then
``pip install -e ".[test]"`` resolved fresh, writes every resulting ``name==version`` (torch and
its CUDA siblings excluded: the runtime owns them) and runs ``pytest`` in that venv; it exits 1
when the suite fails, so a release that breaks fastsd shows before it lands.

A runtime lock: run it on a *fresh* runtime of the kind the lock is for (e.g. a new Colab GPU runtime, before
installing anything), from a checkout of fastsd::

    python wheels/build_lock.py                       # writes wheels/<fingerprint>.txt
    python wheels/build_lock.py --wheelhouse /content/drive/MyDrive/fastsd/wheels/<fingerprint>

It asks pip which exact distributions ``fastsd install --features all`` would add to this
runtime (``pip install --dry-run --report``, torch pinned to the installed build) and writes them
as ``name==version`` lines with the feature that needs them. With ``--wheelhouse`` it also
downloads those wheels and writes the manifest ``fastsd install`` verifies (sha256).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packaging.utils import canonicalize_name  # noqa: E402

from fastsd.features import FEATURES, PROTECTED  # noqa: E402
from fastsd.install import Wheelhouse, installed_versions, plan  # noqa: E402
from fastsd.runtime import environment, fingerprint  # noqa: E402


def resolve(requirements: list[str], pins: dict[str, str]) -> list[dict]:
    """The exact distributions pip would install for ``requirements`` here (from its JSON report)."""
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "c.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report)]
        subprocess.run([*cmd, "-c", str(constraints), *requirements], check=True)
        return json.loads(report.read_text())["install"]


REPO = Path(__file__).resolve().parent.parent
#: Never pinned in the tested set: the runtime's torch stack, and fastsd itself.
UNPINNED_PREFIXES = ("nvidia-", "cuda-")


def build_tested(torch_spec: str, run_tests: bool, out: Path) -> int:
    """Resolve ``.[test]`` fresh in a new venv, write the tested lock, run the suite against it."""
    with tempfile.TemporaryDirectory(prefix="fastsd-lock-") as tmp:
        env_dir = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
        py = str(env_dir / "bin" / "python")
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, f"torch=={torch_spec}"], check=True)
        subprocess.run([*pip, "-e", f"{REPO}[test]"], check=True)
        frozen = subprocess.run(
            [py, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
        ).stdout
        fp = subprocess.run(
            [py, "-c", "from fastsd.runtime import fingerprint; print(fingerprint())"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout.strip()
        pins = []
        for line in frozen.splitlines():
            name, sep, version = line.partition("==")
            key = canonicalize_name(name)
            if not sep or key in PROTECTED or key == "fastsd" or key.startswith(UNPINNED_PREFIXES):
                continue
            pins.append(f"{key}=={version}")
        header = [
            '# fastsd tested set: exact versions of everything `pip install -e ".[test]"` pulls, which the',
            "# whole suite passed with. CI and the README's test command install with -c wheels/tested.txt;",
            "# fastsd install pins to it where no runtime lock matches. torch is not pinned: the runtime owns it.",
            f"# tested: {fp}",
            "# Regenerate (newest versions in the ranges, then the suite): python wheels/build_lock.py --tested",
        ]
        out.write_text("\n".join([*header, *sorted(pins)]) + "\n")
        print(f"wrote {out} ({len(pins)} pins, {fp})")
        if not run_tests:
            return 0
        tests = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=REPO)
        if tests.returncode != 0:
            print(f"the suite FAILED against the new set: review {out} (git diff) before committing it")
        return tests.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tested", action="store_true", help="rebuild wheels/tested.txt and run the suite on it")
    parser.add_argument("--torch", default="2.13.0", help="torch version for --tested (default: CI's CPU build)")
    parser.add_argument("--no-test", action="store_true", help="with --tested: write the lock, skip the suite")
    parser.add_argument("--features", default="all")
    parser.add_argument("--out", type=Path, help="lock path (default: wheels/<fingerprint>.txt)")
    parser.add_argument("--wheelhouse", type=Path, help="also download the wheels here")
    args = parser.parse_args()
    if args.tested:
        return build_tested(args.torch, not args.no_test, args.out or Path(__file__).with_name("tested.txt"))

    names = list(FEATURES) if args.features == "all" else args.features.split(",")
    installed = installed_versions()
    needed = plan(names, installed)
    owners = {item.name: ", ".join(item.features) for item in needed}
    pins = {n: installed[n] for n in PROTECTED if n in installed}
    dists = resolve([str(item.requirement) for item in needed], pins) if needed else []
    fp = fingerprint()
    lines = [
        f"# fastsd lock: what this runtime ({environment()}) lacks for fastsd's features, pinned.",
        f"# fingerprint: {fp}",
        "# Rebuild on a fresh runtime with: python wheels/build_lock.py",
    ]
    for dist in sorted(dists, key=lambda d: canonicalize_name(d["metadata"]["name"])):
        name = canonicalize_name(dist["metadata"]["name"])
        pin = f"{name}=={dist['metadata']['version']}"
        lines.append(f"{pin:<40}# {owners.get(name, 'dependency')}")
    out = args.out or Path(__file__).with_name(f"{fp}.txt")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(dists)} pins)")

    if args.wheelhouse and dists:
        with tempfile.TemporaryDirectory() as tmp:
            specs = [f"{d['metadata']['name']}=={d['metadata']['version']}" for d in dists]
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, *specs], check=True)
            added = Wheelhouse(args.wheelhouse).add(sorted(Path(tmp).glob("*.whl")), fp)
        print(f"cached {len(added)} wheels in {args.wheelhouse}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
