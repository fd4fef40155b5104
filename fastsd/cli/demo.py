"""``fastsd demo``: the main job end to end on tiny built-in models (a thin layer over :func:`fastsd.demo.tour.run_demo`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        parents=parents,
        help="see the main job work: train a LoRA, serve it, convert, OCR (offline, no GPU, ~2 min)",
        description="Run the main job end to end in <home>/demo: a session from generated photos, a LoRA "
        "trained for a few steps at 64 px and exported, the built-in server started, an image generated with "
        "the LoRA through the A1111 API, the model converted to a single file, a generated PDF page OCR'd, "
        "the server stopped. By default on tiny random-weight models built into the local cache: no network, "
        "no GPU, and the images are noise - it proves the machinery, not the art.",
    )
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="run the tour on this base model instead (sd15, hf:org/repo, a folder or file; "
        "found or fetched in the fastsd home)",
    )
    p.add_argument(
        "--ocr-model",
        metavar="ID_OR_PATH",
        help="GLM-OCR Hub id or folder for the OCR step (default: the tiny random-weight GLM-OCR)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.tour import run_demo

    if not args.debug:
        _quiet_libraries()
    print("fastsd demo: the main job on " + (args.model or "tiny random-weight models (offline)"), flush=True)
    result = run_demo(args.model, ocr_model=args.ocr_model, root=args.root, echo=lambda line: print(line, flush=True))
    print(result.report())
    return 0


def _quiet_libraries() -> None:
    """Keep the output to the demo's own lines: info logs, library notices and progress bars off.

    The steps' own commands (``fastsd train``, ``webui``...) show these; here each step reports in
    one line instead, and warnings and errors still show. ``--debug`` keeps everything.
    """
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    logging.getLogger("fastsd").setLevel(logging.WARNING)
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside the libraries
