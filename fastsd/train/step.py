"""One training step's maths: draw its inputs, condition the UNet, the denoising loss, the update.

The step is split where a CUDA graph needs it split: :func:`draw_inputs` does everything random
or data-dependent (eagerly, from the step's seeded generator) and returns :class:`StepInputs`;
:func:`loss_of` turns those tensors into the loss with no randomness and no host syncs, so
:func:`graph_step` (forward, backward, clip, optimizer) can be captured and replayed.

Random draws come from the step's generator in a fixed order: the instance batch's latent
sample, noise, offset noise, timesteps, then the same for the class batch. The generator is
re-seeded per step and micro-batch (:func:`seed_for`), so a resumed run needs no generator state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import data
from .ranks import allreduce_grads


@dataclass
class Branch:
    """One half of a step's batch (the instance images, or the class images of prior preservation)."""

    lat: torch.Tensor  # latents sampled from the cached distributions
    noise: torch.Tensor
    t: torch.Tensor  # timesteps
    tids: torch.Tensor  # SDXL size ids (width/height per image)
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # cached text embeddings (frozen encoders)
    ids: list[torch.Tensor] = field(default_factory=list)  # token ids (text encoders that train)


@dataclass
class StepInputs:
    """Everything a step reads; :meth:`flat` is the flat dict a CUDA graph keeps as static buffers."""

    inst: Branch
    prior: Branch | None = None

    def flat(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for pre, b in (("", self.inst), ("c_", self.prior)):
            if b is None:
                continue
            out[pre + "lat"], out[pre + "noise"], out[pre + "t"] = b.lat, b.noise, b.t
            out.update({f"{pre}cond.{k}": v for k, v in b.cond.items()})
            out.update({f"{pre}ids{k}": v for k, v in enumerate(b.ids)})
            out[pre + "tids"] = b.tids
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor]) -> StepInputs:
        """The inverse of :meth:`flat`, over the same tensors (no copies: the graph's buffers stay)."""

        def branch(pre: str) -> Branch:
            if pre:
                mine = {k[len(pre) :]: v for k, v in flat.items() if k.startswith(pre)}
            else:
                mine = {k: v for k, v in flat.items() if not k.startswith("c_")}
            ids = [mine[f"ids{k}"] for k in range(sum(1 for k in mine if k.startswith("ids")))]
            cond = {k[5:]: v for k, v in mine.items() if k.startswith("cond.")}
            return Branch(mine["lat"], mine["noise"], mine["t"], mine["tids"], cond, ids)

        return cls(branch(""), branch("c_") if "c_lat" in flat else None)


@dataclass
class StepData:
    """What steps draw from: latent distributions and token ids cached on the device, and the batch order."""

    latents: list[torch.Tensor]  # per image: stacked (mean, std) of its VAE latent
    class_latents: list[torch.Tensor]  # the same for the class images (empty: no prior preservation)
    order: data.BatchOrder
    token_ids: list[torch.Tensor]  # per tokenizer: the captions' ids
    class_ids: list[torch.Tensor]  # per tokenizer: the class prompt's ids
    time_ids: torch.Tensor  # SDXL size ids per image
    class_time_ids: torch.Tensor
    batch_size: int
    captions: list[str] = field(default_factory=list)  # SD3/FLUX: embedded through the pipeline, not token ids
    class_prompt: str = ""


@dataclass
class TextCache:
    """Text embeddings computed once the text encoders are frozen (all ``None`` while they train)."""

    inst: dict[str, torch.Tensor] | None = None  # per caption
    prior: dict[str, torch.Tensor] | None = None  # the class prompt
    sample: dict[str, torch.Tensor] | None = None  # the sample prompts
    sample_neg: dict[str, torch.Tensor] | None = None  # empty negative prompts

    @property
    def frozen(self) -> bool:
        return self.inst is not None


@dataclass
class Denoiser:
    """The model and loss settings a step uses (the UNet, the noise schedule, the loss weighting)."""

    unet: Any
    text_encoders: list[Any]
    family: str
    alphas_cumprod: torch.Tensor  # on the training device
    prediction: str  # "epsilon" or "v_prediction"
    num_timesteps: int
    channels_last: bool = False
    offset_noise: float = 0.0
    min_snr_gamma: float | None = None  # None: no Min-SNR weighting
    prior_weight: float = 1.0
    flow: Any = None  # SD3/FLUX: flow.FlowSettings (``unet`` is then the transformer, ``t`` holds sigmas)


def seed_for(seed: int, step: int, micro: int, rank: int) -> int:
    """The noise generator's seed for one micro-batch of one step on one rank."""
    return (seed * 1_000_003 + step * 4099 + micro * 131 + rank * 17) % (2**63 - 1)


def phases(te_steps: int, unet_steps: int, schedule: str) -> list[tuple[str, int, int]]:
    """(name, first step, end step): ``te`` / ``unet`` phases in sequence, or ``joint`` then ``unet``."""
    te, un = te_steps, unet_steps
    if te == 0:
        return [("unet", 0, un)]
    if schedule == "sequential":
        return [("te", 0, te), ("unet", te, te + un)]
    if te >= un:
        return [("joint", 0, un)]
    return [("joint", 0, te), ("unet", te, un)]


def pick(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``t[idx]`` without sending the index list to the device (a list index is a synchronous copy)."""
    return torch.stack([t[i] for i in idx])


def draw_inputs(d: StepData, text: TextCache, den: Denoiser, gen: torch.Generator, global_batch: int) -> StepInputs:
    """The inputs of global batch ``global_batch``: its images' latents, noise, timesteps and conditioning."""
    idx = d.order.batch(global_batch)
    inst = _draw(den, gen, torch.stack([d.latents[i] for i in idx]), pick(d.time_ids, idx))
    _condition_inputs(inst, text.inst, d.token_ids, idx)
    prior = None
    if d.class_latents:
        n = len(d.class_latents)
        cidx = [(global_batch * d.batch_size + j) % n for j in range(d.batch_size)]
        tids = d.class_time_ids.expand(len(cidx), -1).contiguous()
        prior = _draw(den, gen, torch.stack([d.class_latents[i] for i in cidx]), tids)
        _condition_inputs(prior, text.prior, d.class_ids, [0] * len(cidx))
    return StepInputs(inst, prior)


def _draw(den: Denoiser, gen: torch.Generator, lat_dists: torch.Tensor, tids: torch.Tensor) -> Branch:
    mean, std = lat_dists[:, 0], lat_dists[:, 1]
    b = mean.shape[0]
    lat = mean + std * torch.randn(mean.shape, generator=gen, device=gen.device)
    noise = torch.randn(mean.shape, generator=gen, device=gen.device)
    if den.offset_noise:
        noise = noise + den.offset_noise * torch.randn((b, mean.shape[1], 1, 1), generator=gen, device=gen.device)
    if den.flow is not None:  # flow matching: sigmas in (0, 1), logit-normal and shifted
        from .flow import draw_sigmas

        t = draw_sigmas(den.flow, gen, b, tuple(mean.shape[-2:]))
    else:
        t = torch.randint(0, den.num_timesteps, (b,), generator=gen, device=gen.device)
    return Branch(lat, noise, t, tids)


def _condition_inputs(
    b: Branch, cached: dict[str, torch.Tensor] | None, ids: list[torch.Tensor], idx: list[int]
) -> None:
    if cached is not None:  # frozen text encoders: cached embeddings
        b.cond = {k: pick(v, idx) for k, v in cached.items() if v is not None}
    else:  # trained text encoders: token ids, encoded inside the step
        b.ids = [pick(t, idx) for t in ids]


def condition(den: Denoiser, b: Branch) -> dict[str, torch.Tensor]:
    """The UNet's text conditioning: the cached embeddings, or the trained encoders' output (with grad)."""
    if b.cond:
        return b.cond
    return data.encode_text(den.text_encoders, b.ids, den.family)


def per_sample_loss(den: Denoiser, b: Branch) -> torch.Tensor:
    """Denoising MSE per image (epsilon or v target), Min-SNR weighted when ``min_snr_gamma`` is set.

    SD3/FLUX (``den.flow``): the flow-matching velocity loss of :mod:`.flow`.
    """
    if den.flow is not None:
        from .flow import per_sample_loss as flow_loss

        return flow_loss(den.unet, den.flow, b)
    cond = condition(den, b)
    a = den.alphas_cumprod[b.t].view(b.lat.shape[0], 1, 1, 1)
    noisy = a.sqrt() * b.lat + (1 - a).sqrt() * b.noise
    if den.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    extra = {"added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": b.tids}} if den.family == "sdxl" else {}
    pred = den.unet(noisy, b.t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False, **extra)[0]
    v = den.prediction == "v_prediction"
    target = a.sqrt() * b.noise - (1 - a).sqrt() * b.lat if v else b.noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if den.min_snr_gamma:
        snr = den.alphas_cumprod[b.t] / (1 - den.alphas_cumprod[b.t])
        weight = snr.clamp(max=den.min_snr_gamma) / (snr + 1 if v else snr)
        loss = loss * weight
    return loss


def loss_of(den: Denoiser, inp: StepInputs) -> torch.Tensor:
    """The step's loss from its drawn inputs: no randomness, no host syncs (graph-capturable)."""
    loss = per_sample_loss(den, inp.inst).mean()
    if inp.prior is not None:
        loss = loss + den.prior_weight * per_sample_loss(den, inp.prior).mean()
    return loss


@dataclass
class Update:
    """How gradients become a weight update: the optimizer, what it trains, clipping, scaling, ranks."""

    opt: Any  # optim.Optim / optim.InBackward
    trainables: list[torch.nn.Parameter]
    max_grad_norm: float | None
    foreach: bool  # clip with foreach kernels (CUDA)
    scaler: Any = None  # fp16: GradScaler (eager) or scaler.DeviceScaler (graphed)
    world: int = 1
    #: the weights are being changed (an error now leaves a half-updated model: the step cannot be retried)
    updating: bool = False

    def clear_grads(self) -> None:
        for p in self.trainables:
            p.grad = None


def graph_step(den: Denoiser, up: Update, autocast: Any, flat: dict[str, torch.Tensor]) -> torch.Tensor:
    """One whole optimizer step (no accumulation): what a CUDA graph captures.

    fp16 scales the loss with ``up.scaler``, a :class:`~fastsd.train.scaler.DeviceScaler`: unscaling,
    the inf check, the skipped step and the scale's update all stay on the device.
    """
    with autocast:
        loss = loss_of(den, StepInputs.from_flat(flat))
    up.updating = up.opt.in_backward  # the in-backward optimizer changes weights as the gradients appear
    (up.scaler.scale(loss) if up.scaler is not None else loss).backward()
    if not up.opt.in_backward:
        up.updating = True
        if up.scaler is not None:
            up.scaler.unscale_(up.opt.opt)
        clip_grads(up)
        up.opt.step(up.scaler)
        if up.scaler is not None:
            up.scaler.update()
    up.updating = False
    return loss.detach()


def clip_grads(up: Update) -> None:
    """Clip the (unscaled) gradients' global norm to ``up.max_grad_norm``, if set.

    Through the device scaler, which knows whether 16-bit gradients still carry the loss scale.
    """
    if not up.max_grad_norm:
        return
    if hasattr(up.scaler, "clip_"):
        up.scaler.clip_(up.trainables, up.max_grad_norm, up.foreach)
    else:
        torch.nn.utils.clip_grad_norm_(up.trainables, up.max_grad_norm, foreach=up.foreach)


def eager_update(up: Update) -> None:
    """After the micro-batches' backward passes: average over ranks, unscale, clip, step, zero."""
    up.updating = True
    if up.world > 1:
        allreduce_grads(up.trainables, up.world)
    if up.scaler is not None:
        up.scaler.unscale_(up.opt.opt)
    clip_grads(up)
    up.opt.step(up.scaler)
    if up.scaler is not None:
        up.scaler.update()
    up.opt.zero_grad()
    up.updating = False


def encode_frozen_text(
    models: Any, d: StepData, sample_prompts: list[str], device: torch.device, autocast: Any
) -> TextCache:
    """Embed every caption, the class prompt and the sample prompts once; the text encoders then leave the GPU.

    SD3/FLUX embed through their pipeline's ``encode_prompt``, and their T5 encoder is freed after.
    """
    text = TextCache()
    if getattr(models, "flow", False):
        prompts = list(sample_prompts)
        # no autocast: the encoders are loaded in the run's dtype, and fp16 autocast would also run T5's
        # feed-forward output layers, which transformers keeps in fp32 because they overflow fp16 (T4)
        with torch.no_grad():
            models.text_encoders_to(device)
            text.inst = models.encode_prompts(d.captions, device)
            text.prior = models.encode_prompts([d.class_prompt], device)
            if prompts:
                text.sample = models.encode_prompts(prompts, device)
                text.sample_neg = models.encode_prompts([""] * len(prompts), device)
        models.free_t5(device)
        models.text_encoders_to("cpu")
        return text
    with torch.no_grad(), autocast:
        models.text_encoders_to(device)
        text.inst = data.encode_text(models.text_encoders, d.token_ids, models.family)
        text.prior = data.encode_text(models.text_encoders, d.class_ids, models.family)
        if sample_prompts:
            prompts = list(sample_prompts)
            ids = [data.tokenize(tok, prompts).to(device) for tok in models.tokenizers]
            neg = [data.tokenize(tok, [""] * len(prompts)).to(device) for tok in models.tokenizers]
            text.sample = data.encode_text(models.text_encoders, ids, models.family)
            text.sample_neg = data.encode_text(models.text_encoders, neg, models.family)
    models.text_encoders_to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return text
