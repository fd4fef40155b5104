"""What each fastsd feature needs from PyPI: the one table setup.py and the installer both read.

Kept free of imports beyond the standard library so ``setup.py`` can execute it before anything
is installed. fastsd never installs, upgrades or downgrades torch: the runtime's own build (Colab's CUDA torch) is the one that must be used. That is also why torch
is not a pip requirement of fastsd (as in diffusers): ``pip install fastsd`` on a machine without
torch must not pull a CUDA build of several GB. :data:`TORCH` is the range fastsd checks.

Ranges are lower bounds where fastsd needs a feature, plus upper bounds and exclusions only where a
release is *known* to break fastsd, each with its reason. The exact tested versions are in the lock
(``wheels/tested.txt``), which CI and ``fastsd install`` use; ranges are what fastsd can live with.
"""

from __future__ import annotations

#: Never installed, upgraded or downgraded by fastsd; only checked.
PROTECTED = ("torch", "torchvision", "torchaudio", "triton")

#: The torch fastsd needs. Checked (``fastsd doctor``, ``fastsd install``), never installed.
TORCH = "torch>=2.1"

#: How to get torch, for the one-line message shown where it is missing.
TORCH_HINT = (
    "install the build for your machine first: pip install torch (CUDA, Linux), or "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu (CPU only); see pytorch.org"
)

CORE: tuple[str, ...] = (
    "numpy>=1.24",
    "safetensors>=0.4.3",
    "huggingface_hub>=0.26",
    "tqdm>=4.64",
    "pillow>=10.0",
    "psutil>=5.9",
    "packaging>=23.0",
)

#: Releases known to break fastsd, excluded from every range that names the package:
#: name -> (specifier to add, why). Lift an entry only in a reviewed change that re-runs the suite.
KNOWN_BAD: dict[str, tuple[str, str]] = {
    "transformers": (
        "!=5.24.*",
        "5.24.0 requires peft>=0.22.0, which is not released (newest 0.21.2, 2026-12): LoRA training fails",
    ),
}

#: feature name -> (what it is for, requirements; :data:`KNOWN_BAD` is applied by requirements_for)
FEATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": (
        "DreamBooth training (full and LoRA), sessions, model conversion, likeness scores (fastsd eval)",
        (
            "diffusers>=0.32",
            "transformers>=4.46",
            "accelerate>=1.0",
            "peft>=0.13",
            "bitsandbytes>=0.45",
            "opencv-python-headless>=4.8,<5",  # 5.x ships no Haar cascades (smart crop)
            "tensorboard>=2.14",
            "httpx>=0.27",
        ),
    ),
    "webui": (
        "built-in web UI and A1111-compatible API, backends and tunnels",
        (
            "diffusers>=0.32",
            "transformers>=4.46",
            "accelerate>=1.0",
            "peft>=0.13",
            "scipy>=1.10",  # diffusers' LMS samplers (LMS, LMS Karras) import it
            "gradio>=5.0",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "python-multipart>=0.0.9",
            "httpx>=0.27",
            "pyngrok>=7.2",
        ),
    ),
    "ocr": (
        # fastsd caption/ask need the same: Qwen3-VL is in transformers since 4.57, the endpoint client is httpx
        "document OCR with GLM-OCR, PP-DocLayoutV3 layout and the OpenAI-compatible OCR server; "
        "captions and questions with vision-language models (fastsd caption, ask)",
        (
            "transformers>=5.1",
            "accelerate>=1.0",
            "pypdfium2>=4.30",
            "bitsandbytes>=0.45",
            "httpx>=0.27",
            "fastapi>=0.110",  # fastsd ocr serve
            "uvicorn>=0.29",
        ),
    ),
}

#: Extras that are not runtime features: what the test suite and the linter need.
TEST: tuple[str, ...] = (
    "pytest>=8.0",
    "ruff>=0.6",
    "nbformat>=5.9",
    "nbclient>=0.10",
    "ipykernel>=6.0",
    "ipywidgets>=7.7",
    "playwright>=1.45",
    "uv>=0.4",
    "cryptography>=42",  # tests write an encrypted PDF (pypdfium2 must refuse it by name)
    "openai>=1.40",  # tests drive fastsd ocr serve with the OpenAI client
    "glmocr>=0.1.5",  # tests run the official GLM-OCR SDK (self-hosted mode) against fastsd ocr serve
    "pymupdf>=1.24,<2",  # glmocr imports it; 2.x drags in onnxruntime and pymupdf4llm
)

#: Per feature, the imports that must work together for it to run (``fastsd doctor`` tries them in
#: a child process, so a broken pair shows as "not ready" before a run fails half way).
IMPORTS: dict[str, tuple[str, ...]] = {
    "train": (
        "import diffusers, transformers, accelerate, safetensors, cv2",
        "from peft import LoraConfig, inject_adapter_in_model",
        "from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler",
        "from transformers import CLIPTextModel, CLIPTokenizer",
        "from transformers import CLIPModel, ViTModel",  # fastsd eval's scorers
    ),
    "webui": (
        "import diffusers, transformers, gradio, fastapi, uvicorn, scipy",
        "from diffusers import StableDiffusionPipeline, LMSDiscreteScheduler",
    ),
    "ocr": (
        "import transformers, pypdfium2, fastapi, uvicorn",
        "from transformers import AutoProcessor, PPDocLayoutV3ForObjectDetection",
        "from transformers import AutoModelForImageTextToText",  # fastsd caption/ask's local engine
    ),
}


def requirements_for(features: list[str] | tuple[str, ...]) -> list[str]:
    """Requirement strings for ``features`` in table order, without duplicates.

    Raises:
        KeyError: an unknown feature name (the caller turns it into a usage error).
    """
    out: list[str] = []
    for feature in features:
        for req in FEATURES[feature][1]:
            req = with_exclusions(req)
            if req not in out:
                out.append(req)
    return out


def with_exclusions(requirement: str) -> str:
    """``requirement`` with the :data:`KNOWN_BAD` exclusion for its package appended, if any."""
    name = requirement.split(";")[0]
    for op in "<>=!~[ ":
        name = name.split(op)[0]
    bad = KNOWN_BAD.get(name.strip().lower().replace("_", "-"))
    if bad is None:
        return requirement
    spec, _, marker = requirement.partition(";")
    return f"{spec.strip()},{bad[0]}" + (f";{marker}" if marker else "")
