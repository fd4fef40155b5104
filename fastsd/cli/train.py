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

    result = train(args.session, config_from_args(args), home=args.root, force=args.force)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.summary())
    return 130 if result.stopped == "interrupted" else 0
