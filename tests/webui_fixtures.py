"""Helpers for the web UI tests: a fastsd home with tiny models, a kohya LoRA, a VAE, HTTP helpers."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = {"width": 64, "height": 64, "steps": 2}


def kohya_lora(pipeline_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA for the tiny SD1 UNet in kohya format (``lora_unet_*.lora_down/up.weight`` + ``.alpha``)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    tensors = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        part = "lora_down" if kind.startswith("A") else "lora_up"
        tensors[f"{name}.{part}.weight"] = (value * (0.5 if part == "lora_up" else 1.0)).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"ss_network_module": "networks.lora", "ss_output_name": out.stem})
    return out


def tiny_vae_folder(out: Path, seed: int = 7) -> Path:
    """A different (random) VAE saved as a Diffusers folder."""
    from fastsd.demo.tiny import tiny_vae

    torch.manual_seed(seed)
    tiny_vae().save_pretrained(out)
    return out


def make_home(root: Path, sd1: Path, sd2: Path | None = None, sdxl: Path | None = None) -> Path:
    """A fastsd home with the tiny models under models/, a LoRA exported by a session, and a VAE."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(sd1, root / "models" / "tiny-sd1")
    if sd2:
        shutil.copytree(sd2, root / "models" / "tiny-sd2")
    if sdxl:
        shutil.copytree(sdxl, root / "models" / "tiny-sdxl")
    kohya_lora(sd1, root / "sessions" / "dog" / "models" / "doglora.safetensors")
    tiny_vae_folder(root / "models" / "VAE" / "tinyvae")
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (how decompression bombs start)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width * 3 + 1) * 4)  # a few rows; the rest never arrives
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"), dtype=np.int16)


def info(response_json: dict) -> dict:
    return json.loads(response_json["info"])
