"""One spec resolver: a model spec means the same local model to every front door (issue 14).

The Hub is stood in by a filled local copy: with ``HF_HUB_OFFLINE=1``, ``sd15`` is what
``<home>/models/sd15`` holds (the tiny SD1 pipeline), and nothing may touch the network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image


def _offline_home(home: Path, tiny_sd1: Path, tmp_path: Path) -> dict[str, str]:
    shutil.copytree(tiny_sd1, home / "models" / "sd15")
    return {"FASTSD_HOME": str(home), "HF_HUB_OFFLINE": "1", "FASTSD_CACHE": str(tmp_path / "cache")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_a_registry_name_is_the_same_local_model_in_convert_train_and_the_builtin_ui(cli, home, tiny_sd1, tmp_path):
    env = _offline_home(home, tiny_sd1, tmp_path)
    local = home / "models" / "sd15"

    # convert: SRC may be a spec like any other command's --model
    out = tmp_path / "sd15.safetensors"
    r = cli("convert", "sd15", str(out), "--half", env=env)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "sd1 full model, fp16" in r.stderr

    # train: the session's base model sd15 is the same folder
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(tmp_path / "dog.png")
    assert cli("session", "new", "dog", "--base-model", "sd15", env=env).returncode == 0
    assert cli("session", "add", "dog", str(tmp_path / "dog.png"), env=env).returncode == 0
    r = cli("train", "dog", "--method", "lora", "--steps", "1", "--resolution", "64", "--no-export", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((home / "sessions" / "dog" / "session.json").read_text())["base_model"] == "sd15"

    # the built-in UI: --model sd15 loads that folder (it used to call from_pretrained("sd15"))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsd", "webui", "--backend", "builtin", "--tunnel", "none", "--port", str(port),
         "--model", "sd15"],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (line := proc.stdout.readline()):
            lines.append(line)
            if "web UI ready:" in line:
                break
        assert any("web UI ready:" in ln for ln in lines), "".join(lines)
        base = f"http://127.0.0.1:{port}/sdapi/v1"
        models = _get_json(f"{base}/sd-models")
        assert [m["filename"] for m in models if m["model_name"] == "sd15"] == [str(local.resolve())]
        req = urllib.request.Request(
            f"{base}/txt2img",
            data=json.dumps({"prompt": "a dog", "width": 64, "height": 64, "steps": 1}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert len(json.loads(r.read())["images"]) == 1  # the model loaded and generated
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("keys", "kind"),
    [
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_x.alpha"], "lora"),
        (["unet.down_blocks.0.attentions.0.to_q.lora_A.weight"], "lora"),  # diffusers / peft
        (["lora_unet_x.hada_w1_a", "lora_unet_x.hada_w1_b"], "lora"),  # LoHa
        (["control_model.input_blocks.0.0.weight", "control_model.input_hint_block.0.weight"], "controlnet"),
        (["controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "controlnet"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"], "checkpoint"),
        (["conditioner.embedders.0.transformer.x", "model.diffusion_model.out.2.weight"], "checkpoint"),
        (["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"], "checkpoint"),  # a Diffusers UNet
        (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "checkpoint"),  # FLUX, Black Forest Labs' file
        (["joint_blocks.0.x_block.attn.qkv.weight"], "checkpoint"),  # SD3's MMDiT
        (["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"], "vae"),
        (["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.weight"], "vae"),
        (["emb_params"], "embedding"),
        (["clip_l", "clip_g"], "embedding"),
        (["some.other.weight"], None),
        ([], None),
    ],
)
def test_one_rule_tells_what_a_file_is_for_the_catalog_and_the_backends(tmp_path, keys, kind):
    """models.detect.kind_from_keys is the one rule; the built-in UI's catalog (three kinds) and the
    A1111/ComfyUI model links (all kinds) sort a real file the same way."""
    from safetensors.torch import save_file

    from fastsd.launch.modelfolders import classify
    from fastsd.models.detect import kind_from_keys
    from fastsd.webui.catalog import classify_file

    assert kind_from_keys(keys) == kind
    if not keys:
        return
    path = tmp_path / "models" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert classify_file(path) == (kind if kind in ("checkpoint", "lora", "vae") else None)
    if kind is not None:
        assert classify(path, tmp_path) == kind
