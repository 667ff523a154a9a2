"""Model families: the one place where a model is assembled from its config.

A family turns a config into everything the command line, the reports, the readouts and the
benches use (network, parameters and extra model state, loss, denoiser, generation, encode /
decode where it has them, what a checkpoint holds). They ask the registry and the family's
capabilities and never branch on its name:

    family = family_for(config)          # config.model.family (None: inferred, see below)
    model = family.build(image_shape)    # Model: module, apply_fn, process, loss_fn, init_variables
    params = model.init_params(key)
    eps_fn = family.make_eps_fn(model)   # eps_fn(x, t, {'params': params, 'model_cond': ...})
    x, labels = family.generate(model, eps_fn, params, n, seed)
    if family.has_encoder:
        z = family.encode(model, state, images)

    base.py         the interface (`ModelFamily`), `Model`, the registry
    pixel.py        'pixel': a diffusion model on the images (UNet / DiT; classes, guidance,
                    learned variance)
    autoencoder.py  'autoencoder': DiffAE / DMZ (encoder + z-conditioned decoder, latent prior)
    latent.py       'latent': latent diffusion (LDM): KL-autoencoder first stage, then a UNet / DiT
                    on its scaled latents; generation decodes
    cld.py          'cld': critically-damped Langevin diffusion, a UNet on (x, v) in phase space
                    learns the velocity score; generation by SSCS / EM / PF-ODE (no scalar eps)
    ddgan.py        'ddgan': denoising diffusion GAN, a z-conditioned UNet generator and a
                    time-conditional discriminator trained in alternating phases; T-step generation
    lsgm.py         'lsgm': LSGM, a VAE whose prior is a score model on its latents (mixed score),
                    VAE and prior phases with their own optimisers; NLL bound through the PF-ODE
    divae.py        'divae': DiVAE, a VQ-VAE whose decoder is a diffusion UNet conditioned on the
                    quantised codes (beside the deterministic VQ-VAE decoder of the same codes)

config.model.family None (every config and checkpoint written before the field) resolves to
'cld' when config.process.name is 'cld', 'autoencoder' when config.autoencoder.kind is not
'none', else 'pixel'.

Adding a family: a module models/<name>.py with a `ModelFamily` subclass decorated with
`@register_family('<name>')` that overrides what differs from the defaults (network, init,
objective; its own prior and `generate`; `state_structure` for what its checkpoint holds), one
import line below, and a config that sets model.family='<name>'. Alternating updates of
parameter groups (GANs, LSGM): return a `training.PhasedLoss` and give `optimizer_groups`.

Layering: above networks, autoencoders, objectives, processes and sampling; below cli and bench,
which use it; never imports cli. From training it reads only the train state's layout (EMA keys,
host gathering), lazily; training never imports models.
"""
from diffusion_jax.models.base import (Model, ModelFamily, family_for, family_name, get_family,
                                       register_family, registered_families, sampling_params)
from diffusion_jax.models import pixel, autoencoder, latent, cld  # noqa: F401,E402  (register the families)
from diffusion_jax.models import ddgan  # noqa: F401,E402  (registers 'ddgan')
from diffusion_jax.models.autoencoder import DiffusionAutoencoderFamily, autoencoder_choices
from diffusion_jax.models.cld import CLDFamily
from diffusion_jax.models.pixel import PixelDiffusion
from diffusion_jax.models import lsgm  # noqa: F401,E402  (registers 'lsgm')
from diffusion_jax.models import divae  # noqa: F401,E402  (registers 'divae')

__all__ = ["Model", "ModelFamily", "register_family", "get_family", "registered_families",
           "family_name", "family_for", "sampling_params", "PixelDiffusion",
           "DiffusionAutoencoderFamily", "autoencoder_choices", "CLDFamily"]
