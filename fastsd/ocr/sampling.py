"""Per-row temperature / top-p / top-k sampling for the fast OCR decoder, seeded per request.

Each row of a batch carries its own :class:`Sampling`. The random numbers are not drawn from a
torch generator: they are a counter-based hash of (the row's seed, the decode step, the token id),
computed with integer tensor ops. So

* a request's output depends on its seed only, not on the batch it shares or its row in it;
* nothing syncs with the host and no generator state advances, so the step stays capturable in a
  CUDA graph (the keys and settings are device tensors fixed for the batch);
* CPU and CUDA draw the same numbers (integer math is exact).

A token is ``argmax(logits / T + Gumbel noise)`` over the tokens top-k and top-p keep, which is a
draw from ``softmax(logits / T)`` restricted to them (the Gumbel-max trick). Rows with temperature 0
take ``argmax(logits)`` from the very logits the greedy path sees, so they are bit-identical to it.
The order of processing is transformers': repetition penalty (by the caller), temperature, top-k,
top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's rule)
_M32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit value times one stays under 2**63, so int64 never overflows
_MUL_A, _MUL_B = 0x7FEB352D, 0x5BD1E995
_STEP, _TOKEN = 0x1B873593, 0x27D4EB2F


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens.

    Attributes:
        temperature: 0 is greedy; otherwise logits are divided by it before the draw.
        top_p: keep the smallest set of most likely tokens whose probability reaches this (1 = all).
        top_k: keep the k most likely tokens (0 = all).
        seed: the request's random stream; the same seed gives the same tokens.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filters(self) -> bool:
        return not self.greedy and (self.top_p < 1.0 or self.top_k > 0)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit key of a request's seed (any Python int; 64-bit OpenAI seeds fold both halves in)."""
    seed &= (1 << 64) - 1
    lo = torch.tensor([seed & _M32], dtype=torch.long)
    hi = torch.tensor([seed >> 32], dtype=torch.long)
    return int(_mix32(lo ^ _mix32(hi + 0x3C6EF372)).item())


def uniform(keys: torch.Tensor, step: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per (row, token): a hash of (row key, step, token id).

    Args:
        keys: (B,) int64 row keys (:func:`seed_key`).
        step: (1,) int64 decode step (a device tensor, so a graph replays it as it advances).
        vocab: (V,) int64 token ids.
    """
    row = _mix32((keys + step * _STEP) & _M32)[:, None]
    bits = _mix32((row + vocab[None, :] * _TOKEN) & _M32)
    # 23 bits plus a half: strictly inside (0, 1) in float32, so both logs below stay finite
    return ((bits >> 9).float() + 0.5) * (2.0**-23)


class RowSampler:
    """The sampling state of one batch: per-row settings as device tensors, chosen once per batch."""

    def __init__(self, rows: list[Sampling], vocab_size: int, device: torch.device) -> None:
        self.greedy_rows = torch.tensor([r.greedy for r in rows], device=device)
        self.temperature = torch.tensor([1.0 if r.greedy else r.temperature for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device)
        top_k = [r.top_k if 0 < r.top_k < vocab_size else vocab_size for r in rows]
        self.top_k = torch.tensor(top_k, device=device)
        self.keys = torch.tensor([seed_key(r.seed) for r in rows], dtype=torch.long, device=device)
        self.vocab = torch.arange(vocab_size, device=device)
        self.filters = any(r.filters for r in rows)  # host-known: the sort is only paid when asked for

    def choose(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Next token per row from (B, V) float32 logits (already penalised); graph-safe."""
        greedy = logits.argmax(-1)
        scaled = logits / self.temperature[:, None]
        if self.filters:
            scaled = self._filter(scaled)
        gumbel = -torch.log(-torch.log(uniform(self.keys, step, self.vocab)))
        sampled = (scaled + gumbel).argmax(-1)
        return torch.where(self.greedy_rows, greedy, sampled)

    def _filter(self, scaled: torch.Tensor) -> torch.Tensor:
        """-inf for the tokens top-k and top-p drop (the most likely token always stays)."""
        ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        rank = self.vocab[None, :]
        drop = ((before >= self.top_p[:, None]) & (self.top_p[:, None] < 1)) | (rank >= self.top_k[:, None])
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, -float("inf"))
        return torch.empty_like(scaled).scatter_(1, order, ordered)
