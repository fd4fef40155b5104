"""Image generation on diffusers with A1111 semantics: the pipeline manager behind the API and UI.

:class:`PipelineManager` owns the one loaded model. It switches models without a restart (the
previous one is released first), applies memory settings chosen by VRAM, builds the txt2img /
img2img / inpaint pipelines from the same components (no extra memory), applies LoRAs with
weights, a VAE override and CLIP skip, and runs :class:`GenerationRequest` s with A1111's seed
rules: seed -1 is random, image *i* of a job uses ``seed + i`` and its own generator, so a seed
gives the same image whatever the batch size. All of its methods must run on the worker thread.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .. import __version__
from ..errors import ModelFormatError, UserInputError
from ..models import memplan
from ..models.detect import detect
from ..models.load import PIPELINES, load_pipeline
from . import catalog, fastpath, flow, infotext, memory, pixels, samplers
from .worker import JobState

log = logging.getLogger(__name__)

MAX_LOADED_LORAS = 8  # adapters kept loaded (disabled when unused) before all are unloaded


@dataclass
class GenerationRequest:
    """One A1111-style job. Field names and defaults follow A1111's processing classes."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    steps: int | None = 20  # None: the model's default (SD3/FLUX: the makers' settings; else A1111's API's)
    cfg_scale: float | None = 7.0  # None as for steps; FLUX.1-dev: its distilled guidance
    width: int = 512
    height: int = 512
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int | None = None  # A1111's CLIP_stop_at_last_layers; None: the option's value
    checkpoint: str | None = None  # None: the ``sd_model_checkpoint`` option
    vae: str | None = None  # None: the ``sd_vae`` option
    loras: list[tuple[str, float]] = field(default_factory=list)  # besides <lora:...> prompt tags
    eta: float | None = None
    # img2img / inpaint
    init_images: list[Image.Image] | None = None
    denoising_strength: float = 0.75
    resize_mode: int = 0  # 0 resize, 1 crop and resize, 2 resize and fill, 3 latent upscale (as 0)
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0

    @property
    def task(self) -> str:
        if not self.init_images:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"


@dataclass
class GenerationResult:
    """Images with their seeds and infotexts, plus A1111's ``info`` dict."""

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    info: dict[str, Any]
    interrupted: bool = False


def encode_clip_skip(pipe: Any, texts: list[str], clip_skip: int) -> Any:
    """SD1/SD2 prompt embeddings from CLIP layer ``-clip_skip`` (A1111 numbering: 1 = last layer).

    The chosen hidden state goes through the encoder's final layer norm, as in A1111 and diffusers.
    """
    import torch

    tok, te = pipe.tokenizer, pipe.text_encoder
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    device = pipe._execution_device
    mask = ids.attention_mask.to(device) if getattr(te.config, "use_attention_mask", False) else None
    with torch.no_grad():
        out = te(ids.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 has no .text_model
        return norm(out.hidden_states[-clip_skip]).to(te.dtype)


def random_seed() -> int:
    """A fresh seed in A1111's range."""
    return int(random.randrange(4294967294))


def _adapter_name(name: str) -> str:
    return "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


class PipelineManager:
    """Loads one model at a time and generates with it. Run every call on the worker thread.

    Args:
        home: the fastsd home (models are listed from it, outputs saved under it).
        model: an explicit local model file/folder (see :func:`fastsd.models.load.local_model`)
            added to the list and used first.
        models_dirs: extra folders to list models from.
        memory: memory-setting overrides (``attention_slicing``/``vae_tiling``/``cpu_offload``).
        device: torch device; default CUDA when available.
    """

    def __init__(
        self,
        home: Path,
        *,
        model: str | None = None,
        models_dirs: list[str | Path] | None = None,
        memory: dict[str, Any] | None = None,
        device: str | None = None,
        state: JobState | None = None,
    ) -> None:
        import torch

        self.home = Path(home)
        self.model_spec = model
        self.models_dirs = list(models_dirs or [])
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.state = state or JobState()
        self.entries: list[catalog.Entry] = []
        self.refresh()
        first = next((e.title for e in self.entries if e.kind == "checkpoint"), None)
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": first,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "randn_source": "GPU",
            "eta_ancestral": 1.0,
            "samples_format": "png",
            "outdir_samples": str(self.home / "outputs"),
            "fastsd_attention_slicing": "auto",
            "fastsd_vae_tiling": "auto",
            "fastsd_cpu_offload": "auto",
            "fastsd_cuda_graph": "auto",  # replay the denoiser from CUDA graphs (see fastpath)
            memplan.SETTING: "auto",  # SD3/FLUX: fp16, int8, nf4... (fastsd.models.memplan)
        }
        for key, value in (memory or {}).items():
            self.options[f"fastsd_{key}"] = value
        self.pipe: Any = None
        self.loaded: catalog.Entry | None = None
        self.family = "sd1"  # fastsd.models.detect's family names
        self.variant = ""  # SD3: medium/large/large-turbo; FLUX: dev/schnell
        self.plan: memplan.MemoryPlan | None = None  # SD3/FLUX only
        self._task_pipes: dict[str, Any] = {}
        self._scheduler_config: dict[str, Any] = {}
        self._original_vae: Any = None
        self._vae_title = "Automatic"
        self._loras: dict[str, str] = {}  # adapter name -> path
        self._offload_owner: Any = None
        self.memory: dict[str, bool] = {}
        self._graph_lora_state: Any = None  # the LoRA set the captured denoiser graphs were made with

    # ----- catalog -------------------------------------------------------------------------
    def refresh(self) -> list[catalog.Entry]:
        """Re-scan the model folders (A1111's refresh-checkpoints / refresh-loras)."""
        self.entries = catalog.scan(self.home, self.models_dirs, self.model_spec)
        return self.entries

    def listed(self, kind: str) -> list[catalog.Entry]:
        return [e for e in self.entries if e.kind == kind]

    # ----- options -------------------------------------------------------------------------
    def set_options(self, values: dict[str, Any]) -> None:
        """Apply A1111 options; ``sd_model_checkpoint`` and ``sd_vae`` load now. Unknown keys are ignored.

        Raises:
            UserInputError: an unknown checkpoint or VAE, or a bad value.
        """
        values = dict(values)
        for key in ("fastsd_attention_slicing", "fastsd_vae_tiling", "fastsd_cpu_offload", "fastsd_cuda_graph"):
            if key in values and values[key] not in ("auto", True, False):
                raise UserInputError(f'option {key} must be true, false or "auto", not {values[key]!r}')
        if "CLIP_stop_at_last_layers" in values:
            clip = values["CLIP_stop_at_last_layers"]
            if not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip <= 12:
                raise UserInputError(f"CLIP_stop_at_last_layers must be an integer 1..12, not {clip!r}")
        if "randn_source" in values and values["randn_source"] not in ("GPU", "CPU"):
            raise UserInputError(f'randn_source must be "GPU" or "CPU", not {values["randn_source"]!r}')
        if "sd_model_checkpoint" in values and values["sd_model_checkpoint"]:
            entry = catalog.find(self.entries, "checkpoint", str(values["sd_model_checkpoint"]))
            self.ensure_loaded(entry.title)
            values["sd_model_checkpoint"] = entry.title
        if "sd_vae" in values:
            self._vae_entry(values["sd_vae"])  # validate before storing
        for key, value in values.items():
            if key in self.options:
                self.options[key] = value
        if memplan.SETTING in values and self.family in memplan.FLOW_FAMILIES and self.pipe is not None:
            self.unload()  # another plan is another load: the next job loads with it
        elif self.pipe is not None and any(k.startswith("fastsd_") for k in values):
            self._apply_memory_settings()

    # ----- loading -------------------------------------------------------------------------
    def unload(self) -> None:
        """Release the loaded model and its GPU memory."""
        if self.pipe is None:
            return
        fastpath.uninstall(self.pipe)  # its graphs' memory goes back with the model's
        with contextlib.suppress(AttributeError, RuntimeError):
            self.pipe.remove_all_hooks()
        self.pipe = None
        self.loaded = None
        self._task_pipes.clear()
        self._original_vae = None
        self._offload_owner = None
        self._loras.clear()
        self._vae_title = "Automatic"
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def ensure_loaded(self, title: str | None = None) -> catalog.Entry:
        """Load checkpoint ``title`` (default: the current option) unless it is already loaded.

        The previous model is released *before* the new one loads, so two never share the GPU.

        Raises:
            UserInputError: no model available or no such checkpoint.
        """
        title = title or self.options.get("sd_model_checkpoint")
        if not title:
            raise UserInputError(
                f"no model to load: put one under {self.home / 'models'}, pass --model PATH, or set sd_model_checkpoint"
            )
        entry = catalog.find(self.entries, "checkpoint", title)
        if self.loaded is not None and self.loaded.path == entry.path:
            return entry
        self.unload()
        self.state.textinfo = f"Loading {entry.title}"
        log.info("loading model %s", entry.path)
        started = time.time()
        det = detect(entry.path)  # headers and configs only; the loader reads the same
        family, variant = det.family, (det.variants[0] if det.variants else "")
        dtype, plan, quantization = self.dtype, None, None
        if family in memplan.FLOW_FAMILIES:  # refused here, before anything loads, when it cannot fit
            plan, dtype, quantization = flow.plan_for(
                entry.path, family, variant, self.device, self.options.get(memplan.SETTING)
            )
        pipe = load_pipeline(entry.path, torch_dtype=dtype, quantization=quantization)
        if not hasattr(pipe, "unet") and not hasattr(pipe, "transformer"):
            raise ModelFormatError(f"{entry.title} is a {type(pipe).__name__}, not a Stable Diffusion pipeline")
        if hasattr(pipe, "safety_checker") and getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None  # A1111 has none; it also costs VRAM and time
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.loaded, self.family, self.variant, self.plan = pipe, entry, family, variant, plan
        if plan is not None:
            log.info("memory plan for %s: %s", entry.title, plan.describe())
        self._scheduler_config = dict(pipe.scheduler.config)
        self._original_vae = pipe.vae
        self._apply_memory_settings()
        log.info("loaded %s (%s) in %.1fs", entry.title, self.family, time.time() - started)
        return entry

    def _apply_memory_settings(self) -> None:
        overrides = {k: self.options.get(f"fastsd_{k}") for k in memory.MEMORY_KEYS}
        vram = memory.vram_gib() if self.device.startswith("cuda") else 0.0
        self.memory = memory.memory_settings(self.family, vram, overrides)
        if self.plan is not None:  # SD3/FLUX: the memory plan decides the offload
            self.memory["cpu_offload"] = self.plan.offload == "model"
        pipe = self.pipe
        if self.memory["attention_slicing"]:
            pipe.enable_attention_slicing()
        elif hasattr(pipe, "disable_attention_slicing"):
            pipe.disable_attention_slicing()
        vae = pipe.vae
        if self.memory["vae_tiling"]:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        pipe.remove_all_hooks()
        self._offload_owner = None
        if self.plan is not None and self.plan.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        elif not self.memory["cpu_offload"]:
            pipe.to(self.device)
        self._apply_fast_path(vram)

    def _apply_fast_path(self, vram: float) -> None:
        """Replay the denoiser from CUDA graphs unless turned off, offloaded, or (SD3/FLUX on "auto") the
        memory plan leaves no room for the graph's pool (see :mod:`.fastpath`)."""
        wanted = self.options.get("fastsd_cuda_graph", "auto")
        if wanted == "auto" and self.plan is not None and self.device.startswith("cuda"):
            wanted = memplan.room_for_graph(self.plan, self.family, vram)
            if not wanted:
                log.info("the %s plan leaves no room for the denoiser's CUDA graph: it runs eagerly", self.plan.name)
        if wanted is not False and self.device.startswith("cuda") and not self.memory.get("cpu_offload"):
            fastpath.install(self.pipe)
        else:
            fastpath.uninstall(self.pipe)
        self._graph_lora_state = None

    def _vae_entry(self, name: Any) -> catalog.Entry | None:
        if name in (None, "", "Automatic", "None"):
            return None
        return catalog.find(self.entries, "vae", str(name))

    def _apply_vae(self, name: str | None) -> str:
        """Swap in the requested VAE (or restore the model's own); returns the VAE's display name."""
        entry = self._vae_entry(name)
        title = entry.title if entry else "Automatic"
        if title == self._vae_title:
            return title
        if entry is None:
            vae = self._original_vae
        else:
            from diffusers import AutoencoderKL

            p = Path(entry.path)
            try:
                if p.is_dir():
                    vae = AutoencoderKL.from_pretrained(p, torch_dtype=self.dtype, local_files_only=True)
                else:
                    vae = AutoencoderKL.from_single_file(str(p), torch_dtype=self.dtype)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                raise ModelFormatError(f"cannot load VAE {entry.title}: {err}") from err
            if self.memory.get("vae_tiling"):
                vae.enable_tiling()
        if not self.memory.get("cpu_offload"):
            vae.to(self.device)
        self.pipe.vae = vae
        self.pipe.register_modules(vae=vae)
        self._task_pipes.clear()
        self._offload_owner = None
        self._vae_title = title
        return title

    def _task_pipe(self, task: str) -> Any:
        import diffusers

        pipe = self.pipe
        name = PIPELINES[(self.family, task)]
        if type(pipe).__name__ == name:
            target = pipe
        else:
            target = self._task_pipes.get(task)
            if target is None:
                target = getattr(diffusers, name).from_pipe(pipe)
                target.set_progress_bar_config(disable=True)
                self._task_pipes[task] = target
        if self.memory.get("cpu_offload") and self._offload_owner is not target:
            # Offload hooks live on the shared modules; move them to the pipeline about to run.
            if self._offload_owner is not None:
                self._offload_owner.remove_all_hooks()
            target.enable_model_cpu_offload(device=self.device)
            self._offload_owner = target
        return target

    def _apply_loras(self, loras: list[tuple[str, float]], warnings: list[str]) -> list[tuple[str, float]]:
        """Load (once) and weight the requested LoRAs; disable all when none are requested.

        A name is looked up among the catalog's LoRAs only (the model folders), never opened as a
        path: an unknown or path-like name (``<lora:../../x:1>``) is skipped, as A1111 does, and
        said in ``warnings`` (which the job's ``info`` carries back).
        """
        pipe = self.pipe
        if not loras:
            if self._loras:
                pipe.disable_lora()
            return []
        if not hasattr(pipe, "load_lora_weights"):
            raise UserInputError(f"{self.loaded.title if self.loaded else 'this model'} does not support LoRAs")
        applied: list[tuple[str, float]] = []
        for name, weight in loras:
            try:
                entry = catalog.find(self.entries, "lora", name)
            except UserInputError:
                if "/" in name or "\\" in name or ".." in name:
                    why = "is not a LoRA in the model folders (LoRAs are named, not given as paths)"
                else:
                    why = "was not found in the model folders (POST /sdapi/v1/refresh-loras after adding files)"
                warnings.append(f"LoRA {name!r} {why}; ignored")
                log.warning("%s", warnings[-1])
                continue
            adapter = _adapter_name(entry.name)
            if adapter not in self._loras:
                if len(self._loras) >= MAX_LOADED_LORAS:
                    pipe.unload_lora_weights()
                    self._loras.clear()
                try:
                    pipe.load_lora_weights(entry.path, adapter_name=adapter)
                except (ValueError, KeyError, RuntimeError, OSError) as err:
                    raise ModelFormatError(f"LoRA {entry.title} does not fit {self.loaded.title}: {err}") from err
                self._loras[adapter] = entry.path
            applied.append((entry.name, weight))
        if not applied:
            if self._loras:
                pipe.disable_lora()
            return []
        pipe.enable_lora()
        pipe.set_adapters([_adapter_name(n) for n, _ in applied], [w for _, w in applied])
        return applied

    # ----- generation ----------------------------------------------------------------------
    def generate(self, req: GenerationRequest) -> GenerationResult:
        """Run one A1111-style job (``n_iter`` batches of ``batch_size`` images).

        Interrupt (via :attr:`state`) ends the job after the current step and returns what it
        has; skip ends the current batch and goes on with the next.

        Raises:
            UserInputError: bad names or values (unknown sampler, LoRA weight...).
            ModelFormatError: a model, VAE or LoRA that cannot be loaded.
        """
        import torch

        sampler = samplers.find_sampler(req.sampler_name)
        schedule = samplers.find_schedule_type(req.scheduler)
        try:
            prompt, tag_loras = infotext.parse_loras(req.prompt)
        except ValueError as err:
            raise UserInputError(str(err)) from None
        entry = self.ensure_loaded(req.checkpoint)
        vae_name = self._apply_vae(req.vae if req.vae is not None else self.options["sd_vae"])
        warnings: list[str] = []
        loras = self._apply_loras(tag_loras + list(req.loras), warnings)
        lora_state = (tuple(self._loras), tuple(loras))
        if lora_state != self._graph_lora_state:  # graphs bake in the adapters and their weights
            fastpath.reset(self.pipe)
            self._graph_lora_state = lora_state
        clip_skip = req.clip_skip or int(self.options["CLIP_stop_at_last_layers"])
        task = req.task
        is_inpaint_model = getattr(getattr(self.pipe, "unet", None), "config", None) is not None and (
            self.pipe.unet.config.in_channels == 9
        )

        # Pixel inputs for the pipeline (and what to paste the result into, for inpainting).
        width, height = req.width, req.height
        image = mask = None
        paste: tuple[Image.Image, Image.Image, tuple[int, int, int, int]] | None = None
        if task == "img2img":
            image = pixels.resize(req.init_images[0], width, height, req.resize_mode)
            if is_inpaint_model:  # a 9-channel UNet needs a mask: repaint everything
                mask = Image.new("L", (width, height), 255)
        elif task == "inpaint":
            image, mask, paste = pixels.prepare_inpaint(req, width, height)
        elif is_inpaint_model:  # txt2img on an inpainting model: blank image, full mask, full noise
            image = Image.new("RGB", (width, height), (127, 127, 127))
            mask = Image.new("L", (width, height), 255)
        run_task = "inpaint" if mask is not None else task
        pipe = self._task_pipe(run_task)
        pipe.scheduler = samplers.make_scheduler(self._scheduler_config, sampler, schedule, family=self.family)
        default_steps, default_cfg = samplers.default_steps_guidance(self.family, self.variant)
        steps = req.steps if req.steps is not None else default_steps
        cfg_scale = float(req.cfg_scale if req.cfg_scale is not None else default_cfg)
        timesteps = self._schedule_timesteps(pipe.scheduler, sampler, schedule, steps)
        strength = 1.0 if (task == "txt2img") else float(req.denoising_strength)
        if task != "txt2img" and int(steps * strength) < 1:
            # diffusers refuses to run zero steps; A1111 runs at least one (its t_enc + 1)
            strength = min(1.0, (1 + 1e-6) / steps)
        model_hash = catalog.short_hash(entry.path)

        seed = random_seed() if req.seed == -1 else int(req.seed)
        subseed = random_seed() if req.subseed == -1 else int(req.subseed)
        total = req.batch_size * req.n_iter
        all_seeds = [seed + i for i in range(total)]
        gen_device = self.device if self.options.get("randn_source", "GPU") == "GPU" else "cpu"

        state = self.state
        state.job_count = req.n_iter
        state.family = self.family
        state.sampling_steps = steps if task == "txt2img" else max(1, min(int(steps * strength), steps))

        def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            state.latents = kwargs.get("latents")  # first: a reader that sees the step also sees its preview
            state.sampling_step = i + 1
            state.sampling_steps = getattr(p, "num_timesteps", state.sampling_steps) or state.sampling_steps
            if state.interrupted or state.skipped:
                p._interrupt = True  # diffusers skips the remaining steps and decodes what it has
            return {}

        images: list[Image.Image] = []
        used_seeds: list[int] = []
        for it in range(req.n_iter):
            if state.interrupted:
                break
            state.job_no, state.sampling_step, state.skipped = it, 0, False
            seeds = all_seeds[it * req.batch_size : (it + 1) * req.batch_size]
            kwargs: dict[str, Any] = {
                "prompt": [prompt] * len(seeds),
                "negative_prompt": [req.negative_prompt] * len(seeds),
                "num_inference_steps": steps,
                **({"timesteps": timesteps} if timesteps else {}),
                "guidance_scale": cfg_scale,
                "generator": [torch.Generator(gen_device).manual_seed(s) for s in seeds],
                "callback_on_step_end": on_step,
                "output_type": "latent",  # decoded below, one image at a time
            }
            if clip_skip > 1 and self.family in ("sd1", "sd2"):
                # Encoded here: diffusers' SD clip_skip path breaks on transformers 5, and it skips
                # layers for the prompt only, where A1111 skips them for the negative prompt too.
                kwargs["prompt_embeds"] = encode_clip_skip(pipe, kwargs.pop("prompt"), clip_skip)
                kwargs["negative_prompt_embeds"] = encode_clip_skip(pipe, kwargs.pop("negative_prompt"), clip_skip)
            elif clip_skip > 1 and self.family == "sdxl":
                kwargs["clip_skip"] = clip_skip - 1  # diffusers counts layers skipped; A1111 counts from 1
            if req.eta is not None and "eta" in inspect.signature(pipe.__call__).parameters:
                kwargs["eta"] = req.eta
            if run_task == "txt2img":
                kwargs.update(width=width, height=height)
            else:
                kwargs.update(image=[image] * len(seeds), strength=strength)
                if mask is not None or self.family == "flux":  # FLUX img2img would default to 1024 px
                    kwargs.update(width=image.width, height=image.height)
                if mask is not None:
                    kwargs["mask_image"] = [mask] * len(seeds)
            if self.family in memplan.FLOW_FAMILIES:
                flow.adjust_kwargs(kwargs, self.family, self.variant, warnings if it == 0 else [])
            latents = pipe(**kwargs).images
            if self.family == "flux":  # FLUX returns its latents packed in 2x2 patches
                latents = flow.unpack_latents(pipe, latents, kwargs.get("height", height), kwargs.get("width", width))
            # An interrupt during sampling keeps A1111's partial images of this batch; one that
            # arrives while decoding stops before the next image (the decode of a big batch is long).
            during_sampling = state.interrupted
            out = pixels.decode_latents(
                pipe, latents, stop=lambda during=during_sampling: state.interrupted and not during
            )
            images.extend(out)
            used_seeds.extend(seeds[: len(out)])

        if paste is not None:
            images = [pixels.paste_back(img, *paste) for img in images]
        params_common = {
            "Steps": steps,
            "Sampler": sampler.name,
            "Schedule type": None if schedule == "Automatic" else schedule,
            "CFG scale": cfg_scale,
            "Memory plan": self.plan.name if self.plan is not None else None,
        }
        infotexts = []
        for s in used_seeds:
            params = dict(params_common)
            params.update(
                {
                    "Seed": s,
                    "Size": f"{width}x{height}",
                    "Model hash": model_hash,
                    "Model": entry.name,
                    "VAE": None if vae_name == "Automatic" else Path(vae_name).name,
                    "Denoising strength": None if task == "txt2img" else float(req.denoising_strength),
                    "Clip skip": clip_skip if clip_skip > 1 else None,
                    "Mask blur": req.mask_blur if task == "inpaint" else None,
                    "Inpaint area": "Only masked" if task == "inpaint" and req.inpaint_full_res else None,
                    "Masked area padding": req.inpaint_full_res_padding
                    if task == "inpaint" and req.inpaint_full_res
                    else None,
                    "Mask mode": "Inpaint not masked" if task == "inpaint" and req.inpainting_mask_invert else None,
                    "Masked content": ("fill", "original", "latent noise", "latent nothing")[req.inpainting_fill]
                    if task == "inpaint"
                    else None,
                    "Lora weights": ", ".join(f"{n}: {w:g}" for n, w in loras) or None,
                    "Version": f"fastsd {__version__}",
                }
            )
            infotexts.append(infotext.build(req.prompt, req.negative_prompt, params))
        info = {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(images),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(images),
            "seed": seed,
            "all_seeds": used_seeds,
            "subseed": subseed,
            "all_subseeds": [subseed + i for i in range(len(used_seeds))],
            "subseed_strength": 0,
            "width": width,
            "height": height,
            "sampler_name": sampler.name,
            "scheduler": schedule,
            "cfg_scale": cfg_scale,
            "steps": steps,
            "batch_size": req.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": entry.name,
            "sd_model_hash": model_hash,
            "sd_vae_name": None if vae_name == "Automatic" else vae_name,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": None if task == "txt2img" else float(req.denoising_strength),
            "extra_generation_params": {"Lora weights": dict(loras)} if loras else {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": state.job_timestamp,
            "clip_skip": clip_skip,
            "is_using_inpainting_conditioning": bool(is_inpaint_model),
            "version": f"fastsd {__version__}",
            "job_id": state.job_id,
            "interrupted": state.interrupted,
            "warnings": warnings,  # fastsd: what was ignored (unknown LoRAs...)
        }
        return GenerationResult(images, used_seeds, infotexts, info, interrupted=state.interrupted)

    def _schedule_timesteps(self, scheduler: Any, sampler: Any, schedule: str, steps: int) -> list[int] | None:
        """Explicit timesteps for schedule types that are a table (Align Your Steps), else None.

        Raises:
            UserInputError: the sampler's scheduler cannot take explicit timesteps.
        """
        if schedule != samplers.AYS or self.family not in ("sd1", "sd2", "sdxl"):
            return None
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            able = [
                s.name
                for s in samplers.SAMPLERS
                if "timesteps"
                in inspect.signature(getattr(__import__("diffusers"), s.scheduler).set_timesteps).parameters
            ]
            raise UserInputError(
                f"{samplers.AYS} needs a sampler that takes its timesteps: use one of {', '.join(able)}"
            )
        return samplers.ays_timesteps(self.family, steps)

    # ----- live preview --------------------------------------------------------------------
    def preview(self) -> Image.Image | None:
        """A cheap RGB preview of the running job's latest latents (first image), or None."""
        return pixels.latent_preview(self.state.latents, self.state.family)
