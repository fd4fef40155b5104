"""``fastsd convert SRC DST``: Diffusers folder -> single file, or single file -> Diffusers folder."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        parents=parents,
        help="convert between a Diffusers folder and a single-file checkpoint (direction from SRC)",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="a Diffusers folder, a .safetensors/.ckpt file, or any model spec (sd15, hf:org/repo, URL)",
    )
    p.add_argument("dst", metavar="DST", help="the .safetensors file, or the Diffusers folder to create")
    p.add_argument("--half", action="store_true", help="store weights as fp16 (single-file output)")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("safetensors", "ckpt"),
        default="safetensors",
        help="single-file format; ckpt is a pickle, written only when asked for (default: safetensors)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--config",
        metavar="FOLDER_OR_SPEC",
        help="single file -> Diffusers: a Diffusers folder (or model spec) of the same model to take configs, "
        "tokenizers and the parts the file lacks from (needed for SD3/FLUX files; default for SD1/SD2/SDXL: "
        "the configs fastsd ships)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.convert import convert
    from ..models.load import local_model

    src = local_model(args.src, home=args.root)  # sd15, hf:..., URLs are fetched like every --model
    config = local_model(args.config, want="diffusers", home=args.root) if args.config else None
    print(convert(src, args.dst, half=args.half, fmt=args.fmt, overwrite=args.overwrite, config=config))
    return 0
