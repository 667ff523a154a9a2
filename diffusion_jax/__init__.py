"""diffusion_jax: diffusion models and what they learn, in JAX/Flax.

Layers, lowest first (a lower layer never imports a higher one):
    processes, objectives, sampling, likelihood, reference   the maths: jax only, pure functions
    networks                                                 Flax UNet / DiT / latent MLP
    autoencoders, readouts, evaluation                       DiffAE / DMZ, DDAE readouts and probes,
                                                             sample-quality features and distances
    data, training                                           tfds + grain input; mesh, train step, checkpoints
    reports, demos, cli                                      plots and report pages, runnable jobs, the command line
"""
__version__ = "0.1.0"
