"""The config schema: every section's fields with their types, defaults and checks, the objectives'
options, and `base_config()`, a complete config at its defaults. Checking lives in `validate.py`,
loading and overrides in `loading.py`."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    """A config does not match the schema; the message names the field (config.section.field)."""


# ----------------------------------------------------------------------------------- fields
@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its type, default and constraints.

    type: int, float, bool, str, or tuple (then `item` is the element type, None = any).
    optional: None is allowed (stored as a typed `placeholder` so that overrides still work).
    choices: allowed values (a tuple, or a zero-argument callable returning one).
    check: callable(value) -> error message or None, for ranges and the like.
    """
    type: type
    default: Any = None
    optional: bool = False
    choices: Any = None
    item: Any = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""
    finite: bool = True              # floats: reject inf / nan

    def valid_choices(self) -> tuple | None:
        c = self.choices() if callable(self.choices) else self.choices
        return None if c is None else tuple(c)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _unit(v):
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


PRECISIONS = ("float32", "bfloat16")
MESH_AXIS_NAMES = ("data", "fsdp", "tensor")


def _dataset_names() -> tuple[str, ...]:
    from diffusion_jax.data import known_datasets  # pylint: disable=import-outside-toplevel
    return tuple(known_datasets())


def _process_names() -> tuple[str, ...]:
    """The scalar processes (`processes.PROCESSES`) and the phase-space ones (`PHASE_SPACE_PROCESSES`:
    'cld', trained only by their own objective, see `PHASE_SPACE_OBJECTIVES`)."""
    from diffusion_jax.processes import PHASE_SPACE_PROCESSES, PROCESSES  # pylint: disable=import-outside-toplevel
    return tuple(sorted({**PROCESSES, **PHASE_SPACE_PROCESSES}))


def _cld_choices(name: str) -> Callable[[], tuple]:
    def choices():
        from diffusion_jax.objectives import cld  # pylint: disable=import-outside-toplevel
        return getattr(cld, name)
    return choices


def _cld_samplers() -> tuple[str, ...]:
    from diffusion_jax.sampling.cld import CLD_SAMPLERS  # pylint: disable=import-outside-toplevel
    return tuple(CLD_SAMPLERS)


def _cld_option(name: str) -> Callable[[], tuple]:
    def choices():
        from diffusion_jax.sampling import cld  # pylint: disable=import-outside-toplevel
        return getattr(cld, name)
    return choices


def _open_unit(v):
    return None if 0.0 < v < 1.0 else "must be in (0, 1)"


def _sampler_names() -> tuple[str, ...]:
    from diffusion_jax.sampling import SAMPLERS  # pylint: disable=import-outside-toplevel
    return tuple(sorted(SAMPLERS))


def _spacings() -> tuple[str, ...]:
    from diffusion_jax.sampling import SPACINGS  # pylint: disable=import-outside-toplevel
    return tuple(SPACINGS)


# The networks' configurable fields (a subset of the Flax modules' attributes; dtype comes from
# train.precision). tests/test_configs.py checks that each is a real attribute of the module.
_TIME_EMBEDDINGS = ("sinusoidal", "fourier")
_TIME_INPUTS = ("linear", "log")
UNET_FIELDS: dict[str, Field] = {
    "ch": Field(int, 128, check=_positive, doc="base channels"),
    "ch_mult": Field(tuple, (1, 2, 2, 2), item=int, doc="channel multiplier per resolution"),
    "num_res_blocks": Field(int, 2, check=_positive),
    "attn_resolutions": Field(tuple, (16,), item=int),
    "dropout": Field(float, 0.1, check=_unit),
    "time_embedding": Field(str, "sinusoidal", choices=_TIME_EMBEDDINGS),
    "time_scale": Field(float, 1000.0, doc="the embedding sees time_scale * t"),
    "time_input": Field(str, "linear", choices=_TIME_INPUTS,
                        doc="'log': the embedding sees time_scale * log t (NCSN++ / CLD-SGM)"),
    "fourier_scale": Field(float, 16.0),
    "num_classes": Field(int, None, optional=True, doc="class-conditional when set"),
    "resblock_updown": Field(bool, False),
    "resample_with_conv": Field(bool, True),
    "num_heads": Field(int, 1, check=_positive),
    "head_dim": Field(int, None, optional=True),
    "scale_shift_norm": Field(bool, False),
    "skip_rescale": Field(bool, False),
    # Conventions of published checkpoints (weights.diffusers.unet2d); defaults: the library's own.
    "time_offset": Field(float, 0.0, doc="the embedding sees time_scale * t - time_offset "
                                         "(1 with time_scale T: integer DDPM steps n = T t - 1)"),
    "time_flip_sin_cos": Field(bool, False, doc="sinusoidal embedding [cos, sin]"),
    "time_freq_shift": Field(float, 1.0, doc="sinusoidal frequencies 10000^(-k / (ch/2 - shift))"),
    "norm_groups": Field(int, None, optional=True, check=_positive,
                         doc="GroupNorm groups; None: min(C // 4, 32)"),
    "norm_eps": Field(float, 1e-6, check=_positive),
    "downsample_padding": Field(str, "same", choices=("same", "symmetric"),
                                doc="stride-2 conv: 'same' pads (0, 1) (DDPM), 'symmetric' (1, 1)"),
    "mid_attn": Field(bool, True, doc="attention in the middle block"),
}
DIT_FIELDS: dict[str, Field] = {
    "patch_size": Field(int, 2, check=_positive),
    "hidden_size": Field(int, 384, check=_positive),
    "depth": Field(int, 12, check=_positive),
    "num_heads": Field(int, 6, check=_positive),
    "mlp_ratio": Field(float, 4.0, check=_positive),
    "num_classes": Field(int, None, optional=True),
    "dropout": Field(float, 0.0, check=_unit),
    "time_embedding": Field(str, "sinusoidal", choices=_TIME_EMBEDDINGS),
    "time_scale": Field(float, 1000.0),
    "time_input": Field(str, "linear", choices=_TIME_INPUTS),
    "fourier_scale": Field(float, 16.0),
    "frequency_dim": Field(int, 256, check=_positive),
}
MODEL_TYPES = ("unet", "dit")
MODEL_FIELDS: dict[str, dict[str, Field]] = {"unet": UNET_FIELDS, "dit": DIT_FIELDS}


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


# ---------------------------------------------------------------------------------- schema
def _t0s_check(v):
    if not v:
        return "needs at least one t0 fraction"
    bad = [f for f in v if not 0.0 < f <= 1.0]
    return f"t0 fractions must lie in (0, 1], got {bad}" if bad else None


def _mesh_shape_check(v):
    if len(v) != 3:
        return f"needs one size per mesh axis {MESH_AXIS_NAMES}, got {len(v)}"
    if list(v).count(-1) > 1:
        return "at most one size may be -1"
    if any(s == 0 or s < -1 for s in v):
        return "sizes must be positive or -1"
    return None


def _axis_names_check(v):
    if tuple(v) != MESH_AXIS_NAMES:
        return f"the training layer's mesh axes are {MESH_AXIS_NAMES} (in this order)"
    return None


def _rules_check(v):
    for r in v:
        if not isinstance(r, (tuple, list)) or len(r) != 2 or not isinstance(r[0], str):
            return ("must be a tuple of (logical_name, mesh_axes) pairs, e.g. "
                    "(('embed', 'fsdp'), ('mlp', 'tensor'))")
    return None


def _betas_check(v):
    if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
        return "must be two floats (b1, b2) in [0, 1)"
    return None


def _decays_check(v):
    bad = [d for d in v if not (isinstance(d, (int, float)) and 0.0 <= d < 1.0)]
    return None if not bad else f"EMA decays must be in [0, 1), got {bad}"


AUTOENCODER_KINDS = ("none", "diffae", "dmz")
ENCODER_TYPES = ("semantic", "conv")
LATENT_TYPES = ("continuous", "gaussian", "binary")


def _z_modes_check(v):
    from diffusion_jax.networks.unet import Z_MODES  # pylint: disable=import-outside-toplevel
    bad = [m for m in v if m not in Z_MODES]
    if bad:
        return f"unknown z-conditioning modes {bad}; valid: {Z_MODES}"
    if not v:
        return "needs at least one mode"
    return None


def _quality_metrics_check(v):
    valid = ("fid", "is", "kid", "prc")
    bad = [m for m in v if m not in valid]
    if bad:
        return f"unknown metrics {bad}; valid: {', '.join(valid)}"
    if not v:
        return "must name at least one metric"
    if len(set(v)) != len(v):
        return "lists a metric twice"
    return None


SCHEMA: dict[str, dict[str, Field]] = {
    "data": {
        "name": Field(str, "digits/16",
                      doc="diffusion_jax.data.known_datasets(); also folder:<path>, tfds:<name>"),
        "image_size": Field(int, None, optional=True, check=_positive,
                            doc="centre-crop + resize to this size; None: the stored size"),
        "batch_size": Field(int, 128, check=_positive, doc="global batch per train_step call"),
        "random_flip": Field(bool, False),
        "data_dir": Field(str, None, optional=True, doc="tfds data dir; None: $TFDS_DATA_DIR or "
                                                        "~/tensorflow_datasets"),
    },
    "model": {"type": Field(str, "unet", choices=MODEL_TYPES),      # + MODEL_FIELDS[type]
              "family": Field(str, None, optional=True,
                              doc="diffusion_jax.models.registered_families(); None: 'autoencoder' "
                                  "when autoencoder.kind is not 'none', else 'pixel'"),
              "init_from": Field(str, "", doc="'diffusers:<folder>': the network's fields and "
                                              "initial weights from a diffusers model folder")},
    "process": {"name": Field(str, "vp", choices=_process_names)},  # + kwargs
    "objective": {
        "name": Field(str, "eps", choices=tuple(OBJECTIVES)),         # + kwargs
        "label_dropout": Field(float, 0.0, check=_unit,
                               doc="probability of replacing the label by the null class"),
    },
    "optim": {
        "learning_rate": Field(float, 2e-4, check=_positive),
        "betas": Field(tuple, (0.9, 0.999), item=float, check=_betas_check,
                       doc="Adam's (b1, b2)"),
        "eps": Field(float, 1e-8, check=_positive),
        "weight_decay": Field(float, 0.0, check=_non_negative),
        "warmup_steps": Field(int, 0, check=_non_negative),
        "schedule": Field(str, "constant", choices=("constant", "cosine")),
        "end_lr_factor": Field(float, 0.0, check=_non_negative),
        "grad_clip": Field(float, 1.0, check=_non_negative, doc="global-norm clip; 0 = off"),
        "grad_accum": Field(int, 1, check=_positive),
    },
    "ema": {
        "decays": Field(tuple, (0.9999,), item=float, check=_decays_check),
        "warmup": Field(bool, False, doc="decay min(d, (1 + n) / (10 + n)) at update n"),
        "halflife_mimg": Field(float, None, optional=True, check=_positive,
                               doc="EDM: EMA half-life in millions of images; sets decays"),
    },
    "train": {
        "num_steps": Field(int, 1000, check=_positive),
        "log_every": Field(int, 100, check=_positive),
        "sample_every": Field(int, 0, check=_non_negative, doc="0: never during training"),
        "checkpoint_every": Field(int, 1000, check=_non_negative, doc="0: only at the end"),
        "keep": Field(int, 3, check=_positive, doc="checkpoints kept"),
        "seed": Field(int, 0),
        "precision": Field(str, "float32", choices=PRECISIONS, doc="network compute dtype"),
        "max_seconds": Field(float, 0.0, check=_non_negative,
                             doc="stop (with a checkpoint) once this run's training steps have taken "
                                 "this many seconds of wall clock (compilation and sampling not "
                                 "counted); 0: off. For equal-wall-clock comparisons"),
    },
    "mesh": {
        "shape": Field(tuple, (-1, 1, 1), item=int, check=_mesh_shape_check),
        "axis_names": Field(tuple, MESH_AXIS_NAMES, item=str, check=_axis_names_check),
        "logical_axis_rules": Field(tuple, None, optional=True, check=_rules_check),
    },
    "sample": {
        "sampler": Field(str, "dpmpp_2m", choices=_sampler_names),
        "num_steps": Field(int, 50, check=_positive),
        "spacing": Field(str, None, optional=True, choices=_spacings,
                         doc="None: the sampler's default spacing"),
        "num_samples": Field(int, 64, check=_positive),
        "batch_size": Field(int, 256, check=_positive, doc="samples per sampler call"),
        "t_end": Field(float, None, optional=True, check=_positive,
                       doc="last time of the grid; None: the process' t_min"),
        "denoise_final": Field(bool, True,
                               doc="end with x0_hat = (x - sigma eps) / alpha at the last time, as every "
                                   "paper's sampler does (Ho et al., DDIM, score_sde noise_removal, EDM); "
                                   "False leaves noise of sigma(t_end) in the samples"),
        "guidance_scale": Field(float, 1.0, doc="classifier-free guidance; 1 = plain conditional"),
        "use_ema": Field(bool, True),
        "seed": Field(int, 0),
    },
    "cld": {                          # model.family='cld': the phase-space samplers (sampling/cld.py)
        "sampler": Field(str, "sscs", choices=_cld_samplers,
                         doc="'sscs' (symmetric splitting, the paper's), 'em' (Euler-Maruyama) or 'ode' "
                             "(the probability-flow ODE, fixed steps); sample.num_steps steps, a final "
                             "denoising step when sample.denoise_final; config.sample.sampler is unused"),
        "striding": Field(str, "linear", choices=_cld_option("STRIDINGS"),
                          doc="time grid: 'linear' or the official 'quadratic' (fine steps near t = 0)"),
        "ode_solver": Field(str, "heun", choices=_cld_option("PF_SOLVERS"), doc="sampler 'ode'"),
        "score_time": Field(str, "mid", choices=_cld_option("SCORE_TIMES"),
                            doc="sampler 'sscs': score at the step midpoint, or its start (official)"),
    },
    "reflow": {                       # --mode=reflow (cli/reflow.py, Liu et al. 2023)
        "teacher": Field(str, "", doc="workdir of the trained flow (objective 'flow') whose ODE "
                                      "couples noise and data; the student starts from its EMA weights"),
        "num_pairs": Field(int, 2048, check=_positive, doc="(noise, sample) pairs drawn once, kept in "
                                                           "workdir/reflow/pairs.npz"),
        "sampler": Field(str, "heun", choices=_sampler_names, doc="deterministic ODE sampler of the pairs"),
        "num_steps": Field(int, 16, check=_positive, doc="its steps"),
        "straightness_steps": Field(int, 64, check=_positive,
                                    doc="Euler steps of the straightness S (teacher and student)"),
        "eval_steps": Field(tuple, (1, 2, 4), item=int, doc="Euler steps of the few-step comparison"),
        "num_eval": Field(int, 256, check=_positive, doc="fresh noises of the comparison"),
    },
    "sdedit": {                       # --mode=sdedit (cli/sdedit.py, Meng et al. 2022)
        "t0s": Field(tuple, (0.2, 0.35, 0.5, 0.65, 0.8, 1.0), item=float, check=_t0s_check,
                     doc="start times as fractions s of the process' range, t0 = t_min + s (t_max - "
                         "t_min), each in (0, 1]"),
        "sampler": Field(str, None, optional=True, choices=_sampler_names, doc="None: sample.sampler"),
        "full_steps": Field(int, None, optional=True, check=_positive,
                            doc="steps over the whole range (ceil(s N) from t0); None: sample.num_steps"),
        "guide": Field(str, "downsample", choices=("downsample", "noise", "clean"),
                       doc="the guides: test images block-averaged (a coarse 'stroke painting'), "
                           "noised, or clean"),
        "factor": Field(int, 4, check=_positive, doc="'downsample': block size"),
        "noise_std": Field(float, 0.5, check=_positive, doc="'noise': per-pixel std ([-1, 1] images)"),
        "num_images": Field(int, 8, check=_positive, doc="guides: the first images of the split"),
        "split": Field(str, "test"),
        "classifier_steps": Field(int, 500, check=_non_negative,
                                  doc="train steps of the feature classifier for the feature distance "
                                      "and accuracy per t0; 0: none"),
        "seed": Field(int, 0),
    },
    "eval": {
        "split": Field(str, "test"),
        "batch_size": Field(int, None, optional=True, check=_positive,
                            doc="None: data.batch_size"),
        "num_batches": Field(int, 0, check=_non_negative, doc="0: the whole split"),
        "bpd": Field(bool, False,
                     doc="also bits/dim through the PF-ODE (diffusion_jax.likelihood)"),
        "bpd_num_examples": Field(int, 64, check=_positive),
        "bpd_repeats": Field(int, 1, check=_positive),
        "bpd_t_min": Field(float, None, optional=True, check=_positive,
                           doc="the time the PF-ODE likelihood starts from (score_sde's likelihood "
                               "eps, 1e-5); None: the process' t_min. Recorded with the bpd"),
    },
    "autoencoder": {
        "kind": Field(str, "none", choices=AUTOENCODER_KINDS,
                      doc="'none': a plain diffusion model; 'diffae' / 'dmz': a diffusion "
                          "autoencoder whose decoder is config.model (a UNet)"),
        "encoder": Field(str, None, optional=True, choices=ENCODER_TYPES,
                         doc="'semantic' (half-UNet + pooling) | 'conv' (DMZ); None: the kind's"),
        "latent": Field(str, None, optional=True, choices=LATENT_TYPES,
                        doc="'continuous' | 'gaussian' | 'binary'; None: the kind's"),
        "z_dim": Field(int, None, optional=True, check=_positive,
                       doc="latent size (binary: number of bits); None: 512 diffae, 16 dmz"),
        "z_conditioning": Field(tuple, None, optional=True, item=str, check=_z_modes_check,
                                doc="subset of networks.Z_MODES; None: the kind's"),
        "encoder_ch": Field(int, None, optional=True, check=_positive, doc="None: model.ch"),
        "encoder_ch_mult": Field(tuple, None, optional=True, item=int,
                                 doc="semantic encoder levels; None: model.ch_mult"),
        "encoder_num_res_blocks": Field(int, None, optional=True, check=_positive,
                                        doc="None: model.num_res_blocks"),
        "encoder_attn_resolutions": Field(tuple, None, optional=True, item=int,
                                          doc="None: model.attn_resolutions"),
        "norm": Field(str, "batch", choices=("batch", "group"), doc="conv encoder's norm"),
        "pool": Field(str, "mean", choices=("mean", "flatten"),
                      doc="semantic encoder: global average pooling (DiffAE) or flatten (keeps the layout)"),
        "kl_weight": Field(float, 0.0, check=_non_negative,
                           doc="per-example KL to the prior (gaussian: N(0, I); binary: Bernoulli(1/2))"),
        "bit_usage_weight": Field(float, 0.0, check=_non_negative,
                                  doc="binary: batch-level KL of each bit's mean posterior to Bernoulli(1/2)"),
        "straight_through": Field(bool, False, doc="binary: hard Gumbel samples with straight-through "
                                                   "gradients in training (else soft codes)"),
        "tau": Field(float, 1.0, check=_positive, doc="Gumbel-softmax temperature (the start of a schedule)"),
        "tau_final": Field(float, None, optional=True, check=_positive,
                           doc="binary: anneal tau exponentially to this value over tau_anneal_steps; "
                               "None: constant tau"),
        "tau_anneal_steps": Field(int, 0, check=_non_negative, doc="steps of the tau schedule"),
        "prior": Field(str, "bernoulli", choices=("bernoulli", "empirical"),
                       doc="binary latents for generation: Bernoulli(0.5) or per-bit frequencies"),
    },
    "first_stage": {                  # model.family='latent' (LDM): the KL autoencoder of the latents
        "block_out_channels": Field(tuple, (32, 64), item=int,
                                    doc="AutoencoderKL levels (image side / latent side = 2^(levels - 1))"),
        "layers_per_block": Field(int, 1, check=_positive),
        "latent_channels": Field(int, 4, check=_positive),
        "norm_num_groups": Field(int, 8, check=_positive, doc="divides every block_out_channels"),
        "mid_attention": Field(bool, False, doc="attention in the middle block (LDM: True)"),
        "kl_weight": Field(float, 1e-6, check=_non_negative, doc="LDM's KL-f configs: 1e-6"),
        "reconstruction": Field(str, "l1", choices=("l1", "l2"),
                                doc="per-pixel loss (perceptual-free LDM: no LPIPS, no patch GAN)"),
        "steps": Field(int, 0, check=_non_negative,
                       doc="train steps of the first stage; then it is frozen and the diffusion "
                           "model trains on its scaled latents for the remaining steps"),
        "scale_factor": Field(float, None, optional=True, check=_positive,
                              doc="latent scale; None: 1 / std of the first diffusion-stage batch "
                                  "of latents (LDM's scale_by_std)"),
    },
    "vq": {                           # model.family='divae' (Shi et al. 2022): VQ-VAE + diffusion decoder
        "num_codes": Field(int, 64, check=_positive, doc="codebook size K (>= 2)"),
        "code_dim": Field(int, 4, check=_positive, doc="code (embedding) dimension D"),
        "beta": Field(float, 0.25, check=_non_negative, doc="commitment weight (VQ-VAE: 0.25)"),
        "ema_decay": Field(float, 0.99, optional=True,
                           doc="EMA codebook decay (Razavi et al. 2019); None: codebook learned by "
                               "the codebook loss"),
        "dead_after": Field(int, 100, optional=True, check=_positive,
                            doc="EMA: restart a code unused for this many updates from a random "
                                "encoder output of the batch (None: never)"),
        "steps": Field(int, 0, check=_non_negative,
                       doc="train steps of the VQ-VAE (L2 reconstruction by the deterministic "
                           "decoder + commitment); then it is frozen and the diffusion decoder "
                           "trains on (x0, z_q(x0)) for the remaining steps"),
        "block_out_channels": Field(tuple, (32, 64), item=int,
                                    doc="encoder / deterministic-decoder levels (image side / code "
                                        "map side = 2^(levels - 1))"),
        "layers_per_block": Field(int, 1, check=_positive),
        "norm_num_groups": Field(int, 8, check=_positive, doc="divides every block_out_channels"),
        "mid_attention": Field(bool, False),
        "decoder_channels": Field(tuple, None, optional=True, item=int,
                                  doc="levels of the deterministic decoder (same count as "
                                      "block_out_channels); None: block_out_channels (set it to "
                                      "match the diffusion UNet's size for the comparison)"),
        "conditioning": Field(str, "concat", choices=("concat", "concat+time"),
                              doc="how the diffusion UNet sees z_q: nearest-upsampled to the image "
                                  "size and concatenated to x_t; '+time' also adds W mean(z_q) "
                                  "to the time embedding"),
    },
    "lsgm": {                         # model.family='lsgm' (Vahdat et al. 2021): VAE + score prior
        "vae_channels": Field(tuple, (32, 64), item=int,
                              doc="AutoencoderKL levels of the VAE (image side / latent side = "
                                  "2^(levels - 1))"),
        "vae_layers_per_block": Field(int, 1, check=_positive),
        "latent_channels": Field(int, 2, check=_positive),
        "vae_norm_groups": Field(int, 8, check=_positive, doc="divides every vae_channels"),
        "vae_mid_attention": Field(bool, False),
        "decoder_std": Field(float, 0.1, check=_positive,
                             doc="initial std of the discretised-Gaussian decoder p(x|z) (one "
                                 "scalar, learned when learn_decoder_std)"),
        "learn_decoder_std": Field(bool, True),
        "kl_weight": Field(float, 1.0, check=_non_negative,
                           doc="weight of log q(z|x) + CE(q || p) in the VAE loss (1: the ELBO; "
                               "LSGM's kl_coeff)"),
        "mixing_logit_init": Field(float, -3.0,
                                   doc="initial mixing logit per latent channel (official: -3; "
                                       "MNIST / Omniglot -6)"),
        "time_sampling_q": Field(str, "importance", choices=("importance", "uniform"),
                                 doc="t of the VAE's cross entropy: likelihood importance sampling "
                                     "(ll_iw) or uniform (ll_uniform)"),
        "prior_weighting": Field(str, "eps", choices=("eps", "likelihood"),
                                 doc="the prior's loss: 'eps' ||eps - eps_theta||^2, t ~ U (the "
                                     "paper's re-weighted drop_all objective) or 'likelihood' "
                                     "(the CE estimate, ll_iw)"),
        "vae_lr": Field(float, 1e-4, check=_positive, doc="official learning_rate_vae"),
        "prior_lr": Field(float, 1e-4, check=_positive, doc="official learning_rate_dae"),
        "vae_adam_eps": Field(float, 1e-3, check=_positive, doc="official VAE Adam eps"),
        "prior_adam_eps": Field(float, 1e-4, check=_positive, doc="official prior Adam eps"),
        "vae_end_lr_factor": Field(float, 0.1, check=_non_negative,
                                   doc="cosine schedule's end (official 1e-5 / 1e-4); the prior "
                                       "uses optim.end_lr_factor"),
        "warmup_vae_steps": Field(int, 0, check=_non_negative,
                                  doc="first steps train the VAE alone with a N(0, I) prior (the "
                                      "paper pre-trains the VAE); the prior gets no update"),
    },
    "ddgan": {                        # model.family='ddgan' (denoising diffusion GAN); official names
        "num_timesteps": Field(int, 4, check=_positive, doc="T: generator steps (NFE) of the chain"),
        "beta_min": Field(float, 0.1, check=_positive),
        "beta_max": Field(float, 20.0, check=_positive, doc="VP-SDE betas of the T-step schedule"),
        "use_geometric": Field(bool, False, doc="geometric variance schedule instead of the VP one"),
        "nz": Field(int, 100, check=_positive, doc="latent z ~ N(0, I_nz) of the generator"),
        "z_emb_dim": Field(int, 256, check=_positive, doc="width of the mapping network w(z)"),
        "n_mlp": Field(int, 4, check=_non_negative, doc="hidden layers of the mapping network"),
        "use_tanh": Field(bool, True, doc="x0' = tanh(UNet) (official: not not_use_tanh)"),
        "ngf": Field(int, 64, check=_positive, doc="discriminator base channels"),
        "disc_ch_mult": Field(tuple, (4, 8, 8), item=int,
                              doc="discriminator down blocks, ngf * m channels each (each halves H)"),
        "t_emb_dim": Field(int, 256, check=_positive, doc="discriminator time embedding"),
        "lr_g": Field(float, 1.6e-4, check=_positive, doc="generator Adam lr (config.optim's "
                                                          "schedule, warm-up, clip, eps apply)"),
        "lr_d": Field(float, 1.25e-4, check=_positive, doc="discriminator Adam lr"),
        "beta1": Field(float, 0.5, check=_unit, doc="Adam b1 of both networks"),
        "beta2": Field(float, 0.9, check=_unit, doc="Adam b2 of both networks"),
        "r1_gamma": Field(float, 0.02, check=_non_negative,
                          doc="R1 on real x_t: r1_gamma / 2 E||grad D||^2"),
        "lazy_reg": Field(int, 15, check=_non_negative,
                          doc="R1 every lazy_reg steps (unscaled, as the official code); 0: every step"),
    },
    "latent_sampler": {
        "num_steps": Field(int, 0, check=_non_negative,
                           doc="train steps of DiffAE's latent DDIM after the autoencoder; 0: off"),
        "num_layers": Field(int, 10, check=_positive),
        "hidden": Field(int, 2048, check=_positive),
        "batch_size": Field(int, 512, check=_positive),
        "learning_rate": Field(float, 1e-4, check=_positive),
        "loss": Field(str, "l1", choices=("l1", "l2")),
        "sample_steps": Field(int, 50, check=_positive),
    },
    "repa": {                         # REPA (Yu et al. 2025) while training a 'pixel' UNet
        "weight": Field(float, 0.0, check=_non_negative,
                        doc="lambda of L + lambda (1 - cos(h(f(x_t)), y(x0))) (paper: 0.5); 0: off"),
        "block": Field(str, "", doc="the UNet block aligned (a sown name, e.g. 'down_1_0'); '': the "
                                    "first block of the second level (REPA aligns an early block)"),
        "target": Field(str, "", doc="the frozen encoder y: 'run:<workdir>', the (EMA) encoder of a "
                                     "trained autoencoder run (its z); any Flax encoder through "
                                     "readouts.repa_loss"),
        "dim": Field(int, 0, check=_non_negative,
                     doc="the target features' width; 0: read from the target when training starts "
                         "(then saved with the config, so the other modes need no target)"),
        "hidden": Field(int, 0, check=_non_negative, doc="projector MLP width; 0: 4 model.ch"),
    },
    "readout": {
        "timesteps": Field(tuple, (0.02, 0.1, 0.3), item=float,
                           doc="noise levels t of the (t, block) feature sweep"),
        "blocks": Field(tuple, (), item=str, doc="sown block names; (): every block"),
        "num_train": Field(int, 0, check=_non_negative, doc="probe train examples; 0: all"),
        "num_test": Field(int, 0, check=_non_negative, doc="probe test examples; 0: all"),
        "knn_k": Field(int, 20, check=_positive),
        "pool": Field(str, "gap", choices=("gap", "gmp", "gap_gmp"),
                      doc="spatial pooling of a block's map: mean (DDAE), max, or both "
                          "(readouts.features)"),
        "concat": Field(bool, True, doc="also probe every block's pooled features concatenated "
                                        "at the best t (a multi-block 'hypercolumn' readout)"),
    },
    "report": {
        "enabled": Field(bool, True, doc="write report.md/html (samples, reconstructions, "
                                         "interpolations, loss, probes) after training"),
        "num_reconstructions": Field(int, 16, check=_positive),
        "num_interpolations": Field(int, 4, check=_positive),
        "interpolation_points": Field(int, 8, check=_positive),
        "inversion_steps": Field(int, 50, check=_positive, doc="DDIM steps of x0 -> x_T"),
        "fixed_point_iters": Field(int, 2, check=_non_negative,
                                   doc="refinements per DDIM-inversion step"),
        "probe": Field(bool, True, doc="the probe table (raw pixels, PCA, readouts, latents)"),
        "diagnostics": Field(bool, True, doc="autoencoders: does z carry the semantics (class "
                                             "agreement, z dependence per t, code usage)"),
        "diagnostics_images": Field(int, 256, check=_positive,
                                    doc="test images of the autoencoder diagnostics"),
        "feature_distance": Field(bool, True,
                                  doc="labelled data: the classifier-feature distance (Frechet distance of "
                                      "the evaluation classifier's penultimate features) of the samples "
                                      "to the test split, next to that of as many train images"),
        "classifier_steps": Field(int, 1500, check=_positive,
                                  doc="train steps of the diagnostics' feature classifier"),
        "manipulate_target": Field(int, 1, check=_non_negative,
                                   doc="--mode=manipulate: the label to move images towards"),
        "manipulate_scales": Field(tuple, (0.0, 0.3, 0.6, 0.9), item=float,
                                   doc="s of z + s sqrt(D) w / ||w|| (DiffAE: 0.3)"),
    },
    "quality": {
        "inception_weights": Field(str, None, optional=True,
                                   doc="--mode=fid: path of pytorch-fid's "
                                       "pt_inception-2015-12-05-6726825d.pth (published at "
                                       "github.com/mseitzer/pytorch-fid/releases/tag/fid_weights)"),
        "reference_stats": Field(str, None, optional=True,
                                 doc="a statistics .npz (keys mu, sigma; optionally features for "
                                     "kid / prc); None: computed from data.name's "
                                     "reference_split (cached in workdir/quality/)"),
        "reference_split": Field(str, "train", doc="the split the reference statistics come from"),
        "reference_num_images": Field(int, 0, check=_non_negative, doc="0: the whole split"),
        "num_samples": Field(int, 50000, check=_positive, doc="generated images (papers: 50k)"),
        "batch_size": Field(int, 200, check=_positive,
                            doc="Inception batch (divisible by the mesh's 'data' axis)"),
        "resize": Field(str, "reference", choices=("reference", "clean"),
                        doc="to 299x299: 'reference' bilinear as pytorch-fid; 'clean' PIL bicubic "
                            "as clean-fid"),
        "metrics": Field(tuple, ("fid", "is"), item=str, check=_quality_metrics_check,
                         doc="of fid, is, kid, prc (kid / prc need reference features)"),
        "is_splits": Field(int, 10, check=_positive),
        "kid_subsets": Field(int, 100, check=_positive),
        "kid_subset_size": Field(int, 1000, check=_positive),
        "prc_k": Field(int, 3, check=_positive, doc="precision/recall: k of the k-NN balls"),
        "seed": Field(int, 2020, doc="IS shuffle and KID subsets (torch-fidelity's default)"),
    },
    "distributed": {
        "coordinator_address": Field(str, None, optional=True),
        "num_processes": Field(int, None, optional=True, check=_positive),
        "process_id": Field(int, None, optional=True, check=_non_negative),
    },
}
_KWARGS_SECTIONS = ("process", "objective", "sample")


# ------------------------------------------------------------------------------- defaults
def _value(field: Field):
    if field.default is None:
        return config_dict.placeholder(field.type)
    return field.default


def base_config(model_type: str = "unet", process: str = "vp", objective: str = "eps"
                ) -> ml_collections.ConfigDict:
    """A complete config with every field at its default (unlocked; edit, then `validate`)."""
    if model_type not in MODEL_FIELDS:
        raise ConfigError(_unknown_name("model type", model_type, MODEL_TYPES))
    c = ml_collections.ConfigDict()
    for section, fields in SCHEMA.items():
        sec = ml_collections.ConfigDict()
        for name, field in fields.items():
            setattr(sec, name, _value(field))
        setattr(c, section, sec)
    c.model.type = model_type
    for name, field in MODEL_FIELDS[model_type].items():
        setattr(c.model, name, _value(field))
    c.process.name = process
    c.process.kwargs = ml_collections.ConfigDict()
    c.objective.name = objective
    c.objective.kwargs = ml_collections.ConfigDict()
    c.sample.kwargs = ml_collections.ConfigDict()
    return c


def ema_decay_from_halflife(halflife_mimg: float, batch_size: int) -> float:
    """EDM's per-step EMA decay: beta = 0.5 ** (batch_size / (halflife_mimg * 1e6)), i.e. the
    weight of a parameter snapshot halves every `halflife_mimg` million training images."""
    return float(0.5 ** (batch_size / (halflife_mimg * 1e6)))


# ------------------------------------------------------------------------------ messages
def suggest(name: str, valid: Iterable[str]) -> str | None:
    """The closest valid name (difflib), or None."""
    m = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return m[0] if m else None


def _unknown_field(path: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    s = suggest(name, valid)
    hint = f"did you mean {s!r}? " if s else ""
    return f"config.{path}: unknown field; {hint}valid fields here: {', '.join(valid)}"


def _unknown_name(what: str, name, valid: Sequence[str], path: str | None = None) -> str:
    s = suggest(str(name), valid)
    hint = f" (did you mean {s!r}?)" if s else ""
    where = f"config.{path}: " if path else ""
    return f"{where}unknown {what} {name!r}{hint}; valid: {', '.join(map(str, valid))}"


def _describe(v) -> str:
    return f"{type(v).__name__} ({v!r})"
