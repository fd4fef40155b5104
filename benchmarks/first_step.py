"""A UNet's cold first training step with and without cuDNN's attention, each in a fresh process (issue 16 item 2).

Under cProfile on a fresh H100 (2026-12-08), SD1.5 LoRA's 14 s first step sat in the UNet's
``scaled_dot_product_attention`` calls and their backward, not in the convolutions. This script
isolates that: a full-size random-weight UNet (bf16, channels-last, every weight trained) takes one
forward + backward, then more, in a new Python process per backend, so no process inherits another's
built kernels. It prints, per backend, the first step, the second, and the steady step (median of
the last 20). Whether training should keep cuDNN attention is then a trade between the first line and
the last (``FASTSD_CUDNN_ATTENTION``, :mod:`fastsd.train.gpuwarm`).

    PYTHONPATH=. python benchmarks/first_step.py [--model sd15|sdxl] [--repeats 2] [--small]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(model: str, cudnn: bool, steps: int, small: bool) -> dict:
    """One process's measurement (see the module doc)."""
    import torch
    from diffusers import UNet2DConditionModel
    from full_configs import SD15_UNET, SDXL_UNET

    from fastsd.demo.tiny import tiny_sd1_unet

    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch.manual_seed(0)
    dev = "cpu" if small else "cuda"
    unet = tiny_sd1_unet() if small else UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET))
    unet = unet.to(dev, torch.bfloat16).to(memory_format=torch.channels_last)
    side = unet.config.sample_size
    x = torch.randn(1, 4, side, side, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([500], device=dev)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=dev, dtype=torch.bfloat16)
    extra = {}
    if model == "sdxl" and not small:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, device=dev, dtype=torch.bfloat16),
                                       "time_ids": torch.randn(1, 6, device=dev, dtype=torch.bfloat16)}}  # fmt: skip
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        unet(x, t, text, **extra).sample.float().square().mean().backward()
        sync()
        times.append(time.perf_counter() - t0)
    steady = sorted(times[-20:])[len(times[-20:]) // 2]
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    return {"model": "tiny" if small else model, "cudnn_attention": cudnn, "first_s": round(times[0], 2),
            "second_s": round(times[1], 2), "steady_ms": round(steady * 1000, 1), "gpu": gpu, "torch": torch.__version__}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--repeats", type=int, default=2, help="processes per backend, alternating")
    ap.add_argument("--steps", type=int, default=25, help="steps per process (at least 2)")
    ap.add_argument("--small", action="store_true", help="the tests' tiny SD1 UNet on the CPU (a smoke run)")
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first and the second step are reported)")
    if args.child:
        print(json.dumps(child(args.model, args.child == "on", args.steps, args.small)), flush=True)
        return
    for _ in range(args.repeats):
        for backend in ("on", "off"):
            cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--child", backend]
            cmd += ["--small"] if args.small else []
            p = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            print(
                lines[-1] if lines else json.dumps({"cudnn_attention": backend, "error": p.stderr[-600:]}), flush=True
            )


if __name__ == "__main__":
    main()
