"""Training settings: one validated dataclass, GPU presets, and the checks that run before any model loads.

A :class:`TrainConfig` holds plain values with defaults in one place (the popular Colab notebook's
schedule: ~350 text-encoder steps at 1e-6, then 1500 UNet steps at 2e-6). Fields left at ``None``
or ``"auto"`` are filled by :func:`resolve` from the GPU preset (:data:`PRESETS`, picked from
:func:`fastsd.runtime.gpus`) and the base model's family, read from its JSON configs only. Invalid
combinations raise :class:`~fastsd.errors.UserInputError` with the reason, before anything heavy
happens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..models.registry import check_resolution

METHODS = ("full", "lora")
SCHEDULES = ("sequential", "joint")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
OPTIMIZERS = ("auto", "adamw8bit", "adamw_lowmem", "adamw_fused", "adamw")
GRAD_CHECKPOINTING = ("auto", "on", "off")
COMPILE = ("off", "blocks", "full")
CUDA_GRAPH = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "linear", "cosine")

#: Settings by GPU class. ``vram_budget_gb`` is what training may use (room is left for sampling).
PRESETS: dict[str, dict[str, Any]] = {
    # T4: no real bf16, so fp16 + GradScaler; 15 GB, so 8-bit Adam.
    "t4": {"precision": "fp16", "optimizer": "adamw8bit", "vram_budget_gb": 14.0},
    "l4": {"precision": "bf16", "optimizer": "adamw8bit", "vram_budget_gb": 21.0},
    "a100": {"precision": "bf16", "optimizer": "adamw_fused", "vram_budget_gb": 36.0},
    "h100": {"precision": "bf16", "optimizer": "adamw_fused", "vram_budget_gb": 72.0},
    "cpu": {"precision": "fp32", "optimizer": "adamw", "vram_budget_gb": None},
}

#: Defaults that differ between methods (LoRA learns much faster at higher rates).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"unet_steps": 1500, "te_steps": 350, "unet_lr": 2e-6, "te_lr": 1e-6},
    "lora": {"unet_steps": 1000, "te_steps": 0, "unet_lr": 1e-4, "te_lr": 5e-5},
}

SDXL_FULL_MIN_VRAM_GB = 24.0


@dataclass
class TrainConfig:
    """Everything a DreamBooth run needs. ``None``/``"auto"`` fields are filled by :func:`resolve`.

    Attributes (the main ones):
        method: ``full`` (fine-tune the UNet and optionally the text encoder) or ``lora``.
        model: base model: a Diffusers folder, a single file, or any spec `fastsd model get` takes (fetched/converted once); default: the session's ``base_model``.
        resolution: training size in pixels; default: the session's, else the family's native size.
        unet_steps / te_steps: optimizer steps for the UNet and the text encoder (0: frozen).
        schedule: ``sequential`` (text-encoder steps first, then UNet steps, as the popular
            notebook) or ``joint`` (both from step 0; the text encoder freezes after ``te_steps``).
        unet_lr / te_lr: learning rates.
        prior_preservation: generate ``num_class_images`` images of ``class_prompt`` with the
            base model (kept in the session and reused) and add their loss times ``prior_weight``.
        offset_noise: strength of per-channel offset noise (0 disables).
        min_snr_gamma: Min-SNR loss weighting gamma (None disables).
        precision: ``fp16`` (GradScaler), ``bf16``, ``fp32``; ``auto`` from the GPU.
        optimizer: ``adamw8bit`` (bitsandbytes), ``adamw_lowmem`` (8-bit moments in plain torch, CUDA-graph
            capturable: the same 2 bytes per parameter as bitsandbytes), ``adamw_fused``, ``adamw``;
            ``auto`` from the GPU.
        gradient_checkpointing: ``on``/``off``/``auto`` (only as much as the VRAM budget needs).
        fused_backward: step the optimizer inside backward so gradients never all exist at once
            (``None``: when the VRAM budget needs it; bf16/fp32, one process, no accumulation).
        compile: ``off``, ``blocks`` (torch.compile each repeated block) or ``full`` (the UNet).
        cuda_graph: capture the whole training step (forward, backward, optimizer) in a CUDA graph
            and replay it (``auto``: when possible: CUDA, bf16/fp32, no accumulation, one process,
            no buckets, a capturable optimizer; see :mod:`fastsd.train.graph`).
        save_every / keep_checkpoints: resumable states every N steps, keep the newest K.
        export_every: also export a model every M steps (0: only at the end).
        sample_every: sample images every N steps from ``sample_prompts`` x ``sample_seeds``.
        resume: continue from the session's latest complete checkpoint.
    """

    method: str = "full"
    model: str | None = None
    resolution: int | None = None
    allow_resolution: bool = False
    unet_steps: int | None = None
    te_steps: int | None = None
    schedule: str = "sequential"
    unet_lr: float | None = None
    te_lr: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    scale_lr: bool = False
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    lora_rank: int = 4
    lora_alpha: float | None = None
    prior_preservation: bool = False
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_weight: float = 1.0
    offset_noise: float = 0.0
    min_snr_gamma: float | None = 5.0
    buckets: str = "auto"  # auto | on | off
    seed: int = 42
    gpu: str = "auto"
    precision: str = "auto"
    optimizer: str = "auto"
    gradient_checkpointing: str = "auto"
    fused_backward: bool | None = None
    vram_budget_gb: float | None = None
    channels_last: bool = True
    compile: str = "off"
    cuda_graph: str = "auto"
    save_every: int = 500
    keep_checkpoints: int = 2
    export_every: int = 0
    export: bool = True
    save_final: bool = True
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [1, 2])
    sample_steps: int = 25
    log_every: int = 10
    resume: bool = False
    device: str | None = None
    progress: bool = True

    # ---- derived

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (sequential: TE steps + UNet steps)."""
        assert self.unet_steps is not None and self.te_steps is not None, "resolve() the config first"
        if self.schedule == "sequential":
            return self.te_steps + self.unet_steps
        return max(self.unet_steps, self.te_steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_preset(gpu_list: list[Any] | None = None) -> str:
    """GPU preset name from the first CUDA GPU: ``t4``, ``l4``, ``a100``, ``h100`` or ``cpu``."""
    if gpu_list is None:
        from ..runtime import gpus

        gpu_list = gpus()
    if not gpu_list:
        return "cpu"
    gpu = gpu_list[0]
    name = gpu.name.lower()
    for key in ("t4", "l4", "a100", "h100", "h200"):
        if key in name:
            return "h100" if key == "h200" else key
    if not gpu.bf16:
        return "t4"  # pre-Ampere: fp16 only
    if gpu.vram_total_gb >= 60:
        return "h100"
    return "a100" if gpu.vram_total_gb >= 38 else "l4"


def resolve(
    config: TrainConfig,
    *,
    session_info: dict[str, Any] | None = None,
    num_images: int | None = None,
    gpu_list: list[Any] | None = None,
    home: str | Path | None = None,
) -> tuple[TrainConfig, dict[str, Any]]:
    """Fill ``auto``/``None`` fields and validate; nothing heavy is loaded.

    Args:
        config: the user's settings.
        session_info: the session's ``session.json`` (base model, resolution, token/class).
        num_images: how many instance images the session has (0 is refused).
        gpu_list: GPUs to plan for (default: :func:`fastsd.runtime.gpus`).

    Returns:
        ``(resolved config, model facts from :func:`fastsd.models.detect.diffusers_family`)``.

    Raises:
        UserInputError: the reason a combination can't work, and what to change.
    """
    info = session_info or {}
    c = replace(config)
    if c.method not in METHODS:
        raise UserInputError(f"unknown method {c.method!r}: use one of {', '.join(METHODS)}")
    for name, value, allowed in (
        ("schedule", c.schedule, SCHEDULES),
        ("precision", c.precision, PRECISIONS),
        ("optimizer", c.optimizer, OPTIMIZERS),
        ("gradient_checkpointing", c.gradient_checkpointing, GRAD_CHECKPOINTING),
        ("compile", c.compile, COMPILE),
        ("cuda_graph", c.cuda_graph, CUDA_GRAPH),
        ("lr_schedule", c.lr_schedule, LR_SCHEDULES),
        ("buckets", c.buckets, ("auto", "on", "off")),
    ):
        if value not in allowed:
            raise UserInputError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
    if num_images is not None and num_images == 0:
        raise UserInputError("the session has no instance images: add a few photos to its instance_images/ first")

    defaults = METHOD_DEFAULTS[c.method]
    for key in ("unet_steps", "te_steps", "unet_lr", "te_lr"):
        if getattr(c, key) is None:
            setattr(c, key, defaults[key])
    if c.unet_steps <= 0:
        raise UserInputError(f"unet steps must be > 0 (got {c.unet_steps})")
    if c.te_steps < 0:
        raise UserInputError(f"text-encoder steps must be >= 0 (got {c.te_steps}); 0 keeps it frozen")
    if c.unet_lr <= 0 or (c.te_steps > 0 and c.te_lr <= 0):
        raise UserInputError(f"learning rates must be > 0 (got unet {c.unet_lr}, text encoder {c.te_lr})")
    for key in ("batch_size", "grad_accum", "lora_rank", "sample_steps", "log_every", "keep_checkpoints"):
        if getattr(c, key) < 1:
            raise UserInputError(f"{key.replace('_', ' ')} must be >= 1 (got {getattr(c, key)})")
    if c.save_every < 0 or c.export_every < 0 or c.sample_every < 0 or c.warmup_steps < 0:
        raise UserInputError("save/export/sample intervals and warmup steps must be >= 0")

    c.model = c.model or info.get("base_model")
    if not c.model:
        raise UserInputError("no base model: pass --model or set the session's base_model")
    if not (Path(c.model) / "model_index.json").is_file():
        from ..models.load import local_model

        c.model = str(
            local_model(c.model, want="diffusers", home=home)
        )  # fetch (sd15, hf:..., URL) or convert a single file
    from ..models.detect import diffusers_family  # torch: only once settings are checked

    facts = diffusers_family(c.model)
    # the user's size (flag, then session), else the family's native one; one rule checks it
    c.resolution = check_resolution(
        int(c.resolution or info.get("resolution") or facts["native_resolution"]),
        native=facts["native_resolution"],
        family=facts["family"],
        allow_above=c.allow_resolution,
    )

    preset_name = detect_preset(gpu_list) if c.gpu == "auto" else c.gpu
    if preset_name not in PRESETS:
        raise UserInputError(f"unknown GPU preset {c.gpu!r}: use auto or one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    c.gpu = preset_name
    if c.precision == "auto":
        c.precision = preset["precision"]
    if c.optimizer == "auto":
        c.optimizer = preset["optimizer"]
    if c.vram_budget_gb is None:
        c.vram_budget_gb = preset["vram_budget_gb"]

    if facts["family"] == "sdxl" and c.method == "full":
        if c.te_steps > 0:
            raise UserInputError(
                "training the text encoders in an SDXL full fine-tune is not supported: use --te-steps 0, or --method lora"
            )
        if c.vram_budget_gb is not None and c.vram_budget_gb < SDXL_FULL_MIN_VRAM_GB:
            raise UserInputError(
                f"SDXL full fine-tuning needs >= {SDXL_FULL_MIN_VRAM_GB:.0f} GB of VRAM "
                f"(this GPU budget: {c.vram_budget_gb:.0f} GB): use --method lora"
            )
    if c.prior_preservation and not c.class_prompt:
        c.class_prompt = f"a photo of {info.get('class_word') or 'person'}".strip()
    if c.sample_every and not c.sample_prompts:
        token = f"{info.get('instance_token', 'sks')} {info.get('class_word', '')}".strip()
        c.sample_prompts = [f"a photo of {token}"]
    if c.lora_alpha is None:
        c.lora_alpha = float(c.lora_rank)
    return c, facts
