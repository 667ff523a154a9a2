"""Test-suite set-up (must precede the first jax import): 8 host CPU devices for the mesh tests.

XLA:CPU keeps its default LLVM -O2: -O0 compiles the small programs ~17% faster but runs
convolution training loops up to 9x slower (the feature classifier of the reports: 600 steps in
59 s vs 7 s); the whole suite took 1 580 s at -O0 and 1 397 s at -O2 on the 2-core machine. Tests
that only compile tiny programs pass `compiler_options` to their own jit."""
import os

if "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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
