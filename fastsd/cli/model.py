"""``fastsd model get|detect``: download a model by name/URL/path, or tell what a model file is."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", parents=parents, help="download models and tell what a model file is")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    g = msub.add_parser(
        "get",
        parents=parents,
        help="fetch a model: registry name, hf:org/repo[@rev], Hub/Civitai/Drive/any URL, or path",
    )
    g.add_argument("spec", metavar="SPEC")
    g.add_argument("--dest", metavar="DIR", help="folder to put it in (default: <home>/models)")
    g.set_defaults(func=run_get)
    d = msub.add_parser("detect", parents=parents, help="family, variant, precision and parts of a model")
    d.add_argument("path", metavar="PATH")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run_detect)


def run_get(args: argparse.Namespace) -> int:
    from ..models.fetch import get

    print(get(args.spec, dest=args.dest, home=args.root))
    return 0


def run_detect(args: argparse.Namespace) -> int:
    from ..models.detect import detect

    det = detect(args.path)
    if args.json:
        print(json.dumps(det.to_dict(), indent=2))
        return 0
    print(det.summary())
    for note in det.notes:
        print(f"note: {note}")
    return 0
