"""``fastsd webui``: start the built-in UI, A1111, Forge or ComfyUI with fastsd's models, behind a tunnel."""

from __future__ import annotations

import argparse
from typing import Any

from ..launch.tunnel import KINDS
from ..models.memplan import PLAN_NAMES


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "webui",
        parents=parents,
        help="start a web UI (built-in, A1111, Forge, ComfyUI) with your models, reachable through a tunnel",
        description="Start a web UI with the models in <home>/models and the sessions' exports linked in, and "
        "make it reachable. Inside Colab the default tunnel is Colab's own proxy.",
    )
    p.add_argument("--backend", choices=("a1111", "forge", "comfyui", "builtin"), default="builtin")
    p.add_argument("--tunnel", choices=KINDS, default=None, help="default: colab inside Colab, else none")
    p.add_argument("--model", metavar="SPEC", help="model to load (built-in: any spec; backends: a .safetensors file)")
    p.add_argument("--port", type=int, help="local port (default 7860; ComfyUI 8188)")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces, not only 127.0.0.1")
    p.add_argument(
        "--auth", metavar="USER:PASS", help="login for the UI (a public tunnel without one gets a generated one)"
    )
    p.add_argument("--ref", help="backend commit, tag or branch (default: fastsd's pinned known-good commit)")
    p.add_argument("--temp", action="store_true", help="install the backend on local disk instead of <home>/webui")
    p.add_argument(
        "--extension",
        dest="extensions",
        action="append",
        default=[],
        metavar="URL",
        help="git URL of an extension (A1111/Forge) or custom node (ComfyUI); repeatable",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME",
        help="ControlNet model for the base family (registry name or hf:org/repo/file); repeatable",
    )
    p.add_argument("--family", choices=("sd15", "sd21", "sdxl", "sd35"), help="base family for --controlnet")
    p.add_argument(
        "--ngrok-token", metavar="TOKEN", help="ngrok authtoken (default: NGROK_AUTHTOKEN or the Colab secret)"
    )
    p.add_argument(
        "--memory-plan",
        choices=("auto", *PLAN_NAMES),
        help="built-in UI, SD3.5/FLUX.1: weights' precision and offload (default auto: chosen by VRAM and RAM)",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the server to answer (default 900)"
    )
    p.set_defaults(func=run, fast_exit=True)  # a server: exit at once after its clean-up


def run(args: argparse.Namespace) -> int:
    from ..launch.launcher import WebUIOptions, launch

    opts = WebUIOptions(
        backend=args.backend,
        tunnel=args.tunnel,
        model=args.model,
        port=args.port,
        listen=args.listen,
        auth=args.auth,
        ref=args.ref,
        temp=args.temp,
        extensions=args.extensions,
        controlnet=args.controlnet,
        family=args.family,
        ngrok_token=args.ngrok_token,
        timeout=args.timeout,
        root=args.root,
        memory_plan=args.memory_plan,
    )
    return launch(opts)
