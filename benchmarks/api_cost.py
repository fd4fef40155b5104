"""The A1111 API's own cost per image: the real server, encode and HTTP, with generation stubbed out.

``benchmarks/webui.py`` measures the API on a GPU as the difference between two ~0.3 s paths, where a few
milliseconds are within the spread. This measures that difference alone: the built-in server (tiny SD1
model, CPU) with ``PipelineManager.generate`` replaced by a function that returns a ready 512 px image, so
a ``POST /sdapi/v1/txt2img`` round trip over loopback (httpx) is the request parsing, the job queue, the
PNG encode, base64, the JSON body and the transfer. Two images: noise (what a random-weight model makes,
the benchmarks' case) and one with structure; each with the encoder's store-incompressible rule on and off.

Run: ``python benchmarks/api_cost.py`` (one JSON line per case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def images(size: int) -> dict[str, Image.Image]:
    """A noise image, and one with structure (gradients, texture and a little noise)."""
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    smooth = np.stack([(x / 2) % 256, (y / 2) % 256, ((x + y) / 4) % 256], -1)
    structured = np.clip(smooth + np.random.default_rng(1).normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    return {"noise": Image.fromarray(noise), "structured": Image.fromarray(structured)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import httpx

    from fastsd import pngencode
    from fastsd.demo.tiny import build_sd1
    from fastsd.webui import generate
    from fastsd.webui.server import start

    work = Path(tempfile.mkdtemp(prefix="fastsd-api-cost-"))
    model = work / "sd1"
    build_sd1(model).save_pretrained(model, safe_serialization=True)
    current: dict[str, Image.Image] = {}

    def ready(self: Any, req: Any) -> Any:  # stands in for PipelineManager.generate
        return generate.GenerationResult([current["image"]], [req.seed], ["a prompt\nSteps: 20"], {"seed": req.seed})

    generate.PipelineManager.generate = ready
    server = start(str(model), home=str(work / "home"), port=0, ui=False, quiet=True, device="cpu")
    client = httpx.Client(base_url=server.url, timeout=60)
    body = {"prompt": "a prompt", "steps": 20, "width": args.size, "height": args.size}
    store_above = pngencode.STORE_ABOVE
    for name, image in images(args.size).items():
        current["image"] = image
        for store in (True, False):
            pngencode.STORE_ABOVE = store_above if store else float("inf")
            for _ in range(3):
                client.post("/sdapi/v1/txt2img", json=body).raise_for_status()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                r = client.post("/sdapi/v1/txt2img", json=body)
                r.raise_for_status()
                times.append(time.perf_counter() - t)
            line = {"image": name, "size": args.size, "store_incompressible": store, "workers": pngencode.workers()}
            line.update(median_ms=round(statistics.median(times) * 1000, 2), min_ms=round(min(times) * 1000, 2))
            line["response_kb"] = len(r.content) // 1024
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
