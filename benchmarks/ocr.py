"""GLM-OCR throughput: stock ``generate`` vs fastsd's decoder, one page at a time vs batched.

Builds a full-size random-weight GLM-OCR (the zai-org/GLM-OCR config.json sizes, written below:
nothing is downloaded) and feeds it synthetic pages of 896x1120 px (64x80 patches -> 1,280 image
tokens) with the "Text Recognition:" prompt, forcing exactly ``--new-tokens`` (256) new tokens per
page (``min_new_tokens = max_new_tokens``), greedy with repetition penalty 1.1.

Variants (``--variant``, comma list or ``all``):
  stock          ``model.generate`` as transformers ships it (SDPA)
  fastsd-eager   fastsd's decoder: per-image vision calls, chunked prefill into a static KV cache,
                 grouped-query decode attention without KV expansion, on-device penalty/EOS - no graph
  fastsd         the same with the decode step captured in a CUDA graph (one launch per token)

For stock it also times the pieces (vision tower with all B images in one call vs one call per
image, the prefill forward) so the per-step decode cost can be read off: that is where batching
fails to pay in stock ``generate``.

Prints one JSON line per measurement and a final ``summary`` line (speedups vs stock batch 1, the
best rate whose peak VRAM fits ``--budget-gib``). ``--small`` runs a tiny config on the CPU.

    python benchmarks/ocr.py                       # H100: all variants, batch 1,4,16,32,64
    python benchmarks/ocr.py --small               # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastsd.demo.tiny_ocr import FULL_TEXT, FULL_VISION  # noqa: E402

#: zai-org/GLM-OCR config.json: the sizes are fastsd.demo.tiny_ocr's (one copy), plus the real token ids.
#: GlmOcrConfig() defaults are NOT these: their text hidden size (1024) does not even match the
#: vision merger's output (1536).
FULL_CONFIG = {
    "text_config": {
        **FULL_TEXT,
        "rms_norm_eps": 1e-05,
        "pad_token_id": 59246,
        "eos_token_id": [59246, 59253],
        "tie_word_embeddings": False,
    },
    "vision_config": {
        **FULL_VISION,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "rms_norm_eps": 1e-05,
    },
    "image_token_id": 59280,
    "video_token_id": 59281,
    "image_start_token_id": 59256,
    "image_end_token_id": 59257,
    "video_start_token_id": 59258,
    "video_end_token_id": 59259,
}

SMALL_CONFIG = {
    "text_config": {
        **FULL_CONFIG["text_config"],
        "vocab_size": 59392,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        **FULL_CONFIG["vision_config"],
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
    },
    **{k: v for k, v in FULL_CONFIG.items() if k.endswith("_id")},
}

GMASK, SOP, USER, ASSISTANT, BOI, EOI, IMAGE = 59248, 59250, 59253, 59254, 59256, 59257, 59280
PROMPT_IDS = [10, 20, 30, 40, 58]  # stand-ins for "Text Recognition:" (ids do not change the cost)


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def build_model(config: dict, device: str, dtype: torch.dtype):
    from transformers import GlmOcrConfig, GlmOcrForConditionalGeneration

    cfg = GlmOcrConfig(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GlmOcrForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model.config._attn_implementation = "sdpa"
    for sub in (model.model.visual, model.model.language_model):
        sub.config._attn_implementation = "sdpa"
    return model.eval()


def make_inputs(batch: int, grid_hw: tuple[int, int], device: str) -> dict:
    """A left-padded batch as the processor makes it, with random pixels."""
    gh, gw = grid_hw
    n_img = gh * gw // 4
    row = [GMASK, SOP, USER, 198, BOI] + [IMAGE] * n_img + [EOI] + PROMPT_IDS + [ASSISTANT, 198]
    ids = torch.tensor([row] * batch, device=device)
    g = torch.Generator(device="cpu").manual_seed(1)
    pixels = torch.randn(batch * gh * gw, 3 * 2 * 14 * 14, generator=g).to(device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == IMAGE).long(),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, gh, gw]] * batch, device=device),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_stock(model, inputs: dict, new_tokens: int) -> dict:
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=1.1,
            eos_token_id=FULL_CONFIG["text_config"]["eos_token_id"],
            pad_token_id=59246,
        )
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens, out.shape
    return {}


def run_fast(gen, inputs: dict, new_tokens: int) -> dict:
    res = gen.generate(
        inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_ids=FULL_CONFIG["text_config"]["eos_token_id"],
        pad_token_id=59246,
        repetition_penalty=1.1,
        check_every=64,
    )
    assert all(len(r.tokens) == new_tokens for r in res), [len(r.tokens) for r in res]
    s = res[0].stats
    return {
        "vision_s": round(s["vision_s"], 3),
        "prefill_s": round(s["prefill_s"], 3),
        "decode_ms_per_step": round(1000 * s["decode_s"] / max(1, s["steps"] - 1), 2),
        "cuda_graph": bool(s["cuda_graph"]),
    }


def stock_pieces(model, inputs: dict, device: str) -> dict:
    """Vision tower all-at-once vs per image, and the prefill forward, for the stock model."""
    visual = model.model.visual
    pv = inputs["pixel_values"].to(visual.dtype)
    grid = inputs["image_grid_thw"]
    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        visual(pv, grid_thw=grid)
        sync(device)
        together = time.perf_counter() - t
        per = grid.prod(-1).tolist()
        t = time.perf_counter()
        start = 0
        for i, n in enumerate(per):
            visual(pv[start : start + n], grid_thw=grid[i : i + 1])
            start += n
        sync(device)
        each = time.perf_counter() - t
        t = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        sync(device)
        prefill = time.perf_counter() - t
    return {
        "vision_one_call_s": round(together, 3),
        "vision_per_image_s": round(each, 3),
        "prefill_s": round(prefill, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny config on the CPU (smoke run)")
    ap.add_argument("--variant", default="all", help="stock,fastsd-eager,fastsd or all")
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 1,4,16,32,64; --small 1,2,4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per page (default 256; --small 16)")
    ap.add_argument("--single-pages", type=int, default=2, help="pages timed in the one-at-a-time loop")
    ap.add_argument("--budget-gib", type=float, default=12.0, help="VRAM budget for the T4-class figure")
    ap.add_argument("--time-limit", type=float, default=450.0, help="skip measurements after this many seconds")
    ap.add_argument("--vision-batch", type=int, default=1, help="images per vision call in fastsd")
    ap.add_argument("--prefill-batch", type=int, default=8, help="sequences per prefill chunk in fastsd")
    args = ap.parse_args(argv)

    from fastsd.ocr.fast import FastGlmOcr

    t_start = time.perf_counter()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    else:
        dtype = torch.float32
    config = SMALL_CONFIG if args.small else FULL_CONFIG
    grid_hw = (16, 16) if args.small else (80, 64)  # (h, w) patches: 224x224 or 1120x896 px
    new_tokens = args.new_tokens or (16 if args.small else 256)
    sizes = [int(b) for b in (args.batch_sizes or ("1,2,4" if args.small else "1,4,16,32,64")).split(",")]
    variants = ["stock", "fastsd-eager", "fastsd"] if args.variant == "all" else args.variant.split(",")

    import transformers

    model = build_model(config, device, dtype)
    emit(
        event="setup",
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        dtype=str(dtype),
        torch=torch.__version__,
        transformers=transformers.__version__,
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        image_tokens=grid_hw[0] * grid_hw[1] // 4,
        new_tokens=new_tokens,
        build_s=round(time.perf_counter() - t_start, 1),
    )
    results: list[dict] = []
    for variant in variants:
        gen = None
        if variant.startswith("fastsd"):
            gen = FastGlmOcr(
                model,
                cuda_graphs=variant == "fastsd",
                vision_batch=args.vision_batch,
                prefill_batch=args.prefill_batch,
            )

        def once(inputs, n=new_tokens, gen=gen):
            return run_stock(model, inputs, n) if gen is None else run_fast(gen, inputs, n)

        try:  # warm-up: kernels, cuBLAS handles, allocator
            once(make_inputs(1, grid_hw, device), 4)
        except Exception as err:  # noqa: BLE001 - report and go on to the next variant
            emit(variant=variant, error=f"warm-up failed: {type(err).__name__}: {err}"[:500])
            continue
        for batch in sizes:
            if time.perf_counter() - t_start > args.time_limit:
                emit(variant=variant, batch=batch, skipped="time limit")
                continue
            reset_peak(device)
            try:
                extra: dict = {}
                if batch == 1:  # the one-at-a-time loop
                    pages = args.single_pages
                    sync(device)
                    t = time.perf_counter()
                    for _ in range(pages):
                        extra = once(make_inputs(1, grid_hw, device))
                    sync(device)
                else:
                    pages = batch
                    inputs = make_inputs(batch, grid_hw, device)
                    sync(device)
                    t = time.perf_counter()
                    extra = once(inputs)
                    sync(device)
                seconds = time.perf_counter() - t
                row = {
                    "variant": variant,
                    "batch": batch,
                    "pages": pages,
                    "seconds": round(seconds, 3),
                    "pages_per_s": round(pages / seconds, 3),
                    "tokens_per_s": round(pages * new_tokens / seconds, 1),
                    "peak_vram_gib": peak_gib(device),
                    **extra,
                }
                if variant == "stock":
                    try:
                        row.update(stock_pieces(model, make_inputs(batch, grid_hw, device), device))
                        row["decode_ms_per_step"] = round(
                            1000 * (seconds / (pages if batch == 1 else 1) - row["prefill_s"]) / (new_tokens - 1), 2
                        )
                    except Exception as err:  # noqa: BLE001 - the pieces are extra; keep the main figure
                        row["pieces_error"] = f"{type(err).__name__}: {err}"[:300]
                emit(**row)
                results.append(row)
            except torch.cuda.OutOfMemoryError:
                emit(variant=variant, batch=batch, error="CUDA out of memory")
            except Exception as err:  # noqa: BLE001 - one failed measurement must not end the run
                emit(variant=variant, batch=batch, error=f"{type(err).__name__}: {err}"[:500])
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
        del gen
    base = next((r["pages_per_s"] for r in results if r["variant"] == "stock" and r["batch"] == 1), None)
    summary: dict = {
        "event": "summary",
        "stock_batch1_pages_per_s": base,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["pages_per_s"])
        fit = [r for r in rows if r["peak_vram_gib"] is None or r["peak_vram_gib"] <= args.budget_gib]
        best_fit = max(fit, key=lambda r: r["pages_per_s"]) if fit else None
        summary[variant] = {
            "best_pages_per_s": best["pages_per_s"],
            "best_batch": best["batch"],
            "speedup_vs_stock_batch1": round(best["pages_per_s"] / base, 2) if base else None,
            f"best_within_{args.budget_gib:g}GiB": best_fit and best_fit["pages_per_s"],
            "speedup_within_budget": round(best_fit["pages_per_s"] / base, 2) if base and best_fit else None,
        }
    emit(**summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
