"""What the user pays: command start to exported model, fastsd against diffusers' example scripts.

Builds full-size random-weight SD1.5 / SDXL Diffusers folders (the real configs, no download),
writes the same random images for both tools, then per case runs

- fastsd as a user does: ``fastsd session new``, ``fastsd session add``, ``fastsd train --json``
  (separate processes; ``train`` reports its phases: load, cache, first step, warm-up/capture,
  steps, checkpoints, sampling, export, and whole-process peak VRAM per phase);
- diffusers' script (``--peer-dir`` holds ``train_dreambooth.py``, ``train_dreambooth_lora.py``,
  ``train_dreambooth_lora_sdxl.py`` from huggingface/diffusers ``examples/dreambooth``) through
  ``benchmarks/peer_run.py``, which times the same phases around the script's own calls.

The peer runs ``--peer-steps`` steps (its step rate is steady after the first); its wall time at
fastsd's step count is projected from its measured setup, first step, rate, checkpoint and
export times and marked as projected. One JSON line per run goes to stdout and ``--out``; a
markdown table follows.

Cases with ``cap`` run fastsd in-process under ``torch.cuda.set_per_process_memory_fraction``
(a hard cap) with a ``--vram-budget``, through every phase (load, caching, capture, steps,
checkpoint, sampling, export), and report per-phase peaks or the out-of-memory error.

    python benchmarks/e2e.py --peer-dir peer --cases sd15-lora,sd15-full --out e2e.jsonl
    python benchmarks/e2e.py --cases cap-unet+te-9,cap-sdxl-lora-10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPT = "a photo of sks person"


def _on_and_off(name: str, variable: str, fastsd: list[str]) -> dict[str, dict]:
    """Two SD1.5 512 px fastsd-only cases, ``NAME-on`` and ``NAME-off``: the same run with ``variable`` at 1 and 0."""
    return {f"{name}-{state}": {"kind": "sd15", "res": 512, "fastsd": fastsd, "env": {variable: value}}
            for state, value in (("on", "1"), ("off", "0"))}  # fmt: skip


#: name -> what runs. ``fastsd``: extra ``fastsd train`` arguments (the defaults are what a user runs);
#: ``steps``: the fastsd run's total steps (for the peer's projection); ``peer``: script and arguments.
CASES: dict[str, dict] = {
    "sd15-lora": {
        "kind": "sd15",
        "res": 512,
        "fastsd": ["--method", "lora"],
        "steps": 1000,
        "peer": ("train_dreambooth_lora.py", ["--learning_rate", "1e-4", "--rank", "4"]),
    },
    "sd15-full": {  # fastsd's default: 350 text-encoder steps, then 1500 UNet steps
        "kind": "sd15",
        "res": 512,
        "fastsd": [],
        "steps": 1850,
        "peer": ("train_dreambooth.py", ["--train_text_encoder", "--learning_rate", "2e-6"]),
    },
    "sdxl-lora": {
        "kind": "sdxl",
        "res": 1024,
        "fastsd": ["--method", "lora"],
        "steps": 1000,
        "peer": ("train_dreambooth_lora_sdxl.py", ["--learning_rate", "1e-4", "--rank", "4"]),
    },
    # shorter runs of the same defaults (device time is scarce): the totals are projected in RESULTS.md
    "sd15-full-500": {
        "kind": "sd15",
        "res": 512,
        "fastsd": ["--te-steps", "100", "--steps", "400", "--save-every", "0"],
        "steps": 1850,
        "peer_steps": 80,
        "peer": ("train_dreambooth.py", ["--train_text_encoder", "--learning_rate", "2e-6"]),
    },
    "sdxl-lora-300": {
        "kind": "sdxl",
        "res": 1024,
        "fastsd": ["--method", "lora", "--steps", "300"],
        "steps": 1000,
        "peer_steps": 20,
        "peer": ("train_dreambooth_lora_sdxl.py", ["--learning_rate", "1e-4", "--rank", "4"]),
    },
    # the background checkpoint writer: the sd15-full-500 run with four full states in its 500 steps
    "sd15-full-saves": {
        "kind": "sd15",
        "res": 512,
        "fastsd": ["--te-steps", "100", "--steps", "400", "--save-every", "125"],
    },
    # SD3.5 / FLUX.1 LoRA (issue 17), 1024 px, against train_dreambooth_lora_sd3/flux.py, rank 4 both, the
    # peers' default 16-bit LoRA otherwise. FLUX's peer caches latents (its option; fastsd always caches); SD3's
    # cannot: with --cache_latents and bf16 it feeds bf16 pixels to its fp32 VAE and stops (2026-12-03, 58eb52c)
    "sd35-medium-lora": {
        "kind": "sd35-medium",
        "res": 1024,
        "fastsd": ["--method", "lora", "--steps", "150", "--save-every", "0"],
        "steps": 150,
        "peer_steps": 30,
        "peer": ("train_dreambooth_lora_sd3.py", ["--learning_rate", "1e-4", "--rank", "4"]),
        "peer_env": {"PEER_NO_CUDNN_SDPA": "1"},  # equal settings: fastsd trains SD3/FLUX without cuDNN attention
    },
    "flux1-dev-lora": {
        "kind": "flux1-dev",
        "res": 1024,
        "fastsd": ["--method", "lora", "--steps", "60", "--save-every", "0"],
        "steps": 60,
        "peer_steps": 15,
        "peer": ("train_dreambooth_lora_flux.py", ["--learning_rate", "1e-4", "--rank", "4", "--cache_latents"]),
        # its step 1 hit a CUDA illegal memory access on 2026-12-03; the same cuDNN attention fastsd avoids
        "peer_env": {"PEER_NO_CUDNN_SDPA": "1"},
    },
    # cold first step with and without cuDNN autotuning (UNet only, 60 steps, no checkpoint/export)
    **_on_and_off(
        "first-step-autotune",
        "FASTSD_CUDNN_BENCHMARK",
        ["--te-steps", "0", "--steps", "60", "--save-every", "0", "--no-export"],
    ),
    # the cold first step against the steady speed: SD1.5 LoRA with and without cuDNN's attention (see gpuwarm)
    **_on_and_off(
        "first-step-lora-cudnn-attn",
        "FASTSD_CUDNN_ATTENTION",
        ["--method", "lora", "--steps", "300", "--save-every", "0", "--no-export"],
    ),
    # hard caps: (model, cap GiB, TrainConfig overrides incl. the budget)
    "cap-unet+te-9": {
        "kind": "sd15",
        "res": 512,
        "cap": 9.0,
        "cfg": {"method": "full", "schedule": "joint", "optimizer": "adamw_lowmem", "vram_budget_gb": 9.0},
    },
    "cap-unet-10": {"kind": "sd15", "res": 512, "cap": 10.0, "cfg": {"method": "full", "vram_budget_gb": 10.0}},
    "cap-sd15-lora-9": {"kind": "sd15", "res": 512, "cap": 9.0, "cfg": {"method": "lora", "vram_budget_gb": 9.0}},
    "cap-sdxl-lora-10": {"kind": "sdxl", "res": 1024, "cap": 10.0, "cfg": {"method": "lora", "vram_budget_gb": 10.0}},
    "cap-unet+te-14": {"kind": "sd15", "res": 512, "cap": 14.0, "cfg": {"method": "full", "vram_budget_gb": 14.0}},
    "cap-sd15-full-fp16-14": {  # the T4 preset's SD1.5 full fine-tune (UNet + TE schedule); target: <= 9 GiB
        "kind": "sd15",
        "res": 512,
        "cap": 14.5,
        "cfg": {"method": "full", "precision": "fp16", "optimizer": "adamw_lowmem", "vram_budget_gb": 14.0},
    },
    # the T4 preset's full fine-tune since 2026-12-05: fp16 weights with stochastic rounding (targets <= 9 GiB and
    # a state <= 4 GB), under a T4's cap and under 9 GiB; the final state is written to measure its size
    "cap-sd15-full-fp16-16bit-14": {
        "kind": "sd15",
        "res": 512,
        "cap": 14.5,
        "cfg": {
            "method": "full",
            "precision": "fp16",
            "optimizer": "adamw_lowmem",
            "master_weights": "16bit",
            "vram_budget_gb": 14.0,
            "save_final": True,
        },
    },
    "cap-unet+te-16bit-9": {
        "kind": "sd15",
        "res": 512,
        "cap": 9.0,
        "cfg": {
            "method": "full",
            "precision": "fp16",
            "optimizer": "adamw_lowmem",
            "master_weights": "16bit",
            "vram_budget_gb": 9.0,
            "save_final": True,
        },
    },
    "cap-sdxl-lora-fp16-14": {  # the T4 preset's precision (8-bit moments in torch: no bitsandbytes here)
        "kind": "sdxl",
        "res": 1024,
        "cap": 14.5,
        "cfg": {"method": "lora", "precision": "fp16", "optimizer": "adamw_lowmem", "vram_budget_gb": 14.0},
    },
    # the T4 plans of issue 17 under a T4's 14.5 GiB: SD3.5 Medium LoRA in fp16, FLUX.1-dev QLoRA (bf16: fp16 NaNs)
    "cap-sd35-medium-lora-fp16-14": {
        "kind": "sd35-medium",
        "res": 1024,
        "cap": 14.5,
        "cfg": {"method": "lora", "precision": "fp16", "optimizer": "adamw_lowmem", "vram_budget_gb": 14.0},
    },
    "cap-flux1-dev-qlora-14": {
        "kind": "flux1-dev",
        "res": 1024,
        "cap": 14.5,
        "cfg": {"method": "lora", "precision": "bf16", "optimizer": "adamw_lowmem", "vram_budget_gb": 14.0},
    },
}
#: model kinds benchmarks/flow.py builds (SD3.5 / FLUX.1 from their real configs); the others come from train.py
FLOW_KINDS = ("sd35-medium", "sd35-large", "flux1-dev")


def build(kind: str, folder: Path, small: bool) -> Path:
    """The random-weight Diffusers folder of ``kind`` under ``folder``'s parent (built once, reused)."""
    if kind not in FLOW_KINDS:
        from train import build_model

        return build_model(kind, folder, small=small)
    if not (folder / "model_index.json").is_file():
        spec = json.dumps({"name": kind, "work": str(folder.parent), "small": small})
        p = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "flow.py"), "--build-child", spec],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            raise RuntimeError(f"building {kind} failed: {(p.stdout + p.stderr)[-1500:]}")
    return folder


def images(folder: Path, res: int, n: int = 4) -> Path:
    """``n`` random RGB images of ``res``² px (the same files for both tools)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.random.RandomState(i).rand(res, res, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def fastsd(*args: str, env: dict | None = None) -> tuple[float, str]:
    """Run ``python -m fastsd ARGS``; (seconds, stdout). Raises with the output tail on failure."""
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "fastsd", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if p.returncode:
        raise RuntimeError(f"fastsd {' '.join(args[:2])} exit {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
    return time.perf_counter() - t, p.stdout


def fresh_session(name: str, home: Path) -> str:
    """The case's session name, any earlier run's session of that name removed (a re-run in the same workdir)."""
    sess = name.replace("+", "_")
    if (home / "sessions" / sess).exists():
        fastsd("session", "rm", sess, "--root", str(home), "--yes")
    return sess


def run_fastsd(name: str, case: dict, model: Path, imgs: Path, home: Path, steps: int | None) -> dict:
    sess = fresh_session(name, home)
    t_new, _ = fastsd("session", "new", sess, "--root", str(home), "--base-model", str(model),
                      "--resolution", str(case["res"]))  # fmt: skip
    t_add, _ = fastsd("session", "add", sess, str(imgs), "--root", str(home), "--crop", "center")
    extra = list(case["fastsd"]) + (["--steps", str(steps)] if steps else [])
    t_train, out = fastsd("train", sess, "--root", str(home), "--json", *extra, env=case.get("env"))
    res = json.loads(out.strip().splitlines()[-1])
    tm = res["timings"]
    loop = sum(tm.get(k, 0.0) for k in ("first_step", "warmup", "steps", "checkpoint", "sample", "export"))
    return {
        "case": name,
        "tool": "fastsd",
        "steps": res["steps"],
        "wall_s": round(t_new + t_add + t_train, 1),
        "session_new_add_s": round(t_new + t_add, 1),
        "setup_s": round(t_new + t_add + t_train - loop, 1),  # imports, model load, caching
        "load_s": tm.get("load"),
        "cache_s": tm.get("cache"),
        "first_step_s": tm.get("first_step"),
        "warmup_s": tm.get("warmup"),
        "steps_s": tm.get("steps"),
        "checkpoint_s": tm.get("checkpoint", 0.0),
        "checkpoints": len(res["checkpoints"]),
        "sample_s": tm.get("sample", 0.0),
        "export_s": tm.get("export", 0.0),
        "it_per_s_steady": round((res["steps"] - 5) / tm["steps"], 2) if tm.get("steps") else None,  # after warm-up
        "peak_allocated_gb": res["memory"].get("process", {}).get("allocated_gb"),
        "peak_reserved_gb": res["memory"].get("process", {}).get("reserved_gb"),
        "memory": res["memory"],
        "plan": {
            k: res["plan"].get(k)
            for k in (
                "optimizer",
                "precision",
                "cuda_graph",
                "checkpoint_fraction",
                "fused_backward",
                "cuda_graph_captured",
                "cuda_graph_failed",
                "checkpoints_in_background",
            )
        },  # fmt: skip
        "env": case.get("env"),
    }


def run_peer(name: str, case: dict, model: Path, imgs: Path, work: Path, peer_dir: Path, steps: int) -> dict:
    script, extra = case["peer"]
    out_dir = work / f"peer-{name}"
    result = work / f"peer-{name}.json"
    args = [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(imgs),
        "--instance_prompt", PROMPT, "--output_dir", str(out_dir), "--resolution", str(case["res"]),
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--checkpointing_steps", str(steps),
        "--mixed_precision", "no" if case.get("small") else "bf16", "--seed", "42", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **case.get("peer_env", {})}  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "peer_run.py"), str(result), str(peer_dir / script), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t
    res = json.loads(result.read_text()) if result.exists() else {"error": f"exit {p.returncode}"}
    if res.get("error") or p.returncode:
        res["log_tail"] = (p.stdout + p.stderr)[-1500:]
    res.update(case=name, tool=f"diffusers {script}", wall_s=round(wall, 1))
    total = case["steps"]
    if res.get("it_per_s") and total:
        per_ckpt = res["checkpoint_s"] / max(1, res["checkpoints"])
        res["projected_steps"] = total
        res["projected_wall_s"] = round(
            wall - res["steps_s"] - res["checkpoint_s"] + (total - 1) / res["it_per_s"] + per_ckpt * (total // 500), 1
        )  # the script's default --checkpointing_steps is 500
    return res


def fp32_copy(model: Path, folder: Path, emit) -> Path:
    """The same random model saved in fp32 (diffusers' full fine-tune script refuses fp16 weights)."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import DiffusionPipeline

    t = time.perf_counter()
    DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32).save_pretrained(folder, safe_serialization=True)
    emit({"built": f"{model.name} in fp32 for the peer", "seconds": round(time.perf_counter() - t, 1)})
    return folder


def run_cap(name: str, case: dict, model: Path, imgs: Path, home: Path, steps: int) -> dict:
    """One capped fastsd run in a child process (the cap is per process)."""
    sess = fresh_session(name, home)
    fastsd("session", "new", sess, "--root", str(home), "--base-model", str(model), "--resolution", str(case["res"]))
    fastsd("session", "add", sess, str(imgs), "--root", str(home), "--crop", "center")
    spec = json.dumps({"session": sess, "home": str(home), "cap": case["cap"], "cfg": case["cfg"], "steps": steps})
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--cap-child", spec], capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    res = (
        json.loads(lines[-1]) if lines else {"error": f"exit {p.returncode}", "log_tail": (p.stdout + p.stderr)[-1500:]}
    )
    res.update(case=name, tool="fastsd (hard cap)", cap_gib=case["cap"], wall_s=round(time.perf_counter() - t, 1))
    return res


def cap_child(spec: dict) -> None:
    """In-process: cap the allocator, train through every phase, print the phases' peaks."""
    import torch

    sys.path.insert(0, str(REPO))
    from flow import RssSampler

    from fastsd.session import Session
    from fastsd.train import TrainConfig, train

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(spec["cap"] * 2**30 / total)
    n = spec["steps"]
    cfg = {
        "unet_steps": n,
        "te_steps": n if spec["cfg"].get("schedule") == "joint" else (n // 3 if spec["cfg"]["method"] == "full" else 0),
        # a full state's checkpoint costs ~1 min (measured) and no VRAM: LoRA runs take one
        "save_every": n // 2 if spec["cfg"]["method"] == "lora" else 0,
        "save_final": spec["cfg"]["method"] == "lora",
        "sample_every": n,
        "sample_prompts": [PROMPT],
        "sample_steps": 4,
        "log_every": 5,
        "progress": False,
        **spec["cfg"],
    }
    out: dict = {"config": spec["cfg"]}
    plan_lines: list[str] = []

    class PlanLog(logging.Handler):  # the plan in words (estimate, checkpointing): kept for runs that fail
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("plan:") or "retrying" in msg or "capture failed" in msg:
                plan_lines.append(msg[:400])

    logging.getLogger("fastsd").addHandler(PlanLog())
    logging.getLogger("fastsd").setLevel(logging.INFO)
    rss = RssSampler()  # RAM: a T4 runtime has 12.7 GB
    rss.start()
    try:
        r = train(spec["session"], TrainConfig(**cfg), home=spec["home"])
        out.update(steps=r.steps, timings=r.timings, memory=r.memory, it_per_s=round(r.it_per_s, 2))
        plan = r.plan.to_dict()
        out["plan"] = {k: plan.get(k) for k in ("optimizer", "checkpoint_fraction", "fused_backward", "cuda_graph",
                                                "cuda_graph_captured", "cuda_graph_failed", "estimate_gb",
                                                "images_beside_graph", "master_weights")}  # fmt: skip
        proc = r.memory.get("process", {})
        saved = Session.open(spec["session"], spec["home"]).latest_checkpoint()
        # decimal GB, as Drive counts; the manifest lists each file's size
        out["state_gb"] = round(sum(saved.get("sizes", {}).values()) / 1e9, 3) if saved else None
        out["within_cap"] = proc.get("reserved_gb", 0) <= spec["cap"]
        out["within_budget"] = proc.get("reserved_gb", 0) <= spec["cfg"]["vram_budget_gb"]
    except Exception as err:  # noqa: BLE001 - the point is to report it
        out["error"] = f"{type(err).__name__}: {err}"[:600]
        out["where"] = [f"{f.name}:{f.lineno} {f.line}" for f in traceback.extract_tb(err.__traceback__)[-4:]]
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    out["plan_log"] = plan_lines
    out["peak_rss_anon_gib"] = rss.stop()
    print(json.dumps(out), flush=True)


def table(rows: list[dict]) -> str:
    """Markdown: one row per run, the phases as columns."""

    def f(v: object, unit: str = "") -> str:
        return "—" if v in (None, "") else (f"{v:.1f}{unit}" if isinstance(v, float) else f"{v}{unit}")

    lines = [
        "| case | tool | steps | wall s (projected) | setup s | first step s (+warm-up/capture) | steps s (it/s) "
        "| checkpoints s (n) | export s | peak GiB alloc / reserved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "tool" not in r or r.get("error") or "cap_gib" in r:
            continue
        proj = f" ({r['projected_wall_s']:.0f} at {r['projected_steps']})" if r.get("projected_wall_s") else ""
        warm = f" + {r['warmup_s']:.1f}" if r.get("warmup_s") is not None else ""
        rate = r.get("it_per_s_steady") or r.get("it_per_s")
        lines.append(
            f"| {r['case']} | {r['tool']} | {r.get('steps')} | {f(r.get('wall_s'))}{proj} | {f(r.get('setup_s'))} "
            f"| {f(r.get('first_step_s'))}{warm} | {f(r.get('steps_s'))} ({f(rate)}) "
            f"| {f(r.get('checkpoint_s'))} ({r.get('checkpoints', 0)}) | {f(r.get('export_s'))} "
            f"| {f(r.get('peak_allocated_gb'))} / {f(r.get('peak_reserved_gb'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="sd15-lora,sd15-full", help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--peer-dir", help="folder with diffusers' dreambooth example scripts (none: fastsd only)")
    ap.add_argument("--peer-steps", type=int, default=200, help="steps the peer runs (then projected)")
    ap.add_argument("--steps", type=int, help="override fastsd's steps (default: what a user runs)")
    ap.add_argument("--cap-steps", type=int, default=20, help="steps of each hard-cap run")
    ap.add_argument("--workdir", help="models and sessions (default: a temp folder)")
    ap.add_argument("--out", help="append JSON lines here too")
    ap.add_argument("--budget-s", type=float, default=500, help="skip cases that start after this many seconds")
    ap.add_argument("--small", action="store_true", help="tiny models on the CPU, 3 steps (smoke run)")
    ap.add_argument("--cap-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cap_child:
        cap_child(json.loads(args.cap_child))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastsd-e2e-"))
    start = time.perf_counter()
    rows: list[dict] = []
    models: dict[str, Path] = {}

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")

    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        case = CASES.get(name)
        if case is None:
            emit({"case": name, "error": "unknown case"})
            continue
        if time.perf_counter() - start > args.budget_s:
            emit({"case": name, "skipped": "time budget"})
            continue
        kind = case["kind"]
        try:
            if kind not in models:
                t = time.perf_counter()
                models[kind] = build(kind, work / kind, args.small)
                emit({"built": kind, "seconds": round(time.perf_counter() - t, 1)})
            if args.small and kind in FLOW_KINDS:
                case = {**case, "res": 256}  # the tiny SD3's position table ends at 256 px
            imgs = images(work / f"images-{case['res']}", case["res"])
            home = work / "home"
            if "cap" in case:
                emit(run_cap(name, case, models[kind], imgs, home, args.cap_steps))
                continue
            if args.small:
                te = [] if kind in FLOW_KINDS else ["--te-steps", "1"]  # flow LoRAs train the transformer only
                case = {**case, "fastsd": [*case["fastsd"], "--gpu", "cpu", *te, "--save-every", "2"],
                        "steps": 3, "small": True}  # fmt: skip
            emit(run_fastsd(name, case, models[kind], imgs, home, 3 if args.small else args.steps))
            if case.get("peer") and args.peer_dir:
                steps = case.get("peer_steps", args.peer_steps)
                peer_model = models[kind]
                if "--train_text_encoder" in case["peer"][1]:  # the script refuses a text encoder in fp16
                    peer_model = fp32_copy(models[kind], work / f"{kind}-fp32", emit)
                emit(run_peer(name, case, peer_model, imgs, work, Path(args.peer_dir), steps))
        except Exception as err:  # noqa: BLE001 - one failing case must not hide the others
            emit({"case": name, "error": f"{type(err).__name__}: {err}"[:2000]})
    print(table(rows))


if __name__ == "__main__":
    main()
