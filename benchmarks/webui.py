"""Per-image time of the built-in web UI's generation path vs calling diffusers directly.

Builds a full-size SD1.5 with random weights from its real config (nothing is downloaded),
saves it as a Diffusers folder, then times the same job three ways, interleaved so clock and
thermal drift hit all three alike:

* ``direct``: ``StableDiffusionPipeline`` called by hand (same scheduler, seed generator, size);
* ``manager``: :class:`fastsd.webui.generate.PipelineManager` (what the API and UI run);
* ``api``: ``POST /sdapi/v1/txt2img`` on a real server (adds HTTP + base64 PNG encoding).

Prints one JSON line per measurement and a summary line with the overheads (target: < 3 %).

GPU:    PYTHONPATH=. python benchmarks/webui.py
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

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from full_configs import CLIP_L, SD15_UNET, VAE  # noqa: E402

PROMPT = "a photo of a dog on the beach, high quality, detailed"
NEGATIVE = "blurry, lowres, ugly"


def build_sd15(folder: Path, small: bool) -> Path:
    """Save a random-weight SD1.5 (or the tiny test model) as a Diffusers folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastsd.demo.tiny import build_sd1, tiny_tokenizer

    torch.manual_seed(0)
    if small:
        pipe = build_sd1(folder)
    else:
        tok = tiny_tokenizer(folder / "_tokenizer")  # any CLIP BPE works for timing; ids < 49408
        te = CLIPTextModel(
            CLIPTextConfig(
                **CLIP_L, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            )
        )
        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        )
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE, scaling_factor=0.18215),
            text_encoder=te,
            tokenizer=tok,
            unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.to(torch.float16)
    out = folder / "sd15-random"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU: a quick smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed images per path (default 10, --small 3)")
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--no-api", action="store_true", help="skip the HTTP measurement")
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    from fastsd.webui import samplers
    from fastsd.webui.generate import GenerationRequest, PipelineManager

    small = args.small
    steps, size = (4, 64) if small else (20, 512)
    repeats = args.repeats or (3 if small else 10)
    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    machine = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"

    with tempfile.TemporaryDirectory(prefix="fastsd-bench-") as tmp:
        tmp_path = Path(tmp)
        model = build_sd15(tmp_path, small)
        home = tmp_path / "home"

        # 1. diffusers by hand, with exactly the settings the web UI uses.
        direct = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True).to(device)
        direct.set_progress_bar_config(disable=True)
        sampler = samplers.find_sampler(args.sampler)
        base_config = dict(direct.scheduler.config)

        def run_direct(seed: int) -> None:
            direct.scheduler = samplers.make_scheduler(base_config, sampler)
            direct(
                prompt=[PROMPT],
                negative_prompt=[NEGATIVE],
                num_inference_steps=steps,
                guidance_scale=7.0,
                width=size,
                height=size,
                generator=[torch.Generator(device).manual_seed(seed)],
                output_type="pil",
            )

        # 2. the web UI's generation path.
        manager = PipelineManager(home, model=str(model), device=device)
        req = GenerationRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, width=size, height=size, sampler_name=args.sampler
        )

        def run_manager(seed: int) -> None:
            req.seed = seed
            manager.generate(req)

        # 3. the HTTP API (optional: needs fastapi, uvicorn, httpx).
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

        paths = {"direct": run_direct, "manager": run_manager}
        if client is not None:
            paths["api"] = run_api
        for fn in paths.values():  # warm-up: cudnn autotune, allocator, first-call setup
            fn(0)
            fn(1)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(repeats):
            for name, fn in paths.items():
                sync()
                t0 = time.perf_counter()
                fn(1000 + i)
                sync()
                times[name].append(time.perf_counter() - t0)

        summary = {"measure": "summary", "machine": machine, "steps": steps, "size": size, "sampler": args.sampler}
        for name, values in times.items():
            med = statistics.median(values)
            line = {
                "measure": name,
                "machine": machine,
                "s_per_image": round(med, 4),
                "it_per_s": round(steps / med, 2),
                "min_s": round(min(values), 4),
                "overhead_pct": round((med / statistics.median(times["direct"]) - 1) * 100, 2),
                "overhead_pct_of_min": round((min(values) / min(times["direct"]) - 1) * 100, 2),
                "repeats": repeats,
            }
            print(json.dumps(line), flush=True)
            if name != "direct":
                pct = (med / statistics.median(times["direct"]) - 1) * 100
                summary[f"{name}_overhead_pct"] = round(pct, 2)
        summary["within_3pct"] = all(v < 3 for k, v in summary.items() if k.endswith("_overhead_pct"))
        print(json.dumps(summary), flush=True)
        if server is not None:
            client.close()
            server.stop()


if __name__ == "__main__":
    main()
