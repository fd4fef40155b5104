"""A low-memory AdamW that CUDA graphs can capture: 8-bit block-wise moments, device-side step and LR.

bitsandbytes' AdamW8bit keeps the same 2 bytes of state per parameter, but it steps each tensor
from Python with the step count and learning rate as host scalars baked into the kernel
arguments: ~90 ms per SD1.5 step of launch overhead, and a CUDA graph would replay step 1's
bias correction forever. :class:`LowMemAdamW` does the same math with plain torch ops whose
every per-step value (step count, learning rate) lives in device tensors, so the whole training
step (forward, backward, optimizer) can be captured once and replayed.

State per tensor with at least :data:`MIN_8BIT_SIZE` elements (smaller ones keep fp32 moments):

- ``m_q``/``m_scale``: the first moment, quantized per block of :data:`BLOCK` values to the
  8-bit *dynamic* code of Dettmers et al. (signed; the code bitsandbytes uses), scaled by the
  block's absolute maximum;
- ``r_q``/``r_scale``: the square root of the second moment, with the unsigned dynamic code.
  Storing sqrt(v) halves its dynamic range in log space, so a small entry next to a large one in
  its block is not rounded to zero (which would make its update explode).

That is 2 bytes + 8/BLOCK bytes per parameter instead of 8 for fp32 AdamW.

Under fp16 loss scaling (:class:`~fastsd.train.scaler.DeviceScaler`) the scaler sets
``optimizer.found_inf`` before :meth:`LowMemAdamW.step`; where it is 1 (an overflowing step) every
write goes through ``torch.where`` and keeps the old weights, moments and step count, bit for bit,
with no host synchronisation: what GradScaler's skipped ``step`` does, inside a CUDA graph.

**16-bit weights** (``--master-weights 16bit``: fp16 or bf16 parameters, no fp32 copy) are updated in
fp32 and written back with *stochastic rounding* (:func:`stochastic_round_`): a value between two
16-bit neighbours becomes the upper one with a probability proportional to its distance from the
lower one, so the rounding is unbiased. Round-to-nearest would drop every update smaller than half
a 16-bit step (at a learning rate of 2e-6 nearly all of them); stochastic rounding keeps them on
average (Gupta et al. 2015; Zamirai et al. 2020, "Revisiting BFloat16 Training"). The random bits
come from the default generator of the parameter's device, which checkpoints save and a CUDA graph
advances on every replay. Their 16-bit gradients may still carry the loss scale: the scaler then
sets ``optimizer.grad_mult`` (1/scale, times the clipping factor) and the update multiplies in fp32,
so no small gradient is flushed to zero by an fp16 division.
"""

from __future__ import annotations

from typing import Any

import torch

#: Values per quantization block (each block has its own fp32 scale).
BLOCK = 256
#: Tensors smaller than this keep fp32 moments (biases, norms: tiny, and sensitive).
MIN_8BIT_SIZE = 4096
#: Contiguous tensors are updated this many blocks at a time: the fp32 temporaries of one update
#: stay ~100 MB even for the 38M-entry text-encoder embedding.
CHUNK_BLOCKS = 4096
#: fp32 mantissa bits below each 16-bit format's last one (fp16 keeps 10 of fp32's 23, bf16 7).
DROPPED_BITS = {torch.float16: 13, torch.bfloat16: 16}


def stochastic_round_(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 ``value`` in place to a value ``dtype`` (fp16/bf16) holds exactly, up or down at random, unbiased.

    Adding a uniform random integer below ``2**k`` to the fp32 bit pattern and clearing its ``k`` low
    bits rounds the magnitude up with probability (distance to the lower neighbour) / (spacing); the
    result converts to ``dtype`` without a second rounding. Exact for fp16 normals (``|x|`` from 6.1e-5
    to 65504); fp16's subnormals (weights below 6.1e-5) then round to nearest in the conversion.
    """
    k = DROPPED_BITS[dtype]
    bits = value.view(torch.int32)
    bits.add_(torch.randint_like(bits, 0, 2**k)).bitwise_and_(-(2**k))
    return value


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256 sorted values of the 8-bit dynamic tree code (exponent + linear fraction), in [-1, 1].

    Same construction as ``bitsandbytes.functional.create_dynamic_map``: decades 1e-6..1, with more
    fraction levels in the larger decades, plus 0 and 1.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = (
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        bounds = torch.linspace(0.1, 1, int(items), dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0).tolist()
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += [scale * v for v in means]
        if signed:
            data += [-scale * v for v in means]
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0).tolist()
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += [scale * v for v in means]
        if signed:
            data += [-scale * v for v in means]
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_CODES: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _code(device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(code values, midpoints between neighbours) on ``device``; nearest-code search is a bucketize."""
    key = (str(device), signed)
    if key not in _CODES:
        values = dynamic_map(signed).to(device)
        _CODES[key] = (values, ((values[1:] + values[:-1]) / 2).contiguous())
    return _CODES[key]


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize ``x`` of shape ``(blocks, BLOCK)``: (uint8 codes, fp32 per-block absmax)."""
    _, mids = _code(x.device, signed)
    scale = x.abs().amax(dim=1)
    normed = x / scale.clamp_min(1e-30).unsqueeze(1)
    return torch.bucketize(normed, mids, out_int32=True).to(torch.uint8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`quantize` (fp32, shape ``(blocks, BLOCK)``)."""
    values, _ = _code(q.device, signed)
    return values.index_select(0, q.view(-1).int()).view(q.shape).mul_(scale.unsqueeze(1))


class LowMemAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with 8-bit block-wise moments; CUDA-graph capturable.

    Args:
        params: tensors or parameter groups: fp32 masters, or fp16/bf16 weights (stochastically
            rounded, see the module doc); the update is computed in fp32 either way.
        lr: learning rate, a float or a 0-dim device tensor (shared tensors let one ``fill_``
            change the rate of many optimizers, outside a captured graph).
        betas, eps, weight_decay: as :class:`torch.optim.AdamW`.
        min_8bit_size: tensors with fewer elements keep fp32 moments.
    """

    #: :meth:`step` reads ``self.found_inf`` (set by a loss scaler) and skips itself on the device
    skips_on_found_inf = True
    #: :meth:`step` multiplies the gradients by ``self.grad_mult`` when a loss scaler sets it (16-bit gradients)
    takes_grad_mult = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.min_8bit_size = min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        n = p.numel()
        if n >= self.min_8bit_size:
            blocks = -(-n // BLOCK)
            state["m_q"], state["m_scale"] = quantize(torch.zeros(blocks, BLOCK, device=p.device), True)
            state["r_q"], state["r_scale"] = quantize(torch.zeros(blocks, BLOCK, device=p.device), False)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, but every state tensor keeps its saved dtype.

        torch casts floating-point state to its weight's dtype: beside 16-bit weights that would round the
        fp32 moments and block scales to 16 bits, and a resumed run would no longer equal an uninterrupted one.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW update of every tensor with a gradient; no host synchronisation, no host scalars.

        With ``self.found_inf`` set (a 0-dim device tensor, 1: the gradients overflowed) nothing changes
        where it is 1.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf > 0
        mult = getattr(self, "grad_mult", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if self.state[p] else self._init_state(p)
                self._update(
                    p, p.grad, state, group["lr"], beta1, beta2, group["eps"], group["weight_decay"], skip, mult
                )
                if found_inf is not None:
                    state["step"].sub_(found_inf)  # a skipped step is not counted (as fused AdamW does)
        return loss

    @staticmethod
    def _update(
        p: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        lr: float | torch.Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        skip: torch.Tensor | None = None,
        mult: torch.Tensor | None = None,
    ) -> None:
        step = state["step"]
        step.add_(1)
        bias1 = 1 - torch.pow(beta1, step)
        bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
        if isinstance(lr, torch.Tensor):
            step_size = lr / bias1
            decay = 1 - lr * weight_decay
        else:
            step_size = bias1.reciprocal().mul_(lr)
            decay = 1 - lr * weight_decay
        if "exp_avg" in state:
            m, v = state["exp_avg"], state["exp_avg_sq"]
            g = grad.float() if mult is None else grad.float() * mult
            new_m = m.lerp(g, 1 - beta1)
            new_v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
            update = new_m / (new_v.sqrt() / bias2_sqrt + eps)
            _decay_and_step(p, decay, update * step_size, skip)
            _put(m, new_m, skip)
            _put(v, new_v, skip)
            return
        n = p.numel()
        blocks = state["m_scale"].numel()
        args = (bias2_sqrt, step_size, decay, beta1, beta2, eps, skip, mult)
        if p.is_contiguous() and grad.is_contiguous():
            flat_p, flat_g = p.view(-1), grad.view(-1)
            for b0 in range(0, blocks, CHUNK_BLOCKS):
                b1 = min(blocks, b0 + CHUNK_BLOCKS)
                e0, e1 = b0 * BLOCK, min(n, b1 * BLOCK)
                sl = slice(b0, b1)
                qs = (state["m_q"][sl], state["m_scale"][sl], state["r_q"][sl], state["r_scale"][sl])
                _update_8bit(flat_p[e0:e1], flat_g[e0:e1], *qs, *args)
        else:  # e.g. channels_last conv weights: one piece, in logical order
            qs = (state["m_q"], state["m_scale"], state["r_q"], state["r_scale"])
            _update_8bit(p, grad, *qs, *args)


def _update_8bit(
    p: torch.Tensor,
    grad: torch.Tensor,
    m_q: torch.Tensor,
    m_scale: torch.Tensor,
    r_q: torch.Tensor,
    r_scale: torch.Tensor,
    bias2_sqrt: torch.Tensor,
    step_size: torch.Tensor,
    decay: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    skip: torch.Tensor | None = None,
    mult: torch.Tensor | None = None,
) -> None:
    """AdamW on ``p`` (any shape; its blocks are ``m_q``/``r_q`` rows) with 8-bit moments, all in place
    (nothing changes where ``skip``, a 0-dim bool tensor, is true; gradients are times ``mult`` if given)."""
    n = p.numel()
    blocks = m_scale.numel()
    g = grad.reshape(-1).float()
    if mult is not None:
        g = g * mult
    if blocks * BLOCK != n:
        g = torch.nn.functional.pad(g, (0, blocks * BLOCK - n))
    g = g.view(blocks, BLOCK)
    m = dequantize(m_q, m_scale, True)
    r = dequantize(r_q, r_scale, False)
    m.lerp_(g, 1 - beta1)
    r = r.square_().mul_(beta2).addcmul_(g, g, value=1 - beta2).sqrt_()  # sqrt of the new second moment
    update = m / (r / bias2_sqrt + eps)
    _decay_and_step(p, decay, (update.view(-1)[:n] * step_size).view(p.shape), skip)
    mq, ms = quantize(m, True)
    rq, rs = quantize(r, False)
    for dst, new in ((m_q, mq), (m_scale, ms), (r_q, rq), (r_scale, rs)):
        _put(dst, new, skip)


def _decay_and_step(
    p: torch.Tensor, decay: float | torch.Tensor, delta: torch.Tensor, skip: torch.Tensor | None
) -> None:
    """``p = p * decay - delta`` in place; where ``skip`` is true ``p`` keeps its value (same bits either way).

    A 16-bit ``p`` takes the fp32 result stochastically rounded (:func:`stochastic_round_`).
    """
    if p.dtype != torch.float32:
        new = stochastic_round_(p.float().mul_(decay).sub_(delta), p.dtype)
        p.copy_(new if skip is None else torch.where(skip, p, new))
    elif skip is None:
        p.mul_(decay)
        p.sub_(delta)
    else:
        p.copy_(torch.where(skip, p, p.mul(decay).sub_(delta)))


def _put(dst: torch.Tensor, new: torch.Tensor, skip: torch.Tensor | None) -> None:
    """``dst = new`` in place, unless ``skip`` (a 0-dim bool tensor on the device) is true."""
    dst.copy_(new if skip is None else torch.where(skip, dst, new))
