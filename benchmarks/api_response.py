"""What the A1111 API adds to an image once it is made: PNG + base64 + JSON + one loopback HTTP round trip.

A real uvicorn server mounts fastsd's own ``/sdapi/v1`` router (:func:`fastsd.webui.api.make_router`)
over a stand-in backend whose generation is already done: one 512 px noise image (a random-weight
model's images are noise, deflate's worst case). ``txt2img`` is then everything the route does but
generate: the request's validation, the queue's future, the PNG + base64 on a thread, the response's
validation and dump, the body over loopback. ``empty`` is a round trip with an empty body;
``encode`` is the PNG + base64 alone (:func:`fastsd.webui.api._encode`), in the process.
No GPU, no model: the fixed cost per image that ``benchmarks/webui.py``'s ``api`` row adds to its
``manager`` row, split into its parts.

    PYTHONPATH=. python benchmarks/api_response.py [--size 512] [--repeats 60]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

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

    from fastsd.webui.api import _encode, make_router
    from fastsd.webui.generate import GenerationResult
    from fastsd.webui.worker import JobState

    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    text = f"a photo of a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: {args.size}x{args.size}"
    result = GenerationResult([Image.fromarray(pixels)], [1], [text], {"seed": 1, "infotexts": [text]})

    class Done:  # the backend the router needs, its generation finished at once
        manager, worker = None, SimpleNamespace(state=JobState())

        def run_generation(self, req, *, save, override=None) -> Future:
            future: Future = Future()
            future.set_result((result, []))
            return future

    app = FastAPI()
    app.include_router(make_router(Done()))

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
    times: dict[str, list[float]] = {"empty": [], "sdapi/v1/txt2img": []}
    body = {"prompt": "a photo of a dog", "steps": 20, "width": args.size, "height": args.size}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for i in range(args.repeats + 5):  # 5 warm-up rounds
            for path, values in times.items():
                t0 = time.perf_counter()
                r = client.post(f"/{path}", json={**body, "seed": i})
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
    line.update({f"{k.split('/')[-1]}_ms": round(statistics.median(v) * 1000, 2) for k, v in times.items()})
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
