"""What 16-bit weights cost a full fine-tune's updates: fp16/bf16 with stochastic rounding against fp32 masters.

One weight tensor with SD1.5-like magnitudes (N(0, 0.05), the spread of its convolution and attention
weights) takes ``--steps`` AdamW steps (``adamw_lowmem``, weight decay 1e-2) at the full fine-tune's
default rate (2e-6) on gradients with a fixed direction plus per-step noise of the same size (a consistent
signal, as fine-tuning has). Per dtype and rounding, against the fp32-master run: how far the weights
moved (mean |w - w0|), the cosine between the two total updates, and the error of the 16-bit update
relative to the fp32 one. Round to nearest (the same fp32 update, the weight then rounded to the nearest
16-bit value, as kohya's ``--full_fp16`` does) is the contrast: it loses the updates smaller than half a step.

Run: ``python benchmarks/masters.py`` (CPU, a few minutes).
"""

from __future__ import annotations

import argparse
import json

import torch

from fastsd.train.lowmem import LowMemAdamW


def run(dtype: torch.dtype, rounding: str, steps: int, lr: float, n: int) -> torch.Tensor:
    """The weight after ``steps`` updates, as fp32 (``rounding``: ``stochastic`` or ``nearest``)."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(n, generator=gen) * 0.05
    direction = torch.randn(n, generator=gen)
    torch.manual_seed(1)  # the stochastic rounding's bits
    # nearest: the same fp32 update maths, the weight then rounded to the nearest 16-bit value
    nearest = rounding == "nearest"
    w = torch.nn.Parameter(w0.to(dtype).float() if nearest else w0.to(dtype))
    opt = LowMemAdamW([w], lr=lr, weight_decay=1e-2)
    noise = torch.Generator().manual_seed(2)
    for _ in range(steps):
        w.grad = (direction + torch.randn(n, generator=noise)).to(w.dtype)
        opt.step()
        if nearest:
            with torch.no_grad():
                w.copy_(w.to(dtype).float())
    return w.detach().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--n", type=int, default=1 << 16)
    args = ap.parse_args()
    w0 = (torch.randn(args.n, generator=torch.Generator().manual_seed(0)) * 0.05).float()
    fp32 = run(torch.float32, "stochastic", args.steps, args.lr, args.n)  # fp32: no rounding to 16 bits at all
    ref_update = fp32 - w0
    for dtype, rounding in ((torch.float16, "stochastic"), (torch.bfloat16, "stochastic"), (torch.float16, "nearest")):
        w = run(dtype, rounding, args.steps, args.lr, args.n)
        start = w0.to(dtype).float()
        update = w - start
        line = {
            "weights": str(dtype).removeprefix("torch."),
            "rounding": rounding,
            "steps": args.steps,
            "lr": args.lr,
            "moved_mean_abs": float(update.abs().mean()),
            "fp32_moved_mean_abs": float(ref_update.abs().mean()),
            "cosine_vs_fp32": round(float(torch.nn.functional.cosine_similarity(update, ref_update, dim=0)), 4),
            "relative_error_vs_fp32": round(float((update - ref_update).norm() / ref_update.norm()), 4),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
