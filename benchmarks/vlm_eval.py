"""Captioning images/s with the local default's shape, and ``fastsd eval``'s wall time for one SD1.5 export.

Random weights at the real shapes (nothing is downloaded; the GPU machine has no network):
Qwen3-VL-2B-Instruct's (text: 28 layers, 2048 wide, GQA 16/8 heads of 128; vision: 24 layers,
1024 wide, patch 16, DeepStack at 5/11/17), SD1.5's UNet/VAE/CLIP-L, DINO ViT-S/16, CLIP ViT-B/32 and LPIPS's AlexNet.
A random VLM never writes its end-of-turn token, so every caption runs to the cap
(``limit + 32`` = 107 new tokens for CLIP families): the images/s measured is a lower bound for
real captions, which stop at ~40-60 tokens.

GPU:    PYTHONPATH=. python benchmarks/vlm_eval.py
CPU smoke run (tiny models, 2 prompts x 2 images, 64 px):  PYTHONPATH=. python benchmarks/vlm_eval.py --small
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

QWEN3_VL_2B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20]},
    "tie_word_embeddings": True,
}
QWEN3_VL_2B_VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny models on CPU (a smoke run)")
    ap.add_argument("--images", type=int, default=64, help="instance images to caption")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--skip", choices=("none", "caption", "eval"), default="none")
    a = ap.parse_args()
    if a.small:
        a.images, a.batch_size, a.prompts, a.images_per_prompt, a.steps, a.size = 4, 2, 2, 2, 2, 64
        torch.set_num_threads(1)

    import numpy as np
    from PIL import Image
    from train import build_model  # benchmarks/train.py: the one builder of full-size random models

    from fastsd.demo.tiny_scorers import build_tiny_clip, build_tiny_dino, build_tiny_lpips
    from fastsd.demo.tiny_vlm import build_tiny_qwen3_vl
    from fastsd.session import Session

    work = Path(tempfile.mkdtemp(prefix="fastsd-vlm-bench-"))
    home = work / "home"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "small": a.small}
    t = time.perf_counter()
    sd = build_model("sd15", work / "sd15", a.small)
    report["build_sd15_s"] = round(time.perf_counter() - t, 1)
    s = Session.create("bench", home, base_model=str(sd), resolution=a.size, instance_token="sks", class_word="dog")
    rng = np.random.RandomState(0)
    side = 64 if a.small else 512
    for i in range(a.images):
        Image.fromarray((rng.rand(side, side, 3) * 255).astype("uint8")).save(s.instance_dir / f"img{i:03d}.png")

    if a.skip != "caption":
        from fastsd.vlm.caption import caption_session
        from fastsd.vlm.engines import LocalVlm

        t = time.perf_counter()
        vlm = build_tiny_qwen3_vl(
            work / "qwen3-vl",
            **({} if a.small else {"text_config": QWEN3_VL_2B_TEXT, "vision_config": QWEN3_VL_2B_VISION,
                                   "pixels": (65536, 16777216), "dtype": "bfloat16"}),
        )  # fmt: skip
        report["build_vlm_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        engine = LocalVlm(str(vlm), device=device, batch_size=a.batch_size)
        sync()
        report["load_vlm_s"] = round(time.perf_counter() - t, 1)
        report["vlm_params_b"] = round(sum(p.numel() for p in engine.model.parameters()) / 1e9, 3)
        report["vlm_dtype"] = str(engine.dtype)
        warm = Session.create("warm", home, base_model=str(sd), instance_token="sks", class_word="dog")
        for p in sorted(s.instance_dir.iterdir())[: a.batch_size]:
            (warm.instance_dir / p.name).write_bytes(p.read_bytes())
        caption_session(warm, engine)  # one batch to warm up kernels
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        run = caption_session(s, engine)
        sync()
        report["caption"] = {
            "images": a.images,
            "batch_size": a.batch_size,
            "written": len(run.written),
            "failed": len(run.failed),
            "seconds": round(run.seconds, 2),
            "images_per_s": round(len(run.written) / run.seconds, 2),
            # every image costs a full generation, written or not (random weights can decode to nothing)
            "answered_per_s": round((len(run.written) + len(run.failed)) / run.seconds, 2),
            "failures": sorted(set(run.failed.values()))[:3],
            "new_tokens_per_image": "cap (random weights never end): 107",
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        }
        engine.close()
        del engine
        print(json.dumps(report), flush=True)  # a partial line: the caption numbers survive a later timeout

    if a.skip != "eval":
        from fastsd.eval import evaluate
        from fastsd.models.convert import diffusers_to_single_file

        dst = s.models_dir / "bench-step-1000.safetensors"
        t = time.perf_counter()
        diffusers_to_single_file(sd, dst, half=True, overwrite=True)
        s.record_model(dst, kind="full", step=1000)
        dino, clip = build_tiny_dino(work / "dino", full=not a.small), build_tiny_clip(work / "clip", full=not a.small)
        lpips = build_tiny_lpips(work / "lpips")  # AlexNet's real shapes: DIV costs what it will with the real weights
        report["prepare_eval_s"] = round(time.perf_counter() - t, 1)
        s = Session.open("bench", home)
        t = time.perf_counter()
        r = evaluate(s, dino=str(dino), clip=str(clip), prompts=a.prompts, images_per_prompt=a.images_per_prompt,
                     steps=a.steps, size=a.size, prior=False, device=device)  # fmt: skip
        report["eval"] = {
            "prompts": r.prompts,
            "images_per_prompt": r.images_per_prompt,
            "steps": a.steps,
            "size": a.size,
            "wall_s": round(time.perf_counter() - t, 1),
            "metrics": r.metrics,
        }
        print(json.dumps(report), flush=True)
        s2 = Session.open("bench", home)
        t = time.perf_counter()
        r = evaluate(s2, dino=str(dino), clip=str(clip), lpips=str(lpips), prompts=a.prompts,
                     images_per_prompt=a.images_per_prompt, steps=a.steps, size=a.size, prior=True,
                     device=device)  # fmt: skip
        report["eval_with_prior"] = {"wall_s": round(time.perf_counter() - t, 1), "metrics": r.metrics}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
