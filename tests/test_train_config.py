"""Training config validation, GPU presets, buckets and the deterministic batch order (no models loaded)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastsd.errors import UserInputError
from fastsd.train.config import TrainConfig, detect_preset, resolve
from fastsd.train.data import BatchOrder, buckets_for, nearest_bucket


def _gpu(name, vram, bf16=True):
    return SimpleNamespace(name=name, vram_total_gb=vram, bf16=bf16)


@pytest.mark.parametrize(
    ("gpus", "preset"),
    [
        ([], "cpu"),
        ([_gpu("Tesla T4", 15, bf16=False)], "t4"),
        ([_gpu("NVIDIA L4", 22)], "l4"),
        ([_gpu("NVIDIA A100-SXM4-40GB", 40)], "a100"),
        ([_gpu("NVIDIA H100 80GB HBM3", 80)], "h100"),
        ([_gpu("Quadro RTX 5000", 16, bf16=False)], "t4"),
    ],
)
def test_preset_from_gpu(gpus, preset):
    assert detect_preset(gpus) == preset


def test_t4_preset_is_fp16_8bit_and_overridable(tiny_sd1):
    t4 = [_gpu("Tesla T4", 15, bf16=False)]
    c, facts = resolve(TrainConfig(model=str(tiny_sd1)), gpu_list=t4)
    # a full fine-tune on a T4 keeps 16-bit weights (Drive-sized states), updated by adamw_lowmem's stochastic rounding
    assert (c.precision, c.optimizer, c.gpu, c.master_weights) == ("fp16", "adamw_lowmem", "t4", "16bit")
    assert (c.unet_steps, c.te_steps, c.unet_lr, c.te_lr) == (1500, 350, 2e-6, 1e-6)
    assert facts["family"] == "sd1"
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), method="lora"), gpu_list=t4)
    assert (c.optimizer, c.master_weights) == ("adamw8bit", "fp32")  # LoRA adapters stay fp32
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), master_weights="fp32"), gpu_list=t4)
    assert (c.optimizer, c.master_weights) == ("adamw8bit", "fp32")
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), precision="fp32", optimizer="adamw_fused"), gpu_list=t4)
    assert (c.precision, c.optimizer, c.master_weights) == ("fp32", "adamw_fused", "fp32")  # auto gives way
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), master_weights="16bit", precision="bf16"), gpu_list=[])
    assert (c.optimizer, c.master_weights) == ("adamw_lowmem", "16bit")  # the CPU preset's AdamW gives way
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), method="lora"), gpu_list=[])
    assert (c.unet_steps, c.te_steps, c.unet_lr) == (1000, 0, 1e-4)


def test_a_preset_budget_is_never_more_than_the_card_has(tiny_sd1):
    """A 12 GB RTX card matches the L4 preset (bf16, under 38 GB), whose 21 GiB budget it does not have."""
    c, facts = resolve(TrainConfig(model=str(tiny_sd1)), gpu_list=[_gpu("NVIDIA GeForce RTX 3060", 12.0)])
    assert (c.gpu, c.vram_budget_gb, facts["optimizer_from_preset"]) == ("l4", 11.4, True)
    c, _ = resolve(TrainConfig(model=str(tiny_sd1)), gpu_list=[_gpu("Tesla T4", 14.75, bf16=False)])
    assert c.vram_budget_gb == 14.0  # the T4 preset's own
    c, facts = resolve(TrainConfig(model=str(tiny_sd1), vram_budget_gb=30, optimizer="adamw"),
                       gpu_list=[_gpu("NVIDIA GeForce RTX 3060", 12.0)])  # fmt: skip
    assert c.vram_budget_gb == 30 and not facts["optimizer_from_preset"]  # what the user sets is kept


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unet_steps": 0}, "steps must be > 0"),
        ({"unet_steps": -5}, "steps must be > 0"),
        ({"unet_lr": 0.0}, "learning rates must be > 0"),
        ({"te_lr": -1e-6, "te_steps": 10}, "learning rates must be > 0"),
        ({"resolution": 768}, "above sd1's native 512"),
        ({"resolution": 500}, "multiple of 64"),
        ({"method": "dora"}, "unknown method"),
        ({"optimizer": "sgd"}, "unknown optimizer"),
        ({"master_weights": "fp8"}, "unknown master_weights"),
        ({"master_weights": "16bit", "method": "lora"}, "for full fine-tunes"),
        ({"master_weights": "16bit"}, "needs --precision fp16 or bf16"),  # the CPU preset's fp32
        (
            {"master_weights": "16bit", "precision": "bf16", "optimizer": "adamw_fused"},
            "needs --optimizer adamw_lowmem",
        ),
    ],
)
def test_invalid_settings_are_rejected_with_reason(tiny_sd1, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        resolve(TrainConfig(model=str(tiny_sd1), **kwargs), gpu_list=[])


def test_768_on_sd1_allowed_with_override(tiny_sd1):
    c, _ = resolve(TrainConfig(model=str(tiny_sd1), resolution=768, allow_resolution=True), gpu_list=[])
    assert c.resolution == 768


def test_sdxl_full_rules(tiny_sdxl):
    with pytest.raises(UserInputError, match="text encoders in an SDXL full fine-tune"):
        resolve(TrainConfig(model=str(tiny_sdxl), method="full", te_steps=100), gpu_list=[])
    with pytest.raises(UserInputError, match="use --method lora"):
        resolve(TrainConfig(model=str(tiny_sdxl), method="full", te_steps=0), gpu_list=[_gpu("Tesla T4", 15, False)])
    c, facts = resolve(TrainConfig(model=str(tiny_sdxl), method="lora"), gpu_list=[_gpu("Tesla T4", 15, False)])
    assert facts["family"] == "sdxl" and c.resolution == 1024


def test_sd2_768_is_v_prediction(tiny_sd2):
    c, facts = resolve(TrainConfig(model=str(tiny_sd2)), gpu_list=[])
    assert facts == {"family": "sd2", "prediction_type": "v_prediction", "native_resolution": 768,
                     "optimizer_from_preset": True}  # fmt: skip
    assert c.resolution == 768


def test_empty_session_and_missing_model(tiny_sd1, tmp_path):
    with pytest.raises(UserInputError, match="no instance images"):
        resolve(TrainConfig(model=str(tiny_sd1)), num_images=0, gpu_list=[])
    with pytest.raises(UserInputError, match="not a Diffusers folder"):
        resolve(TrainConfig(model=str(tmp_path)), gpu_list=[])
    with pytest.raises(UserInputError, match="no base model"):
        resolve(TrainConfig(), session_info={}, gpu_list=[])


def test_empty_session_fails_before_loading(home, tiny_sd1):
    from fastsd.session import Session
    from fastsd.train import train

    Session.create("empty", home, base_model=str(tiny_sd1))
    with pytest.raises(UserInputError, match="no instance images"):
        train("empty", home=home, on_models=lambda m: pytest.fail("model loaded before validation"))


def test_buckets_and_order():
    table = buckets_for(512)
    assert (512, 512) in table and all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in table)
    assert nearest_bucket(1200, 800, table)[0] > nearest_bucket(1200, 800, table)[1]
    sizes = [(512, 512)] * 5 + [(576, 448)] * 3
    a, b = BatchOrder(sizes, 2, seed=7), BatchOrder(sizes, 2, seed=7)
    seq = [a.batch(i) for i in range(12)]
    assert seq == [b.batch(i) for i in range(12)]
    assert all(len({sizes[i] for i in batch}) == 1 and len(batch) == 2 for batch in seq)  # one bucket per batch
    assert seq[: a.per_epoch] != [BatchOrder(sizes, 2, seed=8).batch(i) for i in range(a.per_epoch)]


def _train_parser():
    from fastsd.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_train_flags_come_from_trainconfig_and_say_their_defaults():
    import dataclasses

    from fastsd.cli.train import config_from_args

    parser = _train_parser()
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert (f.name in by_dest) == f.metadata["cli"], f.name  # every CLI setting is a field, and back
    help_text = parser.format_help()
    for a in by_dest.values():
        if a.nargs != 0:  # a flag that takes a value says what it is without it
            assert "default" in parser._get_formatter()._get_help_string(a), a.option_strings
    assert "--lr UNET_LR" in help_text and "(default full: 2e-6, lora: 1e-4)" in " ".join(help_text.split())

    # nothing given: exactly the dataclass's defaults (resolve fills the rest)
    assert config_from_args(parser.parse_args(["s"])) == TrainConfig()
    c = config_from_args(parser.parse_args(
        ["s", "--steps", "7", "--no-export", "--channels-last", "off", "--prior", "--sample-seed", "9",
         "--sample-prompt", "a", "--sample-prompt", "b", "--min-snr-gamma", "0", "--rank", "8"]
    ))  # fmt: skip
    assert (c.unet_steps, c.export, c.channels_last, c.prior_preservation) == (7, False, False, True)
    assert c.sample_seeds == [9] and c.sample_prompts == ["a", "b"] and c.lora_rank == 8
    assert c.min_snr_gamma == 0  # resolve() turns 0 into None (off): test_min_snr_gamma_zero_is_off_in_one_place
