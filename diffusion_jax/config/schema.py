"""The config schema: every section's fields with their types, defaults and checks, and `base_config()`,
a complete config at its defaults. The sections live by topic: `fields.py` (Field, checks, messages),
`networks.py` (model fields), `objectives.py` (objectives and their options), `families.py` (the model
families' sections); the training, sampling, evaluation and report sections are here. Checking lives in
`validate.py`, loading and overrides in `loading.py`."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from diffusion_jax.config.families import (  # noqa: F401  (re-exported)
    AUTOENCODER, AUTOENCODER_KINDS, CLD, DDGAN, ENCODER_TYPES, FIRST_STAGE, LATENT_SAMPLER, LATENT_TYPES, LSGM,
    REPA, VQ,
)
from diffusion_jax.config.fields import (  # noqa: F401  (re-exported)
    ConfigError, Field, _dataset_names, _describe, _non_negative, _positive, _process_names, _sampler_names,
    _spacings, _type_name, _unit, _unknown_field, _unknown_name, suggest,
)
from diffusion_jax.config.networks import DIT_FIELDS, MODEL_FIELDS, MODEL_TYPES, UNET_FIELDS  # noqa: F401
from diffusion_jax.config.objectives import (  # noqa: F401  (re-exported)
    OBJECTIVES, PHASE_SPACE_OBJECTIVES, ObjectiveSpec, objective_prediction,
)

PRECISIONS = ("float32", "bfloat16")
MESH_AXIS_NAMES = ("data", "fsdp", "tensor")


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
        "shape": Field(tuple, (-1, 1, 1), item=int, check=_mesh_shape_check,
                       doc="sizes of ('data', 'fsdp', 'tensor'); one -1 fills the devices; fixed sizes "
                           "asking for fewer devices than one process has use the first ones"),
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
    "cld": CLD,
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
    "autoencoder": AUTOENCODER,
    "first_stage": FIRST_STAGE,
    "vq": VQ,
    "lsgm": LSGM,
    "ddgan": DDGAN,
    "latent_sampler": LATENT_SAMPLER,
    "repa": REPA,
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
