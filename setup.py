"""diffusion_jax: diffusion models and what they learn, in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.10",
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.2",
    "chex>=0.1.87",
    "ml-collections>=0.1.1",
    "diffrax>=0.6",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "scikit-learn>=1.4",
    "absl-py>=2.1",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "scipy>=1.11",          # FID's matrix square root (scipy.linalg.sqrtm, as pytorch-fid)
]

REFERENCE_IMPLEMENTATIONS = [
    "torch==2.14.1; platform_machine != 'aarch64'",
    "torchvision==0.29.1; platform_machine != 'aarch64'",
    "torch==2.9.1; platform_machine == 'aarch64'",
    "torchvision==0.24.1; platform_machine == 'aarch64'",
    "pytorch-fid>=0.3",
    "torch-fidelity>=0.3",
    "diffusers>=0.30",
]

setup(
    name="diffusion_jax",
    version="0.1.0",
    description="Diffusion models and what they learn: processes, objectives, samplers, likelihoods, "
    "diffusion autoencoders and representation readouts in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The reference implementations the tests compare against, on randomly initialised models
        # (nothing is downloaded). torch / torchvision pinned to builds that pair with each other.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", *REFERENCE_IMPLEMENTATIONS],
        "bench": ["scipy>=1.11", *REFERENCE_IMPLEMENTATIONS],
    },
    entry_points={"console_scripts": ["diffusion-jax=diffusion_jax.cli:run"]},
)
