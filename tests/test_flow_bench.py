"""benchmarks/flow.py: the full-size SD3.5/FLUX.1 configs are the real models, and a tiny run goes through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import flow  # noqa: E402

from fastsd.models import memplan  # noqa: E402


def _billions(module) -> float:
    """Parameters and saved buffers, as a Diffusers folder's headers count them (memplan.folder_sizes): tied
    weights (T5's shared embedding) once."""
    unique = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() for t in unique.values()) / 1e9


@pytest.mark.parametrize("name", list(flow.MODELS))
def test_full_size_pipelines_have_the_real_models_sizes(name, tmp_path):
    family, variant, _ = flow.MODELS[name]
    with flow.built_on("meta"):  # shapes only: nothing is allocated
        pipe = flow.full_pipeline(name, tmp_path, flow.full_t5())
    # memplan's SD3.5 Large figure leaves out the saved 192x192 positional table (0.09 B): 1.1 % under
    assert _billions(pipe.transformer) == pytest.approx(memplan.TRANSFORMER_B[(family, variant)], rel=0.02)
    assert _billions(getattr(pipe, memplan.T5_COMPONENT[family])) == pytest.approx(memplan.T5_B, rel=0.01)
    clips = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sd3" else [])
    assert sum(_billions(c) for c in clips) == pytest.approx(memplan.CLIP_B[family], rel=0.01)
    assert _billions(pipe.vae) == pytest.approx(memplan.VAE_B, rel=0.01)
    assert pipe.vae.config.latent_channels == 16 and not pipe.vae.config.use_quant_conv
    assert next(pipe.transformer.parameters()).dtype == __import__("torch").bfloat16
    if family == "flux":
        assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
        assert pipe.vae.config.scaling_factor == 0.3611
    else:
        assert pipe.scheduler.config.shift == 3.0 and pipe.vae.config.shift_factor == 0.0609
        assert bool(pipe.transformer.config.dual_attention_layers) == (variant == "medium")


def test_a_tiny_build_links_the_shared_t5_and_a_run_measures_it(tmp_path):
    built = flow.build_child({"name": "flux1-dev", "work": str(tmp_path), "small": True})
    folder = Path(built["folder"])
    shared = next((tmp_path / "t5-tiny").glob("*.safetensors"))
    linked = folder / "text_encoder_2" / shared.name
    assert linked.stat().st_ino == shared.stat().st_ino  # written once, hard-linked into the model
    assert (folder / "model_index.json").is_file() and not list(tmp_path.glob("tokenizers-*"))

    spec = {"name": "flux1-dev", "plan": "nf4", "folder": str(folder), "home": str(tmp_path / "home")}
    out = flow.run_child({**spec, "steps": 3, "repeats": 1, "size": 64, "cap": None, "eager": False, "small": True})
    assert "error" not in out, out
    assert out["plan"] == "cpu" and out["steps"] == 3 and out["cfg_scale"] == 3.5  # no GPU: the CPU plan
    assert out["load_s"] > 0 and out["first_image_s"] > 0 and out["s_per_image"] > 0 and out["it_per_s"] > 0
    assert out["peak_rss_gib"] >= out["peak_anon_rss_gib"] > 0
    row = flow.table([out]).splitlines()[-1]
    assert row.startswith("| flux1-dev:nf4 | cpu | ")


def test_runs_are_filtered_by_model_and_plan():
    args = type("A", (), {"runs": None, "models": "flux1-dev", "plans": "nf4,int8"})()
    assert flow.select_runs(args) == [("flux1-dev", "nf4"), ("flux1-dev", "int8")]
    args.runs, args.models, args.plans = "sd35-large:offload", None, None
    assert flow.select_runs(args) == [("sd35-large", "offload")]
    args.runs = "sd35-large:fp8"
    with pytest.raises(SystemExit, match="unknown run"):
        flow.select_runs(args)
