"""Training speed and memory through fastsd's real training loop, one JSON line per variant.

Builds full-size random-weight SD1.5 (UNet, VAE, CLIP-L) and SDXL (UNet, VAE, CLIP-L + OpenCLIP-bigG)
from the real configs written below (no download), saves them as Diffusers folders on local disk,
creates a session with a few images, and runs :func:`fastsd.train.train` for each variant: a mode
(``unet``, ``unet+te``, ``sdxl-lora``) plus the optimisations toggled (compile, channels_last,
8-bit vs fused AdamW, gradient checkpointing, bf16 vs fp16, VRAM budget). it/s is measured over
the steps after the first log interval (compile warm-up excluded); peak is allocated VRAM during
training (after caching).

    python benchmarks/train.py                 # the curated GPU set (< 9 min on an H100)
    python benchmarks/train.py --variants unet-graph,sdxl-lora-lowmem
    python benchmarks/train.py --small         # CPU smoke run on tiny models
    python benchmarks/train.py --t4            # the T4 preset (fp16 + loss scaling): graphed vs eager
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from full_configs import CLIP_BIGG, CLIP_L, SCHED, SD15_UNET, SDXL_UNET, VAE  # noqa: E402

#: name -> (model, TrainConfig overrides). Base: 512 px (SDXL 1024), batch 1, bf16, fused AdamW, no GC,
#: eager (``cuda_graph`` off) unless the variant says otherwise.
VARIANTS: dict[str, tuple[str, dict]] = {
    "unet-eager": ("sd15", {"method": "full", "te_steps": 0}),
    "unet-graph": ("sd15", {"method": "full", "te_steps": 0, "cuda_graph": "on"}),
    "unet-graph-compile": ("sd15", {"method": "full", "te_steps": 0, "cuda_graph": "on", "compile": "full"}),
    "unet-graph-lowmem": ("sd15", {"method": "full", "te_steps": 0, "cuda_graph": "on", "optimizer": "adamw_lowmem"}),
    "unet-eager-no-channels-last": ("sd15", {"method": "full", "te_steps": 0, "channels_last": False}),
    "unet-eager-fp16-scaler": ("sd15", {"method": "full", "te_steps": 0, "precision": "fp16"}),
    "unet-eager-8bit": ("sd15", {"method": "full", "te_steps": 0, "optimizer": "adamw8bit"}),
    "unet-eager-gc": ("sd15", {"method": "full", "te_steps": 0, "gradient_checkpointing": "on"}),
    "unet-eager-in-backward": ("sd15", {"method": "full", "te_steps": 0, "fused_backward": True}),
    "unet-compile-blocks": ("sd15", {"method": "full", "te_steps": 0, "compile": "blocks"}),
    "unet-compile-full": ("sd15", {"method": "full", "te_steps": 0, "compile": "full"}),
    "unet+te-eager": ("sd15", {"method": "full", "schedule": "joint"}),
    "unet+te-graph": ("sd15", {"method": "full", "schedule": "joint", "cuda_graph": "on"}),
    "unet+te-lowmem-graph": (
        "sd15",
        {"method": "full", "schedule": "joint", "optimizer": "adamw_lowmem", "vram_budget_gb": 9, "cuda_graph": "on"},
    ),
    "unet+te-lowmem-graph-compile": (
        "sd15",
        {
            "method": "full",
            "schedule": "joint",
            "optimizer": "adamw_lowmem",
            "vram_budget_gb": 9,
            "cuda_graph": "on",
            "compile": "full",
        },
    ),  # fmt: skip
    "unet+te-lowmem-eager": (
        "sd15",
        {"method": "full", "schedule": "joint", "optimizer": "adamw_lowmem", "vram_budget_gb": 9},
    ),
    "unet+te-8bit-budget9": (
        "sd15",
        {"method": "full", "schedule": "joint", "optimizer": "adamw8bit", "vram_budget_gb": 9},
    ),
    "unet+te-compile-8bit-budget9": (
        "sd15",
        {"method": "full", "schedule": "joint", "optimizer": "adamw8bit", "vram_budget_gb": 9, "compile": "blocks"},
    ),
    "unet+te-compile-full-8bit-in-backward": (
        "sd15",
        {"method": "full", "schedule": "joint", "optimizer": "adamw8bit", "fused_backward": True, "compile": "full"},
    ),
    "sdxl-lora-eager": ("sdxl", {"method": "lora", "te_steps": 0, "gradient_checkpointing": "off"}),
    "sdxl-lora-graph": ("sdxl", {"method": "lora", "te_steps": 0, "gradient_checkpointing": "off", "cuda_graph": "on"}),
    "sdxl-lora-lowmem": ("sdxl", {"method": "lora", "te_steps": 0, "vram_budget_gb": 10, "cuda_graph": "on"}),
    "sdxl-lora-budget10": ("sdxl", {"method": "lora", "te_steps": 0, "vram_budget_gb": 10}),
    "sdxl-lora-gc": ("sdxl", {"method": "lora", "te_steps": 0, "gradient_checkpointing": "on"}),
    "sdxl-lora-compile-budget10": (
        "sdxl",
        {"method": "lora", "te_steps": 0, "vram_budget_gb": 10, "compile": "blocks"},
    ),
}
#: The T4 preset (fp16, loss scaling, 8-bit AdamW, 14 GiB budget). Eager: GradScaler and bitsandbytes'
#: 8-bit AdamW (fused AdamW where bitsandbytes is missing); graphed: the device-side scaler, with
#: adamw_lowmem in place of bitsandbytes (the plan's ``optimizer`` says which ran). ``-lowmem-eager``
#: runs the graphed variant's optimizer eagerly: the graph's own gain.
T4 = {"gpu": "t4", "precision": "fp16", "optimizer": "adamw8bit", "vram_budget_gb": 14.0}
VARIANTS.update(
    {
        "t4-unet-eager": ("sd15", {"method": "full", "te_steps": 0, **T4}),
        "t4-unet-lowmem-eager": ("sd15", {"method": "full", "te_steps": 0, **T4, "optimizer": "adamw_lowmem"}),
        "t4-unet-graph": ("sd15", {"method": "full", "te_steps": 0, **T4, "cuda_graph": "on"}),
        "t4-sdxl-lora-eager": ("sdxl", {"method": "lora", "te_steps": 0, **T4}),
        "t4-sdxl-lora-graph": ("sdxl", {"method": "lora", "te_steps": 0, **T4, "cuda_graph": "on"}),
    }
)
T4_SET = [name for name in VARIANTS if name.startswith("t4-")]
#: the curated set one GPU call runs (~7 min on an H100 with model building; the one compile variant last).
DEFAULT = [
    "unet-eager",
    "unet-graph",
    "unet+te-lowmem-graph",
    "sdxl-lora-graph",
    "sdxl-lora-lowmem",
    "sdxl-lora-eager",
    "unet-graph-compile",
]


def build_model(kind: str, folder: Path, small: bool) -> Path:
    """Save a random-weight Diffusers folder of ``kind`` (``sd15``/``sdxl``; tiny ones with ``small``)."""
    if (folder / "model_index.json").exists():
        return folder
    from fastsd.demo.tiny import build_sd1, build_sdxl, write_clip_tokenizer

    if small:
        pipe = build_sd1(folder) if kind == "sd15" else build_sdxl(folder)
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_clip_tokenizer(folder / "_tok")
    tok = CLIPTokenizer.from_pretrained(folder / "_tok")
    build = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with build:  # random init on the GPU: seconds instead of minutes
        if kind == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**VAE, scaling_factor=0.18215)
            te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        else:
            unet = UNet2DConditionModel(**SDXL_UNET)
            vae = AutoencoderKL(**{**VAE, "sample_size": 1024}, scaling_factor=0.13025, force_upcast=True)
            te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=unet,
            scheduler=DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te,
            text_encoder_2=te2,
            tokenizer=tok,
            tokenizer_2=tok,
            unet=unet,
            scheduler=EulerDiscreteScheduler(**SCHED),
        )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)  # fp16 on disk: faster to write
    del pipe, unet, vae, te
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def make_session(home: Path, name: str, model: Path, resolution: int, images: int = 4):
    import numpy as np
    from PIL import Image

    from fastsd.session import Session

    s = Session.create(name, home, base_model=str(model), resolution=resolution, class_word="person", exist_ok=True)
    for i in range(images):
        arr = (np.random.RandomState(i).rand(resolution, resolution, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(s.instance_dir / f"img{i}.png")
    return s


def run_variant(name: str, model: Path, home: Path, args: argparse.Namespace) -> dict:
    from fastsd.train import TrainConfig, train

    kind, overrides = VARIANTS[name]
    res = args.resolution or ((64 if kind == "sd15" else 64) if args.small else (512 if kind == "sd15" else 1024))
    session = make_session(home, name.replace("+", "_"), model, res)
    rates: list[float] = []
    log_every = args.log_every
    cfg = {
        "resolution": res,
        "allow_resolution": True,
        "unet_steps": args.steps,
        "te_steps": args.steps,
        "precision": "fp32" if args.small else "bf16",
        "optimizer": "adamw" if args.small else "adamw_fused",
        "gradient_checkpointing": "off",
        "vram_budget_gb": None,
        "save_every": 0,
        "save_final": False,
        "export": False,
        "log_every": log_every,
        "progress": False,
        "gpu": "cpu" if args.small else "h100",
        "min_snr_gamma": 5.0,
        "cuda_graph": "off",
        **overrides,
    }
    if args.small:
        cfg["compile"] = "off"  # inductor on a 2-core CPU takes minutes: the smoke run checks the loop only
    if cfg.get("vram_budget_gb") is not None and "gradient_checkpointing" not in overrides:
        cfg["gradient_checkpointing"] = "auto"
    warm_peak: list[float] = []

    def on_log(step: int, info: dict) -> None:
        rates.append(info["it_per_s"])
        if len(rates) == 1 and torch.cuda.is_available():
            # the first interval holds cuDNN autotuning (workspace tries), compile and graph capture:
            # keep its peak apart from the steady-state one
            warm_peak.append(torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    result = train(session, TrainConfig(**cfg), on_log=on_log)
    measured = rates[1:] or rates  # the first interval holds compile / cudnn warm-up / graph capture
    steady = result.peak_vram_gb
    peak = max([steady or 0.0, *warm_peak]) if steady is not None else None
    return {
        "variant": name,
        "model": kind,
        "resolution": res,
        "it_per_s": round(sum(measured) / len(measured), 3),
        "first_interval_it_per_s": round(rates[0], 3) if rates else None,
        "peak_vram_gib": round(peak, 2) if peak is not None else None,
        "peak_steady_gib": steady,
        "steps": result.steps,
        "plan": result.plan.to_dict(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per variant")
    ap.add_argument("--log-every", type=int, default=10, help="it/s is averaged over intervals after the first")
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--budget-s", type=float, default=510, help="skip remaining variants after this many seconds")
    ap.add_argument("--workdir", default=None, help="where the random models are saved (default: a temp folder)")
    ap.add_argument("--small", action="store_true", help="tiny models on the CPU (smoke run)")
    ap.add_argument("--t4", action="store_true", help=f"run the T4 preset graphed vs eager: {', '.join(T4_SET)}")
    args = ap.parse_args()
    if args.t4:
        args.variants = ",".join(T4_SET)
    if args.small:
        args.steps, args.log_every = min(args.steps, 4), 2
        torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastsd-bench-"))
    start = time.perf_counter()
    models: dict[str, Path] = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            print(json.dumps({"variant": name, "error": "unknown variant"}), flush=True)
            continue
        if time.perf_counter() - start > args.budget_s:
            print(json.dumps({"variant": name, "skipped": "time budget"}), flush=True)
            continue
        kind = VARIANTS[name][0]
        try:
            if kind not in models:
                t = time.perf_counter()
                models[kind] = build_model(kind, work / kind, args.small)
                print(json.dumps({"built": kind, "seconds": round(time.perf_counter() - t, 1)}), flush=True)
            print(json.dumps(run_variant(name, models[kind], work / "home", args)), flush=True)
        except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
            print(json.dumps({"variant": name, "error": f"{type(err).__name__}: {err}"[:500]}), flush=True)
            traceback.print_exc(limit=3)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
