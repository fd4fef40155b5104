"""Run fastsd's Colab notebooks in tests, and keep their cells thin.

:func:`execute` loads a notebook, puts test values into its form fields (``name = value  #@param``
lines), drops the first cell's ``!pip install`` (the checkout is on ``PYTHONPATH``), and runs it
cell by cell in a real IPython kernel (nbclient + ipykernel) with the stand-in ``google.colab``
from ``tests/colab_standin`` importable and Colab's environment variables set, so the notebook
takes its Colab paths: Drive mounts (to a temp folder), uploads come from ``STANDIN_UPLOADS``.
``after`` hooks run while the kernel is alive (to reach a server the notebook started).

:func:`check_cells` is the static rule: every code cell is a form plus a few lines of calls.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat

REPO = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "colab_standin"

#: ``name = value  #@param ...``: a Colab form field.
PARAM_RE = re.compile(r"^(?P<indent>\s*)(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<value>.*?)\s*(?P<param>#@param\b.*)$")
MAX_CODE_LINES = 8
#: Statements and expressions a notebook cell must not contain (logic belongs in the package).
FORBIDDEN = {
    ast.FunctionDef: "a function definition",
    ast.AsyncFunctionDef: "a function definition",
    ast.ClassDef: "a class definition",
    ast.Lambda: "a lambda",
    ast.While: "a while loop",
    ast.For: "a for loop",
    ast.Try: "a try block",
    ast.If: "an if statement",
}


def load(path: str | os.PathLike[str]) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def title(cell: nbformat.NotebookNode) -> str:
    """The cell's ``#@title`` text ('' when it has none)."""
    for line in cell.source.splitlines():
        if line.strip().startswith("#@title"):
            return line.strip()[len("#@title") :].split("{", 1)[0].strip()
    return ""


def form_fields(nb: nbformat.NotebookNode) -> dict[str, str]:
    """Every form field's name and value source text."""
    out = {}
    for cell in code_cells(nb):
        for line in cell.source.splitlines():
            m = PARAM_RE.match(line)
            if m:
                out[m["name"]] = m["value"]
    return out


def inject(nb: nbformat.NotebookNode, values: dict[str, Any]) -> nbformat.NotebookNode:
    """A copy of ``nb`` with form fields set to ``values`` (written with ``repr``).

    Raises:
        KeyError: a name that is no form field of the notebook (a typo would test nothing).
    """
    nb = copy.deepcopy(nb)
    unknown = set(values) - set(form_fields(nb))
    if unknown:
        raise KeyError(f"not form fields of this notebook: {sorted(unknown)}")
    for cell in code_cells(nb):
        lines = cell.source.splitlines()
        for i, line in enumerate(lines):
            m = PARAM_RE.match(line)
            if m and m["name"] in values:
                lines[i] = f"{m['indent']}{m['name']} = {values[m['name']]!r}  {m['param']}"
        cell.source = "\n".join(lines)
    return nb


def drop_pip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` without the first code cell's ``!pip install`` line(s)."""
    nb = copy.deepcopy(nb)
    first = code_cells(nb)[0]
    first.source = "\n".join(ln for ln in first.source.splitlines() if not ln.lstrip().startswith("!pip"))
    return nb


def kernel_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment of a Colab-like kernel: stand-in google.colab, Drive in ``tmp``, no network use."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSD_HOME", "PYTEST_CURRENT_TEST")}
    drive = tmp / "drive" / "MyDrive"
    uploads = tmp / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(REPO), str(STANDIN), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "COLAB_RELEASE_TAG": "standin",
            "STANDIN_DRIVE": str(drive),
            "FASTSD_DRIVE_DIR": str(drive),
            "STANDIN_UPLOADS": str(uploads),
            "STANDIN_SECRETS": "{}",
            "STANDIN_LOG": str(tmp / "colab-calls.log"),
            "FASTSD_CACHE": str(tmp / "cache"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "MPLBACKEND": "agg",
        }
    )
    env.update(extra)
    return env


def execute(
    path: str | os.PathLike[str],
    values: dict[str, Any],
    env: dict[str, str],
    *,
    cwd: str | os.PathLike[str],
    timeout: int = 600,
    after: dict[str, Callable[[nbformat.NotebookNode, Callable[[], nbformat.NotebookNode]], None]] | None = None,
    skip: tuple[str, ...] = (),
) -> nbformat.NotebookNode:
    """Execute a notebook with form values injected; returns the executed notebook.

    Args:
        path: the ``.ipynb``.
        values: form field values.
        env: the kernel's environment (see :func:`kernel_env`).
        cwd: the kernel's working folder (Colab's ``/content``).
        timeout: seconds per cell.
        after: ``{title prefix: hook(cell, rerun)}``, each run right after the cell whose ``#@title``
            starts with the prefix, while the kernel still runs; ``rerun()`` executes that cell
            again and returns it (with the new outputs).
        skip: title prefixes of cells not to run.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (its output is in the message).
    """
    from nbclient import NotebookClient

    nb = drop_pip(inject(load(path), values))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    hooks = dict(after or {})
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or title(cell).startswith(skip):
                continue
            client.execute_cell(cell, index)
            for prefix, hook in list(hooks.items()):
                if title(cell).startswith(prefix):
                    hook(copy.deepcopy(cell), lambda cell=cell, index=index: client.execute_cell(cell, index))
                    del hooks[prefix]
    if hooks:
        raise KeyError(f"no cell titled {sorted(hooks)}")
    return nb


def output_text(cell: nbformat.NotebookNode) -> str:
    """All text a cell printed (streams, text/plain results, error lines)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "".join(parts)


def outputs_of_type(cell: nbformat.NotebookNode, mime: str) -> list[str]:
    return [
        out["data"][mime]
        for out in cell.get("outputs", [])
        if out.output_type in ("execute_result", "display_data") and mime in out.get("data", {})
    ]


# ---------------------------------------------------------------- static check


def _code_lines(source: str, first: bool) -> list[str]:
    """Lines that count as code: not blank, not comments, not form fields, not the first cell's pip line."""
    out = []
    for line in source.splitlines():
        s = line.strip()
        if not s or s.startswith("#") or PARAM_RE.match(line):
            continue
        if first and s.startswith("!pip install"):
            continue
        out.append(line)
    return out


def _install_guard(node: ast.AST) -> bool:
    """``if importlib.util.find_spec("fastsd"):``, which skips the set-up cell's rest after a failed install."""
    return isinstance(node, ast.If) and ast.unparse(node.test) == "importlib.util.find_spec('fastsd')"


def check_cells(nb: nbformat.NotebookNode, max_lines: int = MAX_CODE_LINES) -> list[str]:
    """Problems with a notebook's code cells, one line each (empty: it passes).

    Every code cell: a ``#@title``; at most ``max_lines`` lines of code besides comments and form
    fields; form values are literals; no function/class/lambda, loops, try or if statements (but the
    first cell's guard that skips the rest after a failed install); no
    ``!``/``%`` magics (but the first cell's ``!pip install``); no ``input(``; no ``while True``.
    """
    problems = []
    for n, cell in enumerate(code_cells(nb)):
        name = f"cell {n + 1} ({title(cell) or 'untitled'})"
        first = n == 0
        if not title(cell):
            problems.append(f"{name}: no #@title")
        for line in cell.source.splitlines():
            s = line.strip()
            if s.startswith(("!", "%")) and not (first and s.startswith("!pip install")):
                problems.append(f"{name}: shell/magic line {s!r}")
            m = PARAM_RE.match(line)
            if m:
                try:
                    ast.literal_eval(m["value"])
                except (ValueError, SyntaxError):
                    problems.append(f"{name}: form field {m['name']} is not a literal: {m['value']!r}")
        code = _code_lines(cell.source, first)
        if len(code) > max_lines:
            problems.append(f"{name}: {len(code)} lines of code (at most {max_lines})")
        python = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("!", "%")))
        try:
            tree = ast.parse(python)
        except SyntaxError as err:
            problems.append(f"{name}: not valid Python ({err.msg}, line {err.lineno})")
            continue
        for node in ast.walk(tree):
            if first and _install_guard(node):
                continue  # the one branch a cell may hold: fastsd is not importable when its install failed
            for kind, what in FORBIDDEN.items():
                if isinstance(node, kind):
                    problems.append(f"{name}: {what} (line {node.lineno}); put logic in fastsd.notebook")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "input":
                problems.append(f"{name}: input() (line {node.lineno}); use a form field or a button")
        if re.search(r"while\s+True", python):
            problems.append(f"{name}: while True")
    return problems


if __name__ == "__main__":  # python tests/notebook_harness.py notebooks/*.ipynb
    bad = 0
    for arg in sys.argv[1:]:
        for problem in check_cells(load(arg)):
            print(f"{arg}: {problem}")
            bad += 1
    sys.exit(1 if bad else 0)
