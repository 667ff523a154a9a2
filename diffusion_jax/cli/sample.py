"""`--mode=sample`: samples from a checkpoint to PNG + NPZ."""
from __future__ import annotations

import os
import time

from diffusion_jax.cli.experiment import CLIError, say, make_eps_fn, sampling_params, generate
from diffusion_jax.cli.pretrained import load_run


def _first_train_images(config):
    """k -> the first k training images (float, [-1, 1]), read only if a family asks."""
    def first(k):
        import numpy as np
        from diffusion_jax.cli.experiment import open_split
        from diffusion_jax.data import to_model_input
        source = open_split(config, "train")
        return to_model_input(source.get_batch(np.arange(k) % len(source)))["x"]
    return first


def run_sample(config, workdir: str, step: int | None) -> dict:
    import jax
    import numpy as np
    from diffusion_jax.reports import image_grid

    exp, ckpt_step, state = load_run(config, workdir, step)   # a checkpoint, or model.init_from
    s = config.sample
    say(f"sampling {s.num_samples} images with {s.sampler!r} ({s.num_steps} steps) from "
         f"checkpoint step {ckpt_step} ({'EMA' if s.use_ema and config.ema.decays else 'raw'}"
         f" parameters)")
    t0 = time.perf_counter()
    try:
        # what the family's generation draws on, from the train state (an autoencoder's prior
        # latents, DiVAE's codes under its frozen VQ, LDM's scale factor; None for most families)
        z, what = exp.family.generation_latents(exp, state, int(s.num_samples), int(s.seed),
                                                train_images=_first_train_images(config))
        if what:
            say(f"generation draws on: {what}")
        x, labels = generate(exp, make_eps_fn(exp), sampling_params(exp, state),
                              int(s.num_samples), int(s.seed), z=z)
    except FloatingPointError as e:
        raise CLIError(f"sampling from checkpoint step {ckpt_step} failed: {e}") from None
    seconds = time.perf_counter() - t0
    out_dir = os.path.join(workdir, "samples")
    png = os.path.join(out_dir, f"samples_step{ckpt_step}.png")
    npz = os.path.join(out_dir, f"samples_step{ckpt_step}.npz")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        image_grid(x[:256], png)
        uint8 = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        arrays = {"x": x, "images": uint8, "step": np.int64(ckpt_step)}
        if labels is not None:
            arrays["labels"] = labels
        np.savez_compressed(npz, **arrays)
        say(f"wrote {png} and {npz} ({seconds:.1f}s)")
    return {"mode": "sample", "step": ckpt_step, "png": png, "npz": npz,
            "num_samples": int(x.shape[0]), "seconds": seconds}


