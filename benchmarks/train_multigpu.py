"""Data-parallel training scaling: the same full-size SD1.5 UNet training on 1 and N GPUs.

Launches ``torch.distributed.run`` with 1 and then N processes; each rank runs
:func:`fastsd.train.train` on the same session (the trainer joins the process group that torchrun
describes and averages gradients). Steps are eager: the whole-step CUDA graph is single-process.
Prints one JSON line per GPU count (it/s, images/s = it/s x GPUs x batch, peak VRAM) and a summary
with the scaling efficiency.

    python benchmarks/train_multigpu.py --gpus 2           # on a 2-GPU machine
    python benchmarks/train_multigpu.py --gpus 2 --small   # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def worker(args: argparse.Namespace) -> None:
    import torch

    from fastsd.train import TrainConfig, train

    rates: list[float] = []
    small = args.small
    cfg = TrainConfig(
        method="full",
        te_steps=0,
        unet_steps=args.steps,
        resolution=64 if small else 512,
        allow_resolution=True,
        precision="fp32" if small else "bf16",
        optimizer="adamw" if small else "adamw_fused",
        gpu="cpu" if small else "h100",
        cuda_graph="off",
        gradient_checkpointing="off",
        vram_budget_gb=None,
        save_every=0,
        save_final=False,
        export=False,
        progress=False,
        log_every=args.log_every,
    )
    result = train(args.session, cfg, home=args.home, on_log=lambda step, info: rates.append(info["it_per_s"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        steady = rates[1:] or rates
        it_s = sum(steady) / len(steady)
        print(
            "RESULT "
            + json.dumps(
                {
                    "gpus": world,
                    "it_per_s": round(it_s, 3),
                    "images_per_s": round(it_s * world * cfg.batch_size, 3),
                    "peak_vram_gib": result.peak_vram_gb,
                    "steps": result.steps,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                }
            ),
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--session", help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    from train import build_model, make_session  # benchmarks/train.py

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastsd-ddp-"))
    model = build_model("sd15", work / ("sd15-small" if args.small else "sd15"), args.small)
    home = work / "home"
    make_session(home, "ddp", model, 64 if args.small else 512, images=8)
    results = []
    for n in sorted({1, args.gpus}):
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29533",
               __file__, "--worker", "--session", "ddp", "--home", str(home), "--steps", str(args.steps),
               "--log-every", str(args.log_every)] + (["--small"] if args.small else [])  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "Error" in ln and "elastic" not in ln]
            print(json.dumps({"gpus": n, "error": errors[:6] or (proc.stderr or proc.stdout)[-1500:]}), flush=True)
            continue
        results.append(json.loads(line[len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)
    if len(results) == 2:
        one, many = results
        print(json.dumps({"summary": "data parallel", "gpus": many["gpus"],
                          "speedup_images_per_s": round(many["images_per_s"] / one["images_per_s"], 2),
                          "scaling_efficiency": round(many["images_per_s"] / one["images_per_s"] / many["gpus"], 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
