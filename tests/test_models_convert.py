"""Diffusers <-> single file: exact round trips, original key names, sharded/.bin/flat-key inputs, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ldm_keys import expected_keys
from safetensors.torch import load_file, save_file

from fastsd.errors import ModelFormatError, UserInputError
from fastsd.models.convert import convert, diffusers_to_single_file, shipped_config, single_file_to_diffusers
from fastsd.models.detect import detect
from fastsd.models.tensorfile import read_header

FIXTURES = {"sd1": "tiny_sd1", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl", "sd1-inpaint": "tiny_sd1_inpaint"}
PIPES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
}


def _load(kind: str, folder: Path, dtype=None):
    import diffusers

    return getattr(diffusers, PIPES[kind]).from_pretrained(folder, local_files_only=True, torch_dtype=dtype)


def _from_single(kind: str, file: Path, config: Path, dtype=None):
    import diffusers

    return getattr(diffusers, PIPES[kind]).from_single_file(
        str(file), config=str(config), local_files_only=True, torch_dtype=dtype
    )


def _components(pipe):
    return {n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None)}


def _assert_same_weights(ref, got, half: bool = False):
    for name, module in _components(ref).items():
        a, b = module.state_dict(), _components(got)[name].state_dict()
        assert set(a) == set(b), name
        for key, tensor in a.items():
            want = tensor.half() if half and tensor.is_floating_point() else tensor
            assert b[key].dtype == want.dtype, (name, key)
            assert torch.equal(b[key], want), (name, key)


@pytest.mark.parametrize("kind", list(FIXTURES))
def test_round_trip_is_bit_identical_and_keys_are_the_original_ones(kind, request, tmp_path):
    src = request.getfixturevalue(FIXTURES[kind])
    out = diffusers_to_single_file(src, tmp_path / "model.safetensors")
    tensors, meta = read_header(out)
    assert set(tensors) == expected_keys(kind)
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-")

    ref = _load(kind, src)
    back = _from_single(kind, out, src)
    _assert_same_weights(ref, back)

    # same values in differently aligned memory can take another BLAS path (1 ulp apart): realign both
    for pipe in (ref, back):
        for module in _components(pipe).values():
            for param in module.parameters():
                param.data = param.data.clone()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 49407] + [49407] * 70]) % ref.tokenizer.vocab_size
    with torch.no_grad():
        for name, te in _components(ref).items():
            if not name.startswith("text_encoder"):
                continue
            a, b = te(ids, output_hidden_states=True), _components(back)[name](ids, output_hidden_states=True)
            assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])
            assert torch.equal(a[0], b[0])
            if hasattr(a, "text_embeds"):  # SDXL's pooled, projected output
                assert torch.equal(a.text_embeds, b.text_embeds)


def test_detects_every_fixture_and_its_conversion(tiny_sd1, tiny_sd2, tiny_sdxl, tiny_sd1_inpaint, tmp_path):
    cases = [(tiny_sd1, "sd1", []), (tiny_sd2, "sd2", ["v-prediction"]), (tiny_sdxl, "sdxl", [])]
    cases.append((tiny_sd1_inpaint, "sd1", ["inpaint"]))
    for i, (folder, family, variants) in enumerate(cases):
        for path in (folder, diffusers_to_single_file(folder, tmp_path / f"m{i}.safetensors", half=True)):
            det = detect(path)
            assert (det.family, det.kind, det.variants) == (family, "full", variants), path
            assert det.prediction_guess is False
        assert det.precision == "fp16" and det.layout == "single-file"
    assert detect(tiny_sdxl).components == ["unet", "vae", "text_encoder", "text_encoder_2"]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_half_equals_reference_half(kind, request, tmp_path):
    src = request.getfixturevalue(FIXTURES[kind])
    out = diffusers_to_single_file(src, tmp_path / "half.safetensors", half=True)
    back = _from_single(kind, out, src, dtype=torch.float16)
    _assert_same_weights(_load(kind, src), back, half=True)
    # and the file itself: every float tensor is fp16
    assert {str(t.dtype) for t in read_header(out)[0].values()} <= {"torch.float16", "torch.int64"}


def test_sd2_v_prediction_gets_yaml_and_metadata_and_guess_without_it(tiny_sd2, tmp_path):
    out = diffusers_to_single_file(tiny_sd2, tmp_path / "v.safetensors")
    assert 'parameterization: "v"' in out.with_suffix(".yaml").read_text()
    assert read_header(out)[1]["modelspec.prediction_type"] == "v"
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(out), bare)  # same tensors, no metadata, no yaml
    det = detect(bare)
    assert det.family == "sd2" and det.prediction_guess is True and det.notes


def test_sharded_bin_and_prefixed_text_encoder_inputs_give_the_same_file(tiny_sd1, tiny_sdxl, tmp_path):
    plain = diffusers_to_single_file(tiny_sd1, tmp_path / "plain.safetensors")
    odd = tmp_path / "odd"
    shutil.copytree(tiny_sd1, odd)
    unet = load_file(odd / "unet" / "diffusion_pytorch_model.safetensors")
    (odd / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(unet)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, part in shards.items():
        save_file({k: unet[k] for k in part}, odd / "unet" / name)
        weight_map.update(dict.fromkeys(part, name))
    (odd / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    te = load_file(odd / "text_encoder" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in te)  # transformers >= 5.6 flat keys
    (odd / "text_encoder" / "model.safetensors").unlink()
    torch.save({f"text_model.{k}": v for k, v in te.items()}, odd / "text_encoder" / "pytorch_model.bin")
    vae = load_file(odd / "vae" / "diffusion_pytorch_model.safetensors")
    (odd / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(vae, odd / "vae" / "diffusion_pytorch_model.bin")

    other = diffusers_to_single_file(odd, tmp_path / "odd.safetensors")
    a, b = load_file(plain), load_file(other)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # SDXL's second encoder is saved with the text_model. prefix, its first without: both canonical
    assert set(read_header(diffusers_to_single_file(tiny_sdxl, tmp_path / "xl.safetensors"))[0]) == expected_keys(
        "sdxl"
    )


def test_ckpt_only_on_request_and_readable_with_weights_only(tiny_sd1, tmp_path):
    with pytest.raises(UserInputError, match="--format ckpt"):
        diffusers_to_single_file(tiny_sd1, tmp_path / "m.ckpt")
    out = diffusers_to_single_file(tiny_sd1, tmp_path / "m.ckpt", fmt="ckpt", half=True)
    sd = torch.load(out, weights_only=True)["state_dict"]
    assert set(sd) == expected_keys("sd1")
    assert detect(out).family == "sd1"


def test_shipped_configs_work_offline_and_match_full_size_key_layout():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from fastsd.models import keymap

    folder = shipped_config("sdxl")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    assert len(tok) == 49408
    assert tok("a photo of")["input_ids"] == [49406, 320, 1125, 539, 49407]
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"
    for name, channels, attn, depth, label in (
        ("sd1", [320, 640, 1280, 1280], [True, True, True, False], [1, 1, 1, 1], False),
        ("sdxl", [320, 640, 1280], [False, True, True], [0, 2, 10], True),
    ):
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped_config(name) / "unet"))
        from ldm_keys import unet_keys

        got = {op.out for op in keymap.unet_plan(list(unet.state_dict()))}
        assert got == unet_keys(channels, attn, depth, label_emb=label)


# --- bad input -------------------------------------------------------------------------------


def _no_leftovers(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.startswith(".fastsd-tmp-")]


def test_truncated_and_non_model_files_are_refused_cleanly(tiny_sd1, tmp_path, cli):
    good = diffusers_to_single_file(tiny_sd1, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, this is not a model" * 10)
    for bad in (cut, junk):
        with pytest.raises(ModelFormatError):
            single_file_to_diffusers(bad, tmp_path / "out", config=tiny_sd1)
        r = cli("convert", str(bad), str(tmp_path / "out"))
        assert r.returncode == 2 and r.stderr.startswith("fastsd: error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_overwrite_swaps_the_whole_folder_and_a_failed_conversion_keeps_the_old(tiny_sd1, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    single = diffusers_to_single_file(tiny_sd1, tmp_path / "m.safetensors")
    out = tmp_path / "out"
    single_file_to_diffusers(single, out, config=tiny_sd1)
    (out / "stale.txt").write_text("left by an older conversion")
    unet = out / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.read_bytes()

    def disk_full(self, folder, **kwargs):
        (Path(folder) / "model_index.json").write_text("{}")  # half a folder, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        single_file_to_diffusers(single, out, overwrite=True, config=tiny_sd1)
    assert unet.read_bytes() == before and (out / "stale.txt").is_file()  # the old folder, untouched
    _no_leftovers(tmp_path)
    monkeypatch.undo()
    single_file_to_diffusers(single, out, overwrite=True, config=tiny_sd1)
    assert not (out / "stale.txt").exists() and unet.read_bytes() == before  # replaced as a whole
    _no_leftovers(tmp_path)


def test_lora_vae_and_unknown_architecture_are_refused(tiny_sd1, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(
                4, 768
            ),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
        },
        lora,
    )
    det = detect(lora)
    assert (det.kind, det.family) == ("lora", "sd1")
    with pytest.raises(ModelFormatError, match="LoRA"):
        convert(lora, tmp_path / "out")
    with pytest.raises(ModelFormatError, match="VAE"):
        diffusers_to_single_file(tiny_sd1 / "vae", tmp_path / "vae.safetensors")
    odd = tmp_path / "odd"
    shutil.copytree(tiny_sd1, odd)
    unet_file = odd / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(unet_file)
    sd["motion_modules.0.weight"] = torch.zeros(2)
    save_file(sd, unet_file)
    with pytest.raises(ModelFormatError, match="cannot place"):
        diffusers_to_single_file(odd, tmp_path / "odd.safetensors")
    assert not (tmp_path / "odd.safetensors").exists()
    _no_leftovers(tmp_path)


def test_wrong_direction_and_existing_dst(tiny_sd1, tmp_path, cli):
    out = diffusers_to_single_file(tiny_sd1, tmp_path / "m.safetensors")
    with pytest.raises(UserInputError, match="already a single file"):
        convert(out, tmp_path / "again.safetensors")
    before = out.stat().st_mtime_ns
    r = cli("convert", str(tiny_sd1), str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.stat().st_mtime_ns == before
    r = cli("convert", str(tiny_sd1), str(out), "--overwrite", "--half")
    assert r.returncode == 0, r.stderr
    assert detect(out).precision == "fp16"


def test_pickle_needing_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Evil()}, bad)
    with pytest.raises(ModelFormatError, match="code execution"):
        detect(bad)


# --- crafted headers -----------------------------------------------------------------------------


def _rewrite_header(file: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with ``edit(header)`` (the data bytes stay as they are)."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    file.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])


def _same_size_pair(header: dict) -> tuple[str, str]:
    by_size: dict[int, str] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if size and size in by_size:
            return by_size[size], name
        by_size[size] = name
    raise AssertionError("no two tensors of one size")


def _overlap(header: dict) -> None:
    a, b = _same_size_pair(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b reads a's bytes


def _negative_shape(header: dict) -> None:
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) >= 2)
    header[name]["shape"][0] *= -1
    header[name]["shape"][1] *= -1  # the product, hence the byte size, is unchanged


def _beyond_the_file(header: dict) -> None:
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + 2**40, end + 2**40]


def _unknown_dtype(header: dict) -> None:
    header[next(k for k in header if k != "__metadata__")]["dtype"] = "F128"


CRAFTED = {
    "overlap": (_overlap, "overlaps"),
    "negative shape": (_negative_shape, "non-negative integers"),
    "beyond the file": (_beyond_the_file, "gap"),
    "unknown dtype": (_unknown_dtype, "unknown dtype 'F128'"),
}


def _deep_header(file: Path, depth: int = 200_000) -> None:
    body = b'{"x":' + b"[" * depth + b"]" * depth + b"}"
    file.write_bytes(len(body).to_bytes(8, "little") + body)


def test_crafted_component_headers_are_refused_by_convert(tiny_sd1, tmp_path, cli):
    """A Diffusers folder whose UNet header lies: one line naming the file, exit 2, no output file."""
    outs = []
    for i, (case, (edit, reason)) in enumerate([*CRAFTED.items(), ("deep", (None, "nested"))]):
        folder = tmp_path / f"crafted-{i}"
        shutil.copytree(tiny_sd1, folder)
        unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
        _deep_header(unet) if edit is None else _rewrite_header(unet, edit)
        with pytest.raises(ModelFormatError, match=reason):
            diffusers_to_single_file(folder, tmp_path / f"{i}.safetensors")
        outs.append((case, folder, reason))
    for case, folder, reason in (outs[0], outs[-1]):  # through the CLI: overlap, deep
        r = cli("convert", str(folder), str(tmp_path / "out.safetensors"))
        assert r.returncode == 2, (case, r.stderr)
        assert r.stderr.startswith("fastsd: error:") and len(r.stderr.strip().splitlines()) == 1, (case, r.stderr)
        assert "diffusion_pytorch_model.safetensors" in r.stderr and reason in r.stderr, (case, r.stderr)
    assert not list(tmp_path.glob("*.safetensors"))
    _no_leftovers(tmp_path)


def test_crafted_single_files_are_refused_by_model_detect(tiny_sd1, tmp_path, cli):
    good = diffusers_to_single_file(tiny_sd1, tmp_path / "good.safetensors")
    files = []
    for i, (edit, reason) in enumerate(CRAFTED.values()):
        bad = tmp_path / f"crafted-{i}.safetensors"
        shutil.copy(good, bad)
        _rewrite_header(bad, edit)
        with pytest.raises(ModelFormatError, match=reason):
            read_header(bad)
        files.append((bad, reason))
    deep = tmp_path / "deep.safetensors"
    _deep_header(deep)
    files.append((deep, "nested"))
    for bad, reason in (files[1], files[2]):  # through the CLI: negative shape, beyond the file
        r = cli("model", "detect", str(bad))
        assert r.returncode == 2, (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr and reason in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_convert_reports_what_model_detect_says_of_the_result(cli, tiny_sd1, tmp_path, fmt):
    out = tmp_path / f"half.{fmt}"
    r = cli("convert", str(tiny_sd1), str(out), "--half", "--format", fmt)
    assert r.returncode == 0, r.stderr
    said = cli("model", "detect", str(out)).stdout.strip()
    assert "fp16" in said and f"wrote {out} ({said})" in r.stderr  # not the source's "fp32, 64px"
