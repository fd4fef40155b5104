"""``fastsd ocr``: images and PDFs to Markdown/JSON with GLM-OCR (a thin layer over :func:`fastsd.ocr.ocr`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UserInputError


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("use auto or a positive number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("use auto or a positive number")
    return n


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ocr",
        parents=parents,
        help="OCR images and PDFs with GLM-OCR (Markdown, HTML tables, LaTeX, JSON extraction)",
        description="OCR images and PDFs with GLM-OCR. Results go to one folder per document: page_0001.md, "
        "document.md, document.json. A rerun skips pages already done. With --layout on (the default for "
        "--task text) PP-DocLayoutV3 finds the regions first and each is read with its own prompt, as the "
        "GLM-OCR SDK does. `fastsd ocr serve` serves GLM-OCR as an OpenAI-compatible API instead.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="PDF/image files, folders or glob patterns; or `serve` to start the API",
    )
    p.add_argument("--task", choices=["text", "table", "formula", "extract"], default="text")
    p.add_argument(
        "--schema", metavar="FILE.json", help="keys to extract (template or JSON Schema), for --task extract"
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: <fastsd home>/ocr)")
    p.add_argument("--dpi", type=int, default=200, help="PDF render resolution (default 200; longest side <= 3500 px)")
    p.add_argument("--pages", metavar="RANGES", help="pages to OCR, e.g. 1-5,8 (default: all)")
    p.add_argument(
        "--batch-size", type=_batch_size, default=None, metavar="auto|N", help="pages per batch (default auto)"
    )
    p.add_argument("--quantize", choices=["none", "8bit", "4bit"], default="none", help="bitsandbytes weights")
    p.add_argument("--engine", choices=["transformers", "openai"], default="transformers")
    p.add_argument("--base-url", metavar="URL", help="OpenAI-compatible server for --engine openai (vLLM/SGLang)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight for --engine openai")
    p.add_argument("--model", metavar="ID_OR_PATH", default="zai-org/GLM-OCR", help="Hub id or local folder")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="cap on generated tokens per page (default 4096; serve: 8192)"
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g = p.add_argument_group("layout (regions read with their own prompts)")
    g.add_argument(
        "--layout",
        choices=["on", "off"],
        default=None,
        help="find regions with PP-DocLayoutV3 (default: on for --task text)",
    )
    g.add_argument("--layout-model", metavar="ID_OR_PATH", help="PP-DocLayoutV3 Hub id or folder")
    g.add_argument("--layout-settings", metavar="FILE.json", help="thresholds / label->task table overrides")
    g.add_argument("--crops", action="store_true", help="also save every region's crop (regions/)")
    g.add_argument("--draw-boxes", action="store_true", help="save layout_NNNN.png with the regions drawn")
    s = p.add_argument_group("serve (fastsd ocr serve)")
    s.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0: other machines; a key is then required)")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080, the GLM-OCR SDK's default)")
    s.add_argument("--tunnel", help="open a tunnel to the server (colab, ngrok, cloudflared, ...); needs a key")
    s.add_argument("--max-batch", type=int, help="requests decoded together (default: from free VRAM)")
    s.add_argument("--batch-wait-ms", type=float, default=15.0, help="how long a batch waits for more requests")
    s.add_argument("--max-queue", type=int, default=512, help="requests waiting at once (more get 429)")
    s.add_argument("--allow-urls", choices=["on", "off"], help="fetch http(s) image URLs (default: on for loopback)")
    p.set_defaults(func=run)


def serve(args: argparse.Namespace) -> int:
    """``fastsd ocr serve``: the OpenAI-compatible server until Ctrl-C (key from FASTSD_OCR_API_KEY)."""
    from ..colab import secret
    from ..launch import tunnel
    from ..ocr.serve import ServeLimits, start

    if len(args.inputs) > 1:
        raise UserInputError(
            f"fastsd ocr serve takes no inputs (got {' '.join(args.inputs[1:])}); to OCR a file named serve, pass ./serve"
        )
    kind = args.tunnel or "none"
    if kind not in tunnel.KINDS:
        raise UserInputError(f"unknown tunnel {kind!r}: choose from {', '.join(tunnel.KINDS)}")
    public = kind != "none"
    exposed = public or args.host not in ("127.0.0.1", "localhost", "::1")
    allow = (args.allow_urls or ("off" if exposed else "on")) == "on"
    limits = ServeLimits(
        max_tokens=args.max_new_tokens or 8192,  # the GLM-OCR SDK asks for 8192
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        allow_urls=allow,
    )
    server = start(
        args.model,
        host=args.host,
        port=args.port,
        api_key=secret("FASTSD_OCR_API_KEY"),
        public=public,
        limits=limits,
        device=args.device,
        quantize=args.quantize,
    )
    if public:
        t = tunnel.open_tunnel(kind, server.port)
        print(f"public base URL: {t.url}/v1  (send Authorization: Bearer <key>)", flush=True)
    server.wait()
    return 0


def run(args: argparse.Namespace) -> int:
    from ..ocr import ocr

    if args.inputs and args.inputs[0] == "serve":
        return serve(args)
    layout = (args.layout or ("on" if args.task == "text" else "off")) == "on"
    if layout and args.task != "text":
        raise UserInputError(
            f"--layout on reads regions with their own prompts; use it with --task text, not {args.task}"
        )
    if args.task == "extract" and not args.schema:
        raise UserInputError("--task extract needs --schema FILE.json with the keys to extract")
    job = ocr(
        args.inputs,
        task=args.task,
        schema=args.schema,
        out=args.out,
        dpi=args.dpi,
        pages=args.pages,
        batch_size=args.batch_size,
        quantize=args.quantize,
        engine=args.engine,
        base_url=args.base_url,
        model=args.model,
        max_new_tokens=args.max_new_tokens or 4096,
        concurrency=args.concurrency,
        device=args.device,
        root=args.root,
        layout=layout,
        layout_model=args.layout_model,
        layout_settings=args.layout_settings,
        save_crops=args.crops,
        draw_boxes=args.draw_boxes,
    )
    folders: dict[str, str] = {}
    for page in job:
        folders[page.source] = page.folder
        for w in page.warnings:
            print(f"{page.document} page {page.page}: {w}", file=sys.stderr)
    s = job.summary
    for source, reason in s.failed:
        print(f"failed: {source}: {reason}", file=sys.stderr)
    print(
        f"{s.documents} document(s), {s.pages} page(s): {s.done} done, {s.skipped} already done, "
        f"{len(s.failed)} failed; {s.pages_per_second:.2f} pages/s; output in {s.out_dir}"
    )
    return 1 if s.failed else 0
