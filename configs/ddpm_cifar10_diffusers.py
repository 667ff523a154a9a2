"""Sampling (and fine-tuning) the published DDPM CIFAR-10 network, google/ddpm-cifar10-32 (Ho, Jain &
Abbeel 2020), converted from its diffusers folder at start-up (`config.model.init_from`).

    huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32     # once, online
    python -m diffusion_jax --config=configs/ddpm_cifar10_diffusers.py --workdir=runs/ddpm_hub \\
        --config.model.init_from=diffusers:ddpm-cifar10-32 --mode=sample

The network (35,746,307 parameters) comes from the folder's config.json; every other setting is
configs/ddpm_cifar10.py's (Ho et al.'s): discrete DDPM process T = 1000, beta linear 1e-4 -> 0.02,
eps prediction; the model embeds the integer step n = T t - 1 of the grid t_n = (n + 1) / T.
A workdir without a checkpoint samples / evaluates the converted weights; training fine-tunes them
(params and EMA start from them) with Ho et al.'s optimiser.

Samplers (variant after ':'; NFE = sample.num_steps + 1, the last call returning x0_hat,
`sample.denoise_final=True`):
    ''       Ho et al.'s p_sample_loop: ancestral, 999 steps on n = 999..0 with variance beta_n
             ('fixedlarge') and x0_hat clipped to [-1, 1], then x0_hat at n = 0: 1000 NFE
             (paper FID 3.17 / IS 9.46 on 50k samples; /work/shared/reference/baselines.md)
    'ddim'   DDIM eta = 0, 49 uniform steps on t in [1, 1/T] (fractional n = 999 .. 0) + x0_hat:
             50 NFE (DDIM FID 4.67 at 50 NFE, 8.23 at 10: num_steps=9); DDIM's own grid is the
             integers n = 980, 960, .., 0 started from pure noise, a slightly different schedule
    'dpmpp'  DPM-Solver++(2M), 49 logSNR-uniform steps + x0_hat: 50 NFE (num_steps=9: 10 NFE);
             --config.sample.sampler=dpmpp_3m for the third-order multistep solver
"""
import os

import ml_collections

from diffusion_jax.config import load_file

SAMPLER_VARIANTS = ("", "ddim", "dpmpp")


def get_config(variant: str = ""):
    if variant not in SAMPLER_VARIANTS:
        raise ValueError(f"configs/ddpm_cifar10_diffusers.py: unknown variant {variant!r}; "
                         f"valid: {SAMPLER_VARIANTS}")
    config = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddpm_cifar10.py"))
    # The network's fields come from the folder (ddpm_cifar10.py's are the same values).
    config.model.init_from = "diffusers:ddpm-cifar10-32"

    sample = config.sample
    sample.denoise_final = True              # the last model call returns x0_hat (every variant)
    if variant == "":
        sample.sampler = "ancestral"
        sample.num_steps = 999               # + the final x0_hat call: Ho's 1000 calls at n = 999..0
        sample.spacing = "uniform"
        sample.kwargs.variance = "beta"      # model_var_type='fixedlarge'
        sample.kwargs.clip_x0 = True         # p_sample(clip_denoised=True)
    elif variant == "ddim":
        sample.sampler = "ddim"
        sample.num_steps = 49
        sample.spacing = "uniform"
        sample.kwargs = ml_collections.ConfigDict({"eta": 0.0})
    else:
        sample.sampler = "dpmpp_2m"
        sample.num_steps = 49
        sample.spacing = "logsnr"
        sample.kwargs = ml_collections.ConfigDict()
    return config
