"""Drive space a resumable SD1.5 full fine-tune state takes, by the settings that decide it (issue 16, item 5).

A state's size does not depend on the GPU or the steps: it is the trained weights in their dtype plus the
optimizer's moments. So this runs the real command on whatever is here (a CPU is enough): a full-size
random-weight SD1.5 (:func:`train.build_model`), one ``fastsd session`` with 4 images, then per setting
``fastsd train --te-steps 1 --steps 1`` at 64 px (UNet and text encoder both train, as in the default
schedule), and reads the bytes of each file of the state it wrote. One JSON line per setting.

Run: ``python benchmarks/state_size.py --workdir /tmp/state-size`` (about 10 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from e2e import fastsd, fresh_session, images
from train import build_model

#: (name, flags): the T4 preset's two states (before and after 2026-12-05) and the H100/H200 preset's.
#: bf16 on a CPU stores as many bytes as the T4's fp16.
SETTINGS = (
    ("16bit-weights (T4 preset)", ["--precision", "bf16", "--master-weights", "16bit"]),
    ("fp32-masters, 8-bit moments", ["--precision", "bf16", "--master-weights", "fp32", "--optimizer", "adamw_lowmem"]),
    ("fp32-masters, fp32 AdamW (H100 preset)", ["--precision", "bf16", "--master-weights", "fp32", "--optimizer", "adamw"]),
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/state-size")
    ap.add_argument("--only", help="comma-separated setting numbers (1-based) to run")
    args = ap.parse_args()
    work = Path(args.workdir)
    home = work / "home"
    model = build_model("sd15", work / "sd15", small=False)
    imgs = images(work / "images-512", 512)
    only = {int(i) for i in args.only.split(",")} if args.only else None
    for i, (name, flags) in enumerate(SETTINGS, 1):
        if only and i not in only:
            continue
        sess = fresh_session(f"state-{i}", home)
        fastsd("session", "new", sess, "--root", str(home), "--base-model", str(model), "--resolution", "512")
        fastsd("session", "add", sess, str(imgs), "--root", str(home), "--crop", "center")
        t = time.perf_counter()
        fastsd("train", sess, "--root", str(home), "--method", "full", "--te-steps", "1", "--steps", "1",
               "--resolution", "64", "--no-export", "--json", *flags)  # fmt: skip
        state = sorted((home / "sessions" / sess / "checkpoints").iterdir())[-1]
        files = {str(f.relative_to(state)): f.stat().st_size for f in sorted(state.rglob("*")) if f.is_file()}
        total = sum(files.values())
        line = {
            "setting": name,
            "flags": flags,
            "state_gb": round(total / 1e9, 3),
            "state_gib": round(total / 2**30, 3),
        }
        line.update(files_mb={k: round(v / 1e6, 1) for k, v in files.items()}, seconds=round(time.perf_counter() - t))
        line["fits_15gb"] = {"states": int(15e9 // total)}  # how many such states 15 GB of free Drive holds
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
