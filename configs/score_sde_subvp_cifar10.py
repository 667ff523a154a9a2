"""Score SDE: DDPM++ cont. (sub-VP) on CIFAR-10 (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations").

Source: yang-song/score_sde `configs/subvp/cifar10_ddpmpp_continuous.py` and
`configs/subvp/cifar10_ddpmpp_deep_continuous.py` over `configs/default_cifar10_configs.py`:
training.batch_size 128, n_iters 1300001, snapshot_freq 50000, log_freq 50; optim Adam lr 2e-4,
beta1 0.9, eps 1e-8, warmup 5000, grad_clip 1; model.beta_min 0.1, beta_max 20, dropout 0.1;
sde 'subvpsde', continuous, reduce_mean True, likelihood_weighting False, ema_rate 0.9999; nf 128,
ch_mult (1, 2, 2, 2), num_res_blocks 4 (deep: 8, with n_iters 950001), attn_resolutions (16,),
resblock_type 'biggan', skip_rescale True, embedding 'positional', centered data; sampling PC with
predictor euler_maruyama and no corrector, noise_removal. Headline numbers (baselines.md):
DDPM++ cont. deep sub-VP 2.99 bits/dim, ODE FID 2.92.

    --config=configs/score_sde_subvp_cifar10.py       DDPM++ cont. (sub-VP), 4 blocks, 62.5M
    --config=configs/score_sde_subvp_cifar10.py:deep  DDPM++ cont. deep (sub-VP), 8 blocks, 108M

Identical to `score_sde_vp_cifar10.py` but for the process (read from that file). Mapping: the
network predicts eps and the score is -eps_hat / sigma (score_sde's sub-VP models,
scale_by_sigma=False), so the loss is denoising score matching with sigma^2 weighting, reduce
'mean' ('dsm' with prediction 'eps'), t ~ U[1e-5, 1] (process t_min = 1e-5: score_sde's training
eps); sampling stops at t = 1e-3 (its sampling eps) with the VP file's final denoising step
(noise_removal, `sample.denoise_final`); bits/dim at score_sde's likelihood eps 1e-5
(`eval.bpd_t_min`). The time embedding sees 999 t (score_sde's
labels for continuous VP / sub-VP). Not modelled: init_scale 0 of the residual blocks' last convs,
n_jitted_steps (a speed option). The stored copy of the upstream default_cifar10_configs.py reads
batch_size 2 with 128 commented out (a debugging edit); the paper and the other copies
(score_sde_pytorch, forks) use 128, kept here.
"""
import importlib.util
import os

_VP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "score_sde_vp_cifar10.py")
_spec = importlib.util.spec_from_file_location("score_sde_vp_cifar10", _VP)
_vp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vp)

VARIANTS = _vp.VARIANTS


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of score_sde_subvp_cifar10; valid: {VARIANTS}")
    config = _vp.get_config(variant)
    config.process.name = "subvp"
    return config
