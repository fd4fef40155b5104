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
from ..models.registry import LORA_ONLY_FAMILIES, check_resolution

METHODS = ("full", "lora")
SCHEDULES = ("sequential", "joint")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
OPTIMIZERS = ("auto", "adamw8bit", "adamw_lowmem", "adamw_fused", "adamw")
MASTER_WEIGHTS = ("auto", "fp32", "16bit")
GRAD_CHECKPOINTING = ("auto", "on", "off")
COMPILE = ("off", "blocks", "full")
CUDA_GRAPH = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "linear", "cosine")

#: VRAM a budget taken from a preset leaves to the CUDA context and libraries (a T4's 14.6 GiB: the T4 preset's 14).
CONTEXT_GIB = 0.6


#: Settings by GPU class. ``vram_budget_gb`` is what training may use (room is left for sampling).
PRESETS: dict[str, dict[str, Any]] = {
    # T4: no real bf16, so fp16 + GradScaler; 15 GB, so 8-bit Adam; 15 GB of Drive, so a full fine-tune
    # keeps 16-bit weights (stochastic rounding): a 3.7 GB SD1.5 state, not 5.7 (benchmarks/state_size.py).
    # Its graphed step, resume and fp32-master agreement passed tests/test_gpu.py on an H100 (2026-12-08).
    "t4": {"precision": "fp16", "optimizer": "adamw8bit", "vram_budget_gb": 14.0, "master_weights": "16bit"},
    "l4": {"precision": "bf16", "optimizer": "adamw8bit", "vram_budget_gb": 21.0, "master_weights": "fp32"},
    "a100": {"precision": "bf16", "optimizer": "adamw_fused", "vram_budget_gb": 36.0, "master_weights": "fp32"},
    "h100": {"precision": "bf16", "optimizer": "adamw_fused", "vram_budget_gb": 72.0, "master_weights": "fp32"},
    "cpu": {"precision": "fp32", "optimizer": "adamw", "vram_budget_gb": None, "master_weights": "fp32"},
}

#: Defaults that differ between methods (LoRA learns much faster at higher rates).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"unet_steps": 1500, "te_steps": 350, "unet_lr": 2e-6, "te_lr": 1e-6},
    "lora": {"unet_steps": 1000, "te_steps": 0, "unet_lr": 1e-4, "te_lr": 5e-5},
}

SDXL_FULL_MIN_VRAM_GB = 24.0


def _opt(default: Any = None, help: str = "", *, flag: str | None = None, metavar: str | None = None,
         choices: tuple[str, ...] | None = None, factory: Any = None, cli: bool = True) -> Any:  # fmt: skip
    """A :class:`TrainConfig` field and how ``fastsd train`` shows it (``fastsd.cli.train`` builds the flags).

    Args:
        help: the flag's help line; ``{by_method}`` becomes the per-method defaults of
            :data:`METHOD_DEFAULTS`. A flag that takes a value shows ``(default: X)`` unless the
            text already says its default.
        flag: the option's name (default: ``--`` + the field name with dashes).
        metavar / choices: as in argparse.
        cli: ``False`` for settings only the Python API and notebooks set.
    """
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a DreamBooth run needs. ``None``/``"auto"`` fields are filled by :func:`resolve`.

    Each field's help line (the one ``fastsd train --help`` shows) is in its metadata. In short:
    ``method`` full or LoRA; steps, rates and schedule (``sequential``: text-encoder steps first,
    then UNet steps, as the popular notebook; ``joint``: both from step 0, the text encoder freezes
    after ``te_steps``); prior preservation (class images made once with the base model, kept in
    the session); loss options (offset noise, Min-SNR); memory and speed (precision, optimizer,
    gradient checkpointing, in-backward optimizer step, ``torch.compile``, CUDA-graph step: see
    :mod:`fastsd.train.plan`); checkpoints, exports and samples.

    Off switches: ``min_snr_gamma`` and ``max_grad_norm`` are off when ``None`` or 0 (:func:`resolve`
    stores 0 as ``None``); ``offset_noise`` 0 adds none.
    """

    method: str = _opt(
        "auto", "train all weights, or a LoRA; auto: full for SD1/SD2/SDXL, lora for SD3.5/FLUX.1",
        choices=("auto", *METHODS),
    )  # fmt: skip
    model: str | None = _opt(
        None,
        "base model: a Diffusers folder, a single file, a registry name, hf:org/repo or URL (fetched/converted "
        "once; default: the session's)",
        metavar="SPEC",
    )
    resolution: int | None = _opt(
        None, "training size in px (default: the session's, else the model family's native size)", metavar="PX"
    )
    allow_resolution: bool = _opt(False, "allow a size above the model's native one")
    unet_steps: int | None = _opt(None, "UNet steps (default {by_method})", flag="--steps", metavar="N")
    te_steps: int | None = _opt(None, "text-encoder steps; 0 keeps it frozen (default {by_method})", metavar="N")
    schedule: str = _opt("sequential", "text encoder first then UNet, or both at once", choices=SCHEDULES)
    unet_lr: float | None = _opt(None, "UNet learning rate (default {by_method})", flag="--lr")
    te_lr: float | None = _opt(None, "text-encoder learning rate (default {by_method})")
    lr_schedule: str = _opt("constant", "learning-rate curve", choices=LR_SCHEDULES)
    warmup_steps: int = _opt(0, "steps of linear LR warm-up", metavar="N")
    scale_lr: bool = _opt(False, "multiply LRs by batch x accumulation x processes")
    batch_size: int = _opt(1, "images per step and GPU", metavar="N")
    grad_accum: int = _opt(1, "steps whose gradients add up to one update", metavar="N")
    max_grad_norm: float | None = _opt(1.0, "clip the gradients' norm to this; 0 turns clipping off", metavar="X")
    lora_rank: int = _opt(4, "LoRA rank", flag="--rank", metavar="N")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: the rank, a scale of 1)", metavar="X")
    prior_preservation: bool = _opt(False, "prior preservation with class images", flag="--prior")
    class_prompt: str | None = _opt(None, "class prompt (default: 'a photo of <class word>')", metavar="TEXT")
    num_class_images: int = _opt(100, "class images for --prior", flag="--class-images", metavar="N")
    prior_weight: float = _opt(1.0, "weight of the class images' loss with --prior", metavar="X")
    offset_noise: float = _opt(0.0, "offset noise strength (0: off)", metavar="X")
    min_snr_gamma: float | None = _opt(5.0, "Min-SNR loss weighting gamma; 0 turns the weighting off", metavar="G")
    buckets: str = _opt(
        "auto", "aspect-ratio buckets (auto: when an image is not square)", choices=("auto", "on", "off")
    )
    seed: int = _opt(42, "random seed (same seed, same run)")
    gpu: str = _opt("auto", "settings preset (auto: from the GPU)", choices=("auto", *PRESETS))
    precision: str = _opt("auto", "mixed precision", choices=PRECISIONS)
    optimizer: str = _opt("auto", "AdamW flavour", choices=OPTIMIZERS)
    master_weights: str = _opt(
        "auto",
        "a full fine-tune's trained weights: fp32 masters (exact), or 16-bit in the run's precision, updated with "
        "stochastic rounding (half the VRAM and checkpoint size; needs adamw_lowmem); auto: the preset's (16bit on a T4)",
        choices=MASTER_WEIGHTS,
    )
    gradient_checkpointing: str = _opt(
        "auto", "recompute activations to save VRAM (auto: as the VRAM budget needs)", choices=GRAD_CHECKPOINTING
    )
    fused_backward: bool | None = _opt(
        None,
        "step the optimizer inside backward so gradients never all exist at once (None: when the VRAM budget "
        "needs it; bf16/fp32, one process, no accumulation)",
        cli=False,
    )
    vram_budget_gb: float | None = _opt(None, f"VRAM to plan for, GiB (default: the preset's, at most the card's less {CONTEXT_GIB})",
                                        flag="--vram-budget",
                                        metavar="GB")  # fmt: skip
    channels_last: bool = _opt(True, "channels-last memory layout", metavar="on|off")
    compile: str = _opt("off", "torch.compile the UNet blocks or all of it", choices=COMPILE)
    cuda_graph: str = _opt("auto", "replay the whole step as a CUDA graph (CUDA GPUs, fp16 too)", choices=CUDA_GRAPH)
    save_every: int = _opt(500, "save a resumable checkpoint every N steps", metavar="N")
    keep_checkpoints: int = _opt(2, "checkpoints kept", flag="--keep", metavar="N")
    export_every: int = _opt(0, "export a model every N steps (0: at the end only)", metavar="N")
    export: bool = _opt(True, "do not export a model at the end", flag="--no-export")
    save_final: bool = _opt(True, "save a resumable state at the end too", cli=False)
    sample_every: int = _opt(0, "sample images every N steps (0: never)", metavar="N")
    sample_prompts: list[str] = _opt(
        help="prompt for samples; repeatable (default: 'a photo of <token> <class>')",
        flag="--sample-prompt",
        metavar="TEXT",
        factory=list,
    )
    sample_seeds: list[int] = _opt(help="seed of each sample image; repeatable (default: 1 and 2)",
                                   flag="--sample-seed", metavar="N", factory=lambda: [1, 2])  # fmt: skip
    sample_steps: int = _opt(25, "denoising steps per sample (and per class image)", metavar="N")
    log_every: int = _opt(10, "log loss and speed every N steps", metavar="N")
    resume: bool = _opt(False, "continue from the session's latest checkpoint")
    device: str | None = _opt(None, "torch device (default: cuda:LOCAL_RANK, else cpu)")
    progress: bool = _opt(True, "show a progress bar", cli=False)

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


def preset_budget(preset: dict[str, Any], gpu_list: list[Any]) -> float | None:
    """A preset's VRAM budget, never more than this GPU has.

    The presets name a GPU class, and a card is matched by name or else by bf16 and size: an RTX
    card of 12 or 16 GB gets the L4 preset, whose 21 GiB budget it does not have.
    """
    budget = preset["vram_budget_gb"]
    if budget is None or not gpu_list:
        return budget
    return min(budget, round(gpu_list[0].vram_total_gb - CONTEXT_GIB, 1))


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
    if c.method not in ("auto", *METHODS):
        raise UserInputError(f"unknown method {c.method!r}: use auto or one of {', '.join(METHODS)}")
    for name, value, allowed in (
        ("schedule", c.schedule, SCHEDULES),
        ("precision", c.precision, PRECISIONS),
        ("optimizer", c.optimizer, OPTIMIZERS),
        ("master_weights", c.master_weights, MASTER_WEIGHTS),
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

    _check_steps(c, fill=False)  # the user's own values, before a model is fetched
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
    if facts.get("max_resolution") and c.resolution > facts["max_resolution"]:
        raise UserInputError(
            f"{c.resolution} px is beyond this {facts['family']} model's position table ({facts['max_resolution']} px): "
            f"use --resolution {facts['max_resolution']} or lower"
        )

    if gpu_list is None:
        from ..runtime import gpus

        gpu_list = gpus()
    preset_name = detect_preset(gpu_list) if c.gpu == "auto" else c.gpu
    if preset_name not in PRESETS:
        raise UserInputError(f"unknown GPU preset {c.gpu!r}: use auto or one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    c.gpu = preset_name
    if c.precision == "auto":
        c.precision = preset["precision"]
    facts["optimizer_from_preset"] = c.optimizer == "auto"  # the planner may then pick a leaner one
    if c.optimizer == "auto":
        c.optimizer = preset["optimizer"]
    if c.vram_budget_gb is None:
        c.vram_budget_gb = preset_budget(preset, gpu_list)

    if c.method == "auto":  # the model decides: flow-matching transformers train as LoRAs only
        c.method = "lora" if facts["family"] in LORA_ONLY_FAMILIES else "full"
    _resolve_master_weights(c, preset, optimizer_from_preset=facts["optimizer_from_preset"])
    _check_steps(c, fill=True)
    if facts["family"] in LORA_ONLY_FAMILIES:
        _check_flow(c, facts["family"])
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
    c.min_snr_gamma = c.min_snr_gamma or None  # 0 is off, stored as None (the class docstring)
    c.max_grad_norm = c.max_grad_norm or None
    return c, facts


def _resolve_master_weights(c: TrainConfig, preset: dict[str, Any], *, optimizer_from_preset: bool) -> None:
    """Fill ``master_weights`` (LoRA adapters are always fp32) and check what 16-bit weights need.

    16-bit weights are updated with stochastic rounding, which only ``adamw_lowmem`` does: a preset's
    optimizer gives way to it; asked for with another optimizer or fp32 precision, they are refused
    (and ``auto`` keeps fp32 masters there).
    """
    if c.master_weights == "auto":
        fits = c.precision != "fp32" and (optimizer_from_preset or c.optimizer == "adamw_lowmem")
        wanted = c.method == "full" and fits and preset.get("master_weights") == "16bit"
        c.master_weights = "16bit" if wanted else "fp32"
    if c.master_weights != "16bit":
        return
    if c.method != "full":
        raise UserInputError("--master-weights 16bit is for full fine-tunes (LoRA adapters stay fp32): drop it")
    if c.precision == "fp32":
        raise UserInputError("--master-weights 16bit needs --precision fp16 or bf16 (the weights' dtype)")
    if c.optimizer != "adamw_lowmem":
        if not optimizer_from_preset:
            raise UserInputError(
                f"--master-weights 16bit needs --optimizer adamw_lowmem (stochastic rounding), not {c.optimizer}: "
                "change one of them"
            )
        c.optimizer = "adamw_lowmem"


def _check_steps(c: TrainConfig, fill: bool) -> None:
    """Check steps and learning rates; with ``fill``, first take the method's defaults for those left unset."""
    if fill:
        defaults = METHOD_DEFAULTS[c.method]
        for key in ("unet_steps", "te_steps", "unet_lr", "te_lr"):
            if getattr(c, key) is None:
                setattr(c, key, defaults[key])
    if c.unet_steps is not None and c.unet_steps <= 0:
        raise UserInputError(f"unet steps must be > 0 (got {c.unet_steps})")
    if c.te_steps is not None and c.te_steps < 0:
        raise UserInputError(f"text-encoder steps must be >= 0 (got {c.te_steps}); 0 keeps it frozen")
    te_trains = c.te_steps is None or c.te_steps > 0
    if (c.unet_lr is not None and c.unet_lr <= 0) or (te_trains and c.te_lr is not None and c.te_lr <= 0):
        raise UserInputError(f"learning rates must be > 0 (got unet {c.unet_lr}, text encoder {c.te_lr})")


def _check_flow(c: TrainConfig, family: str) -> None:
    """SD3.5/FLUX.1: LoRA on the transformer only, eager steps, no Min-SNR (a DDPM weighting); FLUX not in fp16.

    FLUX's activations overflow fp16 (NaN losses on a T4), so a T4 preset or ``--precision fp16`` is
    refused for FLUX rather than trained into NaNs; SD3.5 trains in fp16 with the GradScaler.
    """
    if c.method != "lora":
        raise UserInputError(f"{family} models train as a LoRA only: use --method lora")
    if c.te_steps:
        raise UserInputError(f"{family} LoRAs train the transformer only: use --te-steps 0")
    if family == "flux" and c.precision == "fp16":
        raise UserInputError(
            "FLUX.1 overflows fp16 (NaN losses): train it on a bf16 GPU (L4, A100, H100) or with --precision fp32"
        )
    c.min_snr_gamma = None  # flow matching weights timesteps by their density instead
    c.cuda_graph = "off"  # eager steps: the transformer's step is compute-bound, not launch-bound
