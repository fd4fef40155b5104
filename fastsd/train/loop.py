"""The DreamBooth training loop: setup, data, models, optimizer, loop, checkpoints, export — top to bottom.

:func:`train` is the one entry point (Python API, ``fastsd train`` and ``accelerate launch``). Read it
in order: it validates the settings before loading anything, loads the base model, prepares
class images and caches, then runs the phases (text encoder, UNet, or both), saving resumable
states and exports into the session as it goes.

Speed rules followed in the step: no host-device synchronisation (the loss is accumulated on the
device and read every ``log_every`` steps), noise comes from a generator re-seeded per step (so
resuming needs no generator state and is exact), latents and frozen text embeddings are cached on
the device, and the VAE and frozen text encoders leave the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import storage
from ..errors import FastsdError, UserInputError
from . import checkpoint, data, memory, optim
from .config import TrainConfig, resolve

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
    plan: dict[str, Any] = field(default_factory=dict)
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


class _Models:
    """The base model's parts, as training uses them."""

    def __init__(self, folder: str, family: str, dtype: torch.dtype, full: bool):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.family = family
        self.folder = folder
        # trained parts keep fp32 masters; frozen parts are loaded straight in the compute dtype (RAM on Colab)
        self.unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=torch.float32 if full else dtype
        )
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        self.tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        self.text_encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)]
        if family == "sdxl":
            self.tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
            self.text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=dtype)
            )
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.requires_grad_(False)

    @property
    def te_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]

    def components(self) -> dict[str, Any]:
        """Name -> trainable-capable module, as in a Diffusers folder."""
        return {"unet": self.unet, **dict(zip(self.te_names, self.text_encoders, strict=True))}

    def pipeline(self, with_text_encoders: bool = True) -> Any:
        """A Diffusers pipeline over these modules (text encoders left out when they are offloaded)."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        sched = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        tes = self.text_encoders if with_text_encoders else [None] * len(self.text_encoders)
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=tes[0],
                text_encoder_2=tes[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=self.unet,
                scheduler=sched,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=tes[0],
            tokenizer=self.tokenizers[0],
            unet=self.unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def _phases(c: TrainConfig) -> list[tuple[str, int, int]]:
    """(name, first step, end step): ``te`` / ``unet`` phases in sequence, or ``joint`` then ``unet``."""
    te, un = c.te_steps, c.unet_steps
    if te == 0:
        return [("unet", 0, un)]
    if c.schedule == "sequential":
        return [("te", 0, te), ("unet", te, te + un)]
    if te >= un:
        return [("joint", 0, un)]
    return [("joint", 0, te), ("unet", te, un)]


def _dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def _seed_for(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 4099 + micro * 131 + rank * 17) % (2**63 - 1)


def _distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group that ``accelerate launch``/torchrun describe."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _allreduce_grads(params: list[torch.Tensor], world: int, bucket_bytes: int = 64 * 2**20) -> None:
    """Average gradients over data-parallel ranks, in flat buckets (one collective per ~64 MB)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [*grads, None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            torch.distributed.all_reduce(flat)
            flat /= world
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                dst.copy_(src)
            bucket, size = [], 0


def _generate_class_images(session: Any, models: _Models, c: TrainConfig, device: torch.device) -> list[Path]:
    """Class images for prior preservation: generate the missing ones with the base model, reuse the rest."""
    from .. import storage

    folder = session.class_images_dir(c.class_prompt)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    missing = c.num_class_images - len(existing)
    if missing > 0:
        log.info("generating %d class images for %r (kept and reused in %s)", missing, c.class_prompt, folder)
        pipe = models.pipeline().to(device)
        pipe.set_progress_bar_config(disable=True)
        dtype = _dtype(c.precision)
        start = len(existing)
        for k in range(start, c.num_class_images):
            gen = torch.Generator(device).manual_seed(c.seed * 7919 + k)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                image = pipe(
                    c.class_prompt,
                    num_inference_steps=c.sample_steps,
                    height=c.resolution,
                    width=c.resolution,
                    generator=gen,
                ).images[0]
            import io

            buf = io.BytesIO()
            image.save(buf, format="PNG")
            storage.write_bytes(folder / f"class-{k:05d}.png", buf.getvalue())
        models.unet.to("cpu")
        for te in models.text_encoders:
            te.to("cpu")
        existing = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    return existing[: c.num_class_images]


def train(
    session: Any,
    config: TrainConfig | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    on_sample: Any = None,
    on_log: Any = None,
    force: bool = False,
) -> TrainResult:
    """Fine-tune the session's base model on its images (full DreamBooth or LoRA), resumably.

    Args:
        session: a :class:`fastsd.session.Session` or a session name (opened under ``home``).
        config: settings; ``None`` for the defaults (the popular notebook's schedule).
        home: fastsd home for a session name.
        on_sample: ``callback(step, [paths])`` after sample images are saved.
        on_log: ``callback(step, {"loss", "lr", "it_per_s"})`` every ``log_every`` steps.
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
    if int(os.environ.get("RANK", "0")) != 0:
        # data-parallel workers only read the session; rank 0 writes it and holds its lock
        return _train(session, config, on_sample, on_log)
    # The lock is held for the whole run (a heartbeat thread keeps it fresh during long steps),
    # so a second training, an add or a 'session rm' is refused instead of racing the trainer.
    with session.lock(force=force, command="fastsd train"):
        return _train(session, config, on_sample, on_log)


def _train(session: Any, config: TrainConfig | None, on_sample: Any, on_log: Any) -> TrainResult:
    """The body of :func:`train`, run while holding the session's lock."""
    # ---- 1. settings, validated before anything heavy
    config = config or TrainConfig()
    image_paths = session.images()
    c, facts = resolve(config, session_info=session.info, num_images=len(image_paths), home=session.path.parent.parent)
    rank, world, device = _distributed(c.device)
    main = rank == 0
    dtype = _dtype(c.precision)
    if device.type == "cpu" and dtype == torch.float16:
        raise UserInputError("fp16 training needs a CUDA GPU: use --precision fp32 or bf16 on the CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN autotuning is off while caching (one-off VAE/text-encoder passes: trying every
        # algorithm costs more than it saves, and its workspaces once took 130 GiB of an idle H200);
        # the loop turns it on (see _autotune) when its steps are many enough to repay it.
        torch.backends.cudnn.benchmark = False
    family = facts["family"]
    full = c.method == "full"
    if c.scale_lr:
        factor = c.batch_size * c.grad_accum * world
        c.unet_lr, c.te_lr = c.unet_lr * factor, c.te_lr * factor
    phases = _phases(c)
    total = phases[-1][2]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if main:
        recorded = {}
        if config.model:  # what the user asked for (sd15, hf:..., an absolute path), not the fetched folder
            from ..models.fetch import check_spec

            recorded["base_model"] = check_spec(str(config.model))
        session.update(family=family, **recorded)

    # ---- 2. models
    meter = memory.PhaseMeter(device)
    meter.start("load")
    models = _Models(c.model, family, dtype, full)
    meter.start("cache")
    prior_paths: list[Path] = []
    if c.prior_preservation:
        if main:
            prior_paths = _generate_class_images(session, models, c, device)
        if world > 1:
            torch.distributed.barrier()
            prior_paths = _generate_class_images(session, models, c, device)  # lists what rank 0 made

    # ---- 3. data: images, buckets, latents cached once; the VAE then leaves the GPU
    captions = [session.caption(p) for p in image_paths]
    examples, bucketed = data.load_examples(image_paths, captions, c.resolution, c.buckets)
    if not examples:
        raise UserInputError("none of the session's images could be read: add JPEG/PNG photos to instance_images/")
    class_examples, _ = data.load_examples(prior_paths, [c.class_prompt or ""] * len(prior_paths), c.resolution, "off")
    vae_dtype = torch.float32 if (family == "sdxl" or device.type == "cpu") else dtype
    models.vae.to(device, vae_dtype)
    latents = data.encode_latent_dists(models.vae, examples, device, vae_dtype)
    class_latents = data.encode_latent_dists(models.vae, class_examples, device, vae_dtype)
    models.vae.to("cpu")
    for ex in [*examples, *class_examples]:
        ex.image = None
    order = data.BatchOrder([ex.size for ex in examples], c.batch_size, c.seed)
    token_ids = [data.tokenize(tok, [ex.caption for ex in examples]).to(device) for tok in models.tokenizers]
    class_ids = [data.tokenize(tok, [c.class_prompt or ""]).to(device) for tok in models.tokenizers]
    time_ids = torch.tensor([[h, w, 0, 0, h, w] for (w, h) in (ex.size for ex in examples)], device=device)
    class_time_ids = torch.tensor([[c.resolution, c.resolution, 0, 0, c.resolution, c.resolution]], device=device)

    # ---- 4. trainable parts: LoRA adapters or fp32 masters; memory plan; speed settings
    comps = models.components()
    te_train = c.te_steps > 0
    lora_params: dict[str, list[torch.nn.Parameter]] = {}
    if not full:
        from .lora import add_lora

        lora_params["unet"] = add_lora(models.unet, c.lora_rank, c.lora_alpha, "unet", seed=c.seed)
        if te_train:
            for k, (name, te) in enumerate(zip(models.te_names, models.text_encoders, strict=True)):
                lora_params[name] = add_lora(te, c.lora_rank, c.lora_alpha, "text", seed=c.seed + 1 + k)
    elif te_train:
        models.text_encoders[0].float()  # fp32 master

    def params_of(name: str) -> list[torch.nn.Parameter]:
        return lora_params.get(name, []) if not full else list(comps[name].parameters())

    unet_trainable = sum(p.numel() for p in params_of("unet"))
    te_trainable = sum(p.numel() for n in models.te_names for p in params_of(n)) if te_train else 0
    frozen_bytes = sum(p.numel() * p.element_size() for p in models.unet.parameters() if not full)
    allow_in_backward = scaler is None and c.grad_accum == 1 and world == 1
    pixels = (c.resolution / facts["native_resolution"]) ** 2
    family_key = "sd2-v" if facts["native_resolution"] == 768 else family
    plan = memory.plan(
        budget_gb=c.vram_budget_gb if device.type == "cuda" else None,
        family_key=family_key,
        pixels_ratio=pixels,
        batch=c.batch_size * (2 if c.prior_preservation else 1),
        trainable=unet_trainable + te_trainable,
        frozen_bytes=frozen_bytes,
        optimizer=c.optimizer,
        low_precision=dtype != torch.float32,
        allow_in_backward=allow_in_backward,
        checkpointing=c.gradient_checkpointing,
        fused_backward=c.fused_backward,
    )
    plan["checkpointed_blocks"] = memory.apply_checkpointing(models.unet, plan["checkpoint_fraction"])
    plan["optimizer"] = optim.resolve_kind(c.optimizer, device)
    plan["precision"] = c.precision
    plan["bucketed"] = bucketed
    from . import graph

    use_graph = graph.decide(
        c.cuda_graph,
        graph.blockers(
            device=device,
            precision=c.precision,
            grad_accum=c.grad_accum,
            world=world,
            bucketed=bucketed,
            optimizer=plan["optimizer"],
        ),
    )
    plan["cuda_graph"] = use_graph
    # a captured step must not cache autocast's casts across the capture boundary (CUDA graph docs)
    graph_autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)
    channels_last = c.channels_last
    if channels_last and c.compile == "blocks":
        # compiled blocks + channels_last weights crashed on the H100 (inductor's stride asserts
        # saw contiguous weights); compiling the whole UNet handles the layout, blocks do not
        channels_last = False
        log.info("channels_last is off with compile=blocks")
    plan["channels_last"] = channels_last
    if main:
        log.info("%s", plan_in_words(plan, c, device.type))
    models.unet.to(device)
    if channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if c.compile != "off":
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
        if c.compile == "full":
            models.unet.compile()
        else:
            for m in models.unet.modules():
                if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D"):
                    m.compile()
    alphas_cumprod = models.noise_scheduler.alphas_cumprod.to(device)
    prediction = models.noise_scheduler.config.prediction_type
    num_t = models.noise_scheduler.config.num_train_timesteps

    # ---- 5. resume
    trained: set[str] = set()
    start = 0
    resume_state: dict[str, Any] | None = None
    if c.resume:
        found = checkpoint.latest(session)
        if found is None:
            log.info("no complete checkpoint in session %s: starting from step 0", session.name)
        else:
            entry, folder = found
            resume_state = checkpoint.load(folder, device)
            start = int(resume_state["state"]["step"])
            trained = set(resume_state["state"]["trained"])
            for name, module in comps.items():
                part = {k[len(name) + 1 :]: v for k, v in resume_state["weights"].items() if k.split(".", 1)[0] == name}
                if part:
                    with torch.no_grad():
                        own = dict(module.named_parameters())
                        for k, v in part.items():
                            own[k].copy_(v)
            checkpoint.restore_rng(resume_state["rng"], resume_state["state"]["rng"], torch.Generator())
            if scaler is not None and resume_state["state"].get("scaler"):
                scaler.load_state_dict(resume_state["state"]["scaler"])
            log.info("resuming session %s from step %d", session.name, start)
    if start >= total:
        raise UserInputError(
            f"the latest checkpoint is at step {start}, already at the end ({total} steps): raise --steps to continue"
        )
    if main:
        # Progress is what this run starts from: a fresh run from 0, a resume from its checkpoint.
        # Written only now, so a run that fails before its first step cannot read "step 4 of 2".
        session.update(progress={"step": start, "total_steps": total})

    # ---- 6. the loop
    # TensorBoard appends to its event files, which Drive must never see: they are written to a
    # local scratch folder named by its owner (a killed run's is cleaned up by the next one) and
    # copied into the session with every checkpoint.
    logdir = storage.temp_name(Path(tempfile.gettempdir()) / "tensorboard", "train")
    logdir.mkdir(mode=0o700)
    writer = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(logdir))
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard logs")
    stop = {"reason": None}
    old_handler = None
    if threading.current_thread() is threading.main_thread():

        def on_sigterm(signum: int, frame: Any) -> None:
            stop["reason"] = "interrupted"

        old_handler = signal.signal(signal.SIGTERM, on_sigterm)

    result = TrainResult(session.name, start, total, 0.0, 0.0, None, None, plan=plan)
    result.timings, result.memory = meter.seconds, meter.peaks
    noise_gen = torch.Generator(device)
    cache: dict[str, Any] = {}
    opt: Any = None
    current = {"phase": None}
    trainables: list[torch.nn.Parameter] = []
    runner: Any = None  # graph.GraphStep when the step is a CUDA graph replay
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    last_loss: float | None = None

    def set_phase(name: str) -> None:
        """Mark what trains in this phase, build its optimizer, and cache what is frozen for good."""
        nonlocal opt, trainables, runner
        current["phase"] = name
        if opt is not None:
            opt.close()
        if runner is not None:  # the last phase's graph: free its pool (and the gradients living there)
            clear_grads()
            runner = None
        train_unet = name in ("unet", "joint")
        train_te = name in ("te", "joint")
        for comp in comps:
            is_te = comp != "unet"
            on = train_te if is_te else train_unet
            for p in params_of(comp) if (is_te and te_train) or not is_te else []:
                p.requires_grad_(on)
            if on:
                trained.add(comp)
        groups = [(params_of("unet"), c.unet_lr)] if train_unet else []
        if train_te:
            groups.append(([p for n in models.te_names for p in params_of(n)], c.te_lr))
        trainables = [p for ps, _ in groups for p in ps]
        in_backward = plan["fused_backward"] and all(p.requires_grad for p in trainables)
        opt = optim.make_optim(plan["optimizer"], groups, in_backward, device_lr=use_graph)
        if use_graph:
            from .graph import GraphStep

            runner = GraphStep(graph_step, clear_grads, capture=device.type == "cuda")
        cache.clear()
        if train_te:
            for te in models.text_encoders:
                te.to(device)
        else:
            # text encoders are frozen from here on: embed every caption once, then offload them
            with torch.no_grad(), autocast:
                for te in models.text_encoders:
                    te.to(device)
                cache["inst"] = data.encode_text(models.text_encoders, token_ids, family)
                cache["class"] = data.encode_text(models.text_encoders, class_ids, family)
                if c.sample_prompts:
                    prompts = list(c.sample_prompts)
                    ids = [data.tokenize(tok, prompts).to(device) for tok in models.tokenizers]
                    neg = [data.tokenize(tok, [""] * len(prompts)).to(device) for tok in models.tokenizers]
                    cache["sample"] = data.encode_text(models.text_encoders, ids, family)
                    cache["sample_neg"] = data.encode_text(models.text_encoders, neg, family)
            for te in models.text_encoders:
                te.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def draw_inputs(global_batch: int) -> dict[str, torch.Tensor]:
        """Everything random or data-dependent in a step, as tensors (a CUDA graph copies them in).

        Random draws come from ``noise_gen`` in a fixed order (instance latent sample, noise, offset
        noise, timesteps, then the same for the class batch), so eager and graph steps see the same values.
        """
        idx = order.batch(global_batch)
        inp: dict[str, torch.Tensor] = {}
        _draw(inp, "", torch.stack([latents[i] for i in idx]))
        _cond_inputs(inp, "", idx, False)
        inp["tids"] = _pick(time_ids, idx)
        if class_latents:
            n = len(class_latents)
            cidx = [(global_batch * c.batch_size + j) % n for j in range(c.batch_size)]
            _draw(inp, "c_", torch.stack([class_latents[i] for i in cidx]))
            _cond_inputs(inp, "c_", cidx, True)
            inp["c_tids"] = class_time_ids.expand(len(cidx), -1).contiguous()
        return inp

    def _draw(inp: dict[str, torch.Tensor], pre: str, lat_dists: torch.Tensor) -> None:
        mean, std = lat_dists[:, 0], lat_dists[:, 1]
        b = mean.shape[0]
        inp[pre + "lat"] = mean + std * torch.randn(mean.shape, generator=noise_gen, device=device)
        noise = torch.randn(mean.shape, generator=noise_gen, device=device)
        if c.offset_noise:
            noise = noise + c.offset_noise * torch.randn((b, mean.shape[1], 1, 1), generator=noise_gen, device=device)
        inp[pre + "noise"] = noise
        inp[pre + "t"] = torch.randint(0, num_t, (b,), generator=noise_gen, device=device)

    def _cond_inputs(inp: dict[str, torch.Tensor], pre: str, idx: list[int], is_class: bool) -> None:
        if "inst" in cache:  # frozen text encoders: cached embeddings
            src = cache["class"] if is_class else cache["inst"]
            pick = [0] * len(idx) if is_class else idx
            for k, v in src.items():
                if v is not None:
                    inp[f"{pre}cond.{k}"] = _pick(v, pick)
        else:  # trained text encoders: token ids, encoded inside the step
            for k, t in enumerate(class_ids if is_class else token_ids):
                inp[f"{pre}ids{k}"] = _pick(t, [0] * len(idx) if is_class else idx)

    def condition(inp: dict[str, torch.Tensor], pre: str) -> dict[str, torch.Tensor]:
        if "inst" in cache:
            n = len(pre) + 5
            return {k[n:]: v for k, v in inp.items() if k.startswith(pre + "cond.")}
        ids = [inp[f"{pre}ids{k}"] for k in range(len(token_ids))]
        return data.encode_text(models.text_encoders, ids, family)

    def per_sample_loss(inp: dict[str, torch.Tensor], pre: str) -> torch.Tensor:
        lat, noise, t, tids = inp[pre + "lat"], inp[pre + "noise"], inp[pre + "t"], inp[pre + "tids"]
        cond = condition(inp, pre)
        b = lat.shape[0]
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        extra = {"added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": tids}} if family == "sdxl" else {}
        pred = models.unet(noisy, t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False, **extra)[0]
        target = a.sqrt() * noise - (1 - a).sqrt() * lat if prediction == "v_prediction" else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if c.min_snr_gamma:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            weight = snr.clamp(max=c.min_snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)
            loss = loss * weight
        return loss

    def loss_of(inp: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's loss from its drawn inputs: no randomness, no host syncs (graph-capturable)."""
        loss = per_sample_loss(inp, "").mean()
        if "c_lat" in inp:
            loss = loss + c.prior_weight * per_sample_loss(inp, "c_").mean()
        return loss

    def graph_step(inp: dict[str, torch.Tensor]) -> torch.Tensor:
        """One whole optimizer step (bf16/fp32, no scaler, no accumulation): what a CUDA graph captures."""
        with graph_autocast:
            loss = loss_of(inp)
        loss.backward()
        if not opt.in_backward:
            if c.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainables, c.max_grad_norm, foreach=device.type == "cuda")
            opt.step()
        return loss.detach()

    def clear_grads() -> None:
        for p in trainables:
            p.grad = None

    def trained_weights() -> dict[str, torch.Tensor]:
        out = {}
        for name in sorted(trained):
            for n, p in comps[name].named_parameters():
                if full or "lora_" in n:
                    out[f"{name}.{n}"] = p
        return out

    def save_state(step: int) -> None:
        if not main:
            return
        with meter.phase("checkpoint"):
            _save_state(step)

    def _save_state(step: int) -> None:
        entry = checkpoint.save_to_session(
            session,
            step,
            c.keep_checkpoints,
            weights=trained_weights(),
            optimizer=opt.state_dict() if opt is not None else {},
            state={
                "step": step,
                "trained": sorted(trained),
                "phase": current["phase"],
                "config": c.to_dict(),
                "data_order": order.state(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "lr_schedule": {"kind": c.lr_schedule, "warmup": c.warmup_steps, "step": step},
                "loss": last_loss,
            },
            noise_gen=noise_gen,
        )
        result.checkpoints.append(str(session.path / entry["path"]))
        session.update(progress={"step": step, "total_steps": total})
        if writer is not None:
            _sync_logs(writer, logdir, session.logs_dir)

    def export(step: int) -> None:
        if not main or not c.export:
            return
        with meter.phase("export"):
            _export(step)

    def _export(step: int) -> None:
        from .export import export_full, export_lora

        stem = f"{session.name}-{'lora-' if not full else ''}step-{step}"
        dst = session.models_dir / f"{stem}.safetensors"
        if full:
            for te in models.text_encoders:
                te.to(device)
            models.vae.to(device)
            with _eager():
                export_full(models.pipeline(), dst, metadata={"fastsd_session": session.name, "step": str(step)})
            models.vae.to("cpu")
            if "inst" in cache:
                for te in models.text_encoders:
                    te.to("cpu")
            result.models.append(str(session.record_model(dst, kind="full", step=step)["file"]))
        else:
            parts = {n: comps[n] for n in ["unet", *(models.te_names if te_train else [])]}
            export_lora(parts, dst, rank=c.lora_rank, alpha=c.lora_alpha, family=family)
            result.models.append(str(session.record_model(dst, kind="lora", step=step)["file"]))

    def sample(step: int) -> list[Path]:
        if not main or not c.sample_prompts:
            return []
        with meter.phase("sample"):
            return _sample(step)

    def _sample(step: int) -> list[Path]:
        from .. import storage

        models.vae.to(device)
        pipe = models.pipeline(with_text_encoders="inst" not in cache)
        pipe.set_progress_bar_config(disable=True)
        paths = []
        for pi, prompt in enumerate(c.sample_prompts):
            for seed in c.sample_seeds:
                kwargs: dict[str, Any] = {}
                if "sample" in cache:
                    s, n = cache["sample"], cache["sample_neg"]
                    kwargs = {"prompt_embeds": s["prompt_embeds"][pi : pi + 1].to(dtype)}
                    kwargs["negative_prompt_embeds"] = n["prompt_embeds"][pi : pi + 1].to(dtype)
                    if family == "sdxl":
                        kwargs["pooled_prompt_embeds"] = s["pooled"][pi : pi + 1].to(dtype)
                        kwargs["negative_pooled_prompt_embeds"] = n["pooled"][pi : pi + 1].to(dtype)
                else:
                    kwargs = {"prompt": prompt}
                gen = torch.Generator(device).manual_seed(seed)
                with torch.no_grad(), _eager(), autocast:
                    lat = pipe(
                        **kwargs,
                        num_inference_steps=c.sample_steps,
                        height=c.resolution,
                        width=c.resolution,
                        generator=gen,
                        output_type="latent",
                    ).images
                with torch.no_grad():  # decode outside autocast: the SDXL VAE overflows in fp16
                    image = models.vae.decode(lat.to(models.vae.dtype) / models.vae.config.scaling_factor).sample
                image = pipe.image_processor.postprocess(image.float(), output_type="pil")[0]
                import io

                buf = io.BytesIO()
                image.save(buf, format="PNG")
                path = session.samples_dir / f"step-{step:06d}-p{pi}-s{seed}.png"
                storage.write_bytes(path, buf.getvalue())
                paths.append(path)
        models.vae.to("cpu")
        result.samples.extend(paths)
        if on_sample is not None:
            on_sample(step, paths)
        return paths

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=f"train {session.name}", disable=not (main and c.progress))
    step = start
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = _autotune(total - start, use_graph)
    meter.start("first_step")
    t0 = time.perf_counter()
    t_log = t0
    steps_at_log = start
    mid_update = False
    retried_oom = False
    try:
        for phase, p_start, p_end in phases:
            if step >= p_end:
                continue
            set_phase(phase)
            if resume_state is not None:
                # a state saved on a phase's last step belongs to that phase: the next one starts fresh
                if resume_state["state"].get("phase") == phase:
                    opt.load_state_dict(resume_state["optimizer"])
                resume_state = None
            while step < p_end:
                if stop["reason"]:
                    break
                opt.set_lr(optim.lr_factor(step - p_start, p_end - p_start, c.lr_schedule, c.warmup_steps))
                try:
                    mid_update = opt.in_backward or runner is not None  # a graph step updates as it goes
                    for micro in range(c.grad_accum):
                        noise_gen.manual_seed(_seed_for(c.seed, step, micro, rank))
                        inp = draw_inputs((step * c.grad_accum + micro) * world + rank)
                        if runner is not None:
                            loss_sum += runner(inp)  # forward, backward and optimizer step: one replay
                            continue
                        with autocast:
                            loss = loss_of(inp)
                        scaled = loss / c.grad_accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        loss_sum += loss.detach()
                    if not opt.in_backward and runner is None:
                        mid_update = True
                        if world > 1:
                            _allreduce_grads(trainables, world)
                        if scaler is not None:
                            scaler.unscale_(opt.opt)
                        if c.max_grad_norm:
                            torch.nn.utils.clip_grad_norm_(trainables, c.max_grad_norm, foreach=device.type == "cuda")
                        opt.step(scaler)
                        if scaler is not None:
                            scaler.update()
                        opt.zero_grad()
                    mid_update = False
                except torch.OutOfMemoryError as err:
                    if not retried_oom and step == start and c.gradient_checkpointing == "auto" and not mid_update:
                        # the estimate was too optimistic: checkpoint everything and try the step again
                        retried_oom = True
                        opt.zero_grad()
                        loss = None
                        torch.cuda.empty_cache()
                        plan["checkpointed_blocks"] = memory.apply_checkpointing(models.unet, 1.0)
                        plan["checkpoint_fraction"] = 1.0
                        log.warning("out of memory on the first step: retrying with full gradient checkpointing")
                        continue
                    raise _oom(err, c, step, device, save_state if not mid_update else None) from None
                loss_count += c.grad_accum
                step += 1
                bar.update(1)
                if step == start + 1:
                    meter.start("warmup")  # eager warm-up steps, then the graph capture
                elif step == start + 2 + graph.WARMUP_STEPS:
                    meter.start("steps")
                if step % c.log_every == 0 or step == p_end:
                    mean_loss = (loss_sum / max(1, loss_count)).item()  # the one sync, every log_every steps
                    loss_sum.zero_()
                    loss_count = 0
                    now = time.perf_counter()
                    rate = (step - steps_at_log) / max(1e-9, now - t_log)
                    t_log, steps_at_log = now, step
                    if not math.isfinite(mean_loss):
                        stop["reason"] = "nan"
                        break
                    last_loss = mean_loss
                    bar.set_postfix(loss=f"{mean_loss:.4f}", phase=phase)
                    if writer is not None:
                        writer.add_scalar("loss", mean_loss, step)
                        writer.add_scalar("lr", _current_lr(opt), step)
                        writer.add_scalar("it_per_s", rate, step)
                    if on_log is not None:
                        on_log(step, {"loss": mean_loss, "lr": _current_lr(opt), "it_per_s": rate, "phase": phase})
                if c.save_every and step % c.save_every == 0 and step < total:
                    save_state(step)
                if c.sample_every and step % c.sample_every == 0:
                    sample(step)
                if c.export_every and step % c.export_every == 0 and step < total:
                    export(step)
            if stop["reason"]:
                break
    except KeyboardInterrupt:
        stop["reason"] = "interrupted"
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    # ---- 7. finish: state, exports, summary
    meter.stop()
    result.seconds = time.perf_counter() - t0
    result.steps = step
    result.it_per_s = (step - start) / max(1e-9, result.seconds)
    result.final_loss = last_loss
    if stop["reason"] == "nan":
        result.stopped = "nan"
        last = session.latest_checkpoint()
        where = f"the last good state is checkpoint step {last['step']}" if last else "no checkpoint was saved yet"
        _close(writer, logdir, session, main)
        raise FastsdError(
            f"the loss became NaN/inf near step {step}: training stopped and nothing more was saved; {where} "
            "(resume with --resume and a lower --lr, or use --precision bf16/fp32)"
        )
    if stop["reason"] == "interrupted":
        result.stopped = "interrupted"
        if step > start and not mid_update:
            save_state(step)
        log.info("interrupted at step %d: state saved; continue with --resume", step)
    else:
        if main and c.save_final and (not result.checkpoints or not result.checkpoints[-1].endswith(f"{step:06d}")):
            save_state(step)
        if c.sample_every and step % c.sample_every:
            sample(step)
        export(step)
    meter.stop()
    loop_peaks = [meter.peaks[k]["allocated_gb"] for k in ("first_step", "warmup", "steps") if k in meter.peaks]
    result.peak_vram_gb = max(loop_peaks) if loop_peaks else None
    if meter.peaks:
        meter.peaks["process"] = meter.process_peak()
    if runner is not None:
        plan["cuda_graph_captured"] = runner.captured
        if runner.failed:
            plan["cuda_graph_failed"] = runner.failed[:300]
    _close(writer, logdir, session, main)
    if opt is not None:
        opt.close()
    return result  # the caller shows result.summary() (the CLI on stdout, notebooks in the cell)


def plan_in_words(plan: dict[str, Any], c: TrainConfig, device: str) -> str:
    """The memory and speed plan as one sentence a person reads (the dict stays in ``TrainResult.plan``)."""
    what = f"LoRA rank {c.lora_rank}" if c.method == "lora" else "full fine-tune"
    parts = [f"plan: {what} on {device} in {plan['precision']} with the {plan['optimizer']} optimizer"]
    blocks = plan.get("checkpointed_blocks", 0)
    parts.append(f"gradient checkpointing on {blocks} UNet block(s)" if blocks else "no gradient checkpointing")
    if plan.get("fused_backward"):
        parts.append("optimizer step inside backward (saves the gradients' memory)")
    if plan.get("cuda_graph"):
        parts.append("the whole step replayed as a CUDA graph")
    if plan.get("bucketed"):
        parts.append("aspect-ratio buckets")
    if plan.get("channels_last"):
        parts.append("channels-last layout")
    if device == "cuda" and plan.get("estimate_gb"):
        parts.append(f"about {plan['estimate_gb']:.1f} GiB of VRAM")
    return "; ".join(parts)


def _autotune(steps: int, graphed: bool) -> bool:
    """Whether to let cuDNN autotune the loop's convolutions (``FASTSD_CUDNN_BENCHMARK=0/1`` overrides).

    Autotuning tries every algorithm for each of the UNet's convolution shapes on the first step
    (forward and both backward passes). Measured on an H200 (SD1.5 UNet, bf16, CUDA graph): the
    first step took 14.5 s with it and 2.5 s without, and the replayed steps ran at the same
    26.5 it/s, so a graphed run never autotunes. An eager run (T4 fp16) autotunes only when its
    steps are many enough to repay a cold start.
    """
    env = os.environ.get("FASTSD_CUDNN_BENCHMARK")
    if env in ("0", "1"):
        return env == "1"
    return not graphed and steps >= _AUTOTUNE_MIN_STEPS


#: below this many eager steps the autotuning's cold-start cost is not repaid
_AUTOTUNE_MIN_STEPS = 200


def _pick(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``t[idx]`` without sending the index list to the device (a list index is a synchronous copy)."""
    return torch.stack([t[i] for i in idx])


def _current_lr(opt: Any) -> float:
    groups = opt.opt.param_groups if hasattr(opt, "opt") else opt.opts[0].param_groups
    return float(groups[0]["lr"])


@contextlib.contextmanager
def _eager():
    """Run compiled modules eagerly (sampling and export use other shapes than training)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def _sync_logs(writer: Any, local: Path, dest: Path) -> None:
    """Copy TensorBoard event files into the session (safe writes; Drive never sees an append)."""
    writer.flush()
    for f in local.rglob("*"):
        if f.is_file():
            storage.copy_file(f, dest / f.relative_to(local), verify_sha256=False)


def _close(writer: Any, logdir: Path, session: Any, main: bool) -> None:
    if writer is not None and main:
        _sync_logs(writer, logdir, session.logs_dir)
        writer.close()
    shutil.rmtree(logdir, ignore_errors=True)


def _oom(err: BaseException, c: TrainConfig, step: int, device: torch.device, save: Any) -> FastsdError:
    """Save what can be saved after CUDA OOM and say which setting to lower."""
    peak = memory.peak_gb(device)
    torch.cuda.empty_cache()
    saved = ""
    if save is not None and step > 0:
        save(step)
        saved = f"; state saved at step {step} (continue with --resume)"
    tips = []
    if c.batch_size > 1:
        tips.append("--batch-size 1")
    if c.gradient_checkpointing != "on":
        tips.append("--gradient-checkpointing on")
    if c.optimizer != "adamw8bit":
        tips.append("--optimizer adamw8bit")
    if c.method == "full":
        tips.append("--method lora")
    tips.append(f"a lower --resolution than {c.resolution}")
    return FastsdError(f"CUDA out of memory at step {step} (peak {peak} GiB){saved}: try {', or '.join(tips)}")
