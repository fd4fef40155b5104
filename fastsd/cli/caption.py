"""``fastsd caption SESSION``: captions for a session's instance images from a vision-language model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags ``caption`` and ``ask`` share."""
    p.add_argument("--engine", choices=("local", "openai"), default="local", help="model here, or an endpoint")
    p.add_argument(
        "--model",
        metavar="NAME",
        help="local: registry name (qwen3-vl-2b, qwen3-vl-4b), Hub id or folder (default qwen3-vl-2b); "
        "openai: the model name the server serves",
    )
    p.add_argument("--base-url", metavar="URL", help="OpenAI-compatible server for --engine openai (…/v1)")
    p.add_argument(
        "--api-key-env",
        metavar="NAME",
        default="OPENAI_API_KEY",
        help="environment variable or Colab secret holding the endpoint's key (never printed)",
    )
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight for --engine openai")
    p.add_argument("--quantize", choices=("none", "8bit", "4bit"), default="none", help="local: bitsandbytes weights")
    p.add_argument("--batch-size", type=int, metavar="N", help="local: images per batch (default 8 on GPU, 2 on CPU)")
    p.add_argument("--device", help="local: cuda or cpu (default: cuda when available)")


def engine_from(args: argparse.Namespace) -> Any:
    from ..vlm.engines import make_engine

    return make_engine(
        args.engine,
        model=args.model,
        base_url=args.base_url,
        key_name=args.api_key_env,
        concurrency=args.concurrency,
        device=args.device,
        quantize=args.quantize,
        batch_size=args.batch_size,
        home=args.root,
    )


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "caption",
        parents=parents,
        help="caption a session's instance images with a vision-language model",
        description="Write a caption for every instance image of a session ('photo of <token> <class>, ...'), cut "
        "to what the text encoder reads. Images that already have a caption keep it unless --overwrite; a rerun "
        "continues where an interrupted one stopped.",
    )
    p.add_argument("session", help="session name")
    p.add_argument("--style", choices=("sentence", "tags"), default="sentence", help="a sentence, or tags")
    p.add_argument("--overwrite", action="store_true", help="replace captions images already have")
    p.add_argument("--max-tokens", type=int, metavar="N", help="text-encoder tokens (default 75 CLIP, 256 T5)")
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserInputError
    from ..session import Session
    from ..vlm.caption import caption_session

    session = Session.open(args.session, args.root)
    images = session.images()
    if not images:
        raise UserInputError(f"session {args.session} has no instance images: add some with 'fastsd session add'")
    if not args.overwrite and all(session.has_own_caption(p) for p in images):
        print(f"all {len(images)} image(s) already have captions (--overwrite replaces them)")
        return 0

    def show(name: str, text: str | None, error: str | None) -> None:
        if not args.json:
            print(
                f"{name}: {text}" if error is None else f"failed: {name}: {error}",
                file=sys.stderr if error else sys.stdout,
            )

    engine = engine_from(args)
    try:
        result = caption_session(
            session, engine, style=args.style, overwrite=args.overwrite, max_tokens=args.max_tokens, progress=show
        )
    finally:
        engine.close()
    if args.json:
        print(json.dumps({"written": result.written, "kept": result.kept, "failed": result.failed}))
    else:
        print(result.summary())
    return 1 if result.failed else 0
