"""``python -m fastsd`` runs the CLI."""

from .cli import main

raise SystemExit(main())
