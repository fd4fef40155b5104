"""The device-side loss scaler of graphed fp16 steps does what torch.amp.GradScaler does eagerly.

Run on the CPU with fp32 weights: an fp16-like overflow is injected with a huge loss at chosen
steps; eager GradScaler (host-side skip) and :class:`DeviceScaler` through ``step.graph_step``
(skip decided on the device) must give the same weights, optimizer state, scale and skipped steps,
bit for bit. The CUDA-graph replay of the same step is ``tests/test_gpu.py``'s.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastsd.train import graph, optim, plan, step
from fastsd.train.optim import make_optim
from fastsd.train.scaler import DeviceScaler, skips_on_overflow

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: fp32 loss * 2**16 scale overflows to inf: what an fp16 backward does at a too-large scale
HUGE = 1e38


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64x128 = 8192 weights: lowmem's 8-bit moments; the rest keeps fp32 moments
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 16))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 64, generator=g), torch.randn(8, 16, generator=g)


def _fake_loss(den, inp):
    """``step.loss_of`` stand-in: the network's MSE times the step's boost (the ``t`` input)."""
    return torch.nn.functional.mse_loss(den(inp.inst.lat), inp.inst.noise) * inp.inst.t


def _run(monkeypatch, kind: str, device_side: bool, steps: int, overflow_at: set[int], growth_interval: int = 3):
    """Train ``steps`` steps; per step: weights, (scale, growth tracker); at the end the optimizer state."""
    net = _net()
    params = list(net.parameters())
    opt = make_optim(kind, [(params, 1e-2)], in_backward=False)
    if device_side:
        scaler = DeviceScaler("cpu", growth_interval=growth_interval)
    else:
        scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    up = step.Update(opt, params, max_grad_norm=1.0, foreach=False, scaler=scaler)
    monkeypatch.setattr(step, "loss_of", _fake_loss)
    history = []
    for i in range(steps):
        x, y = _batch(i)
        boost = torch.tensor(HUGE if i in overflow_at else 1.0)
        if device_side:  # the graphed step's code, run eagerly
            up.clear_grads()
            flat = {"lat": x, "noise": y, "t": boost, "tids": torch.zeros(8, 0)}
            step.graph_step(net, up, torch.autocast("cpu", enabled=False), flat)
        else:  # the loop's eager fp16 path
            scaler.scale(_fake_loss(net, SimpleNamespace(inst=SimpleNamespace(lat=x, noise=y, t=boost)))).backward()
            step.eager_update(up)
        sd = scaler.state_dict()
        history.append(([p.detach().clone() for p in params], (sd["scale"], sd["_growth_tracker"])))
    return history, opt.state_dict()["state"]


@pytest.mark.parametrize("kind", ["adamw_fused", "adamw_lowmem"])
def test_device_scaler_matches_grad_scaler_bit_for_bit(monkeypatch, kind):
    overflow_at = {0, 5, 6}
    eager, eager_state = _run(monkeypatch, kind, device_side=False, steps=12, overflow_at=overflow_at)
    dev, dev_state = _run(monkeypatch, kind, device_side=True, steps=12, overflow_at=overflow_at)
    scales = []
    for i, ((we, se), (wd, sd)) in enumerate(zip(eager, dev, strict=True)):
        assert se == sd, (i, se, sd)
        for a, b in zip(we, wd, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"step {i}")
        if i in overflow_at and i > 0:  # a skipped step leaves the weights bit-unchanged
            for a, b in zip(dev[i - 1][0], wd, strict=True):
                assert torch.equal(a, b)
        scales.append(sd[0])
    # 2**16 halved at each overflow (steps 0, 5, 6), doubled after 3 clean steps in a row (steps 1-3)
    assert scales[0] == 2.0**15 and scales[3] == 2.0**16 and scales[5] == 2.0**15 and scales[6] == 2.0**14
    assert eager_state.keys() == dev_state.keys()
    for key in eager_state:
        for name, value in eager_state[key].items():
            torch.testing.assert_close(dev_state[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    steps_counted = {float(s["step"]) for s in dev_state.values()}
    assert steps_counted == {12.0 - len(overflow_at)}  # skipped steps are not counted


def test_lowmem_found_inf_keeps_every_state_bit_unchanged():
    from fastsd.train.lowmem import LowMemAdamW

    p = torch.nn.Parameter(torch.randn(300, 70))  # 8-bit moments, the last block padded
    q = torch.nn.Parameter(torch.randn(10))  # fp32 moments
    opt = LowMemAdamW([p, q], lr=1e-2)
    for t in (p, q):
        t.grad = torch.randn_like(t)
    opt.step()
    before = (
        [p.detach().clone(), q.detach().clone()],
        {k: v.clone() for s in opt.state.values() for k, v in s.items()},
    )
    opt.found_inf = torch.ones(())
    p.grad, q.grad = torch.full_like(p, float("nan")), torch.full_like(q, float("inf"))
    opt.step()
    del opt.found_inf
    assert torch.equal(p, before[0][0]) and torch.equal(q, before[0][1])
    after = {k: v for s in opt.state.values() for k, v in s.items()}
    for k, v in before[1].items():
        assert torch.equal(after[k], v), k


def test_device_scaler_refuses_an_optimizer_that_cannot_skip_on_the_device():
    net = _net()
    foreach = torch.optim.AdamW(net.parameters(), foreach=True)
    assert not skips_on_overflow(foreach)
    assert skips_on_overflow(torch.optim.AdamW(net.parameters(), fused=True))
    net(torch.randn(2, 64)).sum().backward()
    with pytest.raises(ValueError, match="cannot skip"):
        DeviceScaler("cpu").step(foreach)


def test_scaler_state_resumes_across_grad_scaler_and_device_scaler():
    eager = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    eager.load_state_dict({**eager.state_dict(), "_growth_tracker": 5})
    dev = DeviceScaler("cpu")
    dev.load_state_dict(eager.state_dict())
    assert dev.state_dict() == eager.state_dict()
    dev.scale_t.fill_(256.0)
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(dev.state_dict())
    assert back.get_scale() == 256.0 and back._get_growth_tracker() == 5 and back.state_dict()["growth_interval"] == 7


def test_graph_gate_allows_fp16_with_an_optimizer_that_skips_on_the_device():
    ok = {"device": torch.device("cuda"), "precision": "fp16", "grad_accum": 1, "world": 1, "bucketed": False}
    assert graph.blockers(**ok, optimizer="adamw_fused") == []
    assert graph.blockers(**ok, optimizer="adamw_lowmem") == []
    assert any("fp16" in r for r in graph.blockers(**ok, optimizer="adamw"))
    assert graph.blockers(**ok, optimizer="adamw8bit") == ["optimizer adamw8bit (use adamw_fused, adamw, adamw_lowmem)"]


@pytest.mark.parametrize(
    ("precision", "mode", "bucketed", "expect"),
    [
        ("fp16", "auto", False, ("adamw_lowmem", True)),  # the T4 preset: graphed with adamw_lowmem
        ("fp16", "off", False, ("adamw8bit", False)),  # asked for eager: keeps bitsandbytes
        ("fp16", "auto", True, ("adamw8bit", False)),  # buckets block the graph anyway: no swap
        ("bf16", "auto", False, ("adamw8bit", False)),  # the L4 preset is left as it was
    ],
)
def test_t4_preset_swaps_bitsandbytes_for_lowmem_only_to_graph(monkeypatch, precision, mode, bucketed, expect):
    monkeypatch.setattr(optim, "resolve_kind", lambda kind, device: kind)  # as if bitsandbytes were there
    c = SimpleNamespace(method="lora", vram_budget_gb=14.0, resolution=512, batch_size=1, prior_preservation=False,
                        optimizer="adamw8bit", precision=precision, grad_accum=1, gradient_checkpointing="off",
                        fused_backward=None, cuda_graph=mode, channels_last=False, compile="off", lora_rank=4,
                        sample_every=0, export_every=0, master_weights="fp32")  # fmt: skip
    facts = {"native_resolution": 512, "family": "sd1"}
    p = plan.make_plan(c, facts, torch.nn.Linear(2, 2), trainable=1000, device=torch.device("cuda"), world=1,
                       bucketed=bucketed, scaler=object() if precision == "fp16" else None)  # fmt: skip
    assert (p.optimizer, p.cuda_graph) == expect
    assert bool(p.notes) == (p.optimizer == "adamw_lowmem")
    if p.notes:
        assert "adamw8bit" in p.in_words(c, "cuda") and "notes" in p.to_dict()
