"""Speed paths of the trainer on the CPU: the CUDA-graph step is the eager step's math, the 8-bit
plain-torch AdamW tracks AdamW and resumes exactly, the graph gate says why it is off, the planner
matches the H100 measurements."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import ModelsBox, square_session

from fastsd.train import TrainConfig, graph, memory, train
from fastsd.train.lowmem import BLOCK, LowMemAdamW, dequantize, dynamic_map, quantize
from fastsd.train.optim import make_optim

FAST = {"resolution": 64, "allow_resolution": True, "log_every": 1, "save_every": 0, "export": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dynamic_code_is_bitsandbytes_code():
    bnb = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        torch.testing.assert_close(dynamic_map(signed), bnb.create_dynamic_map(signed), atol=1e-7, rtol=0)


def test_block_quantization_error_is_small_relative_to_each_block():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, BLOCK, generator=g) * torch.logspace(-6, 2, 64).unsqueeze(1)  # blocks of every scale
    for signed, data in ((True, x), (False, x.abs())):
        q, scale = quantize(data, signed)
        assert q.dtype == torch.uint8 and scale.shape == (64,)
        back = dequantize(q, scale, signed)
        err = (back - data).abs().amax(dim=1) / data.abs().amax(dim=1)
        assert err.max() < 0.01, err.max()


def _regression(opt_factory, steps=30, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(128, 64)  # 8192 weights: the 8-bit path; the bias keeps fp32 moments
    w0 = net.weight.detach().clone()
    opt = opt_factory(net.parameters())
    x, y = torch.randn(256, 128), torch.randn(256, 64)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return net, w0, losses


def test_lowmem_adamw_fp32_moments_equal_torch_adamw():
    a, _, _ = _regression(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2), steps=5)
    b, _, _ = _regression(lambda p: LowMemAdamW(p, lr=1e-2, weight_decay=1e-2, min_8bit_size=10**9), steps=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)  # same math, other rounding order


def test_lowmem_adamw_8bit_tracks_torch_adamw():
    a, w0, la = _regression(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2))
    b, _, lb = _regression(lambda p: LowMemAdamW(p, lr=1e-2, weight_decay=1e-2))
    drift = (b.weight - a.weight).norm() / (a.weight - w0).norm()
    assert drift < 0.05, drift
    assert lb[-1] < 0.7 * lb[0] and abs(lb[-1] - la[-1]) < 0.02 * la[0]


def test_lowmem_state_is_two_bytes_per_weight():
    p = torch.nn.Parameter(torch.randn(1000, 100))
    opt = LowMemAdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    nbytes = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert nbytes < 2.1 * p.numel()


def test_device_lr_is_filled_in_place_and_resume_is_exact():
    def run(steps, resume_from=None):
        torch.manual_seed(0)
        net = torch.nn.Linear(128, 64)
        if resume_from is not None:
            net.load_state_dict(resume_from[0])
        opt = make_optim("adamw_lowmem", [(list(net.parameters()), 1e-2)], in_backward=False, device_lr=True)
        lr_tensor = opt.opt.param_groups[0]["lr"]
        if resume_from is not None:
            opt.load_state_dict(resume_from[1])
            assert opt.opt.param_groups[0]["lr"] is lr_tensor  # the graph's tensor survives loading
        start = 0 if resume_from is None else resume_from[2]
        for i in range(start, steps):
            opt.set_lr(1.0 / (i + 1))
            assert opt.opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(1e-2 / (i + 1))
            x = torch.randn(8, 128, generator=torch.Generator().manual_seed(i))
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return {k: v.clone() for k, v in net.state_dict().items()}, opt.state_dict(), steps

    full = run(5)
    part = run(3)
    resumed = run(5, resume_from=part)
    for k in full[0]:
        torch.testing.assert_close(full[0][k], resumed[0][k], rtol=0, atol=0)


def test_lowmem_in_backward_matches_normal_step():
    torch.manual_seed(0)
    net, twin = torch.nn.Linear(128, 64), torch.nn.Linear(128, 64)
    twin.load_state_dict(net.state_dict())
    normal = make_optim("adamw_lowmem", [(list(net.parameters()), 1e-2)], in_backward=False, device_lr=True)
    hooked = make_optim("adamw_lowmem", [(list(twin.parameters()), 1e-2)], in_backward=True, device_lr=True)
    assert len({id(g["lr"]) for o in hooked.opts for g in o.param_groups}) == 1  # one shared LR tensor
    for i in range(3):
        x = torch.randn(5, 128, generator=torch.Generator().manual_seed(i))
        normal.set_lr(0.5)
        hooked.set_lr(0.5)
        net(x).square().mean().backward()
        normal.step()
        normal.zero_grad()
        twin(x).square().mean().backward()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    hooked.close()


def test_graph_gate_lists_what_blocks_capture(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    ok = {"device": cuda, "precision": "bf16", "grad_accum": 1, "world": 1, "bucketed": False}
    assert graph.blockers(**ok, optimizer="adamw_fused") == []
    assert graph.blockers(**ok, optimizer="adamw_lowmem") == []
    assert graph.decide("auto", []) and not graph.decide("off", [])
    reasons = graph.blockers(**{**ok, "precision": "fp16", "bucketed": True}, optimizer="adamw")
    assert len(reasons) == 2 and any("fp16" in r for r in reasons)  # fp16 needs a device-side skip
    assert graph.blockers(**{**ok, "device": cpu}, optimizer="adamw") == ["the device is cpu"]
    with caplog.at_level(logging.WARNING):
        assert not graph.decide("on", reasons)
    assert "cuda_graph on ignored" in caplog.text


def _session(home, model, name):
    return square_session(home, model, name, size=64)


def _trained(monkeypatch, home, model, name, cfg, force_graph):
    """Train and return (UNet params, TE params, plan); ``force_graph`` takes the graph path on the CPU."""
    box = ModelsBox()
    with monkeypatch.context() as mp:
        if force_graph:
            mp.setattr(graph, "blockers", lambda **kw: [])
        cfg = TrainConfig(**cfg, cuda_graph="on" if force_graph else "off", **FAST)
        r = train(_session(home, model, name), cfg, on_models=box)
    m = box["models"]
    return (
        {k: v.detach().clone() for k, v in m.unet.named_parameters()},
        {k: v.detach().clone() for k, v in m.text_encoders[0].named_parameters()},
        r.plan,
    )


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "full", "te_steps": 0, "unet_steps": 3, "optimizer": "adamw_fused"},
        {"method": "full", "te_steps": 2, "unet_steps": 3, "schedule": "joint", "optimizer": "adamw_lowmem",
         "fused_backward": True, "prior_preservation": False},
        {"method": "lora", "te_steps": 0, "unet_steps": 3, "optimizer": "adamw_fused", "unet_lr": 1e-2},
    ],
    ids=["unet-fused", "unet+te-lowmem-in-backward", "lora"],
)  # fmt: skip
def test_graph_step_path_gives_the_eager_weights(home, tiny_sd1, monkeypatch, cfg):
    base_unet, base_te, _ = _trained(monkeypatch, home, tiny_sd1, "eager", cfg, force_graph=False)
    unet, te, plan = _trained(monkeypatch, home, tiny_sd1, "graph", cfg, force_graph=True)
    assert plan.cuda_graph is True
    for k in base_unet:
        torch.testing.assert_close(unet[k], base_unet[k], rtol=1e-5, atol=1e-6)
    for k in base_te:
        torch.testing.assert_close(te[k], base_te[k], rtol=1e-5, atol=1e-6)


def test_cuda_graph_is_a_no_op_on_the_cpu(home, tiny_sd1, monkeypatch):
    _, _, plan = _trained(
        monkeypatch, home, tiny_sd1, "cpu", {"method": "lora", "te_steps": 0, "unet_steps": 1}, force_graph=False
    )
    assert plan.cuda_graph is False


def test_planner_matches_h100_measurements():
    gib = memory.GIB
    unet = 859_520_964
    est = memory.plan(budget_gb=None, family_key="sd1", pixels_ratio=1, batch=1, trainable=unet, frozen_bytes=0,
                      optimizer="adamw_fused", low_precision=True, allow_in_backward=True, checkpointing="off",
                      fused_backward=False)["estimate_gb"]  # fmt: skip
    assert abs(est - 13.27) < 0.7, est  # measured peak, unet-eager
    est8 = memory.plan(budget_gb=None, family_key="sd1", pixels_ratio=1, batch=1, trainable=unet, frozen_bytes=0,
                       optimizer="adamw8bit", low_precision=True, allow_in_backward=True, checkpointing="off",
                       fused_backward=False)["estimate_gb"]  # fmt: skip
    assert abs(est8 - 8.47) < 0.7, est8  # measured peak, unet-eager-8bit
    sdxl = memory.plan(budget_gb=10, family_key="sdxl", pixels_ratio=1, batch=1, trainable=2_900_000,
                       frozen_bytes=int(4.8 * gib), optimizer="adamw_fused", low_precision=True,
                       allow_in_backward=True, checkpointing="auto", fused_backward=None)  # fmt: skip
    assert sdxl["checkpoint_fraction"] >= 0.6 and sdxl["estimate_gb"] <= 10 - memory.fragmentation_gib(10)


def test_a_tight_budget_keeps_no_graph_pool_beside_sample_images():
    """Under a hard 10 GiB cap an SDXL LoRA run's sample image ran out of memory beside the step's CUDA-graph
    pool (1.95 GiB, H200 2026-12-03): the plan has the loop release the graph for images; a large budget keeps it."""
    assert memory.fragmentation_gib(9) == 0.5 and memory.fragmentation_gib(72) == pytest.approx(3.6)
    tight = {"family_key": "sdxl", "pixels_ratio": 1.0, "budget_gb": 10}
    assert not memory.room_for_images(estimate_gb=8.5, **tight)
    assert memory.room_for_images(estimate_gb=8.5, **{**tight, "budget_gb": 72})
    assert memory.room_for_images(estimate_gb=3.0, family_key="sd1", pixels_ratio=1.0, budget_gb=9)
    assert memory.room_for_images(estimate_gb=50.0, family_key="sd1", pixels_ratio=1.0, budget_gb=None)  # no budget


def test_lowmem_chunked_update_equals_whole_update(monkeypatch):
    import fastsd.train.lowmem as lowmem

    def run(chunk):
        monkeypatch.setattr(lowmem, "CHUNK_BLOCKS", chunk)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300, 70))  # 83 blocks, the last one padded
        opt = LowMemAdamW([p], lr=1e-2)
        for i in range(3):
            p.grad = torch.randn(300, 70, generator=torch.Generator().manual_seed(i))
            opt.step()
        return p.detach().clone()

    torch.testing.assert_close(run(4096), run(7), rtol=0, atol=0)


def test_checkpointing_without_rng_stash_gives_the_same_gradients(tiny_sd1):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet", local_files_only=True)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    unet(x, t, emb).sample.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in unet.named_parameters()}
    unet.zero_grad(set_to_none=True)
    assert memory.apply_checkpointing(unet, 1.0) > 0
    unet.train()
    unet(x, t, emb).sample.square().mean().backward()
    for n, p in unet.named_parameters():
        torch.testing.assert_close(p.grad, ref[n])


def test_cudnn_autotuning_only_where_it_pays(monkeypatch):
    """Autotuning cost 12 s of a cold first step on an H200 and gave the graphed steps nothing."""
    from fastsd.train.plan import autotune

    monkeypatch.delenv("FASTSD_CUDNN_BENCHMARK", raising=False)
    assert autotune(1000, graphed=True) is False
    assert autotune(1000, graphed=False) is True
    assert autotune(50, graphed=False) is False
    monkeypatch.setenv("FASTSD_CUDNN_BENCHMARK", "1")
    assert autotune(50, graphed=True) is True


def test_latent_caching_encodes_sdxl_sized_images_one_at_a_time():
    """Four fp32 1024 px encodes at once ran out of memory under a 10 GiB cap; 512 px keeps chunks of 4."""
    from types import SimpleNamespace

    from PIL import Image

    from fastsd.train import data

    seen: list[int] = []

    class FakeVae:
        config = SimpleNamespace(scaling_factor=0.13025, shift_factor=None)

        def encode(self, pixels):
            seen.append(pixels.shape[0])
            lat = torch.zeros(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8)
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=lat, std=lat + 1))

    for size, chunks in ((1024, [1, 1, 1, 1]), (512, [4])):
        seen.clear()
        img = Image.new("RGB", (size, size))
        examples = [data.Example(Path(f"{i}.png"), "", (size, size), img) for i in range(4)]
        out = data.encode_latent_dists(FakeVae(), examples, torch.device("cpu"), torch.float32)
        assert seen == chunks and len(out) == 4


def test_flow_training_turns_cudnn_attention_off_and_gives_it_back(home, tiny_sd1, tiny_flux):
    # cuDNN's attention backward gave NaN gradients on an H200 (tiny FLUX, bf16): SD3/FLUX train without
    # it; the UNet families keep it (it is faster there); a notebook's web UI gets it back afterwards
    from fastsd.train import gpuwarm

    before = torch.backends.cuda.cudnn_sdp_enabled()
    cfg = TrainConfig(method="lora", unet_steps=1, resolution=64, allow_resolution=True, log_every=1, save_every=0,
                      export=False, progress=False)  # fmt: skip
    seen = {}
    for name, model in [("unet", tiny_sd1), ("flux", tiny_flux)]:
        train(square_session(home, model, name, images=1), cfg,
              on_log=lambda step, info, name=name: seen.setdefault(name, torch.backends.cuda.cudnn_sdp_enabled()))  # fmt: skip
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    assert seen == {"unet": before, "flux": False}
    assert gpuwarm.start_warmup(torch.device("cpu"), torch.float32) is None  # nothing to load on a CPU


def _oom_once(monkeypatch, owner, name):
    """Make ``owner.name`` raise CUDA out of memory on its first call, as a too-tight first step does."""
    real, calls = getattr(owner, name), []

    def once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, once)


def test_a_graph_run_out_of_memory_in_its_first_forward_retries_with_full_checkpointing(home, tiny_sd1, monkeypatch):
    """The first (eager warm-up) step of a graphed run that runs out of memory before the optimizer touched
    a weight is retried with every block checkpointed, as an eager run's is (it failed outright under a
    hard 9 GiB cap on an H200, 2026-12-03)."""
    from fastsd.train import step

    _oom_once(monkeypatch, step, "loss_of")
    cfg = {"method": "lora", "te_steps": 0, "unet_steps": 2, "optimizer": "adamw_fused"}
    _, _, plan = _trained(monkeypatch, home, tiny_sd1, "retry", cfg, force_graph=True)
    assert plan.cuda_graph is True and plan.checkpoint_fraction == 1.0 and plan.checkpointed_blocks > 0


def test_out_of_memory_inside_the_optimizer_step_is_not_retried(home, tiny_sd1, monkeypatch):
    """Half-updated weights cannot be trained on: out of memory in the optimizer is the one-line error."""
    from fastsd.errors import FastsdError
    from fastsd.train import optim

    _oom_once(monkeypatch, optim.Optim, "step")
    cfg = {"method": "lora", "te_steps": 0, "unet_steps": 2, "optimizer": "adamw_fused"}
    with pytest.raises(FastsdError, match=r"^CUDA out of memory at step 0 .*: try ") as err:
        _trained(monkeypatch, home, tiny_sd1, "no-retry", cfg, force_graph=True)
    assert "state saved" not in str(err.value)


def _plan_for(
    tiny_sd1, monkeypatch, *, optimizer, from_preset, budget, precision="bf16", cuda_graph="auto", master_weights="fp32"
):
    """make_plan for an SD1.5-sized full fine-tune (860 M trained weights) on a CUDA device of ``budget`` GiB."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from fastsd.train import optim, plan

    monkeypatch.setattr(optim, "resolve_kind", lambda kind, device: kind)  # as with bitsandbytes on a GPU
    c = SimpleNamespace(method="full", vram_budget_gb=budget, resolution=512, batch_size=1, prior_preservation=False,
                        optimizer=optimizer, precision=precision, grad_accum=1, gradient_checkpointing="auto",
                        fused_backward=None, cuda_graph=cuda_graph, channels_last=False, compile="off", lora_rank=4,
                        sample_every=0, export_every=0, master_weights=master_weights)  # fmt: skip
    facts = {"native_resolution": 512, "family": "sd1", "optimizer_from_preset": from_preset}
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    scaler = object() if precision == "fp16" else None
    return plan.make_plan(c, facts, unet, trainable=859_520_964, device=torch.device("cuda"), world=1,
                          bucketed=False, scaler=scaler)  # fmt: skip


def test_a_presets_fp32_adamw_that_cannot_fit_the_budget_becomes_adamw_lowmem(tiny_sd1, monkeypatch):
    """A capped 10 GiB H200 got the H100 preset's fused AdamW (8 bytes of state per weight) and ran out of memory
    at step 2 (2026-12-04); the plan now takes 8-bit moments and says so."""
    p = _plan_for(tiny_sd1, monkeypatch, optimizer="adamw_fused", from_preset=True, budget=10.0)
    assert p.optimizer == "adamw_lowmem" and p.estimate_gb <= 10
    assert any("instead of the preset's adamw_fused" in n for n in p.notes)
    roomy = _plan_for(tiny_sd1, monkeypatch, optimizer="adamw_fused", from_preset=True, budget=72.0)
    assert roomy.optimizer == "adamw_fused" and not roomy.notes


def test_a_run_that_cannot_fit_its_budget_is_refused_in_one_line(tiny_sd1, monkeypatch):
    from fastsd.errors import UserInputError

    with pytest.raises(UserInputError, match=r"^this run needs about 1\d\.\d GiB of VRAM, over its --vram-budget of "
                                             r"10 GiB .*--optimizer adamw_lowmem, or --master-weights 16bit --optimizer adamw_lowmem, "
                                             r"or --method lora"):  # fmt: skip
        _plan_for(tiny_sd1, monkeypatch, optimizer="adamw_fused", from_preset=False, budget=10.0)  # the user's choice
    with pytest.raises(UserInputError, match="over its --vram-budget of 5 GiB"):
        _plan_for(tiny_sd1, monkeypatch, optimizer="adamw_lowmem", from_preset=False, budget=5.0)


def test_16bit_weights_fit_an_sd15_full_fine_tune_where_fp32_masters_cannot(tiny_sd1, monkeypatch):
    """The T4 preset's settings (fp16, 8-bit moments, graphed) at a 9 GiB budget: fp32 masters need 4 bytes of
    weight, 4 of gradient and 2 of fp16 cast per weight and are refused, naming the 16-bit option; 16-bit weights
    (2 + 2, no cast) fit."""
    from fastsd.errors import UserInputError

    t4 = {"optimizer": "adamw_lowmem", "from_preset": False, "budget": 9.0, "precision": "fp16"}
    with pytest.raises(UserInputError, match=r"--master-weights 16bit(,|$)"):
        _plan_for(tiny_sd1, monkeypatch, **t4)
    p = _plan_for(tiny_sd1, monkeypatch, **t4, master_weights="16bit")
    assert p.estimate_gb <= 9.0 and p.cuda_graph and p.master_weights == "16bit"
    assert "fp16 weights updated with stochastic rounding" in p.in_words(SimpleNamespace(method="full"), "cuda")


def test_a_graphed_fp16_full_fine_tune_counts_its_gradients_beside_its_activations(tiny_sd1, monkeypatch):
    """The T4 preset's SD1.5 full fine-tune, graphed, reserved 13.7 GiB where the eager rule (the peak holds the
    casts and activations or the gradients) estimated 9.3 (H200, 2026-12-04): a graph's pool keeps both."""
    graphed = _plan_for(tiny_sd1, monkeypatch, optimizer="adamw_lowmem", from_preset=False, budget=14.0,
                        precision="fp16")  # fmt: skip
    eager = _plan_for(tiny_sd1, monkeypatch, optimizer="adamw_lowmem", from_preset=False, budget=14.0,
                      precision="fp16", cuda_graph="off")  # fmt: skip
    assert graphed.cuda_graph and not eager.cuda_graph
    assert graphed.estimate_gb - eager.estimate_gb > 2.5 and 11.0 < graphed.estimate_gb <= 14.0


def test_cudnn_attention_is_off_for_flow_training_and_follows_its_override(monkeypatch):
    """SD3/FLUX train without cuDNN attention (NaN gradients); UNets keep it unless FASTSD_CUDNN_ATTENTION=0."""
    from fastsd.train import gpuwarm

    monkeypatch.delenv("FASTSD_CUDNN_ATTENTION", raising=False)
    for family, kept in (("sd1", True), ("sdxl", True), ("sd3", False), ("flux", False)):
        with gpuwarm.attention_restored():
            torch.backends.cuda.enable_cudnn_sdp(True)
            gpuwarm.training_attention(family)
            assert torch.backends.cuda.cudnn_sdp_enabled() is kept, family
    monkeypatch.setenv("FASTSD_CUDNN_ATTENTION", "0")
    with gpuwarm.attention_restored():
        torch.backends.cuda.enable_cudnn_sdp(True)
        gpuwarm.training_attention("sd1")
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
    assert gpuwarm.cudnn_attention_kept("flux") is False
    monkeypatch.setenv("FASTSD_CUDNN_ATTENTION", "1")
    assert gpuwarm.cudnn_attention_kept("flux") is True
