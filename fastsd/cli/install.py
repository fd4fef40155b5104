"""``fastsd install``: add what features need, from the wheel cache when it can."""

from __future__ import annotations

import argparse
from typing import Any

from ..features import FEATURES
from ..install import install


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install", parents=parents, help="install what features need (never touches torch)")
    p.add_argument("--features", default="all", help=f"comma-separated: {','.join(FEATURES)} or all (default: all)")
    p.add_argument("--wheelhouse", metavar="DIR", help="wheel cache folder (default: per runtime fingerprint)")
    p.add_argument(
        "--lock",
        metavar="FILE",
        help="lock file to pin to (default: the shipped lock for this runtime, then the tested set wheels/tested.txt)",
    )
    p.add_argument(
        "--latest", action="store_true", help="pin to no lock: the newest versions fastsd's ranges allow (untested)"
    )
    p.add_argument("--installer", choices=("auto", "uv", "pip"), default="auto")
    p.add_argument("--no-cache", action="store_true", help="neither use nor fill the wheel cache")
    p.add_argument("--dry-run", action="store_true", help="only list what is missing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    install(
        args.features,
        wheelhouse=args.wheelhouse,
        lock=args.lock,
        dry_run=args.dry_run,
        installer=args.installer,
        use_cache=not args.no_cache,
        latest=args.latest,
    )
    return 0
