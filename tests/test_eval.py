"""fastsd eval: the metric maths against direct computation, and a tiny SD1 export scored end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from fastsd.eval.metrics import mean_matched_cosine, mean_pairwise_cosine, within_group_diversity
from fastsd.eval.prompts import LIVE_PROMPTS, OBJECT_PROMPTS, eval_prompts
from fastsd.session import Session

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_metrics_on_known_vectors():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    assert mean_pairwise_cosine([e1, e2], [[3.0, 0.0]]) == pytest.approx(0.5)  # cos 1 and 0
    assert mean_matched_cosine([e1, [1.0, 1.0]], [[2.0, 0.0], e2]) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert within_group_diversity([e1, e2], 2) == pytest.approx(1.0)
    assert within_group_diversity([e1, e1, e1, e2], 2) == pytest.approx(0.5)  # groups: identical, orthogonal


def test_metrics_match_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)

    def cos(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    direct = sum(cos(x, y) for x in a for y in b) / (6 * 4)
    assert mean_pairwise_cosine(a, b) == pytest.approx(direct, abs=1e-9)
    assert mean_matched_cosine(a[:4], b) == pytest.approx(sum(cos(a[i], b[i]) for i in range(4)) / 4, abs=1e-9)
    groups = [a[:3], a[3:]]
    div = 1 - sum(sum(cos(x[i], x[j]) for i in range(3) for j in range(3) if i != j) / 6 for x in groups) / 2
    assert within_group_diversity(a, 3) == pytest.approx(div, abs=1e-9)


def test_paper_prompts():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    dog = eval_prompts("sks", "dog")
    assert dog[10] == ("a sks dog wearing a red hat", "a dog wearing a red hat")
    assert eval_prompts("sks", "backpack")[10] == (
        "a sks backpack with a wheat field in the background",
        "a backpack with a wheat field in the background",
    )


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from fastsd.demo.tiny_scorers import build_tiny_clip, build_tiny_dino

    root = tmp_path_factory.mktemp("scorers")
    return build_tiny_dino(root / "dino"), build_tiny_clip(root / "clip")


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory):
    from fastsd.demo.tiny_scorers import build_tiny_lpips

    return build_tiny_lpips(tmp_path_factory.mktemp("lpips"))


@pytest.fixture
def trained(home, tmp_path, tiny_sd1):
    from fastsd.models.convert import diffusers_to_single_file

    src = tmp_path / "photos"
    src.mkdir()
    for i, rgb in enumerate([(200, 60, 20), (40, 90, 200)]):
        Image.new("RGB", (64, 64), rgb).save(src / f"p{i}.png")
    s = Session.create("rex", home, base_model=str(tiny_sd1), resolution=64, instance_token="zwx", class_word="dog")
    s.add_images(src, crop="center", progress=False)
    dst = s.models_dir / "rex-step-10.safetensors"
    diffusers_to_single_file(tiny_sd1, dst, half=False, overwrite=True)
    s.record_model(dst, kind="full", step=10)
    return Session.open("rex", home)


def test_evaluate_records_scores_tensorboard_and_a_sheet(trained, scorers, lpips_weights):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastsd.eval import evaluate

    dino, clip = scorers
    kw = {"dino": str(dino), "clip": str(clip), "lpips": str(lpips_weights)}
    r = evaluate(trained, **kw, prompts=2, images_per_prompt=2, prior=True, steps=2, size=64)
    assert set(r.metrics) == {"dino", "clip_i", "clip_t", "pres", "div"}
    assert all(-1 <= v <= 1 for k, v in r.metrics.items() if k != "div") and r.metrics["div"] > 0
    assert r.settings["lpips_model"] == str(lpips_weights) and "div_fallback" not in r.settings
    again = Session.open("rex", trained.path.parent.parent)
    (entry,) = again.models()
    assert entry["eval"]["metrics"] == r.metrics and entry["eval"]["seed"] == 0
    assert "eval       DINO" in again.describe()
    assert (again.path / r.grid).is_file() and Image.open(again.path / r.grid).size == (
        256,
        512,
    )  # 2 columns; 2 prompts + 4 class images
    events = list((again.logs_dir / "eval").iterdir())
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert acc.Scalars("eval/dino")[0].value == pytest.approx(r.metrics["dino"], abs=1e-4)
    assert acc.Scalars("eval/dino")[0].step == 10
    from fastsd import notebook as nb

    table = nb.show_eval(again)  # the notebook's table (and the grid below it)
    assert "<th>DINO</th>" in table.data and f"{r.metrics['dino']:.3f}" in table.data and "<th>DIV</th>" in table.data
    # fixed seeds: a second run gives the same scores
    assert evaluate(trained, **kw, prompts=2, images_per_prompt=2, prior=True, steps=2, size=64).metrics == r.metrics
    # LPIPS off: DIV is 1 - DINO similarity within each prompt's images, and the result says why
    off = evaluate(trained, **{**kw, "lpips": "off"}, prompts=2, images_per_prompt=2, prior=True, steps=2, size=64)
    assert set(off.metrics) == {"dino", "clip_i", "clip_t", "pres", "div_dino"} and 0 <= off.metrics["div_dino"] <= 2
    assert "--lpips off" in off.settings["div_fallback"]
    assert {k: v for k, v in off.metrics.items() if k != "div_dino"} == {
        k: v for k, v in r.metrics.items() if k != "div"
    }


def test_default_lpips_that_cannot_be_fetched_falls_back_to_div_dino(home, monkeypatch, lpips_weights):
    from fastsd.errors import NetworkError
    from fastsd.eval.run import _lpips
    from fastsd.models import fetch

    def offline(url, *args, **kwargs):
        raise NetworkError(f"download of {url} was cut (ConnectError); run the same command again to resume")

    monkeypatch.setattr(fetch, "download", offline)
    model, why = _lpips(None, home)
    assert model is None and "lpips-alex" in why and "download.pytorch.org" in why
    with pytest.raises(NetworkError):
        _lpips("lpips-alex", home)  # asked for by name: it must load
    model, why = _lpips(str(lpips_weights), home)
    assert model is not None and why == ""
    monkeypatch.setenv("FASTSD_REPO_LPIPS_ALEX", str(lpips_weights))  # an offline copy, as for other helpers
    assert _lpips(None, home)[0] is not None


def test_cli_eval_then_session_show_and_compare(cli, trained, scorers, lpips_weights, home):
    dino, clip = scorers
    env = {"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    r = cli("eval", "rex", "--prompts", "1", "--images-per-prompt", "2", "--steps", "1", "--size", "64",
            "--dino", str(dino), "--clip", str(clip), "--device", "cpu", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["result"]["metrics"]) == {"dino", "clip_i", "clip_t"}  # no class images: no PRES/DIV
    assert out["table"] == {"rex-step-10.safetensors": out["result"]["metrics"]}
    show = cli("session", "show", "rex", env=env)
    assert "eval       DINO" in show.stdout
    Session.create("other", home)
    r = cli("eval", "rex", "--show", "--compare", "other", env=env)
    assert r.returncode == 0 and "rex/rex-step-10.safetensors" in r.stdout and "clip_t" in r.stdout
    r = cli("eval", "other", env=env)
    assert r.returncode == 2 and "no exported model" in r.stderr
    r = cli("eval", "rex", "--prompts", "1", "--images-per-prompt", "2", "--steps", "1", "--size", "64",
            "--prior", "on", "--dino", str(dino), "--clip", str(clip), "--lpips", str(lpips_weights),
            "--device", "cpu", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"DIV is LPIPS ({lpips_weights})" in r.stdout and "LPIPS (AlexNet, v0.1)" in r.stdout
    (entry,) = Session.open("rex", home).models()
    assert entry["eval"]["metrics"]["div"] > 0 and entry["eval"]["lpips_model"] == str(lpips_weights)
    # no scoring model here and no Hub: said in seconds, naming the flag, before any image is generated
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "empty-hf-cache")}
    before = sorted(trained.samples_dir.glob("*"))
    r = cli("eval", "rex", "--clip", str(clip), "--device", "cpu", env=offline)
    assert r.returncode == 1 and "pass --dino" in r.stderr and "dino-vits16" in r.stderr, r.stderr
    assert sorted(trained.samples_dir.glob("*")) == before


@pytest.mark.slow
def test_train_scores_its_lora_export_when_asked(cli, home, tmp_path, tiny_sd1, scorers):
    dino, clip = scorers
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (50 * i, 100, 150)).save(src / f"p{i}.png")
    s = Session.create("lora_dog", home, base_model=str(tiny_sd1), resolution=64, class_word="dog")
    s.add_images(src, crop="center", progress=False)
    env = {"FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1", "FASTSD_REPO_DINO_VITS16": str(dino),
           "FASTSD_REPO_CLIP_VIT_B32": str(clip)}  # fmt: skip
    r = cli("train", "lora_dog", "--method", "lora", "--steps", "1", "--eval", "on", "--eval-prompts", "1",
            "--sample-steps", "1", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["eval"]["export"] == out["models"][-1] and set(out["eval"]["metrics"]) == {"dino", "clip_i", "clip_t"}
    assert Session.open("lora_dog", home).models()[-1]["eval"]["images_per_prompt"] == 4


def test_train_eval_auto_is_off_without_a_gpu(monkeypatch):
    import argparse

    from fastsd.cli.train import _evaluate_after

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = argparse.Namespace(stopped=None, models=["models/x.safetensors"])
    args = argparse.Namespace(eval="auto", session="nope", root=None)
    assert _evaluate_after(args, None, result) is None  # nothing opened, nothing loaded


def test_scores_read_from_a_hand_edited_session_json_never_crash_show(trained):
    trained.info["models"][0]["eval"] = {"metrics": {"dino": "high", "clip_t": 0.25}}
    trained.save()
    again = Session.open("rex", trained.path.parent.parent)
    assert "eval       CLIP-T 0.250" in again.describe() and "high" not in again.describe()
    trained.info["models"][0]["eval"] = "oops"
    trained.save()
    assert "eval " not in Session.open("rex", trained.path.parent.parent).describe()
