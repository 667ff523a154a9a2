"""The 'cld' family: critically-damped Langevin diffusion in phase space (Dockhorn, Vahdat & Kreis,
ICLR 2022; nv-tlabs/CLD-SGM). Chosen by config.model.family='cld', or inferred from
config.process.name='cld'; trained only by the objective 'cld_hsm'.

    network   config.model's UNet on u = concat(x, v) (2C channels) -> alpha (C channels, out_channels)
    score     s_v(u, t) = -v / Sigma_vv(t) - alpha_theta(u, t) / ell_vv(t)   (mixed score; objectives/cld.py)
    loss      `objectives.cld_hsm_loss` (hybrid score matching, t ~ U(loss_eps, 1))
    generate  (x, v) ~ N(0, I) x N(0, M I) (`CLD.prior_sample`), then `sampling.cld_sample` with
              config.cld.sampler ('sscs' | 'em' | 'ode'), sample.num_steps steps on config.cld.striding's
              grid down to sample.t_end (None: the process' t_min), and the official final denoising
              step when sample.denoise_final; keeps x, drops v

Differences from the official NCSN++: the library's UNet (not NCSN++'s FIR resampling / progressive
input) and its time embedding of time_scale * t (sinusoidal by default) instead of Gaussian Fourier
features of log t (scale 16).

No scalar eps (`scalar_eps = False`, `make_eps_fn` returns None; generation goes through `generate`
alone): config.report.probe is refused, and so are SDEdit and model.init_from (`image_denoiser =
False`); config.eval.bpd gives the paper's phase-space bound (`image_bits_per_dim`:
`likelihood.cld_likelihood_bound` on dequantised images). Unconditional only.
"""
from __future__ import annotations

from diffusion_jax import config as cv
from diffusion_jax.models.base import Model, ModelFamily, register_family
from diffusion_jax.models.pixel import network_fields

__all__ = ["CLDFamily"]


@register_family("cld")
class CLDFamily(ModelFamily):
    """Critically-damped Langevin diffusion: a UNet on (x, v) learns the velocity score."""
    image_denoiser = False
    scalar_eps = False

    def check_config(self) -> None:
        c = self.config
        if c.process.name != "cld":
            raise cv.ConfigError(f"config.model.family='cld' needs config.process.name='cld', got "
                                 f"{c.process.name!r}")
        if c.objective.name != "cld_hsm":
            raise cv.ConfigError(f"config.model.family='cld' is trained by config.objective.name="
                                 f"'cld_hsm', got {c.objective.name!r}")
        if c.autoencoder.kind != "none":
            raise cv.ConfigError(f"config.model.family='cld' has no encoder; config.autoencoder.kind "
                                 f"must be 'none', got {c.autoencoder.kind!r}")
        if c.model.type != "unet":
            raise cv.ConfigError(f"config.model.family='cld' needs a UNet (2C input, C output "
                                 f"channels): config.model.type must be 'unet', got {c.model.type!r}")
        if c.model.num_classes is not None:
            raise cv.ConfigError("config.model.num_classes: the 'cld' family is unconditional; "
                                 "leave it unset")
        r = c.get("repa", None)
        if r is not None and r.weight > 0:
            raise cv.ConfigError("config.repa.weight > 0 is for the 'pixel' family")

    def title(self) -> str:
        return "Critically-damped Langevin diffusion (CLD)"

    def sampler_description(self) -> str:
        c, s = self.config.cld, self.config.sample
        return (f"CLD {c.sampler} ({c.striding} grid), {s.num_steps} steps"
                + (" + denoising step" if s.denoise_final else ""))

    # ---------------------------------------------------------------------- assembly
    def build_network(self, image_shape=None):
        from diffusion_jax.networks import UNet
        if image_shape is None:
            raise ValueError("the cld family needs image_shape (its output has the images' channels)")
        fields, dtype = network_fields(self.config, image_shape)
        fields["out_channels"] = int(image_shape[-1])
        return UNet(**fields, dtype=dtype)

    def init_variables(self, module, key, image_shape):
        import jax.numpy as jnp
        h, w, c = image_shape
        return module.init(key, jnp.zeros((1, h, w, 2 * c), jnp.float32), jnp.zeros((1,), jnp.float32),
                           None)

    def objective(self, process, apply_fn, module, *, train: bool = True):
        return cv.build_objective(self.config, process, apply_fn, train=train), False, None

    def readout_network(self, model: Model, params, z=None):
        raise cv.ConfigError("the 'cld' family has no readout network: its UNet reads (x, v) in phase "
                             "space, the readout sweep noises images with a scalar process")

    # ---------------------------------------------------------------------- sampling
    def make_eps_fn(self, model: Model, *, pair: bool | None = None):
        """None: CLD has no scalar eps; `generate` draws from the phase-space samplers."""
        return None

    def score_options(self) -> dict:
        """The objective's options that fix how the network output becomes a score."""
        kw = self.config.objective.kwargs
        return {"objective": kw.get("objective", None) or "hsm",
                "mixed_score": True if kw.get("mixed_score", None) is None else bool(kw.mixed_score)}

    def _sampler(self, model: Model, name: str, num_steps: int, batch: int):
        """jit(params, key) -> (x, nonfinite_step) of `cld_sample` for one batch size (cached)."""
        import jax
        from diffusion_jax.objectives.cld import cld_score_fn
        from diffusion_jax.sampling.cld import cld_sample, cld_time_grid

        cache_key = ("cld_sample", name, num_steps, batch)
        if cache_key not in model.cache:
            cfg, cc = self.config, self.config.cld
            process, shape = model.process, (batch, *model.image_shape)
            options = {"ode": {"solver": cc.ode_solver}, "sscs": {"score_time": cc.score_time}}.get(name, {})
            ts = cld_time_grid(process, num_steps, cc.striding, t_end=cfg.sample.t_end)
            denoise, score_kw = bool(cfg.sample.denoise_final), self.score_options()

            def run(params, key):
                score = cld_score_fn(process, model.apply_fn, params, **score_kw)
                out = cld_sample(name, score, process, key, shape, ts=ts, denoise=denoise, **options)
                return out.x, out.nonfinite_step

            model.cache[cache_key] = jax.jit(run)
        return model.cache[cache_key]

    def image_bits_per_dim(self, model: Model, params, images, key, *, t_min: float | None = None,
                           repeats: int = 1) -> dict:
        """--mode=eval's bits/dim (config.eval.bpd): per repeat r, a fresh uniform dequantisation y
        of the 8-bit images and one draw v0 ~ N(0, gamma M I); the paper's bound
        log p(y) >= E_v0 log p_{t_min}(y, v0) + H(N(0, gamma M I)) by the phase-space PF-ODE
        (`likelihood.cld_likelihood_bound`: Tsit5, Hutchinson divergence; t_min: the official
        t_min as --mode=eval passes it: eval.bpd_t_min, else the process' t_min), as bits/dim with the [-1, 1] Jacobian; an upper
        bound on the model's bits/dim."""
        import jax
        import numpy as np
        from diffusion_jax.likelihood.bpd import bits_per_dim, dequantize
        from diffusion_jax.likelihood.cld import cld_likelihood_bound
        from diffusion_jax.objectives.cld import cld_score_fn
        t0 = 1e-5 if t_min is None else float(t_min)
        d = int(np.prod(np.shape(images)[1:]))
        process, score_kw = model.process, self.score_options()

        @jax.jit
        def one(params, images, key):
            kq, kb = jax.random.split(key)
            score = cld_score_fn(process, model.apply_fn, params, **score_kw)
            out = cld_likelihood_bound(score, process, dequantize(kq, images), kb, num_v0=1, t0=t0)
            return bits_per_dim(out.bound, d), out.nfe

        runs = [one(params, images, jax.random.fold_in(key, r)) for r in range(int(repeats))]
        bpd = np.mean([np.asarray(b) for b, _ in runs], axis=0)
        return {"bpd": float(np.mean(bpd)), "bpd_num_examples": int(bpd.shape[0]), "bpd_t_min": t0,
                "bpd_nfe": float(np.mean([np.asarray(n) for _, n in runs]))}

    def nfe_per_sample(self) -> float:
        """Score evaluations of config.cld.sampler over config.sample.num_steps (+1: denoising)."""
        from diffusion_jax.sampling.cld import _PF_EVALS
        cc, s = self.config.cld, self.config.sample
        per = _PF_EVALS[cc.ode_solver] if cc.sampler == "ode" else 1
        return float(per * int(s.num_steps) + int(bool(s.denoise_final)))

    def generate(self, model: Model, eps_fn, params, n: int, seed: int, *, z=None,
                 num_steps: int | None = None, sampler: str | None = None):
        """n images from the phase-space prior by config.cld.sampler (or `sampler`: 'sscs', 'em',
        'ode') in batches of config.sample.batch_size; eps_fn is ignored (None). Returns (x, None)."""
        import jax
        import numpy as np
        from diffusion_jax.sampling.cld import CLD_SAMPLERS
        from diffusion_jax.training import to_host

        if z is not None:
            raise ValueError("the cld family takes no latents z")
        name = sampler or self.config.cld.sampler
        if name not in CLD_SAMPLERS:
            raise ValueError(f"unknown CLD sampler {name!r} (config.cld.sampler); valid: "
                             f"{', '.join(CLD_SAMPLERS)}")
        s = self.config.sample
        steps = int(num_steps or s.num_steps)
        key = jax.random.PRNGKey(seed)
        xs, done = [], 0
        while done < n:
            b = min(int(s.batch_size), n - done)
            x, _ = self._sampler(model, name, steps, b)(params, jax.random.fold_in(key, done))
            xs.append(np.asarray(to_host(x), np.float32))
            done += b
        return np.concatenate(xs), None
