"""What each fastsd feature needs from PyPI: the one table setup.py and the installer both read.

Kept free of imports beyond the standard library so ``setup.py`` can execute it before anything
is installed. torch is listed for completeness, but fastsd never installs, upgrades or downgrades
it: the runtime's own build (Colab's CUDA torch) is the one that must be used.
"""

from __future__ import annotations

#: Never installed, upgraded or downgraded by fastsd; only checked.
PROTECTED = ("torch", "torchvision", "torchaudio", "triton")

CORE: tuple[str, ...] = (
    "torch>=2.1",
    "numpy>=1.24",
    "safetensors>=0.4.3",
    "huggingface_hub>=0.26",
    "tqdm>=4.64",
    "pillow>=10.0",
    "psutil>=5.9",
    "packaging>=23.0",
)

#: feature name -> (what it is for, requirements)
FEATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": (
        "DreamBooth training (full and LoRA), sessions, model conversion",
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
            "gradio>=5.0",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "python-multipart>=0.0.9",
            "httpx>=0.27",
            "pyngrok>=7.2",
        ),
    ),
    "ocr": (
        "document OCR with GLM-OCR",
        (
            "transformers>=5.1",
            "accelerate>=1.0",
            "pypdfium2>=4.30",
            "bitsandbytes>=0.45",
            "httpx>=0.27",
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
)


def feature_names() -> list[str]:
    """The feature names ``fastsd install --features`` accepts (besides ``all``)."""
    return list(FEATURES)


def requirements_for(features: list[str] | tuple[str, ...]) -> list[str]:
    """Requirement strings for ``features`` in table order, without duplicates.

    Raises:
        KeyError: an unknown feature name (the caller turns it into a usage error).
    """
    out: list[str] = []
    for feature in features:
        for req in FEATURES[feature][1]:
            if req not in out:
                out.append(req)
    return out
