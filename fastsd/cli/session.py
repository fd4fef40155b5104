"""``fastsd session``: create, list, show, add images to, import and remove training sessions."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UserInputError
from ..images import CAPTION_MODES, CROP_MODES


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("session", parents=parents, help="training sessions: new, list, show, add, import, rm")
    ss = p.add_subparsers(dest="session_command", metavar="ACTION")

    new = ss.add_parser("new", parents=parents, help="create a session")
    new.add_argument("name", help="letters, digits, '-' and '_' (spaces become '_')")
    new.add_argument(
        "--base-model",
        metavar="SPEC",
        help="base model: a registry name (sd15, sd21-512, sd21-768, sdxl...), hf:org/repo, a URL, or a path",
    )
    new.add_argument(
        "--resolution",
        type=int,
        help="training size: a multiple of 64 (default: the base model's native size, 512 SD1.5, 1024 SDXL)",
    )
    new.add_argument("--token", default="sks", help="instance token (default sks)")
    new.add_argument("--class", dest="class_word", default="person", help="class word (default person)")
    new.set_defaults(func=run_new)

    ls = ss.add_parser("list", parents=parents, help="list sessions")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=run_list)

    show = ss.add_parser("show", parents=parents, help="say what a session holds")
    show.add_argument("name")
    show.add_argument("--verify", action="store_true", help="re-hash checkpoint files (slow on Drive)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)

    add = ss.add_parser("add", parents=parents, help="add instance images from files, folders or zips")
    add.add_argument("name")
    add.add_argument("sources", nargs="+", metavar="PATH", help="image files, folders or zips")
    add.add_argument(
        "--crop", choices=CROP_MODES, default="smart", help="smart (default), center, or none (keep aspect)"
    )
    add.add_argument("--size", type=int, help="training size (default: the session's resolution)")
    add.add_argument(
        "--captions", choices=CAPTION_MODES, default="auto", help="auto (.txt next to images), filename, or token"
    )
    add.add_argument("--force", action="store_true", help="break the session's lock if another process holds it")
    add.set_defaults(func=run_add)

    imp = ss.add_parser("import", parents=parents, help="import a session from a folder or zip")
    imp.add_argument("source", metavar="PATH", help="session folder (e.g. a shared Drive folder) or .zip")
    imp.add_argument("--name", help="name of the imported session (default: its own name)")
    imp.set_defaults(func=run_import)

    rm = ss.add_parser("rm", parents=parents, help="delete a session and everything in it")
    rm.add_argument("name")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask (required when not in a terminal)")
    rm.add_argument("--force", action="store_true", help="also when another process holds its lock")
    rm.set_defaults(func=run_rm)

    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def run_new(args: argparse.Namespace) -> int:
    from ..models.fetch import check_spec
    from ..session import Session

    # A typo is refused now, not when training starts; a relative path is stored absolute.
    base_model = check_spec(args.base_model) if args.base_model else None
    s = Session.create(
        args.name,
        args.root,
        base_model=base_model,
        resolution=args.resolution,
        instance_token=args.token,
        class_word=args.class_word,
    )
    print(f"created session {s.name} at {s.path}")
    print(f"next: fastsd session add {s.name} PHOTOS (files, folders or zips)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..session import Session, list_sessions

    rows = []
    for name in list_sessions(args.root):
        try:
            s = Session.open(name, args.root)
        except UserInputError as err:
            rows.append({"name": name, "error": str(err)})
            continue
        progress = s.info.get("progress") or {}
        rows.append(
            {
                "name": name,
                "base_model": s.info.get("base_model"),
                "images": len(s.images()),
                "step": progress.get("step", 0),
                "checkpoints": len(s.checkpoints()),
                "models": len(s.models()),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no sessions yet: create one with 'fastsd session new NAME'")
        return 0
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<24} unreadable: {r['error']}")
            continue
        print(
            f"{r['name']:<24} {r['base_model'] or '-':<16} {r['images']:>4} images  step {r['step']:<6} "
            f"{r['checkpoints']} checkpoint(s)  {r['models']} model(s)"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ..session import Session

    s = Session.open(args.name, args.root)
    if args.json:
        print(json.dumps(s.summary(verify=args.verify), indent=2))
    else:
        print(s.describe(verify=args.verify))
    return 0


def run_add(args: argparse.Namespace) -> int:
    from ..session import Session

    report = Session.open(args.name, args.root).add_images(
        args.sources, crop=args.crop, size=args.size, captions=args.captions, force=args.force
    )
    print(report.summary())
    return 1 if report.failed and not (report.added or report.duplicates) else 0


def run_import(args: argparse.Namespace) -> int:
    from ..session import import_session

    s = import_session(args.source, args.root, name=args.name)
    print(f"imported session {s.name} to {s.path}")
    print(s.describe())
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from ..session import Session, remove_session

    s = Session.open(args.name, args.root, strict=False)  # a missing session fails before any question
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                f"fastsd: error: not removing session {s.name} without confirmation: pass --yes",
                file=sys.stderr,
            )
            return 2
        try:
            answer = input(f"delete session {s.name} and everything in {s.path}? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            print("not removed")
            return 2
    path = remove_session(s.name, args.root, force=args.force)
    print(f"removed session {s.name} ({path})")
    return 0
