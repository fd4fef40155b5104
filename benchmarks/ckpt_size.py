"""How small can an exact SD1.5 training state be? Bytes per parameter of lossless encodings.

Builds the real SD1.5 UNet shapes with random weights (:mod:`benchmarks.full_configs`), takes a
stratified sample of its tensors (every k-th by name, so convolutions, attention, norms and biases
all appear in their real proportions; ``--all`` takes every tensor), trains them ``--steps`` AdamW
steps at ``--lr`` on synthetic gradients, then measures, per encoding of the trained fp32 weights
against the base weights they started from:

- ``xor``: the bits of ``trained ^ base``, split into four byte planes, each compressed alone;
- ``diff``: ``trained - base`` as 32-bit integers of the float bits (wrapping), same planes;

the compressed size of each plane with zlib (level 1, and its fast Huffman-only and run-length
strategies) and brotli (quality 1, where installed), the order-0 entropy of each plane (a bound for any byte-wise coder that keeps no
context), and the fp32 AdamW moments' compressibility for comparison. One JSON line per result.

Gradients: ``iid`` draws fresh N(0, sigma) noise each step (the brief's random gradients: the
weights random-walk); ``drift`` adds a fixed random direction of the same size (a consistent
signal, as real fine-tuning has: the weights travel further, so fewer of their bits stay put).

Run: ``python benchmarks/ckpt_size.py --params 40e6 --grad iid`` (CPU, a few minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib

import torch

try:
    import brotli
except ImportError:  # brotli is pinned in wheels/tested.txt but not required
    brotli = None


def _planes(values: torch.Tensor) -> list[bytes]:
    """Byte planes of ``values`` (fp32/int32: plane 3 holds sign + high exponent bits, plane 0 the low mantissa)."""
    width = values.element_size()
    raw = values.contiguous().view(torch.uint8).view(-1, width)  # little-endian: byte 0 is the lowest
    return [raw[:, k].contiguous().numpy().tobytes() for k in range(width)]


def _zlib(data: bytes, strategy: int) -> bytes:
    """zlib with a fast strategy (Huffman-only or run-length: no string matching)."""
    c = zlib.compressobj(1, zlib.DEFLATED, 15, 9, strategy)
    return c.compress(data) + c.flush()


def _entropy(data: bytes) -> float:
    """Order-0 entropy of ``data`` in bits per byte."""
    counts = torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), minlength=256).double()
    p = counts[counts > 0] / len(data)
    return float(-(p * p.log2()).sum())


def _measure(name: str, bits: torch.Tensor, params: int, coders: dict) -> dict:
    """Compressed bytes per parameter of ``bits``'s byte planes, per coder, with times."""
    out = {"what": name, "params": params, "planes": []}
    totals = dict.fromkeys(coders, 0)
    seconds = dict.fromkeys(coders, 0.0)
    entropy_bytes = 0.0
    for k, plane in enumerate(_planes(bits)):
        row = {"plane": k, "entropy_bits": round(_entropy(plane), 3)}
        entropy_bytes += row["entropy_bits"] / 8 * len(plane)
        for label, fn in coders.items():
            t = time.perf_counter()
            size = min(len(fn(plane)), len(plane))  # a plane that does not shrink is stored raw
            seconds[label] += time.perf_counter() - t
            totals[label] += size
            row[label] = round(size / len(plane), 4)
        out["planes"].append(row)
    out["bytes_per_param"] = {label: round(totals[label] / params, 4) for label in coders}
    out["entropy_bytes_per_param"] = round(entropy_bytes / params, 4)
    out["mb_per_s"] = {
        label: round(bits.numel() * bits.element_size() / 1e6 / max(seconds[label], 1e-9), 1) for label in coders
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=40e6, help="parameters in the sample (ignored with --all)")
    ap.add_argument("--all", action="store_true", help="every UNet tensor")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--grad", choices=("iid", "drift"), default="iid")
    ap.add_argument("--sigma", type=float, default=1e-3, help="gradient scale (Adam is scale-free above eps)")
    ap.add_argument("--base", choices=("fp32", "fp16"), default="fp32", help="base weights as stored (fp16: upcast)")
    ap.add_argument("--optim", choices=("adamw", "lowmem"), default="adamw", help="lowmem: fastsd's 8-bit AdamW")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel
    from full_configs import SD15_UNET

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    named = sorted(unet.named_parameters())
    total = sum(p.numel() for _, p in named)
    # Every tensor gives the same fraction of its elements (a flat slice at a random offset):
    # AdamW is elementwise, so a slice trains exactly as it would inside its tensor, and every
    # kind of layer (convolutions, attention, norms, biases) weighs as much as it does in the UNet.
    fraction = 1.0 if args.all else min(1.0, args.params / total)
    base = []
    for _, p in named:
        flat = p.detach().reshape(-1)
        take = max(1, math.ceil(fraction * flat.numel()))
        at = int(torch.randint(0, flat.numel() - take + 1, ()))
        base.append(flat[at : at + take].to(args.device, torch.float32).clone())
    if args.base == "fp16":
        base = [b.half().float() for b in base]
    del unet
    params = [torch.nn.Parameter(b.clone()) for b in base]
    n = sum(p.numel() for p in params)
    gen = torch.Generator(args.device).manual_seed(args.seed + 1)
    drift = (
        [torch.randn(p.shape, generator=gen, device=args.device) * args.sigma for p in params]
        if args.grad == "drift"
        else None
    )
    if args.optim == "lowmem":
        from fastsd.train.lowmem import LowMemAdamW

        opt = LowMemAdamW([{"params": params, "lr": args.lr}], weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2, foreach=True)
    t = time.perf_counter()
    for _ in range(args.steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, device=args.device) * args.sigma
            p.grad = g if drift is None else g + drift[i]
        opt.step()
    train_s = time.perf_counter() - t
    print(json.dumps({"sample_fraction": round(fraction, 5), "tensors": len(named), "params": n, "unet_params": total,
                      "steps": args.steps, "lr": args.lr, "grad": args.grad, "base": args.base,
                      "train_s": round(train_s, 1)}))  # fmt: skip

    coders = {
        "zlib1": lambda b: zlib.compress(b, 1),
        "zlib_huffman": lambda b: _zlib(b, zlib.Z_HUFFMAN_ONLY),
        "zlib_rle": lambda b: _zlib(b, zlib.Z_RLE),
    }
    if brotli is not None:
        coders["brotli1"] = lambda b: brotli.compress(b, quality=1)
    trained = torch.cat([p.detach().reshape(-1) for p in params]).cpu()
    start = torch.cat([b.reshape(-1) for b in base]).cpu()
    tb, bb = trained.view(torch.int32), start.view(torch.int32)
    changed = float((tb != bb).double().mean())
    rel = float(((trained - start).abs() / start.abs().clamp_min(1e-12)).median())
    print(json.dumps({"changed_fraction": round(changed, 4), "median_relative_change": f"{rel:.3g}"}))
    print(json.dumps(_measure("weights_raw", tb, n, coders)))
    print(json.dumps(_measure("weights_xor", tb ^ bb, n, coders)))
    print(json.dumps(_measure("weights_diff", tb - bb, n, coders)))
    keys = sorted({k for p in params for k, v in opt.state[p].items() if v.numel() > 1})
    for key in keys:
        state = torch.cat([opt.state[p][key].reshape(-1) for p in params if key in opt.state[p]]).cpu()
        print(json.dumps(_measure(key, state, n, coders)))


if __name__ == "__main__":
    main()
