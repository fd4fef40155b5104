"""``fastsd doctor``: where fastsd runs, on what hardware, what is missing, and advice."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..doctor import doctor_report
from ..paths import resolve_home


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", parents=parents, help="report runtime, GPUs, packages and advice")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = doctor_report(resolve_home(args.root))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    return 0


def format_report(r: dict[str, Any]) -> str:
    """The doctor report as plain text for a terminal or notebook."""
    lines = [
        f"fastsd {r['fastsd']} on {r['environment']} ({r['platform']})",
        f"python   {r['python']['version']}  {r['python']['executable']}",
    ]
    t = r["torch"]
    if t["version"]:
        lines.append(
            f"torch    {t['version']}  CUDA build {t['cuda_build'] or 'none'}, GPU usable: {'yes' if t['cuda_available'] else 'no'}"
        )
    else:
        lines.append("torch    not installed")
    for g in r["gpus"]:
        lines.append(
            f"gpu {g['index']}    {g['name']}  sm {g['compute_capability']}  "
            f"{g['vram_free_gb']:.1f}/{g['vram_total_gb']:.1f} GiB free  bf16: {'yes' if g['bf16'] else 'no'}"
        )
    if not r["gpus"]:
        lines.append("gpu      none")
    lines.append(f"ram      {r['ram']['available_gb']:.1f}/{r['ram']['total_gb']:.1f} GiB available")
    home_disk = r["disk"]["home"]
    lines.append(f"home     {r['home']}" + (f"  ({home_disk['free_gb']} GiB free)" if home_disk else ""))
    drive = r["disk"]["drive"]
    lines.append(f"drive    {'mounted, ' + str(drive['free_gb']) + ' GiB free' if drive else 'not mounted'}")
    lines.append(f"runtime  fingerprint {r['fingerprint']}")
    lines.append("packages " + ", ".join(f"{k} {v or '-'}" for k, v in r["packages"].items()))
    for name, f in r["features"].items():
        lines.append(f"feature  {name}: {'ready' if f['ready'] else 'not ready: ' + f['reason']}")
    for tip in r["advice"]:
        lines.append(f"advice   {tip}")
    return "\n".join(lines)
