"""SD3.5 and FLUX.1: detection from headers/configs, exact Diffusers <-> single-file round trips, diffusers loads ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastsd.errors import UserInputError
from fastsd.models import convert_flow
from fastsd.models.convert import convert
from fastsd.models.detect import detect, weight_files
from fastsd.models.tensorfile import TensorSource, read_header

FIXTURES = {"sd3": "tiny_sd3", "flux": "tiny_flux"}


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = TensorSource(weight_files(a)), TensorSource(weight_files(b))
    try:
        names = sa.keys()
        assert set(names) == set(sb.keys())
        for key in names:
            x, y = sa.get(key), sb.get(key)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key
    finally:
        sa.close()
        sb.close()


def test_detect_tells_sd3_and_flux_and_their_variants_from_folders_and_files(tiny_sd3, tiny_flux, tmp_path):
    sd3 = detect(tiny_sd3)
    assert (sd3.family, sd3.kind, sd3.variants, sd3.prediction_type) == ("sd3", "full", ["medium"], "flow_matching")
    assert sd3.components == ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    flux = detect(tiny_flux)
    assert (flux.family, flux.variants, flux.resolution) == ("flux", ["dev"], 1024)
    assert detect(tiny_flux / "transformer").summary() == "flux transformer only (dev), fp32, 1024px: transformer"

    f = convert(tiny_sd3, tmp_path / "sd3.5_medium.safetensors")
    assert detect(f).summary() == "sd3 full model (medium), fp32, 1024px: transformer, vae"
    assert read_header(f)[1]["modelspec.architecture"] == "stable-diffusion-v3.5-medium"
    g = convert(tiny_flux, tmp_path / "flux1-dev.safetensors")
    assert detect(g).summary() == "flux transformer only (dev), fp32, 1024px: transformer"


def test_detect_variants_from_original_names(tmp_path):
    from fastsd.demo.tiny import tiny_flux_transformer, tiny_sd3_transformer

    def write(model, kind: str, prefix: str, name: str) -> Path:
        sd = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        tensors = {op.out: torch.zeros(1) for op in convert_flow.plan(kind, list(sd), shapes, prefix)}
        save_file(tensors, tmp_path / name)
        return tmp_path / name

    large = tiny_sd3_transformer("large")
    assert detect(write(large, "sd3", "model.diffusion_model.", "m.safetensors")).variants == ["large"]
    assert detect(write(large, "sd3", "", "sd3.5_large_turbo.safetensors")).variants == ["large-turbo"]
    assert detect(write(tiny_sd3_transformer(), "sd3", "", "x.safetensors")).variants == ["medium"]
    schnell = detect(write(tiny_flux_transformer("schnell"), "flux", "", "s.safetensors"))
    assert (schnell.family, schnell.kind, schnell.variants) == ("flux", "transformer", ["schnell"])
    dev = detect(write(tiny_flux_transformer("dev"), "flux", "model.diffusion_model.", "d.safetensors"))
    assert dev.variants == ["dev"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_round_trip_is_bit_identical(family, request, tmp_path):
    src = request.getfixturevalue(FIXTURES[family])
    single = convert(src, tmp_path / f"{family}.safetensors")
    back = convert(single, tmp_path / "back", config=src)
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _same_weights(src / component, back / component)
    assert detect(back).summary() == detect(src).summary()


def test_diffusers_from_single_file_loads_our_sd3_file(tiny_sd3, tmp_path):
    import diffusers
    import transformers

    single = convert(tiny_sd3, tmp_path / "sd3.safetensors")
    encoders = {
        name: getattr(transformers, cls).from_pretrained(tiny_sd3 / name)
        for name, cls in (
            ("text_encoder", "CLIPTextModelWithProjection"),
            ("text_encoder_2", "CLIPTextModelWithProjection"),
            ("text_encoder_3", "T5EncoderModel"),
        )
    }
    pipe = diffusers.StableDiffusion3Pipeline.from_single_file(
        str(single), config=str(tiny_sd3), local_files_only=True, **encoders
    )
    want = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
    for part in ("transformer", "vae"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(want, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_our_flux_names_are_the_ones_diffusers_converter_reads_at_full_size():
    """diffusers' FLUX converter hard-codes FLUX.1's 3072 width, so the check runs at full size on ``meta``."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    dtypes = {k: v.dtype for k, v in sd.items()}
    ops = convert_flow.plan("flux", list(sd), shapes, "")
    ours = {op.out: torch.empty(convert_flow._out_meta(op, shapes, dtypes, False)[1], device="meta") for op in ops}
    assert "double_blocks.0.img_attn.qkv.weight" in ours and "single_blocks.1.linear1.weight" in ours
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(ours))
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes


def test_cli_converts_both_ways_and_asks_for_a_config_folder(cli, tiny_flux, tmp_path):
    single = tmp_path / "flux1-dev.safetensors"
    result = cli("convert", str(tiny_flux), str(single))
    assert result.returncode == 0, result.stderr
    refused = cli("convert", str(single), str(tmp_path / "back"))
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("fastsd: error: flux1-dev.safetensors is a flux single file")
    assert "pass --config" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    ok = cli("convert", str(single), str(tmp_path / "back"), "--config", str(tiny_flux))
    assert ok.returncode == 0, ok.stderr
    _same_weights(tiny_flux / "transformer", tmp_path / "back" / "transformer")


def test_a_file_of_another_size_than_the_config_is_refused(tiny_sd3, tiny_flux, tmp_path):
    single = convert(tiny_flux, tmp_path / "f.safetensors")
    with pytest.raises(UserInputError, match="is a sd3 model, but f.safetensors is flux"):
        convert(single, tmp_path / "back", config=tiny_sd3)


def test_sd3_and_flux_loras_are_told_apart_in_diffusers_and_kohya_names(tmp_path):
    lora = {"lora_down.weight": torch.zeros(4, 3072), "lora_up.weight": torch.zeros(3072, 4)}
    cases = {
        "kohya-flux": ("lora_unet_double_blocks_0_img_attn_qkv.", "flux"),
        "kohya-sd3": ("lora_unet_joint_blocks_0_x_block_attn_qkv.", "sd3"),
        "peft-flux": ("transformer.single_transformer_blocks.0.attn.to_q.", "flux"),
    }
    for name, (prefix, family) in cases.items():
        save_file({prefix + k: v for k, v in lora.items()}, tmp_path / f"{name}.safetensors")
        det = detect(tmp_path / f"{name}.safetensors")
        assert (det.kind, det.family) == ("lora", family), name
    for width, family in ((1536, "sd3"), (2432, "sd3"), (3072, "flux")):
        key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
        save_file(
            {key: torch.zeros(4, width), key.replace("lora_A", "lora_B"): torch.zeros(width, 4)},
            tmp_path / "p.safetensors",
        )
        assert detect(tmp_path / "p.safetensors").family == family


def test_prefixed_flux_and_bare_sd3_transformer_files_convert_back(tiny_sd3, tiny_flux, tmp_path):
    from safetensors.torch import load_file

    flux = load_file(convert(tiny_flux, tmp_path / "f.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in flux.items()}, tmp_path / "comfy-flux.safetensors")
    back = convert(tmp_path / "comfy-flux.safetensors", tmp_path / "flux-back", config=tiny_flux)
    _same_weights(tiny_flux / "transformer", back / "transformer")
    sd3 = load_file(convert(tiny_sd3, tmp_path / "s.safetensors"))
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in sd3.items() if k.startswith("model.")}
    save_file(bare, tmp_path / "mmdit.safetensors")
    assert detect(tmp_path / "mmdit.safetensors").kind == "transformer"
    back = convert(tmp_path / "mmdit.safetensors", tmp_path / "sd3-back", config=tiny_sd3)
    _same_weights(tiny_sd3 / "transformer", back / "transformer")
    _same_weights(tiny_sd3 / "vae", back / "vae")  # not in the file: the config folder's


def test_training_facts_of_sd3_and_flux_folders(tiny_sd3, tiny_flux):
    from fastsd.models.detect import diffusers_family

    assert diffusers_family(tiny_flux) == {
        "family": "flux",
        "prediction_type": "flow_matching",
        "native_resolution": 1024,
        "variant": "dev",
    }
    assert diffusers_family(tiny_sd3)["family"] == "sd3"
    with pytest.raises(UserInputError, match="is not a Diffusers folder"):
        diffusers_family(tiny_flux / "transformer")
