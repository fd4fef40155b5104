"""The DreamBooth training loop: settings, models, data, plan, resume, the steps, checkpoints, export.

:func:`train` is the one entry point (Python API, ``fastsd train`` and ``accelerate launch``). Its
body reads top to bottom as the run goes: it validates the settings before loading anything,
loads the base model, caches class images, latents and token ids, plans memory and speed, resumes,
then runs the phases (text encoder, UNet, or both), saving resumable states and exports into the
session as it goes. The step's maths is :mod:`.step`, the images it renders :mod:`.sampling`, the
plan :mod:`.plan`, what trains :mod:`.parts`.

Speed rules followed in the step: no host-device synchronisation (the loss is accumulated on the
device and read every ``log_every`` steps), noise comes from a generator re-seeded per step (so
resuming needs no generator state and is exact), latents and frozen text embeddings are cached on
the device, and the VAE and frozen text encoders leave the GPU.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import FastsdError, UserInputError
from ..models.registry import FLOW_FAMILIES
from . import checkpoint, data, flow, gpuwarm, graph, memory, optim, sampling, step
from .config import TrainConfig, resolve
from .export import export_step
from .parts import BaseModel, TrainedParts, dtype_of, load_base, make_trainable, mark_phase, master_dtype, quantized
from .plan import TrainPlan, autotune, make_plan
from .ranks import distributed
from .scaler import DeviceScaler
from .tblog import TrainLog

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did: steps, speed, peak VRAM, files written, and why it stopped early (if it did)."""

    session: str
    steps: int
    total_steps: int
    seconds: float
    it_per_s: float
    peak_vram_gb: float | None
    final_loss: float | None
    checkpoints: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    stopped: str | None = None  # None: finished; else "interrupted", "nan", "oom"
    plan: TrainPlan | None = None
    #: seconds per phase of the whole command: load, cache, first_step, warmup, steps, checkpoint, sample, export
    timings: dict[str, float] = field(default_factory=dict)
    #: peak VRAM per phase ({"allocated_gb", "reserved_gb"}) and for the whole process ("process")
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the end of a run."""
        vram = f", peak VRAM {self.peak_vram_gb:.2f} GiB" if self.peak_vram_gb is not None else ""
        lines = [
            f"{'stopped' if self.stopped else 'finished'}: step {self.steps}/{self.total_steps} in "
            f"{self.seconds:.1f} s ({self.it_per_s:.2f} it/s{vram})"
            + (f", last loss {self.final_loss:.4f}" if self.final_loss is not None else "")
        ]
        if self.timings:
            lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        if self.memory.get("process"):
            p = self.memory["process"]
            lines.append(
                f"  whole-process peak VRAM: {p['allocated_gb']:.2f} GiB allocated, {p['reserved_gb']:.2f} reserved"
            )
        lines += [f"  checkpoint: {p}" for p in self.checkpoints[-1:]]
        lines += [f"  model: {p}" for p in self.models]
        if self.samples:
            lines.append(f"  samples: {len(self.samples)} images in {Path(self.samples[-1]).parent}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values (``fastsd train --json``)."""
        out = {k: v for k, v in vars(self).items()}
        out["samples"] = [str(s) for s in self.samples]
        out["plan"] = self.plan.to_dict() if self.plan is not None else {}
        return out


def train(
    session: Any,
    config: TrainConfig | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    on_sample: Callable[[int, list[Path]], Any] | None = None,
    on_log: Callable[[int, dict[str, Any]], Any] | None = None,
    on_models: Callable[[BaseModel], Any] | None = None,
    force: bool = False,
) -> TrainResult:
    """Fine-tune the session's base model on its images (full DreamBooth or LoRA), resumably.

    Args:
        session: a :class:`fastsd.session.Session` or a session name (opened under ``home``).
        config: settings; ``None`` for the defaults (the popular notebook's schedule).
        home: fastsd home for a session name.
        on_sample: ``callback(step, [paths])`` after sample images are saved.
        on_log: ``callback(step, {"loss", "lr", "it_per_s", "phase"})`` every ``log_every`` steps.
        on_models: ``callback(base_model)`` once the base model is loaded (its modules are the
            ones that train: read them after the run to inspect the trained weights).
        force: break the session's lock if another process holds it (``--force``).

    Returns:
        A :class:`TrainResult` (``stopped`` says why a run ended early).

    Raises:
        UserInputError: invalid settings or session contents (before any model loads).
        SessionLockedError: another process uses the session (a second training, an add...).
        FastsdError: CUDA out of memory (the last state is saved; the message says what to lower)
            or a NaN loss (the last good checkpoint is kept).

    Example:
        >>> from fastsd.train import train, TrainConfig
        >>> result = train("my_dog", TrainConfig(method="lora", unet_steps=800))
        >>> print(result.summary())
    """
    from ..session import Session

    if not isinstance(session, Session):
        session = Session.open(str(session), home)
    hooks = _Hooks(on_sample, on_log, on_models)
    # Rank 0 holds the session's lock for the whole run (a heartbeat thread keeps it fresh during long
    # steps), so a second training, an add or a 'session rm' is refused instead of racing the trainer;
    # data-parallel workers only read the session.
    main = int(os.environ.get("RANK", "0")) == 0
    lock = session.lock(force=force, command="fastsd train") if main else contextlib.nullcontext()
    with lock, gpuwarm.attention_restored():
        try:
            return _train(session, config or TrainConfig(), hooks)
        except torch.OutOfMemoryError as err:  # outside a step (caching, capture, sampling, export): one line too
            raise memory.oom_outside_steps(err) from None


@dataclass
class _Hooks:
    on_sample: Callable[[int, list[Path]], Any] | None = None
    on_log: Callable[[int, dict[str, Any]], Any] | None = None
    on_models: Callable[[BaseModel], Any] | None = None


@dataclass
class _Run:
    """What the loop and its checkpoint, sample and export helpers share (explicit state, not closures)."""

    session: Any
    c: TrainConfig
    models: BaseModel
    parts: TrainedParts
    data: step.StepData
    result: TrainResult
    meter: memory.PhaseMeter
    device: torch.device
    main: bool
    world: int
    total: int
    scaler: Any
    noise_gen: torch.Generator
    tlog: TrainLog | None = None
    text: step.TextCache = field(default_factory=step.TextCache)
    phase: str | None = None
    up: step.Update | None = None  # the phase's optimizer and what it trains
    runner: graph.GraphStep | None = None  # the phase's CUDA-graph step, when the plan has one
    last_loss: float | None = None
    saver: checkpoint.Saver = field(default_factory=checkpoint.Saver)  # periodic states written in the background


def _train(session: Any, config: TrainConfig, hooks: _Hooks) -> TrainResult:
    """The body of :func:`train`, run while holding the session's lock."""
    # ---- 1. settings, validated before anything heavy
    image_paths = session.images()
    c, facts = resolve(config, session_info=session.info, num_images=len(image_paths), home=session.path.parent.parent)
    rank, world, device = distributed(c.device)
    main = rank == 0
    dtype = dtype_of(c.precision)
    _check_precision(device, dtype)
    _device_settings(device)
    warming = gpuwarm.start_warmup(device, dtype)  # while the models load (a fresh machine's cold libraries)
    family = facts["family"]
    gpuwarm.training_attention(family)  # SD3/FLUX: no cuDNN attention (NaN gradients); undone when train() ends
    if c.scale_lr:
        factor = c.batch_size * c.grad_accum * world
        c.unet_lr, c.te_lr = c.unet_lr * factor, c.te_lr * factor
    phases = step.phases(c.te_steps, c.unet_steps, c.schedule)
    total = phases[-1][2]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # a captured step must not cache autocast's casts across the capture boundary (CUDA graph docs)
    graph_autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if main:
        recorded = {}
        if config.model:  # what the user asked for (sd15, hf:..., an absolute path), not the fetched folder
            from ..models.fetch import check_spec

            recorded["base_model"] = check_spec(str(config.model))
        session.update(family=family, **recorded)

    # ---- 2. models, and the class images of prior preservation
    meter = memory.PhaseMeter(device)
    meter.start("load")
    qlora = family in FLOW_FAMILIES and flow.wants_nf4(c.model, family, device, c.vram_budget_gb)
    models = load_base(c.model, family, dtype, full=c.method == "full", nf4=qlora, masters=master_dtype(c))
    if hooks.on_models is not None:
        hooks.on_models(models)
    meter.start("cache")
    prior_paths: list[Path] = []
    if c.prior_preservation:
        if main:
            prior_paths = sampling.class_images(session, models, c, device)
        if world > 1:
            torch.distributed.barrier()
            prior_paths = sampling.class_images(session, models, c, device)  # lists what rank 0 made

    # ---- 3. data: images, buckets, latents cached once; the VAE then leaves the GPU
    d, bucketed = _cache_data(session, models, c, image_paths, prior_paths, device, dtype)
    # SD3/FLUX: prompts embedded now, before the transformer takes the GPU (T5 and it never share it)
    text = step.encode_frozen_text(models, d, c.sample_prompts, device, autocast) if models.flow else None
    if models.flow:
        meter.start("load")  # the transformer loads now, T5 freed (FlowModel.transformer); phases add up
        models.denoiser  # noqa: B018 - the property loads it
        meter.start("cache")

    # ---- 4. trainable parts: LoRA adapters or fp32 masters; memory and speed plan
    parts = make_trainable(models, c)
    plan = make_plan(c, facts, models.denoiser, trainable=parts.count(), device=device, world=world,
                     bucketed=bucketed, scaler=scaler)  # fmt: skip
    if scaler is not None and (plan.cuda_graph or c.master_weights == "16bit"):
        # GradScaler's arithmetic with no host read (the graph can hold it), and fp16 gradients (GradScaler refuses them)
        scaler = DeviceScaler(device)
    plan.qlora = qlora
    if main:
        log.info("%s", plan.in_words(c, device.type))
    _place_unet(models.denoiser, device, plan.channels_last, c.compile)
    sched = models.noise_scheduler
    den = step.Denoiser(
        unet=models.denoiser,
        text_encoders=models.text_encoders if not models.flow else [],  # SD3/FLUX: cached prompts; T5 is freed
        family=family,
        alphas_cumprod=sched.alphas_cumprod.to(device) if not models.flow else torch.zeros(0),
        prediction=sched.config.get("prediction_type", "flow_matching"),
        num_timesteps=sched.config.num_train_timesteps,
        channels_last=plan.channels_last,
        offset_noise=c.offset_noise,
        min_snr_gamma=c.min_snr_gamma,
        prior_weight=c.prior_weight,
        flow=flow.settings_of(models) if models.flow else None,
    )

    # ---- 5. resume
    # the stochastic rounding's random bits: same seed, same run (a resume restores them); step -1: a seed no
    # step's noise generator gets
    if c.master_weights == "16bit":
        (torch.cuda.manual_seed if device.type == "cuda" else torch.manual_seed)(step.seed_for(c.seed, -1, 0, rank))
    start, resume_state = _resume(session, c, parts, scaler, device)
    if start >= total:
        raise UserInputError(
            f"the latest checkpoint is at step {start}, already at the end ({total} steps): raise --steps to continue"
        )
    if main:
        # Progress is what this run starts from: a fresh run from 0, a resume from its checkpoint.
        # Written only now, so a run that fails before its first step cannot read "step 4 of 2".
        session.update(progress={"step": start, "total_steps": total})

    # ---- 6. the loop
    result = TrainResult(session.name, start, total, 0.0, 0.0, None, None, plan=plan)
    result.timings, result.memory = meter.seconds, meter.peaks
    run = _Run(session, c, models, parts, d, result, meter, device, main, world, total, scaler, torch.Generator(device))
    run.tlog = TrainLog(main)
    if text is not None:  # SD3/FLUX: the prompts embedded before the transformer took the GPU
        run.text = text
    stop: dict[str, str | None] = {"reason": None}  # set by SIGTERM or a NaN loss
    old_handler = _on_sigterm(stop)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=f"train {session.name}", disable=not (main and c.progress))
    at = start  # the number of completed steps
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = autotune(total - start, plan.cuda_graph)
    gpuwarm.finish_warmup(warming)
    if device.type == "cuda":  # what caching left cached goes back: the steps allocate on their own stream
        gc.collect()
        torch.cuda.empty_cache()
    meter.start("first_step")
    t0 = time.perf_counter()
    t_log, steps_at_log = t0, start
    retried_oom = False
    up: step.Update | None = None
    runner: graph.GraphStep | None = None
    try:
        for phase, p_start, p_end in phases:
            if at >= p_end:
                continue
            _enter_phase(run, phase, plan, den, graph_autocast, autocast)
            up, runner = run.up, run.runner
            if resume_state is not None:
                # a state saved on a phase's last step belongs to that phase: the next one starts fresh
                if resume_state["state"].get("phase") == phase and optim.fits_saved(
                    resume_state["state"].get("optimizer"), resume_state["optimizer"], up.opt
                ):
                    up.opt.load_state_dict(resume_state["optimizer"])
                resume_state = None
            while at < p_end:
                if stop["reason"]:
                    break
                up.opt.set_lr(optim.lr_factor(at - p_start, p_end - p_start, c.lr_schedule, c.warmup_steps))
                try:
                    up.updating = up.opt.in_backward  # the in-backward optimizer updates as backward goes
                    for micro in range(c.grad_accum):
                        run.noise_gen.manual_seed(step.seed_for(c.seed, at, micro, rank))
                        inp = step.draw_inputs(
                            d, run.text, den, run.noise_gen, (at * c.grad_accum + micro) * world + rank
                        )
                        if runner is not None:
                            # a replay updates the weights as it goes; an eager warm-up step says when (graph_step)
                            up.updating = runner.captured
                            loss_sum += runner(inp.flat())  # forward, backward and optimizer step: one replay
                            continue
                        with autocast:
                            loss = step.loss_of(den, inp)
                        scaled = loss / c.grad_accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        loss_sum += loss.detach()
                    if not up.opt.in_backward and runner is None:
                        step.eager_update(up)
                    up.updating = False
                except torch.OutOfMemoryError:
                    if not retried_oom and at == start and c.gradient_checkpointing == "auto" and not up.updating:
                        # the estimate was too optimistic: checkpoint everything and try the step again
                        retried_oom = True
                        up.opt.zero_grad()
                        loss = None
                        torch.cuda.empty_cache()
                        plan.checkpointed_blocks = memory.apply_checkpointing(models.denoiser, 1.0)
                        plan.checkpoint_fraction = 1.0
                        log.warning("out of memory on the first step: retrying with full gradient checkpointing")
                        continue
                    raise memory.oom_error(
                        c, at, device, partial(_save_state, run) if not up.updating else None
                    ) from None
                loss_count += c.grad_accum
                at += 1
                bar.update(1)
                if at == start + 1:
                    meter.start("warmup")  # eager warm-up steps, then the graph capture
                elif at == start + 2 + graph.WARMUP_STEPS:
                    meter.start("steps")
                if at % c.log_every == 0 or at == p_end:
                    mean_loss = (loss_sum / max(1, loss_count)).item()  # the one sync, every log_every steps
                    loss_sum.zero_()
                    loss_count = 0
                    now = time.perf_counter()
                    rate = (at - steps_at_log) / max(1e-9, now - t_log)
                    t_log, steps_at_log = now, at
                    if not math.isfinite(mean_loss):
                        stop["reason"] = "nan"
                        break
                    run.last_loss = mean_loss
                    bar.set_postfix(loss=f"{mean_loss:.4f}", phase=phase)
                    info = {"loss": mean_loss, "lr": _current_lr(up.opt), "it_per_s": rate}
                    run.tlog.scalars(at, info)
                    if hooks.on_log is not None:
                        hooks.on_log(at, {**info, "phase": phase})
                if c.save_every and at % c.save_every == 0 and at < total:
                    _save_state(run, at, wait=False)  # written while the next steps run
                if c.sample_every and at % c.sample_every == 0 and at < total:  # the last step's: after the steps
                    _sample(run, hooks, at)
                if c.export_every and at % c.export_every == 0 and at < total:
                    _export(run, at)
            if stop["reason"]:
                break
    except KeyboardInterrupt:
        stop["reason"] = "interrupted"
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if run.saver.pending:  # a state in flight is listed before anything else
            with meter.phase("checkpoint"):
                run.saver.wait(raise_error=sys.exc_info()[1] is None)

    # ---- 7. finish: state, exports, summary
    del up, runner  # run.up / run.runner own them: _steps_over frees them before the images and the export
    meter.stop()
    result.seconds = time.perf_counter() - t0
    result.steps = at
    result.it_per_s = (at - start) / max(1e-9, result.seconds)
    result.final_loss = run.last_loss
    if stop["reason"] == "nan":
        result.stopped = "nan"
        last = session.latest_checkpoint()
        where = f"the last good state is checkpoint step {last['step']}" if last else "no checkpoint was saved yet"
        run.tlog.close(session.logs_dir)
        raise FastsdError(
            f"the loss became NaN/inf near step {at}: training stopped and nothing more was saved; {where} "
            "(resume with --resume and a lower --lr, or use --precision bf16/fp32)"
        )
    if stop["reason"] == "interrupted":
        result.stopped = "interrupted"
        if at > start and not (run.up is not None and run.up.updating):  # a half-updated model is not saved
            _save_state(run, at)
        log.info("interrupted at step %d: state saved; continue with --resume", at)
    else:
        if main and c.save_final and (not result.checkpoints or not result.checkpoints[-1].endswith(f"{at:06d}")):
            _save_state(run, at, wait=False)  # written while the images and the export are made
        _steps_over(run)
        if c.sample_every:
            _sample(run, hooks, at)
        _export(run, at)
        _finish_writing(run)
    meter.stop()
    loop_peaks = [meter.peaks[k]["allocated_gb"] for k in ("first_step", "warmup", "steps") if k in meter.peaks]
    result.peak_vram_gb = max(loop_peaks) if loop_peaks else None
    if meter.peaks:
        meter.peaks["process"] = meter.process_peak()
    plan.checkpoints_in_background = run.saver.in_background
    if run.runner is not None:
        plan.cuda_graph_captured = run.runner.captures > 0
        plan.cuda_graph_captures = run.runner.captures
        if run.runner.failed:
            plan.cuda_graph_failed = run.runner.failed[:300]
    run.tlog.close(session.logs_dir)
    if run.up is not None:
        run.up.opt.close()
    return result  # the caller shows result.summary() (the CLI on stdout, notebooks in the cell)


# ---- the story's chapters, in the order it calls them


def _device_settings(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN autotuning is off while caching (one-off VAE/text-encoder passes: trying every
        # algorithm costs more than it saves, and its workspaces once took 130 GiB of an idle H200);
        # the loop turns it on (see plan.autotune) when its steps are many enough to repay it.
        torch.backends.cudnn.benchmark = False


def _cache_data(
    session: Any,
    models: BaseModel,
    c: TrainConfig,
    image_paths: list[Path],
    prior_paths: list[Path],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[step.StepData, bool]:
    """Read the images into buckets, cache their latent distributions and token ids on the device."""
    captions = [session.caption(p) for p in image_paths]
    examples, bucketed = data.load_examples(image_paths, captions, c.resolution, c.buckets)
    if not examples:
        raise UserInputError("none of the session's images could be read: add JPEG/PNG photos to instance_images/")
    class_examples, _ = data.load_examples(prior_paths, [c.class_prompt or ""] * len(prior_paths), c.resolution, "off")
    vae_dtype = torch.float32 if (models.family in ("sdxl", *FLOW_FAMILIES) or device.type == "cpu") else dtype
    models.vae.to(device, vae_dtype)
    latents = data.encode_latent_dists(models.vae, examples, device, vae_dtype)
    class_latents = data.encode_latent_dists(models.vae, class_examples, device, vae_dtype)
    models.vae.to("cpu")
    for ex in [*examples, *class_examples]:
        ex.image = None
    r = c.resolution
    d = step.StepData(
        latents=latents,
        class_latents=class_latents,
        order=data.BatchOrder([ex.size for ex in examples], c.batch_size, c.seed),
        token_ids=[data.tokenize(tok, [ex.caption for ex in examples]).to(device) for tok in models.tokenizers],
        class_ids=[data.tokenize(tok, [c.class_prompt or ""]).to(device) for tok in models.tokenizers],
        time_ids=torch.tensor([[h, w, 0, 0, h, w] for (w, h) in (ex.size for ex in examples)], device=device),
        class_time_ids=torch.tensor([[r, r, 0, 0, r, r]], device=device),
        batch_size=c.batch_size,
        captions=[ex.caption for ex in examples],
        class_prompt=c.class_prompt or "",
    )
    return d, bucketed


def _place_unet(unet: Any, device: torch.device, channels_last: bool, compile_mode: str) -> None:
    """The denoiser (UNet or SD3/FLUX transformer) onto the training device, in the planned layout, compiled as asked."""
    if not quantized(unet):  # an NF4 transformer is loaded on the GPU already
        unet.to(device)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_mode != "off":
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
        if compile_mode == "full":
            unet.compile()
        else:
            for m in unet.modules():
                if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D"):
                    m.compile()


def _resume(
    session: Any, c: TrainConfig, parts: TrainedParts, scaler: Any, device: torch.device
) -> tuple[int, dict[str, Any] | None]:
    """(first step, the loaded state) from the latest complete checkpoint with ``--resume``; (0, None) otherwise."""
    if not c.resume:
        return 0, None
    found = checkpoint.latest(session)
    if found is None:
        log.info("no complete checkpoint in session %s: starting from step 0", session.name)
        return 0, None
    _, folder = found
    state = checkpoint.load(folder, device)
    start = int(state["state"]["step"])
    parts.trained = set(state["state"]["trained"])
    parts.load(state["weights"])
    # the noise generator lives on the training device (its state has that device's layout: a CPU
    # generator refuses a CUDA state); each step reseeds it, so this copy only checks the state
    checkpoint.restore_rng(state["rng"], state["state"]["rng"], torch.Generator(device))
    if scaler is not None and state["state"].get("scaler"):
        scaler.load_state_dict(state["state"]["scaler"])
    log.info("resuming session %s from step %d", session.name, start)
    return start, state


def _check_precision(device: torch.device, dtype: torch.dtype) -> None:
    """fp16 training is refused on the CPU (slow there, and not what the CPU preset's users mean to ask for).

    Raises:
        UserInputError: fp16 on a CPU device.
    """
    if device.type == "cpu" and dtype == torch.float16:
        raise UserInputError("fp16 training needs a CUDA GPU: use --precision fp32 or bf16 on the CPU")


def _on_sigterm(stop: dict[str, str | None]) -> Any:
    """SIGTERM (a Colab runtime stopping, ``kill``) ends the run like Ctrl-C; the old handler, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigterm(signum: int, frame: Any) -> None:
        stop["reason"] = "interrupted"

    return signal.signal(signal.SIGTERM, on_sigterm)


def _enter_phase(run: _Run, name: str, plan: TrainPlan, den: step.Denoiser, graph_autocast: Any, autocast: Any) -> None:
    """Mark what trains in this phase, build its optimizer (and graph step), cache what is frozen for good."""
    run.phase = name
    if run.up is not None:
        run.up.opt.close()
    if run.runner is not None:  # the last phase's graph: free its pool (and the gradients living there)
        run.up.clear_grads()
        run.runner = None
    c, device = run.c, run.device
    groups = mark_phase(run.parts, name, c.unet_lr, c.te_lr)
    trainables = [p for ps, _ in groups for p in ps]
    in_backward = plan.fused_backward and all(p.requires_grad for p in trainables)
    opt = optim.make_optim(plan.optimizer, groups, in_backward, device_lr=plan.cuda_graph)
    run.up = step.Update(opt, trainables, c.max_grad_norm, device.type == "cuda", run.scaler, run.world)
    if plan.cuda_graph:
        step_fn = partial(step.graph_step, den, run.up, graph_autocast)
        run.runner = graph.GraphStep(step_fn, run.up.clear_grads, capture=device.type == "cuda")
    if name in ("te", "joint"):
        run.text = step.TextCache()
        run.models.text_encoders_to(device)
    elif not run.text.frozen:  # text encoders are frozen from here on: embed every caption once, then offload them
        run.text = step.encode_frozen_text(run.models, run.data, c.sample_prompts, device, autocast)


def _save_state(run: _Run, at: int, wait: bool = True) -> None:
    """A resumable checkpoint of step ``at`` into the session (rank 0), then TensorBoard's logs.

    ``wait=False`` (the periodic saves) lets :class:`~fastsd.train.checkpoint.Saver` write it on a
    thread while training goes on; the bookkeeping below then runs once it is listed.
    """
    if not run.main:
        return
    c, opt = run.c, run.up.opt if run.up is not None else None

    def listed(entry: dict[str, Any]) -> None:
        run.result.checkpoints.append(str(run.session.path / entry["path"]))
        run.session.update(progress={"step": entry["step"], "total_steps": run.total})
        run.tlog.sync(run.session.logs_dir)

    with run.meter.phase("checkpoint"):
        run.saver.save(
            run.session,
            at,
            c.keep_checkpoints,
            weights=run.parts.weights(),
            optimizer=opt.state_dict() if opt is not None else {},
            state={
                "step": at,
                "trained": sorted(run.parts.trained),
                "phase": run.phase,
                "optimizer": {"kind": opt.kind, "in_backward": opt.in_backward} if opt is not None else None,
                "config": c.to_dict(),
                "data_order": run.data.order.state(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                "lr_schedule": {"kind": c.lr_schedule, "warmup": c.warmup_steps, "step": at},
                "loss": run.last_loss,
            },
            noise_gen=run.noise_gen,
            on_listed=listed,
            wait=wait,
        )


def _steps_over(run: _Run) -> None:
    """No step follows: the graph's pool, the gradients and the optimizer's state leave the GPU.

    The last state is saved (or handed to the writer as a host copy) by now, so the final images
    and the export run in the memory the steps held (a full SD1.5 state in fused AdamW: 6.4 GB).
    """
    if run.runner is not None:
        run.runner.release()
    if run.up is not None:
        run.up.clear_grads()
        run.up.opt.close()
        run.up = None
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def _between_steps(run: _Run) -> None:
    """Before images or an export in the middle of a run: release the graph's pool when the budget has no room beside it."""
    if run.runner is not None and not run.result.plan.images_beside_graph:
        run.runner.release()  # the next step captures again (about a second)


def _sample(run: _Run, hooks: _Hooks, at: int) -> None:
    if not run.main or not run.c.sample_prompts:
        return
    _between_steps(run)
    with run.meter.phase("sample"):
        paths = sampling.sample_images(run.session, run.models, run.c, at, run.text, run.device)
    run.result.samples.extend(paths)
    if hooks.on_sample is not None:
        hooks.on_sample(at, paths)


def _export(run: _Run, at: int) -> None:
    """The model of step ``at`` into the session, written while a state in flight finishes (listed after it)."""
    if not run.main or not run.c.export:
        return
    _between_steps(run)
    with run.meter.phase("export"):
        file = export_step(run.session, run.models, run.c, at, run.device, te_trained=run.parts.te_train,
                           te_frozen=run.text.frozen, before_record=partial(_finish_writing, run))  # fmt: skip
    run.result.models.append(file)


def _finish_writing(run: _Run) -> None:
    """Wait for the state in flight (timed as checkpointing) and list it: the session's manifest has one writer."""
    if run.saver.pending:
        with run.meter.phase("checkpoint"):
            run.saver.wait()


def _current_lr(opt: Any) -> float:
    groups = opt.opt.param_groups if hasattr(opt, "opt") else opt.opts[0].param_groups
    return float(groups[0]["lr"])
