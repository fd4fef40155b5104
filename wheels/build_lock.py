"""Rebuild the lock file (and optionally its wheelhouse) for the runtime this script runs on.

Run it on a *fresh* runtime of the kind the lock is for (e.g. a new Colab GPU runtime, before
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="all")
    parser.add_argument("--out", type=Path, help="lock path (default: wheels/<fingerprint>.txt)")
    parser.add_argument("--wheelhouse", type=Path, help="also download the wheels here")
    args = parser.parse_args()

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
