"""Per-image time of the built-in web UI's generation path vs calling diffusers directly.

Builds a full-size SD1.5 or SDXL with random weights from its real config (nothing is
downloaded), saves it as a Diffusers folder, then times the same job four ways, interleaved so
clock and thermal drift hit all alike:

* ``direct``: the diffusers pipeline called by hand (same scheduler, seed generator, size);
* ``eager``: :class:`fastsd.webui.generate.PipelineManager` with ``fastsd_cuda_graph`` off;
* ``manager``: the same with its default, the denoiser replayed from CUDA graphs;
* ``api``: ``POST /sdapi/v1/txt2img`` on a real server (adds HTTP + base64 PNG encoding).

Prints one JSON line per measurement (median and fastest per image, speed-up over ``direct``,
the first image's extra cost, the largest pixel difference to ``direct`` for the same seed) and a
summary line. Targets (issue 16): ``manager`` >= 1.3x ``direct``; ``api`` within 3 % of ``manager``.

GPU:    PYTHONPATH=. python benchmarks/webui.py [--model sdxl]
CPU smoke run (tiny model, 64 px, 4 steps):  PYTHONPATH=. python benchmarks/webui.py --small
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train import build_model  # noqa: E402  (the one builder of full-size random models)

PROMPT = "a photo of a dog on the beach, high quality, detailed"
NEGATIVE = "blurry, lowres, ugly"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU: a quick smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed images per path (default 10, --small 3)")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (--small 4)")
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--no-api", action="store_true", help="skip the HTTP measurement")
    parser.add_argument("--cache", type=Path, default=None, help="keep the built model here between runs")
    parser.add_argument("--size", type=int, help="image side (default 512, SDXL 1024, --small 64)")
    args = parser.parse_args()

    from diffusers import DiffusionPipeline

    from fastsd.webui import samplers
    from fastsd.webui.generate import GenerationRequest, PipelineManager

    small = args.small
    steps = args.steps or (4 if small else 20)
    size = args.size or (64 if small else (1024 if args.model == "sdxl" else 512))
    repeats = args.repeats or (3 if small else 10)
    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    machine = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"

    with tempfile.TemporaryDirectory(prefix="fastsd-bench-") as tmp:
        tmp_path = Path(tmp)
        model = build_model(
            args.model, (args.cache or tmp_path) / f"{args.model}-random{'-small' if small else ''}", small
        )
        home = tmp_path / "home"

        # 1. diffusers by hand, with exactly the settings the web UI uses.
        direct = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True).to(device)
        direct.set_progress_bar_config(disable=True)
        sampler = samplers.find_sampler(args.sampler)
        base_config = dict(direct.scheduler.config)

        def run_direct(seed: int) -> np.ndarray:
            direct.scheduler = samplers.make_scheduler(base_config, sampler)
            out = direct(
                prompt=[PROMPT],
                negative_prompt=[NEGATIVE],
                num_inference_steps=steps,
                guidance_scale=7.0,
                width=size,
                height=size,
                generator=[torch.Generator(device).manual_seed(seed)],
                output_type="pil",
            )
            return np.asarray(out.images[0])

        # 2./3. the web UI's generation path, eager and with its default CUDA graphs.
        req = GenerationRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, width=size, height=size, sampler_name=args.sampler
        )
        managers = {
            "eager": PipelineManager(home, model=str(model), device=device, memory={"cuda_graph": False}),
            "manager": PipelineManager(home, model=str(model), device=device),
        }

        def run_with(manager: PipelineManager):
            def run(seed: int) -> np.ndarray:
                req.seed = seed
                return np.asarray(manager.generate(req).images[0])

            return run

        # 4. the HTTP API (optional: needs fastapi, uvicorn, httpx).
        server = client = None
        if not args.no_api:
            try:
                import httpx

                from fastsd.webui.server import start

                server = start(str(model), home=home, port=0, ui=False, quiet=True, device=device)
                client = httpx.Client(base_url=server.url, timeout=600)
            except ImportError as err:
                print(json.dumps({"measure": "api", "skipped": f"missing package: {err.name}"}), flush=True)

        def run_api(seed: int) -> None:
            body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": steps, "width": size, "height": size}
            r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": args.sampler, "seed": seed})
            r.raise_for_status()

        paths = {"direct": run_direct, **{name: run_with(m) for name, m in managers.items()}}
        if client is not None:
            paths["api"] = run_api
        first: dict[str, float] = {}
        reference: dict[str, np.ndarray] = {}
        for name, fn in paths.items():  # first image (loading, autotuning, capture), then a warm one
            sync()
            t0 = time.perf_counter()
            fn(0)
            sync()
            first[name] = time.perf_counter() - t0
            reference[name] = fn(1)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(repeats):
            for name, fn in paths.items():
                sync()
                t0 = time.perf_counter()
                fn(1000 + i)
                sync()
                times[name].append(time.perf_counter() - t0)

        direct_med = statistics.median(times["direct"])
        summary = {"measure": "summary", "machine": machine, "model": args.model, "steps": steps, "size": size}
        summary.update(sampler=args.sampler, torch=torch.__version__)
        for name, values in times.items():
            med = statistics.median(values)
            line = {
                "measure": name,
                "s_per_image": round(med, 4),
                "it_per_s": round(steps / med, 2),
                "min_s": round(min(values), 4),
                "speedup_vs_direct": round(direct_med / med, 3),
                "first_image_s": round(first[name], 3),
                "repeats": repeats,
            }
            if isinstance(reference.get(name), np.ndarray) and name != "direct":
                diff = np.abs(reference[name].astype(int) - reference["direct"].astype(int))
                line.update(max_pixel_diff=int(diff.max()), mean_pixel_diff=round(float(diff.mean()), 3))
            print(json.dumps(line), flush=True)
            summary[f"{name}_speedup"] = line["speedup_vs_direct"]
        graphs = managers["manager"].pipe.unet.__dict__.get("forward")
        summary["captures"] = getattr(graphs, "captures", None)
        summary["capture_failed"] = getattr(graphs, "failed", None)
        if "api" in times:
            summary["api_overhead_pct"] = round(
                (statistics.median(times["api"]) / statistics.median(times["manager"]) - 1) * 100, 2
            )
        if device == "cuda":
            summary["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(summary), flush=True)
        if server is not None:
            client.close()
            server.stop()


if __name__ == "__main__":
    main()
