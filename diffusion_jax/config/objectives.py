"""The objective section of the config: each objective's loss factory, the prediction its network
makes and its options (`config.objective.kwargs`)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from diffusion_jax.config.fields import Field, _cld_choices, _non_negative, _open_unit, _positive, _unit


# Objectives: name -> (factory path, prediction of the network, {kwarg: Field}).
@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    factory: str                       # attribute of diffusion_jax.objectives
    prediction: str                    # network output: 'eps', 'x0', 'v', 'score' or 'edm'
    kwargs: Mapping[str, Field]
    takes_process: bool = True

    def get_factory(self) -> Callable:
        from diffusion_jax import objectives  # pylint: disable=import-outside-toplevel
        return getattr(objectives, self.factory)


_REDUCE = Field(str, "mean", choices=("mean", "sum"), doc="over pixels: mean, or sum (score_sde "
                                                           "reduce_mean=False, EDM)")
_DENOISING_KW = {
    "weighting": Field(str, "none"),
    "min_snr_gamma": Field(float, 5.0, check=_positive),
    "time_sampling": Field(str, "uniform"),
    "discrete": Field(bool, None, optional=True,
                      doc="integer DDPM timesteps (default: iff the process is 'ddpm')"),
    "reduce": _REDUCE,
    "input_perturbation": Field(float, 0.0, check=_non_negative,
                                doc="DDPM-IP's gamma: x_t = alpha x0 + sigma (eps + gamma xi)"),
    "logit_mean": Field(float, 0.0, doc="time_sampling='logit_normal': SD3's m, t = sigmoid(m + s n)"),
    "logit_std": Field(float, 1.0, check=_positive, doc="time_sampling='logit_normal': SD3's s"),
    "mode_scale": Field(float, 1.29, doc="time_sampling='mode': SD3's scale, in [-1, 2/(pi - 2)]"),
}
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "eps": ObjectiveSpec("epsilon_loss", "eps", _DENOISING_KW),
    "x0": ObjectiveSpec("x0_loss", "x0", _DENOISING_KW),
    "v": ObjectiveSpec("v_loss", "v", _DENOISING_KW),
    "flow": ObjectiveSpec("flow_matching_loss", "flow", _DENOISING_KW),   # velocity alpha' x0 + sigma' eps
    # k-rectified flow on (data, noise) pairs of a teacher's ODE: --mode=reflow (cli/reflow.py)
    "reflow": ObjectiveSpec("reflow_loss", "flow", {
        k: _DENOISING_KW[k] for k in ("time_sampling", "reduce", "logit_mean", "logit_std",
                                      "mode_scale")}),
    "dsm": ObjectiveSpec("score_matching_loss", "score", {
        "weighting": Field(str, "sigma2"),
        "importance_sampling": Field(bool, False),
        "prediction": Field(str, "score", choices=("score", "eps")),
        "time_sampling": Field(str, "uniform"),
        "discrete": Field(bool, None, optional=True),
        "reduce": _REDUCE,
    }),
    "hybrid": ObjectiveSpec("hybrid_loss", "eps", {
        "vb_weight": Field(float, 0.001, check=_non_negative,
                           doc="lambda of L_simple + lambda L_vb (improved DDPM)"),
        "num_timesteps": Field(int, None, optional=True, check=_positive,
                               doc="None: the DDPM process' T"),
        "input_perturbation": Field(float, 0.0, check=_non_negative, doc="DDPM-IP's gamma"),
        "time_sampling": Field(str, "uniform", choices=("uniform", "loss_aware"),
                               doc="'loss_aware': improved DDPM's loss-second-moment sampler"),
        "history_per_bucket": Field(int, 10, check=_positive),
        "uniform_prob": Field(float, 0.001, check=_unit),
        "reduce": _REDUCE,
    }),
    "edm": ObjectiveSpec("edm_loss", "edm", {
        "sigma_data": Field(float, 0.5, check=_positive),
        "p_mean": Field(float, -1.2),
        "p_std": Field(float, 1.2, check=_positive),
        "reduce": _REDUCE,
    }, takes_process=False),
    # Critically-damped Langevin diffusion (phase space; only with process 'cld', models/cld.py):
    # the network output alpha gives the velocity score -v / Sigma_vv - alpha / ell_vv.
    "cld_hsm": ObjectiveSpec("cld_hsm_loss", "cld_score", {
        "objective": Field(str, "hsm", choices=_cld_choices("CLD_OBJECTIVES"),
                           doc="'hsm': hybrid score matching (v0 marginalised, the paper's); 'dsm'"),
        "weighting": Field(str, "eps", choices=_cld_choices("CLD_WEIGHTINGS"),
                           doc="'eps' (official reweightedv2), 'eps_beta' (reweightedv1), 'likelihood'"),
        "mixed_score": Field(bool, True, doc="s = -v / Sigma_vv - alpha / ell_vv (else -alpha / ell_vv)"),
        "loss_eps": Field(float, 1e-5, check=_open_unit, doc="t ~ U(loss_eps, 1)"),
        "reduce": _REDUCE,
    }),
}
# Phase-space processes and the one objective that trains each (config cross-check).
PHASE_SPACE_OBJECTIVES: dict[str, str] = {"cld": "cld_hsm"}


def objective_prediction(objective_cfg) -> str:
    """What the network predicts under this objective ('eps', 'x0', 'v', 'score', 'edm' or 'flow')."""
    spec = OBJECTIVES[objective_cfg.name]
    if objective_cfg.name == "dsm":
        return objective_cfg.kwargs.get("prediction", "score")
    return spec.prediction
