"""The ``fastsd`` command: one subcommand per module in this package, each a thin layer over the library.

A subcommand module defines ``add_parser(subparsers, parents)``, which registers its parser with
``func=<handler>``; the handler takes the parsed args and returns an exit code. Errors from the
library (:class:`fastsd.errors.FastsdError`) become one line on stderr and their exit code; any
other exception is reported in one line too, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__, liblogs
from ..errors import FastsdError
from ..features import TORCH_HINT
from ..redact import install_logging

#: Subcommand modules, in the order ``fastsd --help`` lists them.
COMMANDS = (
    "doctor", "install", "session", "model", "convert", "train", "caption", "eval", "webui", "ocr", "ask", "demo"
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (global options are accepted before or after the subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="fastsd home (default: FASTSD_HOME, Drive's MyDrive/fastsd in Colab, else ~/fastsd)",
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs"
    )
    parser = argparse.ArgumentParser(
        prog="fastsd",
        description="DreamBooth training, model conversion, web UIs and OCR on Colab-class GPUs.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"fastsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub, [common])
    return parser


def missing_module_message(module: str) -> str:
    """One line for a package that is not installed, saying how to get it."""
    top = module.split(".")[0]
    if top == "torch":
        return f"torch is not installed (fastsd never installs it): {TORCH_HINT}"
    return f"{top} is not installed: run fastsd install --features all (fastsd doctor shows what each feature lacks)"


def entry() -> None:
    """The console entry point: run :func:`main` and exit with its code.

    A command that sets ``fast_exit`` (the web UI server) ends the process right after its own
    clean-up, without the interpreter's final garbage collection of torch and diffusers, which on a
    loaded 2-core machine took seconds after Ctrl-C. Its files are already closed by then.
    """
    args: list[argparse.Namespace] = []
    code = main(parsed=args.append)
    if code == 130:
        _forget_handled_interrupt()
    if args and getattr(args[0], "fast_exit", False):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)


def _forget_handled_interrupt() -> None:
    """Let an interrupted command end with exit code 130, as it says.

    Under ``python -m fastsd``, CPython 3.10-3.13 remembers any KeyboardInterrupt that left code
    run from a string (``exec`` inside ``dataclasses``, jinja2 templates, imports) and, after a
    clean exit, kills the process with SIGINT instead (return code -2), even though fastsd caught
    it. The next string it runs resets that memory: this one.
    """
    builtins.eval("0")  # a constant: its only effect is the reset


def main(argv: Sequence[str] | None = None, parsed: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage or bad input).

    ``parsed`` is called with the parsed arguments (the entry point uses it to learn the command).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if parsed is not None:
        parsed(args)
    args.root = getattr(args, "root", None)
    args.debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
    )
    liblogs.quiet(args.debug)
    install_logging()  # no log line of fastsd or of a library it drives prints a secret
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FastsdError as err:
        if args.debug:
            raise
        print(f"fastsd: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fastsd: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if args.debug or not err.name:
            raise
        print(f"fastsd: error: {missing_module_message(err.name)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the one place that turns surprises into a line
        if args.debug:
            raise
        from ..models.fetch import connection_failure_message

        if line := connection_failure_message(err):  # a network failure is foreseeable, never "unexpected"
            print(f"fastsd: error: {line}", file=sys.stderr)
            return 1
        print(
            f"fastsd: unexpected error: {type(err).__name__}: {err} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
