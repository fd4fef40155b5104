"""SD3.5 and FLUX.1 generation per memory plan, through the built-in web UI's own path, full-size random weights.

Builds SD3.5 Medium, SD3.5 Large and FLUX.1-dev from their real configs (``full_configs.py``; CLIP-L,
OpenCLIP bigG, T5 v1.1 XXL, the 16-channel VAE, the flow-matching scheduler) with random bf16 weights
on the GPU, and saves each as a Diffusers folder under ``--work`` (kept: a folder already there is
reused). The T5 encoder (9.5 GB) is written once and hard-linked into every model. Nothing is
downloaded; the tokenizers are fastsd.demo.tiny's small ones (the encoders' real vocabulary sizes).

Then each (model, plan) runs in its own child process (peaks are per process): a
:class:`fastsd.webui.generate.PipelineManager` with the plan forced through ``fastsd_memory_plan``,
as ``fastsd webui --memory-plan PLAN`` does, loads the model (timed: detection, plan, quantization,
placement), makes a first image, then ``--repeats`` more at 1024 px with the model's default steps
and guidance (``samplers.FLOW_DEFAULTS``: SD3.5 Medium 40, Large 28, FLUX.1-dev 28; ``--steps``
shortens). One JSON line per run: load s, first image s, steady s/image, denoising it/s (from CUDA
events at each step's end, first step excluded), whole-process peak VRAM allocated / reserved
(``torch.cuda.max_memory_*``) and what the device shows used, peak RSS (``ru_maxrss``, which counts
the safetensors pages diffusers maps while loading) and peak anonymous RSS (sampled; what RAM the
process really needs), memplan's estimate beside the measurement, and whether the CUDA-graph fast
path captured. A markdown table follows. ``--cap GiB`` caps each child's allocator
(``torch.cuda.set_per_process_memory_fraction``; 14.5 emulates a T4's usable VRAM) and says whether
each plan fits. Load times are from the page cache (the model was just written) unless ``--cold``
evicts the model's files first.

GPU (one H200; the machine needs the diffusers and bitsandbytes wheels). One call per family keeps each
under 10 minutes and the disk under ~35 GB (all three models and the T5 together are ~59 GB):
    PYTHONPATH=. python benchmarks/flow.py --work /tmp/flowbench --models sd35-medium,sd35-large --budget-s 480
    PYTHONPATH=. python benchmarks/flow.py --work /tmp/flowbench --models flux1-dev --steps 14 --repeats 2 --budget-s 480
    PYTHONPATH=. python benchmarks/flow.py --plans nf4 --cap 14.5 --steps 8 --delete-after   # a T4's VRAM
    PYTHONPATH=. python benchmarks/flow.py --runs sd35-large:int8,flux1-dev:nf4-t5nf4 --out flow.jsonl
CPU smoke run (tiny models, 64 px, 2 steps):  PYTHONPATH=. python benchmarks/flow.py --small
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fastsd import storage  # noqa: E402
from fastsd.models.memplan import PLAN_NAMES, T5_COMPONENT  # noqa: E402

PROMPT = "a photo of a dog on the beach, high quality, detailed"

#: benchmark name -> (fastsd.models.detect family, variant, fastsd.demo.tiny builder for --small).
MODELS: dict[str, tuple[str, str, str]] = {
    "sd35-medium": ("sd3", "medium", "sd3"),
    "sd35-large": ("sd3", "large", "sd3-large"),
    "flux1-dev": ("flux", "dev", "flux"),
}
#: What one run of the benchmark measures by default: the T4 plans (issue 17) and, for FLUX.1, the
#: 8-bit and half-precision plans an H200 holds.
DEFAULT_RUNS = [
    "sd35-medium:fp16-t5i8",
    "sd35-medium:nf4",
    "sd35-large:nf4",
    "flux1-dev:nf4",
    "flux1-dev:int8",
    "flux1-dev:fp16",
]
GIB = 2**30


# ----- building the models ----------------------------------------------------------------------


@contextlib.contextmanager
def built_on(device: str):
    """Modules created inside are made on ``device`` in bf16 (random init on the GPU: seconds, not minutes)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def full_t5() -> Any:
    """T5 v1.1 XXL's encoder with random weights (made where :func:`built_on` says)."""
    from full_configs import T5_XXL
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**T5_XXL))


def full_pipeline(name: str, scratch: Path, t5: Any) -> Any:
    """The full-size pipeline ``name`` with random weights (made where :func:`built_on` says) and the given T5."""
    import full_configs as cfg
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastsd.demo.tiny import tiny_t5_tokenizer, tiny_tokenizer

    family, variant, _ = MODELS[name]
    tok = tiny_tokenizer(scratch / "clip")
    t5_tok = tiny_t5_tokenizer(scratch / "t5")
    if family == "flux":
        return FluxPipeline(
            transformer=FluxTransformer2DModel(**cfg.FLUX_DEV_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(**cfg.FLUX_DEV_SCHEDULER),
            vae=AutoencoderKL(**cfg.FLOW_VAE, **cfg.FLUX_VAE_FACTORS),
            text_encoder=CLIPTextModel(CLIPTextConfig(**cfg.CLIP_L)),
            tokenizer=tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
        )
    transformer = cfg.SD35_MEDIUM_TRANSFORMER if variant == "medium" else cfg.SD35_LARGE_TRANSFORMER
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg.SD35_SCHEDULER),
        vae=AutoencoderKL(**cfg.FLOW_VAE, **cfg.SD3_VAE_FACTORS),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg.CLIP_L)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg.CLIP_BIGG)),
        tokenizer_2=tiny_tokenizer(scratch / "clip", pad_token="!"),  # SD3's bigG tokenizer pads with "!"
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of folder ``src`` made of hard links (a real copy where links cannot be made)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def save_parts(pipe: Any, folder: Path, t5_key: str, shared_t5: Path) -> None:
    """Save ``pipe`` as a Diffusers folder (through storage's one folder builder), its T5 linked from ``shared_t5``.

    diffusers' own ``save_pretrained`` would write the T5 again; this writes ``model_index.json``
    the same way (``save_config``) and every other component with its own ``save_pretrained``.
    """
    with storage.building_folder(folder, "bench") as tmp:
        pipe.save_config(tmp)
        for key, part in pipe.components.items():
            if part is None:
                continue
            if key == t5_key:
                link_tree(shared_t5, tmp / key)
                continue
            save = part.save_pretrained
            safe = {"safe_serialization": True} if "safe_serialization" in inspect.signature(save).parameters else {}
            save(tmp / key, **safe)


def folder_gb(folder: Path) -> float:
    """Size of the files under ``folder`` in GB (hard links counted in each folder that holds them)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def build_child(spec: dict) -> dict:
    """In a child process: build and save model ``spec['name']`` under ``spec['work']`` (the T5 first if missing)."""
    import torch

    from fastsd.demo.tiny import BUILDERS

    name, work, small = spec["name"], Path(spec["work"]), spec["small"]
    family, _, tiny = MODELS[name]
    folder, shared = work / name, work / ("t5-tiny" if small else "t5-xxl")
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tokenizers-", dir=work))
    out: dict[str, Any] = {"built": name, "folder": str(folder)}
    t = time.perf_counter()
    if small:  # the tiny builders make everything, T5 included, on the CPU
        pipe = BUILDERS[tiny](scratch)
        if not (shared / "config.json").is_file():
            with storage.building_folder(shared, "bench") as tmp:
                getattr(pipe, T5_COMPONENT[family]).save_pretrained(tmp)
    else:
        if not (shared / "config.json").is_file():
            with built_on("cuda"):
                t5 = full_t5()
            with storage.building_folder(shared, "bench") as tmp:
                t5.save_pretrained(tmp)
            out["t5_s"] = round(time.perf_counter() - t, 1)
            del t5
            torch.cuda.empty_cache()
        with built_on("meta"):
            t5 = full_t5()  # a placeholder that registers the class: the saved one is linked in
        with built_on("cuda"):
            pipe = full_pipeline(name, scratch, t5)
    out["init_s"] = round(time.perf_counter() - t, 1)
    save_parts(pipe, folder, T5_COMPONENT[family], shared)
    shutil.rmtree(scratch, ignore_errors=True)
    out.update(seconds=round(time.perf_counter() - t, 1), gb=round(folder_gb(folder), 2))
    if torch.cuda.is_available():
        out["build_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return out


# ----- one run: load through the web UI's manager, generate, measure ---------------------------------


def _state_class():
    """A :class:`fastsd.webui.worker.JobState` that timestamps each denoising step's end.

    The manager's step callback sets ``sampling_step``; on CUDA a timing event is recorded there
    (no host sync, so the queue of kernels is not disturbed), on the CPU the clock is read.
    """
    import torch

    from fastsd.webui.worker import JobState

    class TimedState(JobState):
        def __init__(self) -> None:
            self.marks: list[Any] = []
            super().__init__()

        @property
        def sampling_step(self) -> int:
            return self._step

        @sampling_step.setter
        def sampling_step(self, value: int) -> None:
            self._step = value
            if value >= 1:
                if torch.cuda.is_available():
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    self.marks.append(event)
                else:
                    self.marks.append(time.perf_counter())

        def step_seconds(self) -> float | None:
            """Seconds from the first step's end to the last's, per step (None with fewer than 2 steps)."""
            if len(self.marks) < 2:
                return None
            if torch.cuda.is_available():
                return self.marks[0].elapsed_time(self.marks[-1]) / 1000 / (len(self.marks) - 1)
            return (self.marks[-1] - self.marks[0]) / (len(self.marks) - 1)

    return TimedState


class RssSampler(threading.Thread):
    """The process's peak anonymous RSS (``RssAnon``: not the file pages a mapped safetensors file shows)."""

    def __init__(self, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak_kib, self.running = every_s, 0, True

    def run(self) -> None:
        while self.running:
            self.peak_kib = max(self.peak_kib, self.now_kib())
            time.sleep(self.every_s)

    @staticmethod
    def now_kib() -> int:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> float:
        """Stop sampling; the peak in GiB."""
        self.running = False
        self.peak_kib = max(self.peak_kib, self.now_kib())
        return round(self.peak_kib / 2**20, 2)


def run_child(spec: dict) -> dict:
    """In a child process: load ``spec['folder']`` with plan ``spec['plan']`` through the web UI's manager and time it."""
    import torch

    from fastsd.webui.generate import GenerationRequest, PipelineManager

    cuda = torch.cuda.is_available() and not spec["small"]
    device = "cuda" if cuda else "cpu"
    out: dict[str, Any] = {"run": f"{spec['name']}:{spec['plan']}", "device": "cpu"}
    if cuda:
        out["device"] = torch.cuda.get_device_name(0)
        if spec.get("cap"):
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap"] * GIB / total))
            out["cap_gib"] = spec["cap"]
    rss = RssSampler()
    rss.start()
    memory: dict[str, Any] = {"memory_plan": spec["plan"]}  # what `fastsd webui --memory-plan PLAN` passes
    if spec.get("eager"):
        memory["cuda_graph"] = False

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    try:
        state = _state_class()()
        t = time.perf_counter()
        manager = PipelineManager(Path(spec["home"]), model=spec["folder"], device=device, memory=memory, state=state)
        manager.ensure_loaded()
        sync()
        out["load_s"] = round(time.perf_counter() - t, 2)
        plan = manager.plan
        out.update(plan=plan.name, plan_described=plan.describe())
        out.update(estimate_vram_gib=round(plan.vram_gib, 2), estimate_ram_gib=round(plan.ram_gib, 2))
        if cuda:
            out["load_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        size = spec["size"]
        req = GenerationRequest(prompt=PROMPT, steps=spec["steps"], cfg_scale=None, width=size, height=size)

        def image(seed: int) -> tuple[float, float | None, dict]:
            req.seed = seed
            state.marks.clear()
            sync()
            t0 = time.perf_counter()
            result = manager.generate(req)
            sync()
            return time.perf_counter() - t0, state.step_seconds(), result.info

        first_s, _, info = image(0)
        out.update(first_image_s=round(first_s, 2), steps=info["steps"], cfg_scale=info["cfg_scale"], size=size)
        if info.get("warnings"):
            out["warnings"] = info["warnings"]
        runs = [image(1 + i) for i in range(spec["repeats"])]
        per_image = statistics.median(r[0] for r in runs)
        per_step = [r[1] for r in runs if r[1]]
        out.update(s_per_image=round(per_image, 3), min_s=round(min(r[0] for r in runs), 3), repeats=len(runs))
        out["it_per_s_image"] = round(info["steps"] / per_image, 3)  # steps over the whole image's time
        if per_step:
            out["it_per_s"] = round(1 / statistics.median(per_step), 3)  # denoising steps alone
        graphs = manager.pipe.transformer.__dict__.get("forward")
        out["cuda_graph"] = {"captures": getattr(graphs, "captures", 0), "failed": getattr(graphs, "failed", None)}
    except Exception as err:  # noqa: BLE001 - a plan that does not fit is a result, not a crash
        out["error"] = f"{type(err).__name__}: {err}"[:600]
        out["oom"] = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["peak_anon_rss_gib"] = rss.stop()
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        free, total = torch.cuda.mem_get_info()
        out["device_used_gib"] = round((total - free) / GIB, 2)  # + CUDA context and anything outside torch
        if spec.get("cap"):
            out["fits_cap"] = "error" not in out and out["peak_reserved_gib"] <= spec["cap"]
    return out


# ----- the parent: build, run each child, report ------------------------------------------------------


def child(flag: str, spec: dict, timeout: float) -> dict:
    """Run this script as ``--<flag> SPEC`` in a new process; its last JSON line (or what went wrong)."""
    cmd = [sys.executable, __file__, f"--{flag}", json.dumps(spec)]
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-1500:]
        return {"error": f"timed out after {timeout:.0f} s", "log_tail": tail.decode(errors="replace")}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": f"exit {p.returncode}", "log_tail": (p.stdout + p.stderr)[-1500:]}


def evict(folder: Path) -> None:
    """Drop ``folder``'s (written back) file pages from the page cache, so the next load reads the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def select_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (model, plan) pairs asked for: ``--runs`` (default :data:`DEFAULT_RUNS`) filtered by --models/--plans."""
    runs = []
    for item in [r.strip() for r in (args.runs or ",".join(DEFAULT_RUNS)).split(",") if r.strip()]:
        name, _, plan = item.partition(":")
        if name not in MODELS or plan not in PLAN_NAMES:
            raise SystemExit(
                f"unknown run {item!r}: MODEL:PLAN, MODEL one of {', '.join(MODELS)}, PLAN of {PLAN_NAMES}"
            )
        runs.append((name, plan))
    models = {m.strip() for m in args.models.split(",")} if args.models else None
    plans = {p.strip() for p in args.plans.split(",")} if args.plans else None
    return [(m, p) for m, p in runs if (models is None or m in models) and (plans is None or p in plans)]


def table(rows: list[dict]) -> str:
    """Markdown: one row per run."""

    def f(v: Any) -> str:
        return "—" if v is None else str(v)

    lines = [
        "| run | plan used | load s | first image s | s/image | it/s (denoise) | peak VRAM GiB alloc / reserved "
        "| device used GiB | peak RSS GiB (anon) | est. VRAM GiB | fits cap | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("error", "")[:120].replace("|", "/")
        lines.append(
            f"| {r['run']} | {f(r.get('plan'))} | {f(r.get('load_s'))} | {f(r.get('first_image_s'))} "
            f"| {f(r.get('s_per_image'))} | {f(r.get('it_per_s'))} "
            f"| {f(r.get('peak_allocated_gib'))} / {f(r.get('peak_reserved_gib'))} | {f(r.get('device_used_gib'))} "
            f"| {f(r.get('peak_rss_gib'))} ({f(r.get('peak_anon_rss_gib'))}) | {f(r.get('estimate_vram_gib'))} "
            f"| {f(r.get('fits_cap'))} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", help=f"comma-separated MODEL:PLAN (default {','.join(DEFAULT_RUNS)})")
    ap.add_argument("--models", help=f"only these models, comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--plans", help=f"only these plans, comma-separated: {', '.join(PLAN_NAMES)}")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the model's own; --small 2)")
    ap.add_argument("--repeats", type=int, help="timed images after the first (default 3, --small 2)")
    ap.add_argument("--size", type=int, help="image side in px (default 1024, --small 64)")
    ap.add_argument("--cap", type=float, help="cap each run's VRAM at this many GiB (14.5: a T4) and say if it fits")
    ap.add_argument("--eager", action="store_true", help="turn the CUDA-graph fast path off (fastsd_cuda_graph)")
    ap.add_argument("--cold", action="store_true", help="evict the model's files from the page cache before each load")
    ap.add_argument("--work", type=Path, help="where models are saved and reused (default: a temp folder)")
    ap.add_argument("--delete-after", action="store_true", help="delete each model after its last run (disk)")
    ap.add_argument("--out", type=Path, help="also append the JSON lines here")
    ap.add_argument("--budget-s", type=float, default=560, help="start nothing new after this many seconds")
    ap.add_argument("--small", action="store_true", help="tiny models on the CPU (smoke run)")
    ap.add_argument("--build-child", help=argparse.SUPPRESS)
    ap.add_argument("--run-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_child or args.run_child:
        if args.small or (args.build_child and json.loads(args.build_child)["small"]):
            import torch

            torch.set_num_threads(1)
        result = (
            build_child(json.loads(args.build_child)) if args.build_child else run_child(json.loads(args.run_child))
        )
        print(json.dumps(result), flush=True)
        return

    start = time.perf_counter()
    runs = select_runs(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="fastsd-flowbench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(line) + "\n")

    built: dict[str, Path | None] = {}
    last = {name: i for i, (name, _) in enumerate(runs)}
    for i, (name, plan) in enumerate(runs):
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0:
            emit({"run": f"{name}:{plan}", "skipped": "time budget (--budget-s)"})
            continue
        if name not in built:
            folder = work / name
            if (folder / "model_index.json").is_file():
                emit({"built": name, "cached": str(folder)})
            else:
                result = child("build-child", {"name": name, "work": str(work), "small": args.small}, left + 30)
                emit(result)
                if "error" in result:
                    built[name] = None
                    continue
            built[name] = folder
        if built[name] is None:
            emit({"run": f"{name}:{plan}", "skipped": f"{name} was not built"})
            continue
        if args.cold:
            evict(built[name])
        spec = {
            "name": name,
            "plan": plan,
            "folder": str(built[name]),
            "home": str(work / "home"),
            "steps": args.steps or (2 if args.small else None),
            "repeats": args.repeats or (2 if args.small else 3),
            "size": args.size or (64 if args.small else 1024),
            "cap": args.cap,
            "eager": args.eager,
            "small": args.small,
        }
        t = time.perf_counter()
        result = {"run": f"{name}:{plan}", **child("run-child", spec, max(args.budget_s - (t - start), 60) + 30)}
        result["wall_s"] = round(time.perf_counter() - t, 1)  # the child's whole life: imports, load, images
        emit(result)
        rows.append(result)
        if args.delete_after and last[name] == i:
            storage.remove_folder(built[name])
    print(table(rows), flush=True)
    if any("error" in r for r in rows) and not args.cap:
        sys.exit(1)  # without a cap every plan here should fit: an error is a failure


if __name__ == "__main__":
    main()
