"""Forward processes behind one marginal interface: alpha(t), sigma(t), log_snr(t) and its inverse,
f(t), g(t), prior sampling and log-density, and the time range [t_min, t_max]."""
from diffusion_jax.processes.base import Process, as_time, bcast, schedule_dtype
from diffusion_jax.processes.cld import CLD
from diffusion_jax.processes.flow import FLOW_PATHS, Flow
from diffusion_jax.processes.predictions import (
    as_eps_fn,
    eps_from_score,
    eps_from_v,
    eps_from_flow,
    eps_from_x0,
    flow_from_eps,
    flow_from_x0,
    flow_rates,
    score_from_eps,
    v_from_eps,
    x0_from_eps,
    x0_from_flow,
    x0_fn,
)
from diffusion_jax.processes.ve import EDM, VE
from diffusion_jax.processes.vp import Cosine, DiscreteDDPM, SubVP, VPLinear, ddpm_betas

PROCESSES = {
    "vp": VPLinear,
    "subvp": SubVP,
    "cosine": Cosine,
    "ddpm": DiscreteDDPM,
    "ve": VE,
    "edm": EDM,
    "flow": Flow,
}
# Phase-space processes: not scalar alpha/sigma processes, so kept out of PROCESSES (which the scalar
# samplers, the PF-ODE likelihood and the config objectives assume); get_process builds them too.
PHASE_SPACE_PROCESSES = {"cld": CLD}


def get_process(name: str, **kwargs) -> Process:
    """Builds a process by name: 'vp', 'subvp', 'cosine', 'ddpm' (discrete DDPM, T = 1000), 've', 'edm',
    'flow' (flow matching: path='linear' (rectified flow) or 'cosine'), and the phase-space 'cld'
    (critically-damped Langevin diffusion, `processes.cld.CLD`, not a `Process`)."""
    known = {**PROCESSES, **PHASE_SPACE_PROCESSES}
    if name not in known:
        raise ValueError(f"unknown process {name!r}; known processes: {sorted(known)}")
    try:
        return known[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for process {name!r}: {e}") from None


__all__ = [
    "Process", "CLD", "PHASE_SPACE_PROCESSES", "Flow", "FLOW_PATHS", "VPLinear", "SubVP", "Cosine", "DiscreteDDPM", "VE", "EDM", "PROCESSES", "get_process",
    "ddpm_betas", "as_time", "bcast", "schedule_dtype", "as_eps_fn", "eps_from_score", "eps_from_v",
    "eps_from_x0", "score_from_eps", "v_from_eps", "x0_from_eps", "x0_fn",
    "flow_rates", "flow_from_eps", "eps_from_flow", "flow_from_x0", "x0_from_flow",
]
