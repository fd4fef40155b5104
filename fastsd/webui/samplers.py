"""A1111 sampler and schedule-type names mapped to diffusers schedulers, as data.

The table follows the diffusers documentation's "A1111/k-diffusion equivalents". A sampler is
built fresh for each job from the *model's own* scheduler config (kept at load time), so
settings such as ``prediction_type`` (SD2-768 v-prediction) or ``timestep_spacing`` carry over,
and nothing a previous job chose (Karras sigmas...) leaks into the next.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserInputError


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: its diffusers scheduler class and the config it overrides."""

    name: str
    scheduler: str
    config: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


#: A1111 sampler name -> diffusers scheduler. Order is the order A1111 lists them in.
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {}, ("k_dpmpp_2m",)),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, ("k_dpmpp_2m_ka",)),
    Sampler("DPM++ SDE", "DPMSolverSinglestepScheduler", {}, ("k_dpmpp_sde",)),
    Sampler("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}, ("k_dpmpp_sde_ka",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, ("k_dpmpp_2m_sde",)),
    Sampler(
        "DPM++ 2M SDE Karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        ("k_dpmpp_2m_sde_ka",),
    ),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", {}, ("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", {}, ("k_lms",)),
    Sampler("LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, ("k_lms_ka",)),
    Sampler("Heun", "HeunDiscreteScheduler", {}, ("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",)),
    Sampler("DDIM", "DDIMScheduler", {}, ("ddim",)),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",)),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, ("unipc",)),
    Sampler("LCM", "LCMScheduler", {}, ("k_lcm",)),
)

#: A1111 "Schedule type" (the ``scheduler`` API field, A1111 >= 1.9) -> scheduler config overrides.
#: Applied only where the sampler's scheduler class accepts the setting, as A1111 ignores it there.
#: A1111 1.10's sd_schedulers.py, as diffusers realises each: Normal spaces the timesteps evenly from
#: the first to the last (diffusers' "linspace"), Simple and SGM Uniform step back evenly from the
#: last ("trailing"), DDIM takes every k-th from the start ("leading"); Align Your Steps uses NVIDIA's
#: published timesteps (diffusers' ``AysSchedules``), log-linearly interpolated to the step count as
#: A1111 does.
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Align Your Steps": {},  # timesteps, see ays_timesteps()
    "Simple": {"timestep_spacing": "trailing"},
    "Normal": {"timestep_spacing": "linspace"},
    "DDIM": {"timestep_spacing": "leading"},
    "Beta": {"use_beta_sigmas": True},
}

#: A1111 schedule types diffusers' schedulers cannot produce: refused by name, never run as another.
UNSUPPORTED_SCHEDULE_TYPES = (
    "Polyexponential",
    "KL Optimal",
    "Karras Exponential",
    "Align Your Steps GITS",
    "Align Your Steps 11",
    "Align Your Steps 32",
)

AYS = "Align Your Steps"

#: Schedulers of flow-matching models (SD3, FLUX) start with this; their samplers are :data:`FLOW_SAMPLERS`.
FLOW_MATCH_PREFIX = "FlowMatch"

#: The A1111 samplers that have a flow-matching form in diffusers: name -> (scheduler, overrides,
#: families). Euler is the models' own sampler; DPM++ 2M and UniPC run on flow sigmas with the
#: model's shift (and FLUX's resolution-dependent shift); Heun cannot take the explicit sigmas FLUX's
#: pipeline passes. Any other A1111 sampler is refused for these models, never run as another.
FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SAMPLERS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "Euler": ("FlowMatchEulerDiscreteScheduler", {}, ("sd3", "flux")),
    "Heun": ("FlowMatchHeunDiscreteScheduler", {}, ("sd3",)),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", FLOW_SOLVER, ("sd3", "flux")),
    "UniPC": ("UniPCMultistepScheduler", FLOW_SOLVER, ("sd3", "flux")),
}
#: Schedule types a flow-matching Euler can realise (its sigma options); the others keep the model's schedule.
FLOW_SCHEDULES = ("Automatic", "Uniform", "Simple", "Normal", "SGM Uniform", "Karras", "Exponential", "Beta")

DEFAULT_SAMPLER = "Euler"  # what A1111's API uses when a request names none (its sampler_index default)

#: Steps and guidance when a request names none, per (family, variant): the model makers' settings.
#: SD3.5 Large Turbo and FLUX.1-schnell are distilled to 4 steps without guidance; FLUX.1-dev's
#: guidance is its distilled guidance embedding (Forge's "Distilled CFG"), not classifier-free guidance.
#: The shift is the model's own scheduler config (SD3.5: 3.0; FLUX.1-dev: by resolution).
FLOW_DEFAULTS: dict[tuple[str, str], tuple[int, float]] = {
    ("sd3", "medium"): (40, 4.5),
    ("sd3", "large"): (28, 3.5),
    ("sd3", "large-turbo"): (4, 0.0),
    ("sd3", "sd3.0-medium"): (28, 7.0),
    ("flux", "dev"): (28, 3.5),
    ("flux", "schnell"): (4, 0.0),
}
API_DEFAULTS = (50, 7.0)  # A1111's API (StableDiffusionProcessing) for the UNet families


def default_steps_guidance(family: str, variant: str) -> tuple[int, float]:
    """(steps, guidance) for a request that names none."""
    return FLOW_DEFAULTS.get((family, variant), API_DEFAULTS)


def _by_name() -> dict[str, Sampler]:
    table: dict[str, Sampler] = {}
    for s in SAMPLERS:
        for key in (s.name, *s.aliases):
            table[key.lower()] = s
    return table


_BY_NAME = _by_name()


def find_sampler(name: str | None) -> Sampler:
    """The sampler called ``name`` (A1111 name or alias, any case); None gives the API default.

    Raises:
        UserInputError: no sampler has that name.
    """
    sampler = _BY_NAME.get((name or DEFAULT_SAMPLER).strip().lower())
    if sampler is None:
        known = ", ".join(s.name for s in SAMPLERS)
        raise UserInputError(f"unknown sampler {name!r}: use one of {known}")
    return sampler


def find_schedule_type(name: str | None) -> str:
    """Canonical schedule-type name for ``name`` (any case); None/"" means Automatic.

    Raises:
        UserInputError: no schedule type has that name.
    """
    if not name:
        return "Automatic"
    wanted = schedule_id(name)
    for key in SCHEDULE_TYPES:
        if schedule_id(key) == wanted:
            return key
    known = ", ".join(SCHEDULE_TYPES)
    for key in UNSUPPORTED_SCHEDULE_TYPES:
        if schedule_id(key) == wanted:
            raise UserInputError(f"schedule type {key!r} is not available in fastsd's diffusers UI: use one of {known}")
    raise UserInputError(f"unknown schedule type {name!r}: use one of {known}")


def schedule_id(label: str) -> str:
    """A1111's scheduler ``name`` for a label: "SGM Uniform" -> "sgm_uniform"."""
    return label.strip().lower().replace(" ", "_")


def ays_timesteps(family: str, steps: int) -> list[int]:  # family: sd1, sd2 or sdxl (models.detect's names)
    """Align Your Steps timesteps for ``steps`` steps (SD1/SD2 or SDXL table), as A1111 interpolates them.

    The published tables have 10 steps; other counts are interpolated log-linearly, then made
    strictly decreasing (a scheduler refuses repeated timesteps).
    """
    import numpy as np
    from diffusers.schedulers import AysSchedules

    table = AysSchedules["StableDiffusionXLTimesteps" if family == "sdxl" else "StableDiffusionTimesteps"]
    ys = np.log(np.asarray(table[::-1], dtype=np.float64))
    curve = np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(table)), ys))[::-1]
    out: list[int] = []
    for t in np.rint(curve).astype(int).tolist():
        t = min(t, out[-1] - 1) if out else t
        out.append(max(t, 0))
    if len(set(out)) != len(out):
        raise UserInputError(f"{AYS} cannot spread {steps} steps over the model's timesteps: use fewer steps")
    return out


def flow_scheduler(base_config: dict[str, Any], sampler: Sampler, schedule_type: str, family: str):
    """The flow-matching form of ``sampler`` for an SD3/FLUX model (see :data:`FLOW_SAMPLERS`).

    Raises:
        UserInputError: the sampler or schedule type has no flow-matching form for ``family``.
    """
    import diffusers

    able = [n for n, (_, _, fams) in FLOW_SAMPLERS.items() if family in fams]
    entry = FLOW_SAMPLERS.get(sampler.name)
    if entry is None or family not in entry[2]:
        raise UserInputError(
            f"sampler {sampler.name!r} does not apply to {family} (a flow-matching model): use one of {', '.join(able)}"
        )
    if schedule_type not in FLOW_SCHEDULES:
        raise UserInputError(
            f"schedule type {schedule_type!r} does not apply to {family} (a flow-matching model): "
            f"use one of {', '.join(FLOW_SCHEDULES)}"
        )
    name, overrides, _ = entry
    cls = getattr(diffusers, name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = dict(overrides)
    if name != base_config.get("_class_name"):
        config["flow_shift"] = float(base_config.get("shift", 1.0))  # the model's shift carries over
        if base_config.get("use_dynamic_shifting"):
            config.update(use_dynamic_shifting=True, time_shift_type="exponential")
    for key, value in SCHEDULE_TYPES[schedule_type].items():
        if key.startswith("use_") and key.endswith("_sigmas"):
            config[key] = value
    return cls.from_config(base_config, **{k: v for k, v in config.items() if k in accepted})


def make_scheduler(
    base_config: dict[str, Any], sampler: Sampler, schedule_type: str = "Automatic", family: str | None = None
):
    """A new diffusers scheduler for ``sampler`` built from the model's original scheduler config.

    Args:
        base_config: the scheduler config the model shipped with.
        sampler: from :func:`find_sampler`.
        schedule_type: a key of :data:`SCHEDULE_TYPES`.
        family: the model's family (:mod:`fastsd.models.detect`'s names); SD3/FLUX models (a
            flow-matching scheduler config) get :func:`flow_scheduler`.

    Returns:
        A scheduler instance.

    Raises:
        UserInputError: a sampler or schedule type that does not apply to a flow-matching model.
    """
    import diffusers

    if str(base_config.get("_class_name", "")).startswith(FLOW_MATCH_PREFIX):
        return flow_scheduler(base_config, sampler, schedule_type, family or "sd3")
    cls = getattr(diffusers, sampler.scheduler)
    accepted = set(inspect.signature(cls.__init__).parameters)
    overrides = dict(sampler.config)
    for key, value in SCHEDULE_TYPES[schedule_type].items():
        if key in accepted:
            if key.startswith("use_") and key.endswith("_sigmas"):
                # One sigma schedule at a time: the schedule type replaces the sampler's own choice.
                for other in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                    overrides.pop(other, None)
            overrides[key] = value
    return cls.from_config(base_config, **overrides)
