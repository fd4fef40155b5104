"""Benchmark: Diffusers -> single-file conversion of full-size SD1.5 and SDXL on this machine (CPU).

Builds full-size random-weight Diffusers folders once, from the configs fastsd ships (cached under
``./bench-cache/``, git-ignored), one tensor at a time so building never holds a whole model in
memory. Then times ``fastsd.models.convert.diffusers_to_single_file`` in a child process, fp32 ->
fp16 and fp16 -> fp16, and reads that child's peak RSS from ``os.wait4``. Prints one JSON line per
measurement.

    python benchmarks/convert.py                 # SD1.5 and SDXL
    python benchmarks/convert.py --family sd15 --repeat 2
    python benchmarks/convert.py --small         # quick smoke run on a tiny model

Reference (issue #4, diffusers' convert script with --half, this machine): SD1.5 13.8 s / 2.3 GB,
SDXL 15.2 s / 7.3 GB. Targets: <= 0.5 GB peak RSS, <= half the reference time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CACHE = REPO / "bench-cache"
FAMILIES = {"sd15": "sd1", "sdxl": "sdxl"}
REFERENCE_S = {"sd15": 13.8, "sdxl": 15.2}


def _component_model(folder: Path, name: str):
    """The component built on the meta device (shapes only, no memory) from its shipped config."""
    from accelerate import init_empty_weights

    cfg = folder / name
    with init_empty_weights():
        if name in ("unet", "vae"):
            from diffusers import AutoencoderKL, UNet2DConditionModel

            cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
            return cls.from_config(cls.load_config(cfg))
        import transformers

        config = transformers.CLIPTextConfig.from_pretrained(cfg)
        return getattr(transformers, config.architectures[0])(config)


def _write_random(model, path: Path, dtype) -> int:
    """Stream random tensors with ``model``'s names and shapes into a safetensors file."""
    import torch

    from fastsd.models.tensorfile import safetensors_header, tensor_bytes

    entries = [(k, dtype, tuple(v.shape)) for k, v in model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as fh:
        fh.write(safetensors_header(entries, {"format": "pt"}))
        for _, _, shape in entries:
            fh.write(tensor_bytes((torch.randn(shape, generator=gen) * 0.02).to(dtype)))
    return path.stat().st_size


def build(family: str, precision: str) -> Path:
    """A full-size random-weight Diffusers folder for ``family`` in ``precision`` (built once)."""
    import torch

    from fastsd.models.convert import shipped_config

    folder = CACHE / f"{family}-{precision}"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(shipped_config(FAMILIES[family]), folder)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (isinstance(index.get(name), list) and index[name][0]):
            continue
        model = _component_model(folder, name)
        fname = "diffusion_pytorch_model.safetensors" if name in ("unet", "vae") else "model.safetensors"
        size = _write_random(model, folder / name / fname, dtype)
        print(f"built {folder.name}/{name}: {size / 1e9:.2f} GB", file=sys.stderr)
        del model
    (folder / ".complete").write_text("ok\n")
    return folder


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from fastsd.models.convert import diffusers_to_single_file
t = time.perf_counter()
diffusers_to_single_file({src!r}, {dst!r}, half=True, overwrite=True)
t = time.perf_counter() - t
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(t, int(hwm) * 1024)
"""


def measure(family: str, precision: str, out_dir: Path) -> dict:
    """Convert with --half in a child process; wall time (incl. Python start) and the child's peak RSS.

    This process never imports torch (models are built in another child): Linux carries a parent's
    resident size into a forked child's ``ru_maxrss``, so a heavy parent would inflate the number.
    """
    src = CACHE / f"{family}-{precision}"
    if not (src / ".complete").is_file():
        cmd = [sys.executable, __file__, "--build", family, precision]
        subprocess.run(cmd, check=True)
    dst = out_dir / f"{family}-from-{precision}.safetensors"
    code = CHILD.format(repo=str(REPO), src=str(src), dst=str(dst))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    report = (proc.stdout.read().split() if proc.stdout else []) or ["nan", "0"]
    inner, hwm = float(report[0]), int(report[1])
    if status != 0:
        raise SystemExit(f"conversion failed for {family} {precision}")
    size = dst.stat().st_size
    dst.unlink()
    return {
        "benchmark": "convert_diffusers_to_single_file",
        "family": family,
        "input": precision,
        "output": "fp16",
        "wall_s": round(wall, 2),
        "convert_s": round(inner, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1024 / 1024, 3),
        "vm_hwm_gb": round(hwm / 1024**3, 3),
        "output_gb": round(size / 1e9, 2),
        "reference_s": REFERENCE_S.get(family),
        "target_s": REFERENCE_S[family] / 2 if family in REFERENCE_S else None,
        "target_rss_gb": 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--precision", choices=["fp32", "fp16", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="smoke run on a tiny SD1 model")
    parser.add_argument("--build", nargs=2, metavar=("FAMILY", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(CACHE / "out"), help="where outputs go (deleted after each run)")
    args = parser.parse_args()
    if args.build:
        if args.build[0] in FAMILIES:
            build(*args.build)
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.small:
        folder = CACHE / "tiny-fp32"
        if not (folder / ".complete").is_file():
            code = (
                f"import sys, shutil; sys.path.insert(0, {str(REPO)!r}); "
                "from fastsd.demo.tiny import save_tiny_pipeline; "
                f"shutil.copytree(save_tiny_pipeline('sd1', {str(CACHE / 'tiny-build')!r}), {str(folder)!r})"
            )
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run([sys.executable, "-c", code], check=True)
            (folder / ".complete").write_text("ok\n")
        FAMILIES["tiny"] = "sd1"
        families, precisions = ["tiny"], ["fp32"]
    else:
        families = list(FAMILIES) if args.family == "all" else [args.family]
        precisions = ["fp32", "fp16"] if args.precision == "all" else [args.precision]
    for family in families:
        for precision in precisions:
            for _ in range(args.repeat):
                print(json.dumps(measure(family, precision, out_dir)), flush=True)


if __name__ == "__main__":
    main()
