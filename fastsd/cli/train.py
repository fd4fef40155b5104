"""``fastsd train SESSION``: DreamBooth fine-tuning (full or LoRA) of the session's base model."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..train.config import METHOD_DEFAULTS, TrainConfig


def _onoff(value: str) -> bool:
    return value.lower() in ("1", "on", "true", "yes")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to every flag that takes a value and whose text does not say its default.

    A switch (``--prior``, ``--no-export``) has none to say: leaving it out is the default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unsaid = default is None or default is argparse.SUPPRESS or default == [] or action.nargs == 0
        if "default" in text or unsaid or not action.option_strings:
            return text
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        return f"{text} (default: {shown})"


def _number(value: Any) -> str:
    """``2e-6`` as people write it (not ``2e-06`` or ``0.0001``)."""
    if not isinstance(value, float) or value == 0 or abs(value) >= 0.1:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _by_method(name: str) -> str:
    """``full: 1500, lora: 1000``: a setting's per-method defaults, from :data:`METHOD_DEFAULTS`."""
    return ", ".join(f"{method}: {_number(values[name])}" for method, values in METHOD_DEFAULTS.items())


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field (its metadata: flag, help, metavar, choices).

    A field left at ``None`` (or a repeatable flag not given) is not passed on, so
    :class:`TrainConfig` and :func:`fastsd.train.resolve` decide its default (see :func:`config_from_args`).
    """
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        text = meta["help"]
        if "{by_method}" in text:
            text = text.replace("{by_method}", _by_method(f.name))
        kw: dict[str, Any] = {"dest": f.name, "help": text}
        kind = str(f.type).replace(" | None", "")
        if kind == "bool" and meta["metavar"]:
            kw.update(type=_onoff, default=f.default, metavar=meta["metavar"])
        elif kind == "bool":
            kw.update(action="store_false" if f.default else "store_true")
        elif kind.startswith("list["):
            kw.update(action="append", type={"list[int]": int}.get(kind, str), default=None, metavar=meta["metavar"])
        else:
            kw.update(type={"int": int, "float": float}.get(kind, str), default=f.default)
            kw.update({k: meta[k] for k in ("metavar", "choices") if meta[k]})
        p.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed options (those left unset keep the dataclass's defaults)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


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
    add_config_arguments(p)
    # the command's own flags (not training settings)
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

    config = config_from_args(args)
    result = train(args.session, config, home=args.root, force=args.force)
    scores = _evaluate_after(args, config, result)
    if args.json:
        out = result.to_json()
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
        if getattr(args, "debug", False):
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
