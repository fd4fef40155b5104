"""DreamBooth training on the tiny fixtures (CPU): what trains changes, what is frozen doesn't; prior
preservation, resume equivalence, exports that load, NaN handling, 2 processes, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import ModelsBox

from fastsd.errors import FastsdError
from fastsd.session import Session
from fastsd.train import TrainConfig, checkpoint, train
from fastsd.train.parts import BaseModel


def _state_weights(session: Session) -> dict[str, torch.Tensor]:
    """The weights of the session's newest checkpoint, as a resume reads them."""
    return checkpoint.load(session.path / session.latest_checkpoint()["path"])["weights"]


FAST = {"resolution": 64, "allow_resolution": True, "log_every": 1, "save_every": 0, "min_snr_gamma": 5.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_session(home, model, name="dog", n=3, **kw):
    s = Session.create(name, home, base_model=str(model), resolution=64, class_word="dog", **kw)
    for i in range(n):
        rng = np.random.RandomState(i)
        arr = (rng.rand(64, 64 + 32 * (i % 2), 3) * 255).astype("uint8")  # one non-square: buckets
        Image.fromarray(arr).save(s.instance_dir / f"img{i}.png")
    return s


@pytest.fixture
def captured():
    """Pass as ``on_models=``: ``captured["models"]`` is the run's BaseModel, to inspect its modules afterwards."""
    return ModelsBox()


def _base(model, sub, cls):
    return cls.from_pretrained(model, subfolder=sub, local_files_only=True)


def _changed(before, module, keys=None):
    now = dict(module.named_parameters())
    return {k for k, v in before.items() if (keys is None or k in keys) and not torch.equal(v, now[k].detach().cpu())}


def test_full_sd1_sequential_trains_te_then_unet(home, tiny_sd1, captured):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    s = make_session(home, tiny_sd1)
    r = train(s, TrainConfig(method="full", te_steps=2, unet_steps=2, offset_noise=0.05, **FAST), on_models=captured)
    assert r.steps == 4 and r.stopped is None and np.isfinite(r.final_loss)
    m = captured["models"]
    unet0 = dict(_base(tiny_sd1, "unet", UNet2DConditionModel).named_parameters())
    te0 = dict(_base(tiny_sd1, "text_encoder", CLIPTextModel).named_parameters())
    vae0 = dict(_base(tiny_sd1, "vae", AutoencoderKL).named_parameters())
    assert len(_changed(unet0, m.unet)) > len(unet0) // 2
    assert len(_changed(te0, m.text_encoders[0])) > len(te0) // 2
    assert not _changed(vae0, m.vae)
    ckpt = _state_weights(s)
    assert {k.split(".")[0] for k in ckpt} == {"unet", "text_encoder"}
    assert s.info["progress"]["step"] == 4


def test_full_sd2_v_prediction_unet_only_keeps_te_frozen(home, tiny_sd2, captured):
    from transformers import CLIPTextModel

    s = make_session(home, tiny_sd2)
    r = train(s, TrainConfig(method="full", te_steps=0, unet_steps=2, **FAST), on_models=captured)
    assert r.steps == 2
    te0 = dict(_base(tiny_sd2, "text_encoder", CLIPTextModel).named_parameters())
    assert not _changed(te0, captured["models"].text_encoders[0])
    ckpt = _state_weights(s)
    assert {k.split(".")[0] for k in ckpt} == {"unet"}


def test_lora_sdxl_joint_exports_loadable_kohya_file(home, tiny_sdxl, captured):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    s = make_session(home, tiny_sdxl)
    r = train(
        s,
        TrainConfig(method="lora", te_steps=2, unet_steps=2, schedule="joint", unet_lr=1e-2, te_lr=1e-2, **FAST),
        on_models=captured,
    )
    assert r.steps == 2 and len(r.models) == 1
    m = captured["models"]
    base = dict(_base(tiny_sdxl, "unet", UNet2DConditionModel).named_parameters())
    peft_names = {n.replace(".base_layer", ""): p for n, p in m.unet.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[k], peft_names[k].detach().cpu().float()) for k in base)  # frozen base
    lora_file = s.path / r.models[0]
    keys = load_file(lora_file).keys()
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert s.models()[0]["kind"] == "lora"

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def render():
        g = torch.Generator().manual_seed(0)
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, generator=g, output_type="np")

    before = render().images
    pipe.load_lora_weights(str(lora_file))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert np.abs(render().images - before).max() > 1e-4


def test_prior_preservation_generates_then_reuses(home, tiny_sd1, monkeypatch):
    s = make_session(home, tiny_sd1, n=2)
    cfg = TrainConfig(method="lora", unet_steps=1, prior_preservation=True, num_class_images=2, sample_steps=2, **FAST)
    train(s, cfg)
    folder = s.class_images_dir("a photo of dog")
    made = sorted(folder.glob("*.png"))
    assert len(made) == 2
    stamps = [p.stat().st_mtime_ns for p in made]
    monkeypatch.setattr(BaseModel, "pipeline", lambda *a, **k: pytest.fail("class images regenerated"))
    train(s, TrainConfig(**{**cfg.to_dict(), "export": False}))
    assert [p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))] == stamps


def test_interrupted_then_resumed_equals_uninterrupted(home, tiny_sd1):
    cfg = {"method": "full", "te_steps": 1, "unet_steps": 4, "seed": 3, "export": False, **FAST}
    a = make_session(home, tiny_sd1, name="a")
    train(a, TrainConfig(**cfg))

    b = make_session(home, tiny_sd1, name="b")

    def kill(step, info):
        if step == 3:
            raise KeyboardInterrupt

    r = train(b, TrainConfig(**cfg), on_log=kill)
    assert r.stopped == "interrupted" and b.latest_checkpoint()["step"] == 3
    r = train(Session.open("b", home), TrainConfig(**cfg, resume=True))
    assert r.steps == 5 and r.stopped is None

    wa = _state_weights(a)
    b = Session.open("b", home)
    wb = _state_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # the text encoder stopped training at step 1: step 5's state links step 3's file, not a copy
    (at3, at5), te = b.checkpoints(), "weights/text_encoder.safetensors"
    assert (at3["step"], at5["step"]) == (3, 5) and at3["files"][te] == at5["files"][te]
    assert (b.path / at3["path"] / te).stat().st_ino == (b.path / at5["path"] / te).stat().st_ino


def test_a_resume_with_another_optimizer_keeps_the_weights_and_restarts_the_moments(home, tiny_sd1, caplog):
    """A session started on one GPU class and resumed on another gets that preset's optimizer (a T4's adamw_lowmem,
    then an A100's AdamW): the 8-bit moments cannot load into AdamW's layout, so the run says so and goes on."""
    cfg = {"method": "full", "te_steps": 0, "seed": 3, "export": False, **FAST}
    s = make_session(home, tiny_sd1, name="moved")
    train(s, TrainConfig(**cfg, unet_steps=2, optimizer="adamw_lowmem"))
    at2 = _state_weights(s)
    r = train(Session.open("moved", home), TrainConfig(**cfg, unet_steps=4, optimizer="adamw", resume=True))
    assert r.steps == 4 and r.stopped is None
    assert any("optimizer state is adamw_lowmem's" in m and "start afresh" in m for m in caplog.messages)
    moved = _state_weights(Session.open("moved", home))
    assert any(not torch.equal(at2[k], moved[k]) for k in at2)  # it trained on from step 2's weights


@pytest.mark.parametrize(
    ("kind", "in_backward", "layout"),
    [("adamw", False, "adamw"), ("adamw_lowmem", False, "lowmem"), ("adamw_lowmem", True, "lowmem")],
)
def test_an_older_state_tells_its_optimizer_by_its_keys(kind, in_backward, layout):
    """States saved before the optimizer was recorded: the resume reads the layout from the per-weight keys, so a T4
    session's 8-bit moments are not loaded into an A100's AdamW (a KeyError before)."""
    from fastsd.train import optim

    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = optim.make_optim(kind, [([w], 1e-3)], in_backward=in_backward)
    w.grad = torch.randn_like(w)
    if in_backward:
        (w * w.grad).sum().backward()  # the hook steps it
    else:
        opt.step()
    saved = opt.state_dict()
    assert optim.saved_layout(saved) == (layout, in_backward)
    assert optim.saved_layout(optim.make_optim(kind, [([w], 1e-3)], in_backward=False).state_dict())[0] is None
    same = optim.make_optim(kind, [([w], 1e-3)], in_backward=in_backward)
    other = optim.make_optim("adamw" if layout == "lowmem" else "adamw_lowmem", [([w], 1e-3)], in_backward=False)
    assert optim.fits_saved(None, saved, same)  # no record: read from the keys
    assert not optim.fits_saved(None, saved, other)
    assert optim.fits_saved({"kind": "adamw_fused", "in_backward": False}, {}, optim.make_optim(
        "adamw", [([w], 1e-3)], in_backward=False))  # fused and foreach AdamW save the same layout  # fmt: skip


def test_periodic_states_are_written_while_training_goes_on_and_resume_exactly(home, tiny_sd1, monkeypatch):
    import threading

    cfg = {"method": "full", "te_steps": 1, "unet_steps": 4, "seed": 3, "export": False, **FAST, "save_every": 2}
    a = make_session(home, tiny_sd1, name="a")
    train(a, TrainConfig(**cfg))

    # b: step 2's state is held back until step 3 has trained, then the run dies at step 4
    monkeypatch.setattr(checkpoint, "HOST_HEADROOM_BYTES", 0)  # the tiny state always fits beside the run
    real, step3, waited = Session.write_checkpoint, threading.Event(), []

    def held(self, step, files, **kw):
        if step == 2:
            waited.append(step3.wait(timeout=60))  # times out if the trainer waits for this write
        return real(self, step, files, **kw)

    def on_log(step, info):
        if step == 3:
            step3.set()
        if step == 4:
            raise RuntimeError("the runtime died")

    monkeypatch.setattr(Session, "write_checkpoint", held)
    b = make_session(home, tiny_sd1, name="b")
    with pytest.raises(RuntimeError, match="runtime died"):
        train(b, TrainConfig(**cfg), on_log=on_log)
    monkeypatch.undo()
    assert waited == [True], "step 3 did not train while step 2's state was being written"
    b = Session.open("b", home)
    assert [c["step"] for c in b.checkpoints()] == [2]  # written, listed, nothing of the dead step
    r = train(b, TrainConfig(**cfg, resume=True))
    assert r.steps == 5 and r.stopped is None
    wa, wb = _state_weights(a), _state_weights(Session.open("b", home))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_states_go_to_the_background_only_with_host_room_and_the_plan_says_how_many(home, tiny_sd1, monkeypatch,
                                                                                     caplog):  # fmt: skip
    cfg = {"method": "lora", "unet_steps": 4, "export": False, **{**FAST, "save_every": 2}}
    monkeypatch.setattr(checkpoint, "HOST_HEADROOM_BYTES", 2**60)  # no host has room for the copy
    with caplog.at_level("INFO", logger="fastsd.train.checkpoint"):
        r = train(make_session(home, tiny_sd1, name="full-host"), TrainConfig(**cfg))
    assert r.plan.checkpoints_in_background == 0 and "written in place" in caplog.text
    monkeypatch.setattr(checkpoint, "HOST_HEADROOM_BYTES", 0)
    r = train(make_session(home, tiny_sd1, name="roomy-host"), TrainConfig(**cfg))
    assert r.plan.checkpoints_in_background == 2  # step 2's, and the last one (written while the export runs)
    assert len(r.checkpoints) == 2 and r.plan.to_dict()["checkpoints_in_background"] == 2


def test_the_last_state_is_written_while_the_export_runs_and_both_are_listed(home, tiny_sd1, monkeypatch):
    """The final state's write (10.8 GB for SD1.5 full on the H100 preset) overlaps the export; the export is
    listed in session.json only after the state, so the manifest still has one writer at a time."""
    from fastsd.train import export

    monkeypatch.setattr(checkpoint, "HOST_HEADROOM_BYTES", 0)
    seen = []
    real = export.export_lora

    def exporting(*args, **kwargs):
        seen.append([c["step"] for c in Session.open("overlap", home).checkpoints()])  # not listed yet
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "export_lora", exporting)
    r = train(make_session(home, tiny_sd1, name="overlap"), TrainConfig(method="lora", unet_steps=3, **FAST))
    s = Session.open("overlap", home)
    assert seen == [[]] and [c["step"] for c in s.checkpoints()] == [3] and len(s.models()) == 1
    assert r.checkpoints and r.models and r.plan.checkpoints_in_background == 1


def test_out_of_memory_outside_the_steps_is_one_line_naming_what_to_lower(home, tiny_sd1, monkeypatch):
    from fastsd.train import loop

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 MiB. GPU 0 has ...")

    monkeypatch.setattr(loop, "_cache_data", full)
    with pytest.raises(FastsdError) as err:
        train(make_session(home, tiny_sd1, n=1), TrainConfig(method="lora", unet_steps=1, **FAST))
    message = str(err.value)
    assert "\n" not in message and "(Tried to allocate 1024.00 MiB)" in message and "--vram-budget" in message


def test_nan_loss_stops_and_says_so(home, tiny_sd1, monkeypatch):
    s = make_session(home, tiny_sd1, n=1)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda a, b, reduction: (a - b) * float("nan"))
    with pytest.raises(FastsdError, match="NaN"):
        train(s, TrainConfig(method="lora", unet_steps=2, **FAST))
    assert s.models() == []


def test_unreadable_image_is_skipped(home, tiny_sd1, caplog):
    s = make_session(home, tiny_sd1, n=2)
    (s.instance_dir / "broken.png").write_bytes(b"not a png")
    r = train(s, TrainConfig(method="lora", unet_steps=1, export=False, **FAST))
    assert r.steps == 1
    assert "skipping unreadable image broken.png" in caplog.text


def test_full_export_loads_with_from_single_file(home, tiny_sd1, captured):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    s = make_session(home, tiny_sd1, n=1)
    r = train(s, TrainConfig(method="full", te_steps=0, unet_steps=1, **FAST), on_models=captured)
    path = s.path / r.models[0]
    assert path.suffix == ".safetensors" and any(m["file"] == r.models[0] for m in s.models())
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny_sd1), local_files_only=True, safety_checker=None
    )
    trained = captured["models"].unet.state_dict()
    base = _base(tiny_sd1, "unet", UNet2DConditionModel).state_dict()
    exported = pipe.unet.state_dict()
    assert set(exported) == set(trained)
    for key, value in exported.items():
        assert torch.equal(value, trained[key].detach().cpu().half().to(value.dtype)), key
    assert any(not torch.equal(base[k], trained[k].detach().cpu()) for k in base)  # it did train


def test_single_file_base_model_is_converted_once_and_trains(home, tiny_sd1, tmp_path, monkeypatch):
    from fastsd.models import convert, load

    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    single = convert.diffusers_to_single_file(tiny_sd1, tmp_path / "base.safetensors")
    folder = load.local_model(single, want="diffusers", config=tiny_sd1)
    assert (folder / "model_index.json").is_file() and folder.is_relative_to(tmp_path / "cache")
    calls = []
    monkeypatch.setattr(convert, "single_file_to_diffusers", lambda *a, **k: calls.append(a))
    assert load.local_model(single, want="diffusers", config=tiny_sd1) == folder and not calls  # cached
    s = make_session(home, folder, name="from_file", n=1)
    assert train(s, TrainConfig(method="lora", unet_steps=1, export=False, **FAST)).steps == 1


def test_registry_base_model_offline_is_one_clear_error(home, cli, tiny_sd1):
    s = make_session(home, tiny_sd1, name="offline", n=1)
    s.update(base_model="sd15")
    res = cli("train", "offline", "--steps", "1", env={"FASTSD_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 1
    where = home / "models" / "sd15"
    assert res.stderr.strip().splitlines() == [
        "fastsd: error: cannot download stable-diffusion-v1-5/stable-diffusion-v1-5: HF_HUB_OFFLINE is set and it "
        f"is not in the cache; put the model at {where} and pass --model {where}, or unset HF_HUB_OFFLINE"
    ]


def test_cli_end_to_end_lora_with_samples(home, tiny_sd1, cli):
    make_session(home, tiny_sd1, name="cli_dog")
    res = cli(
        "train", "cli_dog", "--method", "lora", "--steps", "2", "--resolution", "64", "--allow-resolution",
        "--sample-every", "2", "--sample-steps", "2", "--log-every", "1", "--json",
        env={"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["steps"] == 2 and len(out["samples"]) == 2 and out["models"]
    # what the whole command paid, by phase (the table benchmarks/e2e.py prints)
    assert {"load", "cache", "first_step", "sample", "export"} <= set(out["timings"])
    assert all(v >= 0 for v in out["timings"].values())
    s = Session.open("cli_dog", home)
    assert s.models()[0]["kind"] == "lora" and list(s.samples_dir.glob("*.png"))
    assert list(s.logs_dir.rglob("events.out.tfevents*"))
    bad = cli("train", "cli_dog", "--steps", "0", env={"FASTSD_HOME": str(home)})
    assert bad.returncode == 2 and "steps must be > 0" in bad.stderr


def test_two_processes_on_cpu(home, tiny_sd1, tmp_path):
    from conftest import REPO

    make_session(home, tiny_sd1, name="ddp", n=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "fastsd", "train", "ddp", "--method", "lora", "--steps", "2", "--resolution", "64",
        "--allow-resolution", "--log-every", "1", "--json",
    ]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    s = Session.open("ddp", home)
    assert s.latest_checkpoint()["step"] == 2 and len(s.models()) == 1


def test_optimizer_step_inside_backward_matches_normal_step():
    from fastsd.train.optim import make_optim

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    twin.load_state_dict(net.state_dict())
    normal = make_optim("adamw", [(list(net.parameters()), 1e-2)], in_backward=False)
    fused = make_optim("adamw", [(list(twin.parameters()), 1e-2)], in_backward=True)
    for i in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(i))
        net(x).square().mean().backward()
        normal.step()
        normal.zero_grad()
        twin(x).square().mean().backward()  # stepped by the hooks
        assert all(p.grad is None for p in twin.parameters())
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    fused.close()


def test_failed_run_never_leaves_impossible_progress(home, tiny_sd1, tmp_path, cli):
    s = make_session(home, tiny_sd1, name="progress", n=1)
    assert train(s, TrainConfig(method="lora", unet_steps=4, export=False, **FAST)).steps == 4
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_sd1, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    res = cli("train", "progress", "--method", "lora", "--te-steps", "1", "--steps", "1", "--model", str(broken),
              "--resolution", "64", "--allow-resolution", env={"FASTSD_HOME": str(home)})  # fmt: skip
    assert res.returncode != 0
    progress = Session.open("progress", home).info["progress"]
    assert progress["step"] <= progress["total_steps"], progress
