"""Test-suite set-up (must precede the first jax import): 8 host CPU devices for the mesh tests, and
XLA:CPU's LLVM back end at -O0. The tests' programs are small and run for few steps, so compiling
dominates: -O0 cut a CLI test's CPU time by ~17% and the mixture-sampler tests' by ~18% on the
2-core CI machine. It changes code generation only (no HLO pass), so results agree with -O2 to
float rounding; subprocesses (multi-host, resume, notebooks) inherit it. Set XLA_FLAGS with your
own --xla_backend_optimization_level to override."""
import os

if "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import pytest  # noqa: E402


@pytest.fixture
def compile_cache(tmp_path):
    """JAX's persistent compilation cache in a temporary directory for one test: the resumed run
    and sample mode then reuse the first run's executables (the same HLO) instead of compiling
    again, which keeps the end-to-end test near a minute on 2 shared cores. Restored after."""
    import jax
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    try:
        from jax._src import compilation_cache as cc   # reset_cache: re-read the settings
    except ImportError:                                  # pragma: no cover
        yield None
        return
    jax.config.update(names[0], str(tmp_path / "jax_cache"))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    cc.reset_cache()
    try:
        yield tmp_path / "jax_cache"
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()
