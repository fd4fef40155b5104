"""16-bit weights (``--master-weights 16bit``): stochastic rounding keeps small updates, the loss scale stays off
fp16 gradients until the optimizer's fp32 maths, and a full fine-tune's state is half the size and resumes exactly.

The T4 preset trains a full fine-tune this way (fp16); the CPU runs here use bf16, the same code path without a
loss scale (fp16 training needs CUDA). The GPU run of the fp16 path is in ``tests/test_gpu.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd.session import Session
from fastsd.train import TrainConfig, checkpoint, step, train
from fastsd.train.lowmem import LowMemAdamW, stochastic_round_
from fastsd.train.optim import make_optim
from fastsd.train.scaler import DeviceScaler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased(dtype):
    torch.manual_seed(0)
    lo = torch.tensor(1.0, dtype=dtype)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=dtype))
    x = (lo.float() + 0.3 * (hi.float() - lo.float())).expand(200_000).clone()  # 30 % of the way up
    r = stochastic_round_(x.clone(), dtype).to(dtype)
    assert set(r.unique().tolist()) == {lo.item(), hi.item()}
    assert (r == hi).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert x.to(dtype).eq(lo).all()  # round to nearest: always the lower one, the update lost
    neg = stochastic_round_(-x.clone(), dtype).to(dtype)  # the same for negative values, by magnitude
    assert (neg == -hi).float().mean().item() == pytest.approx(0.3, abs=0.01)


def _train_weights(dtype: torch.dtype, opt_kind: str, steps: int = 200, lr: float = 1e-5) -> torch.Tensor:
    """A 64x128 weight at 1.0 after ``steps`` AdamW steps on a constant gradient (each step moves it ~``lr``)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(64, 128, dtype=dtype))
    if opt_kind == "lowmem":
        opt = LowMemAdamW([w], lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        w.grad = torch.full_like(w, 0.5)
        opt.step()
    return w.detach().float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_weights_keep_updates_far_below_their_spacing(dtype):
    """200 updates of 1e-5 each (1 % of fp16's spacing at 1.0, 0.1 % of bf16's): fp32 moves by 2e-3, round to
    nearest not at all, stochastic rounding by 2e-3 on average."""
    fp32 = 1.0 - _train_weights(torch.float32, "lowmem")
    rounded = 1.0 - _train_weights(dtype, "lowmem")
    assert fp32.mean().item() == pytest.approx(2e-3, rel=0.02)
    assert rounded.mean().item() == pytest.approx(fp32.mean().item(), rel=0.1)
    assert (1.0 - _train_weights(dtype, "torch")).abs().max().item() == 0.0  # what plain 16-bit AdamW does


def _net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 16)).to(dtype)


def test_fp16_gradients_are_unscaled_and_clipped_in_fp32_by_the_optimizer():
    """An fp16 network's scaled fp16 gradients through DeviceScaler give the update of the fp32 network's true ones.

    The true gradients (~1e-7) are near AdamW's eps, so the update's size depends on unscaling them right, and
    clipping to 1e-6 (a third of their norm) acts on the true norm: left scaled or unclipped, the update would be
    several times larger. An overflowing step changes nothing.
    """
    ref, half = _net(torch.float32), _net(torch.float16)
    x = torch.randn(8, 64)
    ref_params, half_params = list(ref.parameters()), list(half.parameters())
    ref_start, half_start = [p.detach().clone() for p in ref_params], [p.detach().float() for p in half_params]
    ref_opt = LowMemAdamW(ref_params, lr=1e-2)
    opt = make_optim("adamw_lowmem", [(half_params, 1e-2)], in_backward=False)
    up = step.Update(opt, half_params, 1e-6, foreach=False, scaler=DeviceScaler("cpu"))
    small = 1e-5
    (ref(x).square().mean() * small).backward()
    assert torch.nn.utils.clip_grad_norm_(ref_params, 1e-6) > 2e-6
    ref_opt.step()
    up.scaler.scale(half(x.half()).float().square().mean() * small).backward()
    assert all(p.grad.dtype == torch.float16 for p in half_params)
    step.eager_update(up)
    assert up.scaler.found_inf.item() == 0
    for r, r0, h, h0 in zip(ref_params, ref_start, half_params, half_start, strict=True):
        moved_ref, moved_half = (r.detach() - r0).flatten(), (h.float() - h0).flatten()
        assert moved_half.abs().mean().item() == pytest.approx(moved_ref.abs().mean().item(), rel=0.02)
        assert torch.cosine_similarity(moved_ref, moved_half, dim=0) > 0.98  # each weight: rounding and fp16 maths
    before = [p.detach().clone() for p in half_params]
    up.scaler.scale(half(x.half()).float().square().mean() * 1e30).backward()  # overflows fp16: skipped
    step.eager_update(up)
    assert up.scaler.found_inf.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, half_params, strict=True))


def _session(home, model, name: str) -> Session:
    s = Session.create(name, home, base_model=str(model), resolution=64, class_word="dog")
    for i in range(2):
        arr = (np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(s.instance_dir / f"img{i}.png")
    return s


def _weight_bytes(s: Session) -> int:
    """Bytes of the newest state's weight files (its optimizer file is the same 8-bit moments either way)."""
    return sum(f.stat().st_size for f in (s.path / s.latest_checkpoint()["path"] / "weights").glob("*.safetensors"))


FAST = {"resolution": 64, "allow_resolution": True, "log_every": 1, "save_every": 0, "export": False}
RUN = {"method": "full", "te_steps": 1, "unet_steps": 4, "seed": 3, "precision": "bf16", **FAST}


def test_a_16bit_full_fine_tune_resumes_exactly_with_half_the_state(home, tiny_sd1):
    a = _session(home, tiny_sd1, "a")
    ra = train(a, TrainConfig(**RUN, master_weights="16bit"))
    assert ra.plan.master_weights == "16bit" and ra.plan.optimizer == "adamw_lowmem"
    weights = checkpoint.load(a.path / a.latest_checkpoint()["path"])["weights"]
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}

    b = _session(home, tiny_sd1, "b")

    def kill(at, info):
        if at == 3:
            raise KeyboardInterrupt

    assert train(b, TrainConfig(**RUN, master_weights="16bit"), on_log=kill).stopped == "interrupted"
    assert train(Session.open("b", home), TrainConfig(**RUN, master_weights="16bit", resume=True)).steps == 5
    resumed = checkpoint.load(b.path / Session.open("b", home).latest_checkpoint()["path"])["weights"]
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)  # the rounding's random bits resumed too

    fp32 = _session(home, tiny_sd1, "fp32")
    train(fp32, TrainConfig(**RUN, optimizer="adamw_lowmem", master_weights="fp32"))
    assert _weight_bytes(a) < 0.51 * _weight_bytes(fp32)


def test_the_t4_presets_full_fine_tune_trains_fp16_weights_through_the_device_scaler_and_resumes_exactly(
    home, tiny_sd1, monkeypatch
):
    """The T4 preset's default path end to end on the CPU (its fp16 refusal lifted for the test): fp16 weights,
    fp16 gradients kept scaled for adamw_lowmem, DeviceScaler's state and the rounding's bits in the checkpoint."""
    from fastsd.train import loop

    monkeypatch.setattr(loop, "_check_precision", lambda device, dtype: None)
    run = {**RUN, "gpu": "t4", "precision": "auto"}
    a = _session(home, tiny_sd1, "t4a")
    ra = train(a, TrainConfig(**run))
    assert (ra.plan.precision, ra.plan.master_weights, ra.plan.optimizer) == ("fp16", "16bit", "adamw_lowmem")
    state = checkpoint.load(a.path / a.latest_checkpoint()["path"])
    assert {w.dtype for w in state["weights"].values()} == {torch.float16}
    assert state["state"]["scaler"]["scale"] == 2.0**16  # no overflow in 5 steps, no growth before 2000

    b = _session(home, tiny_sd1, "t4b")

    def kill(at, info):
        if at == 3:
            raise KeyboardInterrupt

    assert train(b, TrainConfig(**run), on_log=kill).stopped == "interrupted"
    assert train(Session.open("t4b", home), TrainConfig(**run, resume=True)).steps == 5
    resumed = checkpoint.load(b.path / Session.open("t4b", home).latest_checkpoint()["path"])["weights"]
    assert all(torch.equal(state["weights"][k], resumed[k]) for k in resumed)


def test_the_cli_takes_master_weights_and_says_what_it_refuses(home, tiny_sd1, cli):
    _session(home, tiny_sd1, "cli16")
    env = {"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    common = ("--method", "full", "--te-steps", "0", "--steps", "1", "--resolution", "64", "--allow-resolution")
    res = cli("train", "cli16", *common, "--precision", "bf16", "--master-weights", "16bit", "--json", env=env)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout.strip().splitlines()[-1])["plan"]
    assert (plan["master_weights"], plan["optimizer"]) == ("16bit", "adamw_lowmem")
    bad = cli("train", "cli16", *common, "--master-weights", "16bit", "--optimizer", "adamw_fused",
              "--precision", "bf16", env=env)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--master-weights 16bit needs --optimizer adamw_lowmem" in bad.stderr.strip().splitlines()[-1]
    cpu_fp16 = cli("train", "cli16", *common, "--precision", "fp16", env=env)
    assert cpu_fp16.returncode == 2 and "fp16 training needs a CUDA GPU" in cpu_fp16.stderr.strip().splitlines()[-1]
