"""On a CUDA GPU: the fast paths that only exist there give the same results as the plain ones.

The CPU suite checks the math of these paths without capture; these tests run the real CUDA
graphs (training step, OCR decode step). Skipped without a GPU; run on the lent H100 with
``pytest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastsd.session import Session
from fastsd.train import TrainConfig, loop, train

pytestmark = pytest.mark.gpu

FAST = {"resolution": 64, "allow_resolution": True, "log_every": 1, "save_every": 0, "export": False}


def _session(home, model, name):
    s = Session.create(name, home, base_model=str(model), resolution=64, class_word="dog")
    for i in range(2):
        arr = (np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(s.instance_dir / f"img{i}.png")
    return s


def _train(monkeypatch, home, model, name, graph: str, **cfg):
    box = {}
    real = loop._Models

    def spy(*a, **k):
        box["m"] = real(*a, **k)
        return box["m"]

    monkeypatch.setattr(loop, "_Models", spy)
    r = train(_session(home, model, name), TrainConfig(cuda_graph=graph, gpu="h100", precision="bf16", **cfg, **FAST))
    monkeypatch.undo()
    return {k: v.detach().float().cpu() for k, v in box["m"].unet.named_parameters()}, r


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "full", "te_steps": 0, "unet_steps": 6, "optimizer": "adamw_fused"},
        {"method": "full", "te_steps": 3, "unet_steps": 6, "schedule": "joint", "optimizer": "adamw_lowmem",
         "fused_backward": True},
        {"method": "lora", "te_steps": 0, "unet_steps": 6, "optimizer": "adamw_fused", "unet_lr": 1e-3},
    ],
    ids=["unet-fused", "unet+te-lowmem", "lora"],
)  # fmt: skip
def test_cuda_graph_training_matches_eager(home, tiny_sd1, monkeypatch, cfg):
    from diffusers import UNet2DConditionModel

    base = {
        k: v.float() for k, v in UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").state_dict().items()
    }
    eager, r_eager = _train(monkeypatch, home, tiny_sd1, "eager", "off", **cfg)
    graphed, r_graph = _train(monkeypatch, home, tiny_sd1, "graph", "on", **cfg)
    assert r_graph.plan.get("cuda_graph_captured") is True, r_graph.plan
    assert r_eager.plan["cuda_graph"] is False
    moved = 0
    for k, w in eager.items():
        name = k.replace("base_layer.", "")
        delta_e = w - base[name] if name in base and base[name].shape == w.shape else w
        delta_g = graphed[k] - base[name] if name in base and base[name].shape == w.shape else graphed[k]
        if delta_e.abs().max() > 0:
            moved += 1
            cos = torch.nn.functional.cosine_similarity(delta_e.flatten(), delta_g.flatten(), dim=0)
            assert cos > 0.99, (k, float(cos))  # the same updates, up to bf16 kernel differences
    assert moved > 0


def test_ocr_fast_decoder_with_cuda_graph_matches_generate(tiny_glm_ocr, monkeypatch, caplog):
    from fastsd.ocr import engine as ocr_engine
    from fastsd.ocr.engine import PageJob, TransformersEngine

    monkeypatch.setattr(ocr_engine, "pick_dtype", lambda device: torch.float32)  # no bf16 near-ties
    jobs = []
    for i, size in enumerate([(300, 400), (300, 400), (200, 200), (500, 300)]):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).text((20, 20), f"line {i}", fill="black")
        jobs.append(PageJob(i, im, "Text Recognition:"))
    fast = TransformersEngine(str(tiny_glm_ocr), device="cuda", max_new_tokens=24, local_files_only=True)
    stock = TransformersEngine(str(tiny_glm_ocr), device="cuda", max_new_tokens=24, fast=False, local_files_only=True)
    got = fast.run(jobs)
    assert fast.fast is not None and fast.fast.cuda_graphs
    assert "capture failed" not in caplog.text  # the graphs really ran
    assert [g.tokens for g in got] == [g.tokens for g in stock.run(jobs)]
