"""Time one resumable-state save into a session, the way the trainer saves it (CPU, no GPU needed).

Builds a state of about ``--gb`` GB in memory: fp32 weights of a trained "unet" and a frozen
"text_encoder" (requires_grad off, as after the text-encoder phase), plus AdamW moments
(``exp_avg``, ``exp_avg_sq``) for the UNet, i.e. 4 + 8 bytes per UNet parameter, and saves it
``--saves`` times with :func:`fastsd.train.checkpoint.save_to_session` into a fresh session (keep 2).
The API is the same before and after the one-pass save, so the same script times both: run it
with ``PYTHONPATH`` pointing at each checkout. One JSON line per save: seconds, GB/s, bytes listed,
and bytes newly written to disk (hard-linked files count once).

Run: ``PYTHONPATH=. python benchmarks/ckpt_save.py --gb 2`` (needs ~2.5x ``--gb`` of RAM and disk).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def _state(gb: float, te_share: float, device: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights (``component.name``) and an AdamW-shaped optimizer state of about ``gb`` GB."""
    unet_params = int(gb * 1e9 / (12 + 4 * te_share / (1 - te_share)))
    te_params = int(unet_params * te_share / (1 - te_share))
    g = torch.Generator().manual_seed(0)
    weights, state = {}, {}
    per = 4 * 1024 * 1024  # 16 MiB tensors, the size of a large SD1.5 convolution
    for i in range(max(1, unet_params // per)):
        weights[f"unet.block{i:03d}.weight"] = torch.nn.Parameter(torch.randn(per, generator=g).to(device))
        state[i] = {"step": torch.tensor(100.0), "exp_avg": (torch.randn(per, generator=g) * 1e-4).to(device),
                    "exp_avg_sq": (torch.rand(per, generator=g) * 1e-8).to(device)}  # fmt: skip
    for i in range(max(1, te_params // per)):
        te = torch.randn(per, generator=g).to(device)
        weights[f"text_encoder.layer{i:03d}.weight"] = torch.nn.Parameter(te, requires_grad=False)
    groups = [{"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "params": sorted(state)}]
    return weights, {"state": state, "param_groups": groups}


def _disk_bytes(root: Path) -> int:
    """Bytes of distinct files under ``root`` (a hard-linked file once)."""
    seen, total = set(), 0
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the state")
    ap.add_argument("--te-share", type=float, default=0.125, help="share of the weights that is frozen (SD1.5: 0.125)")
    ap.add_argument("--saves", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the state lives (cuda: as in training)")
    ap.add_argument("--root", default=None, help="fastsd home (default: a temp folder, removed after)")
    args = ap.parse_args()

    from fastsd.session import Session
    from fastsd.train import checkpoint

    weights, optimizer = _state(args.gb, args.te_share, args.device)
    with tempfile.TemporaryDirectory(dir=args.root) as home:
        session = Session.create("bench", home)
        before = 0
        with session.lock(heartbeat=0):
            for k in range(1, args.saves + 1):
                with torch.no_grad():  # the UNet moved: its file must be written again
                    next(iter(weights.values())).add_(1e-3)
                os.sync()
                t = time.perf_counter()
                entry = checkpoint.save_to_session(session, 100 * k, 2, weights=weights, optimizer=optimizer,
                                                   state={"step": 100 * k}, noise_gen=torch.Generator())  # fmt: skip
                seconds = time.perf_counter() - t
                listed = sum(entry["sizes"].values())
                on_disk = _disk_bytes(session.checkpoints_dir)
                print(json.dumps({"save": k, "seconds": round(seconds, 2), "gb": round(listed / 1e9, 3),
                                  "gb_per_s": round(listed / 1e9 / seconds, 3),
                                  "new_on_disk_gb": round((on_disk - before) / 1e9, 3),
                                  "files": len(entry["files"])}), flush=True)  # fmt: skip
                before = on_disk


if __name__ == "__main__":
    main()
