"""`python -m diffusion_jax --config=configs/default.py --workdir=runs/x [--mode=train|sample|eval]`
(see `diffusion_jax.cli`)."""
from diffusion_jax.cli import run

if __name__ == "__main__":
    run()
