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

#: Schedulers of flow-matching models (SD3): the A1111 names do not apply; the model's own is used.
FLOW_MATCH_PREFIX = "FlowMatch"

DEFAULT_SAMPLER = "Euler"  # what A1111's API uses when a request names none (its sampler_index default)


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


def make_scheduler(base_config: dict[str, Any], sampler: Sampler, schedule_type: str = "Automatic"):
    """A new diffusers scheduler for ``sampler`` built from the model's original scheduler config.

    Args:
        base_config: the scheduler config the model shipped with.
        sampler: from :func:`find_sampler`.
        schedule_type: a key of :data:`SCHEDULE_TYPES`.

    Returns:
        A scheduler instance; for flow-matching models, the model's own scheduler class.
    """
    import diffusers

    if str(base_config.get("_class_name", "")).startswith(FLOW_MATCH_PREFIX):
        cls = getattr(diffusers, base_config["_class_name"])
        return cls.from_config(base_config)
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
