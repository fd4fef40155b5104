"""Write fastsd's Colab notebooks from the cell lists below: ``python notebooks/build.py``.

The ``.ipynb`` files are generated so that a change is reviewed here, as plain Python strings,
and the JSON stays stable (fixed cell ids, no outputs). Commit both. ``--check`` exits 1 when a
committed notebook differs from what this script writes (CI runs it).

Cells are Colab forms: ``#@title`` names the cell, ``#@param`` lines are its fields,
``#@markdown`` lines its help text. Each cell calls one or two functions of ``fastsd``; all
logic lives in the package (``fastsd.notebook`` and the library), never here.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository_url() -> str:
    """The repository URL from the package metadata (``REPOSITORY`` in setup.py, its ``url=``).

    Read from the source, not by running setup.py: one place to change when the project moves.
    """
    tree = ast.parse((HERE.parent / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REPOSITORY" for t in node.targets):
            return ast.literal_eval(node.value).rstrip("/")
    raise SystemExit("setup.py defines no REPOSITORY = '<url>': the notebooks need the repository URL")


REPO_URL = repository_url()
#: Colab opens a notebook of a GitHub repository at colab.research.google.com/github/<owner>/<repo>/blob/...
COLAB_BASE = "https://colab.research.google.com/github/" + REPO_URL.removeprefix("https://github.com/")


def md(text: str) -> tuple[str, str]:
    return ("markdown", text.strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", text.strip("\n"))


def setup_cell(features: str, what: str) -> tuple[str, str]:
    return code(
        f'''
#@title 1. Set up: install fastsd and connect Google Drive
#@markdown Run once per runtime (Runtime > Change runtime type > **T4 GPU** first). With Drive connected, {what}
#@markdown stay in `MyDrive/fastsd` when the runtime ends, and installs are quick from the wheel cache kept there.
install_from = "git+{REPO_URL}"  #@param {{type:"string"}}
use_drive = True  #@param {{type:"boolean"}}
!pip install -q "fastsd @ {{install_from}}" > /tmp/fastsd-pip.log 2>&1 || echo "fastsd: error: could not install fastsd from {{install_from}}: $$(grep -m1 -oE '(fatal|ERROR):.*' /tmp/fastsd-pip.log || tail -n1 /tmp/fastsd-pip.log) (pip's output: /tmp/fastsd-pip.log)"
import importlib.util
if importlib.util.find_spec("fastsd"):  # a failed install stops at its one line above
    import fastsd.install
    from fastsd import notebook as nb
    home = nb.setup(drive=use_drive)
    installed = fastsd.install.install("{features}")
'''
    )


def intro(name: str, title: str, body: str) -> tuple[str, str]:
    link = f"{COLAB_BASE}/blob/main/notebooks/{name}.ipynb"
    return md(f"# {title}\n\n[![Open In Colab]({BADGE})]({link})\n\n{body.strip()}")


DREAMBOOTH = [
    intro(
        "fastsd_dreambooth",
        "fastsd DreamBooth",
        """
Teach Stable Diffusion a subject (a person, a pet, an object, a style) from a few photos.
Run the cells in order; each is a form: fill it in, then press its play button. Everything is kept
in a *session* on Google Drive, so after a disconnect you run the cells again with the same session
name and training continues where it stopped.

Errors show as one line starting with `fastsd: error:` that says what to do.
""",
    ),
    setup_cell("train,webui", "sessions, checkpoints and models"),
    code(
        """
#@title 2. Base model
#@markdown A registry name (`sd15`, `sd21-512`, `sd21-768`, `sdxl`, `sd35-medium`, `sd35-large`, `flux1-dev`),
#@markdown `hf:org/repo`, a Hugging Face or Civitai link, or a path on Drive (a Diffusers folder or a `.safetensors`
#@markdown file). Downloads happen once, into `fastsd/models`. SD3.5 and FLUX.1-dev are gated: accept the licence on
#@markdown their Hub page and add `HF_TOKEN` in Colab's Secrets. They train as LoRAs; on a T4 SD3.5 trains in fp16,
#@markdown and FLUX.1 (which overflows fp16) needs a bf16 GPU (L4, A100).
base_model = "sd15"  #@param {type:"string"}
model_dir = nb.model_path(base_model, diffusers=True)
print(f"base model: {model_dir}")
"""
    ),
    code(
        """
#@title 3. Session: start a new one, or continue one
#@markdown The subject is called `instance_token class_word` in prompts (e.g. `sks dog`). An existing session
#@markdown is opened as it is: it shows how far it got and whether training can resume. `resolution` 0 trains at
#@markdown the base model's native size (512 SD1.5, 768 SD2-768, 1024 SDXL, SD3.5 and FLUX.1).
session_name = "my_subject"  #@param {type:"string"}
instance_token = "sks"  #@param {type:"string"}
class_word = "person"  #@param {type:"string"}
resolution = 0  #@param [0, 512, 768, 1024] {type:"raw"}
session = nb.open_session(
    session_name, base_model=model_dir, resolution=resolution, instance_token=instance_token, class_word=class_word
)
"""
    ),
    code(
        """
#@title 4. Add images
#@markdown Leave `drive_source` empty to upload from this computer (photos, zips, and `.txt` captions named like
#@markdown their photos). Or give folders, files or zips on Drive, comma-separated. 10-20 varied photos work well.
#@markdown `smart` crops around faces or the subject; `none` keeps the aspect ratio.
drive_source = ""  #@param {type:"string"}
crop = "smart"  #@param ["smart", "center", "none"]
report = nb.add_images(session, drive_source, crop=crop)
"""
    ),
    code(
        """
#@title 5. Captions
#@markdown Optional: have a vision-language model write the captions first (`local`: Qwen3-VL-2B on this GPU,
#@markdown freed before training; `openai`: any OpenAI-compatible server, its key in Colab's Secrets panel as
#@markdown `OPENAI_API_KEY`). Captions you already have are kept.
auto_caption = "off"  #@param ["off", "local", "openai"]
caption_style = "sentence"  #@param ["sentence", "tags"]
endpoint_url = ""  #@param {type:"string"}
endpoint_model = ""  #@param {type:"string"}
nb.auto_caption(session, auto_caption, style=caption_style, base_url=endpoint_url, model=endpoint_model)
#@markdown Edit a caption and press Save (or Save all). An empty caption means the default `instance_token class_word`.
editor = nb.caption_editor(session)
"""
    ),
    code(
        """
#@title 6. Train
#@markdown `auto`: `full` for SD1.x/SD2.x/SDXL, `lora` for SD3.5 and FLUX.1 (the only method they train with).
#@markdown 0 means the method's default (`full`: 1500 UNet + 350 text-encoder steps at 2e-6; `lora`: 1000 steps
#@markdown at 1e-4); text-encoder steps -1 means the default, 0 keeps it frozen. Checkpoints are saved in the session
#@markdown every `save_every` steps; with `resume` ticked, running the cell again continues from the latest one.
method = "auto"  #@param ["auto", "full", "lora"]
steps = 0  #@param {type:"integer"}
text_encoder_steps = -1  #@param {type:"integer"}
learning_rate = 0  #@param {type:"number"}
train_resolution = 0  #@param {type:"integer"}
save_every = 500  #@param {type:"integer"}
sample_every = 500  #@param {type:"integer"}
sample_prompt = ""  #@param {type:"string"}
prior_preservation = False  #@param {type:"boolean"}
resume = True  #@param {type:"boolean"}
#@markdown `score`: DreamBooth likeness scores (DINO, CLIP-I, CLIP-T) of the export at the end; auto = on GPUs.
score = "auto"  #@param ["auto", "on", "off"]
result = nb.train(
    session, method=method, steps=steps, text_encoder_steps=text_encoder_steps, learning_rate=learning_rate,
    resolution=train_resolution, save_every=save_every, sample_every=sample_every, sample_prompt=sample_prompt,
    prior_preservation=prior_preservation, resume=resume, score=score,
)
"""
    ),
    code(
        """
#@title 7. Try the trained model
#@markdown Generates a grid with the newest exported model (blank prompt: `a photo of <token> <class>`).
#@markdown Tick `show_ui` for the full web UI inside the notebook.
prompt = ""  #@param {type:"string"}
images = 4  #@param {type:"integer"}
try_steps = 25  #@param {type:"integer"}
try_seed = -1  #@param {type:"integer"}
show_ui = False  #@param {type:"boolean"}
server = nb.try_model(session, prompt, count=images, steps=try_steps, seed=try_seed, show_ui=show_ui)
"""
    ),
    code(
        """
#@title 8. Your model, and freeing Drive space
#@markdown Exported models are `.safetensors` files for A1111, Forge, ComfyUI and diffusers; the fastsd Web UI
#@markdown notebook lists them by itself. Checkpoints are only for resuming and take most of the space:
#@markdown delete them (or the whole session) with the button below; it asks first.
download = False  #@param {type:"boolean"}
delete = "checkpoints"  #@param ["checkpoints", "session"]
models = nb.exports(session, download=download)
remover = nb.confirm_remove(session.name, what=delete)
"""
    ),
]

WEBUI = [
    intro(
        "fastsd_webui",
        "fastsd Web UI",
        """
Run a Stable Diffusion web UI on this runtime with your models: fastsd's built-in UI (with an
A1111-compatible API), AUTOMATIC1111, Forge or ComfyUI. Models in `MyDrive/fastsd/models` and the
models your DreamBooth sessions exported are listed in every UI. The backends' installs are kept
on Drive too, so the second start is quick.
""",
    ),
    setup_cell("webui", "models, settings and the UIs' installs"),
    code(
        """
#@title 2. Web UI and model
#@markdown `builtin` starts in seconds; A1111, Forge and ComfyUI install on their first start (several minutes).
#@markdown The model to load first: a registry name (`sd15`, `sdxl`, `sd35-medium`, `sd35-large`, `sd35-large-turbo`,
#@markdown `flux1-schnell`, `flux1-dev`...), `hf:org/repo`, a link, or a path on Drive; blank: only the models already
#@markdown in `fastsd/models` and your sessions. SD3.5 and FLUX.1-dev are gated: accept the licence on their Hub page
#@markdown and add `HF_TOKEN` in Colab's Secrets. For them the built-in UI picks the memory plan for this GPU (on a
#@markdown T4: SD3.5 Medium in fp16, SD3.5 Large and FLUX.1 in 4-bit NF4). ControlNets (comma-separated names,
#@markdown e.g. `canny, depth`) are picked for the model's family; extensions are git URLs (A1111/Forge/ComfyUI).
backend = "builtin"  #@param ["builtin", "a1111", "forge", "comfyui"]
model = "sd15"  #@param {type:"string"}
controlnet = ""  #@param {type:"string"}
extensions = ""  #@param {type:"string"}
model_file = nb.model_path(model)
nb.list_models()
"""
    ),
    code(
        """
#@title 3. Tunnel, login, launch
#@markdown `auto` uses Colab's own proxy, which the free tier allows; the link opens only in your signed-in browser.
#@markdown Public tunnels (ngrok, cloudflared, localtunnel, gradio) get a login: yours, or a generated one shown
#@markdown below. ngrok needs a token: add `NGROK_AUTHTOKEN` in Colab's Secrets (the key icon on the left).
tunnel = "auto"  #@param ["auto", "colab", "ngrok", "cloudflared", "localtunnel", "gradio", "none"]
username = ""  #@param {type:"string"}
password = ""  #@param {type:"string"}
port = 7860  #@param {type:"integer"}
ui = nb.webui(
    backend, model=model_file, tunnel=tunnel, user=username, password=password, controlnet=controlnet,
    extensions=extensions, port=port,
)
"""
    ),
    code(
        """
#@title 4. Stop the web UI
#@markdown Frees the GPU (for training, or another UI). Running cell 3 again also stops the running UI first.
nb.stop_webui()
"""
    ),
]

OCR = [
    intro(
        "fastsd_ocr",
        "fastsd OCR",
        """
Turn PDFs and scans into Markdown (text), HTML (tables), LaTeX (formulas) or JSON (fields you
name) with GLM-OCR on this runtime's GPU. Results are written page by page to
`MyDrive/fastsd/ocr/<document>/`; running again skips pages that are done.
""",
    ),
    setup_cell("ocr", "OCR results"),
    code(
        """
#@title 2. Documents
#@markdown Leave empty to upload from this computer. Or give PDFs, images or folders on Drive, comma-separated
#@markdown (globs like `/content/drive/MyDrive/scans/*.pdf` work).
documents = ""  #@param {type:"string"}
inputs = nb.ocr_inputs(documents)
"""
    ),
    code(
        """
#@title 3. Task and options, then run
#@markdown `text`: Markdown; `table`: HTML tables; `formula`: LaTeX; `extract`: JSON with the fields of `schema`
#@markdown (a template like `{"invoice_number": "", "total": ""}`, a JSON Schema, or a `.json` file on Drive).
#@markdown Pages like `1-5,8` (blank: all). `8bit`/`4bit` save GPU memory. Blank model: GLM-OCR from Hugging Face.
task = "text"  #@param ["text", "table", "formula", "extract"]
schema = ""  #@param {type:"string"}
pages = ""  #@param {type:"string"}
quantize = "none"  #@param ["none", "8bit", "4bit"]
model = ""  #@param {type:"string"}
max_tokens_per_page = 0  #@param {type:"integer"}
results = nb.ocr(
    inputs, task=task, schema=schema, pages=pages, quantize=quantize, model=model, max_tokens=max_tokens_per_page
)
"""
    ),
    code(
        """
#@title 4. Preview
#@markdown The first pages' results, as they were written to Drive.
preview_pages = 3  #@param {type:"integer"}
nb.preview_ocr(results, pages=preview_pages)
"""
    ),
]

NOTEBOOKS = {"fastsd_dreambooth": DREAMBOOTH, "fastsd_webui": WEBUI, "fastsd_ocr": OCR}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """The notebook ``name`` as nbformat v4, with Colab's metadata and form views."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "accelerator": "GPU",
        "colab": {"name": f"{name}.ipynb", "provenance": [], "gpuType": "T4", "toc_visible": True},
        "kernelspec": {"display_name": "Python 3", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(cells):
        cell_id = hashlib.sha1(f"{name}:{i}".encode()).hexdigest()[:12]
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(text, id=cell_id)
        else:
            cell = nbformat.v4.new_code_cell(text, id=cell_id)
            cell.metadata = {"cellView": "form"}
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def readme_text(text: str) -> str:
    """The README with its Colab badges and ``git+`` install lines pointing at :data:`REPO_URL`."""
    text = re.sub(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+(?=/blob/)", COLAB_BASE, text)
    return re.sub(r"git\+https://github\.com/[\w.-]+/[\w.-]+", f"git+{REPO_URL}", text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    readme = README.read_text()
    if readme_text(readme) != readme:
        if check:
            stale.append(README.name)
        else:
            README.write_text(readme_text(readme))
            print(f"wrote {README}")
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(build(name, cells)) + "\n"
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
