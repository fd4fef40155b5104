"""What the A1111 API adds to an image once it is made: PNG + base64 + JSON + one loopback HTTP round trip.

A real uvicorn server answers ``POST`` the way fastsd's ``/sdapi/v1/txt2img`` does for a finished
512 px noise image (a random-weight model's images are noise, deflate's worst case): ``image`` runs
:func:`fastsd.webui.api._encode` on a thread and returns the dict through ``response_model=ImageResponse``.
``empty`` is the same round trip with an empty body; ``encode`` is ``_encode`` alone, in the process.
No GPU, no model: the fixed cost per image that ``benchmarks/webui.py``'s ``api`` row adds to its
``manager`` row, split into its parts.

    PYTHONPATH=. python benchmarks/api_response.py [--size 512] [--repeats 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()

    import httpx
    import uvicorn
    from fastapi import FastAPI
    from PIL import Image

    from fastsd.webui.api import ImageResponse, _encode
    from fastsd.webui.generate import GenerationResult

    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    text = "a photo of a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    result = GenerationResult([Image.fromarray(pixels)], [1], [text], {"seed": 1, "infotexts": [text]})
    params = {"prompt": "a photo of a dog", "steps": 20, "width": args.size, "height": args.size}
    app = FastAPI()

    @app.post("/image", response_model=ImageResponse)
    async def image() -> dict:
        images = await asyncio.to_thread(_encode, result, True)
        return {"images": images, "parameters": params, "info": json.dumps(result.info)}

    @app.post("/empty")
    async def empty() -> dict:
        return {}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    times: dict[str, list[float]] = {"empty": [], "image": []}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for i in range(args.repeats + 5):  # 5 warm-up rounds
            for path, values in times.items():
                t0 = time.perf_counter()
                r = client.post(f"/{path}", json={"prompt": "a photo of a dog", "seed": i})
                r.raise_for_status()
                if i >= 5:
                    values.append(time.perf_counter() - t0)
    server.should_exit = True
    times["encode"] = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _encode(result, True)
        times["encode"].append(time.perf_counter() - t0)
    line = {"size": args.size, "repeats": args.repeats, "body_bytes": len(r.content)}
    line.update({f"{k}_ms": round(statistics.median(v) * 1000, 2) for k, v in times.items()})
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
