"""Fast batched decoding (greedy, or sampled per row) for ``GlmOcrForConditionalGeneration``.

Why stock ``generate`` is slow for OCR batches: every decode step re-enters Python for ~400 small
kernels (16 layers x projections, norms, M-RoPE, mask building) plus the logits processors, so one
step costs tens of milliseconds whatever the batch; the GPU idles. This module keeps the model's own
weights and modules but runs the decoder with

* the vision tower called per image (or per small group), so its activations stay page-sized;
* a static KV cache (one ``(B, kv_heads, L + new, head_dim)`` buffer per layer) filled by a
  chunked prefill, so a batch of 64 pages never builds a 64-page activation tensor;
* a decode step made only of tensor ops on fixed buffers (grouped-query attention as
  ``kv_heads x group`` queries, no KV expansion; repetition penalty as a seen-token mask; EOS and
  ``min_new_tokens`` handled on device), which on CUDA is captured once per batch into a CUDA graph and
  replayed: one launch per token instead of hundreds;
* host synchronisation only every ``check_every`` steps (EOS of the whole batch, repetition guard,
  and the tokens so far for callers that stream them), copying only the tokens new since the last.

The math is the model's: same RMSNorms, MLPs, rotary embedding module and projections; greedy
tokens equal ``generate(do_sample=False, repetition_penalty=p)`` (tests check this on the tiny model).
Rows given a :class:`~.sampling.Sampling` with a temperature draw their tokens inside the same
graphed step (:class:`~.sampling.RowSampler`); a batch with no such row runs the greedy step alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..cudagraph import capture
from .sampling import RowSampler, Sampling

log = logging.getLogger(__name__)


@dataclass
class DecodeResult:
    """Tokens of one sequence and why it stopped (``eos``, ``length`` or ``stopped``)."""

    tokens: list[int]
    finish: str
    stats: dict[str, float] = field(default_factory=dict)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # GLM rotates interleaved pairs (x0, x1), (x2, x3), ... - not the two halves as LLaMA does.
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    q_rot, q_pass = q[..., :rd], q[..., rd:]
    k_rot, k_pass = k[..., :rd], k[..., rd:]
    q = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)
    k = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k_pass], dim=-1)
    return q, k


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16  # aligned rows keep SDPA on its fused kernels


def _grow(t: torch.Tensor, total: int) -> torch.Tensor:
    bigger = torch.zeros(*t.shape[:2], total, t.shape[3], dtype=t.dtype, device=t.device)
    bigger[:, :, : t.shape[2]] = t
    return bigger


class FastGlmOcr:
    """Batched generator over a loaded ``GlmOcrForConditionalGeneration`` (weights shared, not copied).

    Args:
        model: the model (any dtype/device; bitsandbytes-quantized linears work, without CUDA graphs).
        cuda_graphs: capture the decode step in a CUDA graph (CUDA only; falls back to eager on failure).
        vision_batch: images per vision-tower call (1 keeps peak memory lowest; more saves launches).
        prefill_batch: sequences per prefill chunk.
        grow_by: KV slots added when a batch outgrows its cache.
    """

    def __init__(
        self,
        model: Any,
        *,
        cuda_graphs: bool = True,
        vision_batch: int = 1,
        prefill_batch: int = 8,
        grow_by: int = 1024,
    ) -> None:
        self.model = model
        self.core = model.model
        self.text = model.model.language_model
        self.visual = model.model.visual
        self.cfg = model.config
        tc = model.config.text_config
        self.n_heads = tc.num_attention_heads
        self.n_kv = tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.group = self.n_heads // self.n_kv
        self.scaling = self.head_dim**-0.5
        self.device = self.text.embed_tokens.weight.device
        self.dtype = self.text.embed_tokens.weight.dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.vision_batch = max(1, vision_batch)
        self.prefill_batch = max(1, prefill_batch)
        self.grow_by = max(16, grow_by)

    # ----------------------------------------------------------------- vision + embeddings
    def image_embeds(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision-tower output for all images, computed ``vision_batch`` images per call."""
        sizes = grid_thw.prod(-1).tolist()
        out, start = [], 0
        vdtype = self.visual.patch_embed.proj.weight.dtype
        for i in range(0, len(sizes), self.vision_batch):
            n = sum(sizes[i : i + self.vision_batch])
            pv = pixel_values[start : start + n].to(self.device, vdtype)
            start += n
            res = self.visual(pv, grid_thw=grid_thw[i : i + self.vision_batch].to(self.device))
            out.append(res.pooler_output if hasattr(res, "pooler_output") else res)
        return torch.cat(out, dim=0)

    # ----------------------------------------------------------------- one decoder pass
    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        rows: slice,
        write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        b, q_len, _ = h.shape
        for layer, (kc, vc) in zip(self.text.layers, caches, strict=True):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, q_len, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rope(q, k, cos, sin)
            write(kc, vc, (k, v))
            o = attend(q, kc[rows], vc[rows])
            o = attn.o_proj(o.transpose(1, 2).reshape(b, q_len, self.n_heads * self.head_dim))
            h = residual + layer.post_self_attn_layernorm(o)
            residual = h
            h = residual + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(h)))
        return self.text.norm(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()

    # ----------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        check_every: int = 16,
        should_stop: Callable[[int, list[int]], bool] | None = None,
        sampling: list[Sampling | None] | None = None,
    ) -> list[DecodeResult]:
        """Decode a left-padded batch (as :meth:`OcrProcessor.encode` makes it), greedy by default.

        Args:
            should_stop: called every ``check_every`` steps with (row, tokens so far) for rows still
                running; True stops that row (finish ``stopped``) - the repetition guard, a client
                gone, a streamer. The list is the decoder's own: read it, do not change it.
            sampling: one entry per row (None or temperature 0: greedy, as without it).
        """
        t0 = time.perf_counter()
        dev = self.device
        input_ids = inputs["input_ids"].to(dev)
        attention_mask = inputs["attention_mask"].to(dev)
        mm = inputs["mm_token_type_ids"].to(dev)
        grid = inputs["image_grid_thw"].to(dev)
        bsz, length = input_ids.shape
        # KV capacity grows in chunks: decode attention reads the whole buffer every step, so a
        # 4096-token cap must not cost 4096 slots while pages end after a few hundred tokens.
        total = _round16(length + min(max_new_tokens, self.grow_by))

        # 1. vision + embeddings + M-RoPE positions (the model's own code)
        img = self.image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
        embeds = self.text.embed_tokens(input_ids)
        img_mask = (input_ids == self.cfg.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(img_mask, img.to(embeds.dtype))
        del img
        positions, _ = self.core.get_rope_index(
            input_ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=attention_mask
        )
        t_vision = time.perf_counter()

        # 2. static KV cache + chunked prefill
        caches = [
            (
                torch.zeros(bsz, self.n_kv, total, self.head_dim, device=dev, dtype=self.dtype),
                torch.zeros(bsz, self.n_kv, total, self.head_dim, device=dev, dtype=self.dtype),
            )
            for _ in self.text.layers
        ]
        key_valid = torch.zeros(bsz, total, dtype=torch.bool, device=dev)
        key_valid[:, :length] = attention_mask.bool()
        first_logits = torch.empty(bsz, self.model.lm_head.out_features, device=dev, dtype=torch.float32)
        causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(length, dtype=torch.bool, device=dev)
        for b0 in range(0, bsz, self.prefill_batch):
            rows = slice(b0, min(bsz, b0 + self.prefill_batch))
            pos = positions[:, rows]
            cos, sin = self.text.rotary_emb(embeds[rows], position_ids=pos)
            padded = not bool(attention_mask[rows].all())
            if padded:
                # causal & real keys; a pad row sees itself so it stays finite (no real row reads it)
                mask = (causal & attention_mask[rows].bool()[:, None, :]) | eye
                mask = mask[:, None]

            def write(kc, vc, kv, rows=rows):
                kc[rows, :, :length] = kv[0]
                vc[rows, :, :length] = kv[1]

            def attend(q, k, v, mask=mask if padded else None):
                k = k[:, :, :length].repeat_interleave(self.group, dim=1)
                v = v[:, :, :length].repeat_interleave(self.group, dim=1)
                if mask is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)

            h = self._layers(embeds[rows], cos, sin, caches, rows, write, attend)
            first_logits[rows] = self._logits(h[:, -1])
        del embeds
        t_prefill = time.perf_counter()

        # 3. decode state (fixed buffers: the CUDA graph reads and updates them in place)
        eos = torch.tensor(eos_token_ids, device=dev, dtype=torch.long)
        vocab = first_logits.shape[-1]
        seen = torch.zeros(bsz, vocab, dtype=torch.bool, device=dev)
        # left pads are not part of the text: the penalty skips them (as transformers >= 5.2x does)
        seen.scatter_(1, torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:]), True)
        out = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
        unfinished = torch.ones(bsz, dtype=torch.bool, device=dev)
        step = torch.zeros(1, dtype=torch.long, device=dev)  # index of the token being chosen
        base_pos = positions[:, :, -1].clone()  # (3, B) position of the last prompt token
        penalty = float(repetition_penalty)
        per_row = [r or Sampling() for r in sampling or []]
        sampler = RowSampler(per_row, vocab, dev) if any(not r.greedy for r in per_row) else None

        def choose(logits: torch.Tensor) -> torch.Tensor:
            if penalty != 1.0:
                penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
                logits = torch.where(seen, penalised, logits)
            if min_new_tokens > 0:
                block = (step < min_new_tokens).expand(bsz, len(eos_token_ids))
                cur = logits.index_select(1, eos)
                logits = logits.index_copy(1, eos, torch.where(block, torch.full_like(cur, -float("inf")), cur))
            nxt = logits.argmax(-1) if sampler is None else sampler.choose(logits, step)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            unfinished.logical_and_(~(nxt[:, None] == eos[None, :]).any(-1))  # isin, graph-safe
            seen.scatter_(1, nxt[:, None], True)
            out.index_copy_(1, step, nxt[:, None])
            step.add_(1)
            return nxt

        tok = choose(first_logits).clone()

        def decode_step() -> None:
            # the token chosen last step (index step-1) is fed at slot length+step-1
            slot = step + (length - 1)
            key_valid.index_fill_(1, slot, True)
            pos = (base_pos + step).unsqueeze(-1)  # (3, B, 1)
            h = self.text.embed_tokens(tok[:, None])
            cos, sin = self.text.rotary_emb(h, position_ids=pos)
            mask = key_valid[:, None, None, :]

            def write(kc, vc, kv):
                kc.index_copy_(2, slot, kv[0])
                vc.index_copy_(2, slot, kv[1])

            def attend(q, k, v):
                # grouped-query attention without expanding K/V: each KV head sees its group's queries
                qg = q.reshape(bsz, self.n_kv, self.group, self.head_dim)
                o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scaling)
                return o.reshape(bsz, self.n_heads, 1, self.head_dim)

            h = self._layers(h, cos, sin, caches, slice(None), write, attend)
            tok.copy_(choose(self._logits(h[:, -1])))

        graph = (
            self._capture(decode_step, [tok, step, unfinished, seen, key_valid, out]) if max_new_tokens > 1 else None
        )
        finish = ["length"] * bsz
        stopped: set[int] = set()
        n_steps = 1
        so_far: list[list[int]] = [[] for _ in range(bsz)]  # host copy of ``out[:, :copied]``
        copied = 0
        for i in range(1, max_new_tokens):
            if length + i > total:
                # out of KV slots: copy into bigger buffers, re-capture (the graph holds the old ones)
                new_total = _round16(min(length + max_new_tokens, total + self.grow_by))
                caches = [(_grow(k, new_total), _grow(v, new_total)) for k, v in caches]
                grown = torch.zeros(bsz, new_total, dtype=torch.bool, device=dev)
                grown[:, :total] = key_valid
                key_valid, total = grown, new_total
                graph = self._capture(decode_step, [tok, step, unfinished, seen, key_valid, out])
            graph.replay() if graph is not None else decode_step()
            n_steps += 1
            if (i + 1) % check_every == 0 or i == max_new_tokens - 1:
                running = unfinished.tolist()
                if should_stop is not None:
                    for row, new in enumerate(out[:, copied : i + 1].tolist()):
                        so_far[row] += new
                    copied = i + 1
                    for row, alive in enumerate(running):
                        if alive and should_stop(row, so_far[row]):
                            stopped.add(row)
                            unfinished[row] = False
                            running[row] = False
                if not any(running):
                    break
        tokens = out[:, :n_steps].tolist()
        t_end = time.perf_counter()
        stats = {
            "vision_s": t_vision - t0,
            "prefill_s": t_prefill - t_vision,
            "decode_s": t_end - t_prefill,
            "steps": float(n_steps),
            "cuda_graph": float(graph is not None),
        }
        eos_set = set(eos_token_ids)
        results = []
        for row, seq in enumerate(tokens):
            cut = next((j for j, t in enumerate(seq) if t in eos_set), None)
            if cut is not None:
                seq, finish[row] = seq[:cut], "eos"
            if row in stopped:
                finish[row] = "stopped"
            results.append(DecodeResult(tokens=seq, finish=finish[row], stats=stats))
        return results

    def _capture(self, fn: Callable[[], None], state: list[torch.Tensor]):
        """A CUDA graph of ``fn`` (None when not on CUDA or capture fails: the caller runs eagerly).

        Warm-up runs change the decode state, so it is saved before and restored after; the KV
        slots warm-up wrote stay masked until real steps overwrite them.
        """
        if not self.cuda_graphs:
            return None
        saved = [t.clone() for t in state]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
            graph, _ = capture(fn)
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
            return graph
        except Exception as err:  # noqa: BLE001 - e.g. quantized kernels that sync; eager still works
            log.warning("CUDA graph capture failed (%s); decoding eagerly", err)
            torch.cuda.synchronize()
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
            return None
