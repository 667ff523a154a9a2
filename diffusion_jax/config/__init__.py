"""Experiment configs: the schema and defaults (`schema.py`, with its sections by topic in `fields.py`,
`networks.py`, `objectives.py` and `families.py`), validation on load (`validate.py`) and a file loader
with overrides (`loading.py`).

An experiment config is an `ml_collections.ConfigDict` with these sections (`base_config()` builds
one with every field at its default; the files in `configs/` start from it):

    data         name, image_size, batch_size, random_flip, data_dir
    model        type 'unet' | 'dit' and that network's fields (`UNET_FIELDS` / `DIT_FIELDS`),
                 family (`diffusion_jax.models`; None: 'autoencoder' if autoencoder.kind
                 is not 'none', else 'pixel'), init_from
    process      name (`diffusion_jax.processes.PROCESSES`, or the phase-space 'cld') and kwargs
                 (the process' fields)
    objective    name (`OBJECTIVES`: 'eps' 'x0' 'v' 'flow' 'dsm' 'edm' 'hybrid' 'cld_hsm') and kwargs
                 (the factory's options), label_dropout (classifier-free guidance training); 'hybrid'
                 (improved DDPM, learned variance) doubles the network's output channels; 'cld_hsm'
                 goes with process 'cld' and nothing else (`PHASE_SPACE_OBJECTIVES`)
    optim        AdamW: learning_rate, betas, eps, weight_decay, warmup_steps, schedule
                 'constant' | 'cosine', end_lr_factor, grad_clip (0 = off), grad_accum
    ema          decays (tuple), warmup (bool), halflife_mimg (EDM-style: derives the decay)
    train        num_steps, log_every, sample_every, checkpoint_every, keep, seed, precision
    mesh         shape (data, fsdp, tensor), axis_names, logical_axis_rules (None = library's)
    sample       sampler (`diffusion_jax.sampling.SAMPLERS`), num_steps, spacing, t_end,
                 num_samples, batch_size, denoise_final, guidance_scale, use_ema, seed, and
                 kwargs (the sampler's options, e.g. snr for 'pc')
    cld          model.family='cld': sampler 'sscs' | 'em' | 'ode', striding, ode_solver, score_time
    sdedit       --mode=sdedit: t0s (fractions of the time range), sampler, full_steps, guide
                 'downsample' | 'noise' | 'clean', factor, noise_std, num_images, split,
                 classifier_steps, seed
    eval         split, batch_size, num_batches, bpd, bpd_num_examples, bpd_repeats, bpd_t_min
    distributed  coordinator_address, num_processes, process_id (None: single process)
    autoencoder  kind 'none' | 'diffae' | 'dmz' and the design axes: encoder, latent, z_dim,
                 z_conditioning, encoder sizes, norm, kl_weight, tau, prior (None: the kind's)
    latent_sampler  DiffAE's latent DDIM (num_steps 0: off), trained after the autoencoder
    readout      timesteps and blocks of the (t, block) feature sweep, probe sizes, k of k-NN
    report       what the report after training holds (reconstructions, interpolations, probes)

`validate(config)` checks it against the schema and then LOCKS it (no new fields; values may still
be assigned with their type):

* an unknown (misspelled) field raises `ConfigError` naming it and suggesting the closest valid
  name (difflib): "config.optim.lerning_rate: unknown field; did you mean 'learning_rate'?";
* a wrong type names the field, the expected and the received type;
* an unknown process / objective / sampler / model type / dataset name lists the valid ones;
* process, objective and sampler kwargs are checked against the process' fields, the objective
  factory's options and the sampler's keyword arguments; then the process and the objective are
  built once, so bad values (an unknown weighting, say) fail at load time, not after the model
  is compiled;
* fields missing from a hand-written config are filled in with their defaults;
* derived values are filled in: `ema.decays` from `ema.halflife_mimg` when that is set.

`load_config('configs/x.py[:arg]', overrides=['train.num_steps=100'])` imports a config file,
applies `path=value` overrides (values parsed as Python literals, checked like everything else)
and validates. The command line (`diffusion_jax.cli`) uses `ml_collections.config_flags` for the
same overrides (`--config.train.num_steps=100`) and then `validate`.
"""
from diffusion_jax.config.loading import (
    apply_overrides, check_override_paths, from_dict, load_config, load_file,
)
from diffusion_jax.config.schema import (
    AUTOENCODER_KINDS, DIT_FIELDS, ENCODER_TYPES, LATENT_TYPES, MESH_AXIS_NAMES, MODEL_FIELDS, MODEL_TYPES,
    OBJECTIVES, PHASE_SPACE_OBJECTIVES, PRECISIONS, SCHEMA, UNET_FIELDS, ConfigError, Field, ObjectiveSpec, base_config,
    ema_decay_from_halflife, objective_prediction, suggest,
)
from diffusion_jax.config.validate import build_objective, build_process, kwargs_dict, validate

__all__ = [
    "AUTOENCODER_KINDS", "DIT_FIELDS", "ENCODER_TYPES", "LATENT_TYPES", "MESH_AXIS_NAMES", "MODEL_FIELDS",
    "MODEL_TYPES", "OBJECTIVES", "PHASE_SPACE_OBJECTIVES", "PRECISIONS", "SCHEMA", "UNET_FIELDS", "ConfigError", "Field", "ObjectiveSpec",
    "apply_overrides", "base_config", "build_objective", "build_process", "check_override_paths",
    "ema_decay_from_halflife", "from_dict", "kwargs_dict", "load_config", "load_file", "objective_prediction",
    "suggest", "validate",
]
