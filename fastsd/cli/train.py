"""``fastsd train SESSION``: DreamBooth fine-tuning (full or LoRA) of the session's base model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..train.config import (
    COMPILE,
    CUDA_GRAPH,
    GRAD_CHECKPOINTING,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    TrainConfig,
)


def _onoff(value: str) -> bool:
    return value.lower() in ("1", "on", "true", "yes")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to every flag that has a default worth saying (not None/False, not in the text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unsaid = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "default" in text or unsaid or not action.option_strings:
            return text
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        return f"{text} (default: {shown})"


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        parents=parents,
        formatter_class=_DefaultsFormatter,
        help="DreamBooth-train a session (full or LoRA); resumable",
        description="Fine-tune the session's base model on its instance images. Runs under 'accelerate launch' "
        "for data parallel training (effective batch = --batch-size x GPUs; use --scale-lr to scale the LR with it). "
        "'auto' settings come from the GPU preset (--gpu).",
    )
    p.add_argument("session", help="session name")
    p.add_argument("--method", choices=("full", "lora"), default="full", help="train all weights, or a LoRA")
    p.add_argument(
        "--model", metavar="SPEC", help="base model (name, hf:org/repo, URL or path; default: the session's)"
    )
    p.add_argument(
        "--steps", type=int, dest="unet_steps", metavar="N", help="UNet steps (default full: 1500, lora: 1000)"
    )
    p.add_argument("--te-steps", type=int, metavar="N", help="text-encoder steps (default full: 350, lora: 0 = frozen)")
    p.add_argument(
        "--schedule",
        choices=("sequential", "joint"),
        default="sequential",
        help="text encoder first then UNet, or both at once",
    )
    p.add_argument("--lr", type=float, dest="unet_lr", help="UNet learning rate (default full: 2e-6, lora: 1e-4)")
    p.add_argument("--te-lr", type=float, help="text-encoder learning rate (default full: 1e-6, lora: 5e-5)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="learning-rate curve")
    p.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="steps of linear LR warm-up")
    p.add_argument("--scale-lr", action="store_true", help="multiply LRs by batch x accumulation x processes")
    p.add_argument("--resolution", type=int, metavar="PX", help="training size in px (default: the session's)")
    p.add_argument("--allow-resolution", action="store_true", help="allow a size above the model's native one")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per step and GPU")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="steps whose gradients add up to one update")
    p.add_argument("--rank", type=int, dest="lora_rank", default=4, metavar="N", help="LoRA rank")
    p.add_argument(
        "--prior", action="store_true", dest="prior_preservation", help="prior preservation with class images"
    )
    p.add_argument("--class-prompt", metavar="TEXT", help="class prompt (default: 'a photo of <class word>')")
    p.add_argument(
        "--class-images", type=int, dest="num_class_images", default=100, metavar="N", help="class images for --prior"
    )
    p.add_argument("--offset-noise", type=float, default=0.0, metavar="X", help="offset noise strength (0: off)")
    p.add_argument(
        "--min-snr-gamma", type=float, default=5.0, metavar="G", help="Min-SNR loss weighting; 0 disables it"
    )
    p.add_argument("--seed", type=int, default=42, help="random seed (same seed, same run)")
    p.add_argument("--gpu", choices=("auto", *PRESETS), default="auto", help="settings preset (auto: from the GPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="mixed precision")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="auto", help="AdamW flavour")
    p.add_argument(
        "--gradient-checkpointing",
        choices=GRAD_CHECKPOINTING,
        default="auto",
        help="recompute activations to save VRAM (auto: as the VRAM budget needs)",
    )
    p.add_argument(
        "--vram-budget",
        type=float,
        dest="vram_budget_gb",
        metavar="GB",
        help="VRAM to plan for (default: the preset's)",
    )
    p.add_argument("--compile", choices=COMPILE, default="off", help="torch.compile the UNet blocks or all of it")
    p.add_argument(
        "--cuda-graph", choices=CUDA_GRAPH, default="auto", help="replay the whole step as a CUDA graph (bf16 GPUs)"
    )
    p.add_argument("--channels-last", type=_onoff, default=True, metavar="on|off", help="channels-last memory layout")
    p.add_argument("--save-every", type=int, default=500, metavar="N", help="save a resumable checkpoint every N steps")
    p.add_argument("--keep", type=int, dest="keep_checkpoints", default=2, metavar="N", help="checkpoints kept")
    p.add_argument(
        "--export-every", type=int, default=0, metavar="N", help="export a model every N steps (0: at the end only)"
    )
    p.add_argument("--no-export", action="store_false", dest="export", help="do not export a model at the end")
    p.add_argument("--sample-every", type=int, default=0, metavar="N", help="sample images every N steps (0: never)")
    p.add_argument(
        "--sample-prompt",
        action="append",
        dest="sample_prompts",
        default=[],
        metavar="TEXT",
        help="prompt for samples; repeatable (default: 'a photo of <token> <class>')",
    )
    p.add_argument("--sample-steps", type=int, default=25, metavar="N", help="denoising steps per sample")
    p.add_argument("--log-every", type=int, default=10, metavar="N", help="log loss and speed every N steps")
    p.add_argument(
        "--eval",
        choices=("auto", "on", "off"),
        default="auto",
        help="score the final export with fastsd eval (DINO, CLIP-I, CLIP-T) at the end; auto: on GPUs only",
    )
    p.add_argument(
        "--eval-prompts",
        type=int,
        metavar="N",
        help="first N of the 25 eval prompts (default all; --sample-steps steps)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the session's latest checkpoint")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK, else cpu)")
    p.add_argument("--force", action="store_true", help="break the session's lock if another process holds it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _fetch_model_first(args: argparse.Namespace) -> None:
    """Get the base model before torch loads: a typo or an unreachable Hub fails in a second, not ten."""
    from ..models.load import local_model
    from ..session import Session

    session = Session.open(args.session, args.root)
    spec = args.model or session.info.get("base_model")
    if spec and session.images():  # without images, train refuses first (and says so)
        local_model(spec, want="diffusers", home=session.path.parent.parent)


def run(args: argparse.Namespace) -> int:
    _fetch_model_first(args)
    from ..train import train

    skip = {"session", "root", "debug", "func", "command", "json", "force", "eval", "eval_prompts"}
    fields = {k: v for k, v in vars(args).items() if k not in skip}
    if fields.get("min_snr_gamma") == 0:
        fields["min_snr_gamma"] = None
    config = TrainConfig(**fields)
    result = train(args.session, config, home=args.root, force=args.force)
    scores = _evaluate_after(args, config, result)
    if args.json:
        out = {k: (str(v) if k == "samples" else v) for k, v in vars(result).items()}
        out["samples"] = [str(s) for s in result.samples]
        out["eval"] = scores
        print(json.dumps(out))
    else:
        print(result.summary())
    return 130 if result.stopped == "interrupted" else 0


def _evaluate_after(args: argparse.Namespace, config: TrainConfig, result: Any) -> dict[str, Any] | None:
    """``fastsd eval`` on the run's final export (``--eval``); a failure is a warning, never a failed run.

    Runs in the main process only, after training has freed the GPU, with the sample steps and
    the training size; skipped when the run stopped early or exported nothing.
    """
    import os
    import sys

    import torch

    wanted = {"on": True, "off": False}.get(args.eval, torch.cuda.is_available())
    if not wanted or result.stopped or not result.models or os.environ.get("RANK", "0") != "0":
        return None
    from ..errors import FastsdError
    from ..eval import evaluate
    from ..session import Session

    session = Session.open(args.session, args.root)
    try:
        r = evaluate(
            session,
            export=result.models[-1],
            prompts=args.eval_prompts,
            steps=config.sample_steps,
            size=config.resolution,
            device=args.device,
            home=args.root,
        )
    except FastsdError as err:
        print(f"fastsd: warning: eval skipped: {err}; run 'fastsd eval {args.session}' later", file=sys.stderr)
        return None
    except Exception as err:  # noqa: BLE001 - the run is trained and exported: report it, whatever eval hit
        if args.debug:
            raise
        print(
            f"fastsd: warning: eval failed ({type(err).__name__}: {err}); the model is exported; "
            f"run 'fastsd eval {args.session} --debug' for details",
            file=sys.stderr,
        )
        return None
    if not args.json:
        from ..eval.run import table

        print(f"eval of {r.export} ({r.prompts} prompt(s) x {r.images_per_prompt}, {r.seconds:.0f} s):")
        print(table([(r.export, r.metrics)]))
    return {"export": r.export, **r.to_dict()}
