"""The Colab notebooks: valid, thin, and they run end to end on tiny models with a stand-in Colab.

Each notebook is executed cell by cell in a real kernel (``notebook_harness.execute``) with form
values injected; the tests then check what a user would see on Drive and in the cell outputs.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from notebook_harness import REPO, check_cells, execute, kernel_env, load, output_text, outputs_of_type, title

NOTEBOOKS = REPO / "notebooks"
NAMES = ("fastsd_dreambooth", "fastsd_webui", "fastsd_ocr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path, count: int = 3, size: tuple[int, int] = (560, 520)) -> list[Path]:
    from PIL import Image, ImageDraw

    paths = []
    for i in range(count):
        img = Image.new("RGB", size, (40 + 60 * i, 120, 200 - 50 * i))
        draw = ImageDraw.Draw(img)
        draw.ellipse((100 + 20 * i, 80, 400, 420 - 30 * i), fill=(230, 200 - 40 * i, 60))
        path = folder / f"photo_{i}.png"
        img.save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_and_thin(name):
    nb = load(NOTEBOOKS / f"{name}.ipynb")
    nbformat.validate(nb)
    assert check_cells(nb) == []
    first = [c for c in nb.cells if c.cell_type == "code"][0]
    assert re.search(r'^!pip install -q "fastsd @ \{install_from\}" ', first.source, re.M)
    assert "fastsd.install.install(" in first.source
    assert all(c.metadata.get("cellView") == "form" for c in nb.cells if c.cell_type == "code")
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are committed clean"


def test_committed_notebooks_match_the_generator():
    proc = subprocess.run([sys.executable, str(NOTEBOOKS / "build.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "source, problem",
    [
        ("#@title x\ndef f():\n    pass", "a function definition"),
        ("#@title x\nclass A:\n    pass", "a class definition"),
        ("#@title x\nf = lambda: 1", "a lambda"),
        ("#@title x\nwhile True:\n    pass", "while True"),
        ("#@title x\nname = input('name? ')", "input()"),
        ("#@title x\n!ls /content", "shell/magic line"),
        ("#@title x\n%cd /content", "shell/magic line"),
        ("#@title x\n" + "\n".join(f"a{i} = {i}" for i in range(9)), "9 lines of code"),
        ("#@title x\nsteps = 5 + 1  #@param {type:'integer'}", "not a literal"),
        ("x = 1", "no #@title"),
    ],
)
def test_static_check_catches(source, problem):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('#@title setup\n!pip install -q "fastsd"\nimport fastsd'),
        nbformat.v4.new_code_cell(source),
    ]
    problems = check_cells(nb)
    assert any(problem in p for p in problems), problems
    nb.cells = nb.cells[:1] + [nbformat.v4.new_code_cell("#@title ok\nsteps = 5  #@param {type:'integer'}\nrun(steps)")]
    assert check_cells(nb) == []


def test_fastsd_errors_are_one_line_in_a_kernel(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("#@title 1\nfrom fastsd import notebook as nb\nhome = nb.setup(drive=False)"),
        nbformat.v4.new_code_cell("#@title 2\nfrom fastsd.session import Session\nSession.open('nope')"),
        nbformat.v4.new_code_cell("#@title 3\nprint('not reached')"),
    ]
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    env = kernel_env(tmp_path, FASTSD_HOME=str(tmp_path / "home"))
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=False)
    with client.setup_kernel(env=env):
        client.execute_cell(nb.cells[0], 0)
        with pytest.raises(CellExecutionError):
            client.execute_cell(nb.cells[1], 1)
    text = output_text(nb.cells[1])
    assert text.strip().startswith("fastsd: error: no session named nope")
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1


# ---------------------------------------------------------------- execution on tiny models


@pytest.mark.slow
def test_dreambooth_notebook_runs(tmp_path, tiny_sd1):
    env = kernel_env(tmp_path)
    _images(Path(env["STANDIN_UPLOADS"]))
    values = {
        "base_model": str(tiny_sd1),
        "session_name": "rex",
        "instance_token": "zwx",
        "class_word": "dog",
        "resolution": 512,
        "drive_source": "",
        "crop": "smart",
        "method": "lora",
        "steps": 3,
        "text_encoder_steps": 0,
        "train_resolution": 64,
        "save_every": 2,
        "sample_every": 3,
        "images": 2,
        "try_steps": 2,
        "try_seed": 7,
        "delete": "checkpoints",
    }
    seen = {}

    def after_images(cell, rerun):
        assert "added 3 image(s)" in output_text(cell)
        again = output_text(rerun())  # a re-run uploads the same photos: skipped as duplicates
        assert "added 0 image(s), skipped 3 duplicate(s)" in again

    def after_train(cell, rerun):
        seen["train"] = output_text(cell)
        seen["train_html"] = "".join(outputs_of_type(cell, "text/html"))

    nb = execute(
        NOTEBOOKS / "fastsd_dreambooth.ipynb",
        values,
        env,
        cwd=tmp_path,
        after={"4.": after_images, "6.": after_train},
    )
    home = tmp_path / "drive" / "MyDrive" / "fastsd"
    info = json.loads((home / "sessions" / "rex" / "session.json").read_text())
    assert info["base_model"] == str(tiny_sd1) and info["instance_token"] == "zwx"
    assert info["progress"]["step"] == 3
    # trained: checkpoints on Drive, samples inline, a LoRA exported
    assert "finished: step 3/3" in seen["train"]
    assert seen["train_html"].count("data:image/png;base64") >= 2
    (lora,) = [m for m in info["models"] if m["kind"] == "lora"]
    assert (home / "sessions" / "rex" / lora["file"]).stat().st_size > 0
    # export cell lists the model and offers the remover (a widget, nothing deleted without a click)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert lora["file"].split("/")[-1] in output_text(last)
    assert outputs_of_type(last, "application/vnd.jupyter.widget-view+json")
    assert json.loads((home / "sessions" / "rex" / "session.json").read_text())["checkpoints"]
    assert "drive.mount" in (tmp_path / "colab-calls.log").read_text()
    # the runtime ends; a new one runs setup, model, session, train again: the session says where it stands
    # and training does not start over
    again = execute(NOTEBOOKS / "fastsd_dreambooth.ipynb", values, env, cwd=tmp_path, skip=("4.", "5.", "7.", "8."))
    session_cell, train_cell = (c for c in again.cells if c.cell_type == "code" and title(c)[:2] in ("3.", "6."))
    assert "3 instance image(s)" in output_text(session_cell) and "training is complete" in output_text(session_cell)
    assert "trained to step 3 of 3 already" in output_text(train_cell)
    # try: a grid of two generated images
    try_cell = [c for c in nb.cells if c.cell_type == "code" and "7. Try" in c.source][0]
    assert "".join(outputs_of_type(try_cell, "text/html")).count("data:image/png;base64") == 2


@pytest.mark.slow
def test_webui_notebook_serves(tmp_path, tiny_sd1):
    env = kernel_env(tmp_path)
    port = _free_port()
    values = {"backend": "builtin", "model": str(tiny_sd1), "tunnel": "auto", "port": port}
    seen = {}

    def get(url: str) -> int:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status

    def after_launch(cell, rerun):
        text = output_text(cell)
        url = re.search(r"open the web UI: (\S+)", text)[1]
        assert url.startswith(f"http://127.0.0.1:{port}")  # the stand-in Colab proxy
        seen["status"] = get(url)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=60) as r:
            seen["models"] = json.loads(r.read())
        again = output_text(rerun())  # re-running stops the first server, then starts again on the same port
        assert "stopped the builtin web UI" in again
        seen["status_again"] = get(url)

    def after_stop(cell, rerun):
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            get(f"http://127.0.0.1:{port}/")

    execute(NOTEBOOKS / "fastsd_webui.ipynb", values, env, cwd=tmp_path, after={"3.": after_launch, "4.": after_stop})
    assert seen["status"] == 200 and seen["status_again"] == 200
    assert any(str(tiny_sd1) in json.dumps(m) for m in seen["models"])
    assert "proxyPort" in (tmp_path / "colab-calls.log").read_text()


@pytest.mark.slow
def test_ocr_notebook_writes_markdown(tmp_path, tiny_glm_ocr):
    from PIL import Image, ImageDraw

    env = kernel_env(tmp_path)
    uploads = Path(env["STANDIN_UPLOADS"])
    pages = []
    for text in ("Invoice 42", "Total: 17 EUR"):
        img = Image.new("RGB", (420, 300), "white")
        ImageDraw.Draw(img).text((30, 120), text, fill="black")
        pages.append(img)
    pages[0].save(uploads / "invoice.pdf", save_all=True, append_images=pages[1:])
    pages[1].save(uploads / "receipt.png")
    values = {"documents": "", "model": str(tiny_glm_ocr), "max_tokens_per_page": 8, "preview_pages": 2}
    nb = execute(NOTEBOOKS / "fastsd_ocr.ipynb", values, env, cwd=tmp_path)
    out = tmp_path / "drive" / "MyDrive" / "fastsd" / "ocr"
    assert (out / "invoice" / "page_0001.md").is_file() and (out / "invoice" / "page_0002.md").is_file()
    assert (out / "invoice" / "document.md").is_file() and (out / "receipt" / "document.md").is_file()
    run_cell, preview = [c for c in nb.cells if c.cell_type == "code"][-2:]
    assert "2 document(s), 3 page(s): 3 done" in output_text(run_cell)
    shown = outputs_of_type(preview, "text/markdown")
    assert len(shown) == 2 and all("page" in m for m in shown)
