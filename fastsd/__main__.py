"""``python -m fastsd`` runs the CLI."""

from .cli import entry

entry()
