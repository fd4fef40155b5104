"""The first ten minutes: a CLI that starts at once, and offline, input and output messages a person can act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

HEAVY = ("torch", "diffusers", "transformers")

# Runs the CLI in-process and reports which heavy libraries it imported, whatever the exit.
_PROBE = """
import json, sys
from fastsd.cli import main
HEAVY = ("torch", "diffusers", "transformers")
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
sys.stdout.flush()
print(json.dumps({"exit": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}), file=sys.stderr)
"""


def _imports_of(*args: str, home) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTSD_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [("--help",), ("--version",), ("session", "list"), ("session", "show", "pets"), ("doctor",), ("train", "--help")],
)
def test_light_commands_do_not_import_torch(args, home, cli):
    assert cli("session", "new", "pets", env={"FASTSD_HOME": str(home)}).returncode == 0
    seen = _imports_of(*args, home=home)
    assert seen["exit"] in (0, None), seen
    assert seen["heavy"] == [], f"fastsd {' '.join(args)} imported {seen['heavy']}"
