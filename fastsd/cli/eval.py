"""``fastsd eval SESSION``: DreamBooth likeness scores (DINO, CLIP-I, CLIP-T; PRES, DIV with a prior) of an export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval",
        parents=parents,
        help="score how well an export learned the subject (DreamBooth's DINO, CLIP-I, CLIP-T)",
        description="Generate the DreamBooth paper's prompts with the session's latest export (4 images per prompt, "
        "fixed seeds) and score them against the instance photos. With prior preservation, also PRES and DIV "
        "(mean LPIPS between a prompt's images, as in the paper; div_dino = 1 - DINO similarity when the LPIPS "
        "weights cannot be fetched, said in the output). Scores go into the session (session show), TensorBoard "
        "(logs/eval) and a contact sheet in samples/.",
    )
    p.add_argument("session", help="session name")
    p.add_argument("--export", metavar="FILE", help="export to score (default: the latest)")
    p.add_argument("--prompts", type=int, metavar="N", help="first N of the 25 prompts (default all)")
    p.add_argument("--images-per-prompt", type=int, default=4, metavar="N", help="images per prompt (default 4)")
    p.add_argument(
        "--prior",
        choices=("auto", "on", "off"),
        default="auto",
        help="PRES and DIV from class-prompt images (auto: when the session has class images)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0; the same for every export)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--size", type=int, metavar="PX", help="image size (default: the session's training size)")
    p.add_argument("--dino", metavar="MODEL", help="DINO model: name, Hub id or folder (default dino-vits16)")
    p.add_argument("--clip", metavar="MODEL", help="CLIP model: name, Hub id or folder (default clip-vit-b32)")
    p.add_argument(
        "--lpips",
        metavar="MODEL",
        help="LPIPS weights for DIV: name, Hub id or a folder with torchvision's alexnet-owt-7be5be79.pth and "
        "lpips' v0.1 alex.pth (default lpips-alex, fetched once; off: div_dino)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--compare", action="append", default=[], metavar="SESSION", help="also list another session's scores"
    )
    p.add_argument("--show", action="store_true", help="only print the recorded scores, evaluate nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def scored_rows(session: Any, prefix: str = "") -> list[tuple[str, dict[str, float]]]:
    """(export label, metrics) for every export of ``session`` that has scores."""
    rows = []
    for m in session.models():
        metrics = (m.get("eval") or {}).get("metrics") if isinstance(m.get("eval"), dict) else None
        if isinstance(metrics, dict):  # session.json is read from disk: only numbers are shown
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            rows.append((prefix + Path(m["file"]).name, numbers))
    return rows


def run(args: argparse.Namespace) -> int:
    from ..session import Session

    session = Session.open(args.session, args.root)
    others = [Session.open(name, args.root) for name in args.compare]
    result = None
    if not args.show:
        from ..eval import evaluate
        from ..eval.run import pick_export

        pick_export(session, args.export)  # no export: say so before loading anything
        result = evaluate(
            session,
            export=args.export,
            dino=args.dino,
            clip=args.clip,
            lpips=args.lpips,
            prompts=args.prompts,
            images_per_prompt=args.images_per_prompt,
            prior={"auto": None, "on": True, "off": False}[args.prior],
            seed=args.seed,
            steps=args.steps,
            size=args.size,
            device=args.device,
            home=args.root,
        )
        session = Session.open(args.session, args.root)
    prefix = f"{session.name}/" if others else ""
    rows = scored_rows(session, prefix) + [r for o in others for r in scored_rows(o, f"{o.name}/")]
    if args.json:
        out = {"result": {"export": result.export, **result.to_dict()} if result else None, "table": dict(rows)}
        print(json.dumps(out))
        return 0
    from ..eval.run import METRICS, table

    if result is not None:
        print(
            f"scored {result.export}: {result.prompts} prompt(s) x {result.images_per_prompt} image(s) in "
            f"{result.seconds:.1f}s; images in {result.grid}"
        )
        if "div" in result.metrics:
            print(f"DIV is LPIPS ({result.settings['lpips_model']})")
        elif "div_dino" in result.metrics:
            print(f"DIV is div_dino (1 - DINO similarity), not LPIPS: {result.settings['div_fallback']}")
    if rows:
        print(table(rows))
        for name in {n for _, r in rows for n in r}:
            print(f"  {name}: {METRICS.get(name, '')}")
    else:
        print(f"no export of {session.name} has scores yet: run fastsd eval {session.name}")
    return 0
