"""Configs: every file in configs/ loads and validates; the paper configs carry the papers' numbers
(shared/reference/baselines.md and the cited repositories); schema errors name the field."""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import ml_collections
import pytest

from diffusion_jax import config as cv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
VARIANTS = {"score_sde_vp_cifar10.py": ["deep"], "score_sde_subvp_cifar10.py": ["deep"],
            "score_sde_ve_cifar10.py": ["deep"]}
SPECS = [c for c in CONFIGS] + [f"{c}:{v}" for c in CONFIGS
                                for v in VARIANTS.get(os.path.basename(c), [])]
BASELINES = os.path.join(os.path.dirname(ROOT), "shared", "reference", "baselines.md")


def load(name: str, overrides=()):
    return cv.load_config(os.path.join(ROOT, "configs", name), overrides)


def test_expected_config_files_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"default.py", "ddpm_cifar10.py", "score_sde_vp_cifar10.py",
            "score_sde_subvp_cifar10.py", "score_sde_ve_cifar10.py", "edm_cifar10.py",
            "dit_s2.py"} <= names


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: os.path.basename(s))
def test_every_config_loads_validates_and_locks(spec):
    config = cv.load_config(spec)
    assert config.is_locked
    with pytest.raises((AttributeError, KeyError)):
        config.optim.not_a_field = 1
    # Every section of the schema is present and the docstring cites a source.
    assert set(config.keys()) == set(cv.SCHEMA)
    path = spec.split(":")[0]
    doc = cv.loading._load_module(path).__doc__  # noqa: SLF001
    assert doc and len(doc) > 200
    # JSON round trip (what a checkpoint stores) gives back the same config.
    again = cv.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()


def test_ddpm_cifar10_is_ho_et_al():
    c = load("ddpm_cifar10.py")
    assert c.data.name == "cifar10" and c.data.image_size == 32
    assert c.data.batch_size == 128 and c.data.random_flip is True
    assert c.process.name == "ddpm"
    assert dict(c.process.kwargs) == {"num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                      "beta_schedule": "linear"}
    assert c.objective.name == "eps"
    m = c.model
    assert (m.type, m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions),
            m.dropout) == ("unet", 128, (1, 2, 2, 2), 2, (16,), 0.1)
    o = c.optim
    assert (o.learning_rate, o.warmup_steps, o.grad_clip, o.weight_decay, o.schedule) == \
        (2e-4, 5000, 1.0, 0.0, "constant")
    assert tuple(o.betas) == (0.9, 0.999) and o.eps == 1e-8          # Adam's defaults
    assert tuple(c.ema.decays) == (0.9999,)
    assert c.train.num_steps == 800_000
    # Ho's 1000 calls: 999 ancestral steps on t = (n + 1)/T, then x0_hat at n = 0 (denoise_final).
    assert c.sample.sampler == "ancestral" and c.sample.num_steps == 999 and c.sample.denoise_final
    assert c.sample.kwargs.variance == "beta"      # model_var_type='fixedlarge'


@pytest.mark.parametrize("name,process", [("score_sde_vp_cifar10.py", "vp"),
                                          ("score_sde_subvp_cifar10.py", "subvp")])
def test_score_sde_vp_subvp_match_score_sde(name, process):
    c = load(name)
    assert c.process.name == process
    assert (c.process.kwargs.beta_min, c.process.kwargs.beta_max) == (0.1, 20.0)
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 4)
    assert c.model.resblock_updown and c.model.skip_rescale and c.model.dropout == 0.1
    assert c.model.time_embedding == "sinusoidal"
    assert c.objective.name == "dsm"
    assert (c.objective.kwargs.weighting, c.objective.kwargs.reduce) == ("sigma2", "mean")
    assert (c.optim.learning_rate, c.optim.warmup_steps, c.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert tuple(c.ema.decays) == (0.9999,)
    assert c.data.batch_size == 128 and c.train.num_steps == 1_300_001
    deep = cv.load_config(os.path.join(ROOT, "configs", name) + ":deep")
    assert deep.model.num_res_blocks == 8 and deep.train.num_steps == 950_001
    with pytest.raises(cv.ConfigError, match="unknown variant"):
        cv.load_config(os.path.join(ROOT, "configs", name) + ":shallow")


def test_score_sde_ve_matches_score_sde():
    c = load("score_sde_ve_cifar10.py")
    assert c.process.name == "ve"
    assert (c.process.kwargs.sigma_min, c.process.kwargs.sigma_max) == (0.01, 50.0)
    assert c.model.time_embedding == "fourier" and c.model.fourier_scale == 16.0
    assert math.isclose(c.model.time_scale, math.log(50.0 / 0.01))
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 4)
    assert tuple(c.ema.decays) == (0.999,)
    assert c.objective.kwargs.reduce == "sum"      # reduce_mean=False
    assert (c.optim.learning_rate, c.optim.warmup_steps, c.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert c.sample.sampler == "pc" and c.sample.kwargs.snr == 0.16
    assert c.sample.kwargs.corrector == "langevin"


def test_edm_matches_karras_et_al():
    c = load("edm_cifar10.py")
    assert c.process.name == "edm"
    assert (c.process.kwargs.t_min, c.process.kwargs.t_max) == (0.002, 80.0)
    k = c.objective.kwargs
    assert c.objective.name == "edm"
    assert (k.sigma_data, k.p_mean, k.p_std) == (0.5, -1.2, 1.2)
    assert c.optim.learning_rate == 1e-3 and c.data.batch_size == 512
    assert tuple(c.optim.betas) == (0.9, 0.999) and c.optim.grad_clip == 0.0
    assert c.optim.warmup_steps == 19531               # 10 Mimg at batch 512
    assert c.train.num_steps == 390_625                 # 200 Mimg at batch 512
    assert c.model.dropout == 0.13
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (2, 2, 2), 4)
    # EMA half-life 0.5 Mimg -> per-step decay 0.5 ** (512 / 5e5).
    assert c.ema.halflife_mimg == 0.5
    assert c.ema.decays == pytest.approx((0.5 ** (512 / 5e5),), rel=1e-12)
    assert c.ema.decays[0] == pytest.approx(0.99929047, abs=1e-8)
    # The half-life is kept when the batch changes.
    c2 = load("edm_cifar10.py", ["data.batch_size=256"])
    assert c2.ema.decays[0] == pytest.approx(0.5 ** (256 / 5e5))
    # Heun, 18 Karras sigmas (rho 7 = time_grid's default): 17 Heun steps + the final x0 = 35 NFE.
    from diffusion_jax.sampling import SAMPLERS
    assert c.sample.sampler == "heun" and c.sample.spacing == "karras"
    assert c.sample.num_steps * SAMPLERS["heun"].nfe_per_step + c.sample.denoise_final == 35


def test_dit_s2_matches_peebles_and_xie():
    c = load("dit_s2.py")
    m = c.model
    assert (m.type, m.depth, m.hidden_size, m.num_heads, m.patch_size) == ("dit", 12, 384, 6, 2)
    assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.warmup_steps) == (1e-4, 0.0, 0)
    assert c.data.batch_size == 256 and tuple(c.ema.decays) == (0.9999,)
    assert c.objective.label_dropout == 0.1 and m.num_classes == 10


def test_paper_numbers_agree_with_the_baselines_sheet():
    if not os.path.exists(BASELINES):
        pytest.skip("shared/reference/baselines.md is not beside the repository")
    sheet = open(BASELINES, encoding="utf-8").read()
    for fact in ("T = 1000, beta linear 1e-4 -> 0.02",
                 "128 channels, multipliers (1, 2, 2, 2), 2 residual blocks per resolution, "
                 "self-attention at 16x16",
                 "dropout 0.1; Adam lr 2e-4, batch 128, warm-up 5000 steps, gradient clip 1.0, "
                 "EMA 0.9999, random horizontal flips",
                 "800k steps",
                 "VP beta_min 0.1, beta_max 20; VE sigma_min 0.01, sigma_max 50",
                 "sigma_min 0.002, sigma_max 80, rho 7, sigma_data 0.5, P_mean -1.2",
                 "P_std 1.2",
                 "S: 12 layers, width 384, 6 heads"):
        assert fact in " ".join(sheet.split()), fact


def test_network_parameter_counts():
    """DDPM's UNet is the sheet's 35.7M; EDM's DDPM++ is 'DDPM++ 56M'; score_sde's 62M / 108M."""
    import jax
    import numpy as np
    from flax import linen as nn

    from diffusion_jax.cli.experiment import build_network
    from diffusion_jax.networks import abstract_variables

    def count(name):
        c = load(name)
        v = abstract_variables(build_network(c, (32, 32, 3)), (1, 32, 32, 3), None)
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(v)))

    assert count("ddpm_cifar10.py") == 35_746_307
    assert round(count("edm_cifar10.py") / 1e6) == 57     # 56.5M


def test_schema_model_fields_are_module_fields():
    from diffusion_jax.networks import DiT, UNet
    for cls, fields in ((UNet, cv.UNET_FIELDS), (DiT, cv.DIT_FIELDS)):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(fields) <= names, set(fields) - names
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, field in fields.items():
            d = defaults[name]
            assert d == field.default or (isinstance(d, (tuple, list)) and
                                          tuple(d) == tuple(field.default)), name


def test_objective_kwargs_are_factory_options():
    import inspect
    from diffusion_jax.objectives.denoising import denoising_loss
    extra = set(inspect.signature(denoising_loss).parameters)
    for name, spec in cv.OBJECTIVES.items():
        params = set(inspect.signature(spec.get_factory()).parameters)
        if any(p.kind == p.VAR_KEYWORD
               for p in inspect.signature(spec.get_factory()).parameters.values()):
            params |= extra
        assert set(spec.kwargs) <= params, (name, set(spec.kwargs) - params)


def test_misspelled_field_names_it_and_suggests():
    c = cv.base_config()
    c.optim.lerning_rate = 1e-3
    with pytest.raises(cv.ConfigError) as e:
        cv.validate(c)
    msg = str(e.value)
    assert "config.optim.lerning_rate" in msg and "did you mean 'learning_rate'" in msg
    # The same through an override string and at section level.
    with pytest.raises(cv.ConfigError, match=r"optim\.lerning_rate.*did you mean 'learning_rate'"):
        load("default.py", ["optim.lerning_rate=1e-3"])
    with pytest.raises(cv.ConfigError, match=r"config\.optm.*did you mean 'optim'"):
        load("default.py", ["optm.learning_rate=1e-3"])
    c = cv.base_config()
    c.sampel = ml_collections.ConfigDict({"num_steps": 3})
    with pytest.raises(cv.ConfigError, match=r"config\.sampel.*did you mean 'sample'"):
        cv.validate(c)


def test_wrong_type_names_field_expected_and_got():
    with pytest.raises(cv.ConfigError) as e:
        load("default.py", ["train.num_steps='100'"])
    assert "config.train.num_steps: expected int, got str ('100')" in str(e.value)
    c = cv.from_dict({"optim": {"learning_rate": "1e-4"}}, validate_config=False)
    with pytest.raises(cv.ConfigError, match=r"config\.optim\.learning_rate: expected float, "
                                             r"got str"):
        cv.validate(c)
    with pytest.raises(cv.ConfigError, match=r"config\.data\.random_flip: expected bool, got int"):
        cv.validate(cv.from_dict({"data": {"random_flip": 1}}, validate_config=False))
    with pytest.raises(cv.ConfigError, match=r"config\.model\.ch_mult\[1\]: expected int"):
        load("default.py", ["model.ch_mult=(1, 'a')"])
    # Ints are fine where floats are expected.
    assert load("default.py", ["optim.learning_rate=1"]).optim.learning_rate == 1.0


@pytest.mark.parametrize("override,valid", [
    ("process.name='vpp'", "'vp'"),
    ("objective.name='epsilon'", "'eps'"),
    ("sample.sampler='dpm++'", "dpmpp_2m"),
    ("model.type='transformer'", "dit"),
    ("data.name='mnist'", "digits/16"),
    ("train.precision='fp16'", "bfloat16"),
])
def test_unknown_names_list_the_valid_ones(override, valid):
    with pytest.raises(cv.ConfigError, match="valid") as e:
        load("default.py", [override])
    assert valid in str(e.value)


def test_kwargs_checked_against_process_objective_and_sampler():
    with pytest.raises(cv.ConfigError, match=r"process\.kwargs\.beta_mx.*did you mean "
                                             r"'beta_max'"):
        c = cv.base_config(process="vp")
        c.process.kwargs.beta_mx = 10.0
        cv.validate(c)
    with pytest.raises(cv.ConfigError, match=r"objective\.kwargs\.weigting.*'weighting'"):
        c = cv.base_config(objective="eps")
        c.objective.kwargs.weigting = "none"
        cv.validate(c)
    with pytest.raises(cv.ConfigError, match="config.objective"):   # bad value: the factory says
        load("default.py", ["objective.kwargs.weighting='snr2'"])
    with pytest.raises(cv.ConfigError, match=r"sample\.kwargs\.snrr.*'snr'"):
        c = load("score_sde_ve_cifar10.py")
        c.unlock()
        c.sample.kwargs.snrr = 0.1
        cv.validate(c)


def test_cross_field_checks():
    with pytest.raises(cv.ConfigError, match="warmup_steps"):
        load("default.py", ["train.num_steps=50"])           # cosine: 50 updates <= warm-up 100
    with pytest.raises(cv.ConfigError, match="image_size"):
        load("ddpm_cifar10.py", ["data.image_size=36"])
    with pytest.raises(cv.ConfigError, match="halflife_mimg"):
        load("edm_cifar10.py", ["ema.decays=(0.999,)"])
    with pytest.raises(cv.ConfigError, match="mesh.shape"):
        load("default.py", ["mesh.shape=(-1, -1, 1)"])
    with pytest.raises(cv.ConfigError, match="coordinator_address"):
        load("default.py", ["distributed.num_processes=2"])
    with pytest.raises(cv.ConfigError, match="EMA decays must be in"):
        load("default.py", ["ema.decays=(1.5,)"])
    with pytest.raises(cv.ConfigError, match=r"config\.optim\.betas: must be two floats"):
        load("default.py", ["optim.betas=(0.9,)"])


def test_validate_fills_missing_fields_with_defaults():
    c = ml_collections.ConfigDict({"data": {"name": "digits/16", "batch_size": 8},
                                   "model": {"type": "unet", "ch": 8}})
    cv.validate(c)
    assert c.optim.learning_rate == cv.SCHEMA["optim"]["learning_rate"].default
    assert c.model.num_res_blocks == cv.UNET_FIELDS["num_res_blocks"].default
    assert c.data.image_size is None and c.is_locked


def test_ddae_probe_of_the_published_ddpm_network():
    """configs/ddae_cifar10.py:diffusers probes the converted google/ddpm-cifar10-32 at DDAE's
    noise level (DDPM step n = 11 of 1000 is t = (n + 1) / T = 0.012) and middle decoder blocks,
    with Ho et al.'s process; an unknown variant is named."""
    c = load("ddae_cifar10.py:diffusers")
    assert c.model.init_from == "diffusers:ddpm-cifar10-32" and c.process.name == "ddpm"
    assert 0.012 in c.readout.timesteps and c.readout.pool == "gap"
    assert {"up_1_0", "up_2_0"} <= set(c.readout.blocks)
    assert not load("ddae_cifar10.py").model.init_from           # the trained-here variant
    with pytest.raises(Exception, match="unknown variant"):
        load("ddae_cifar10.py:nope")
