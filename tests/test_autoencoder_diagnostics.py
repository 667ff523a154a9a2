"""Issue 12: diffusion-autoencoder diagnostics, evaluation-mode encoding, BatchNorm statistics for the
EMA weights, binary-code usage and compile-once inference (tiny models, 8x8 images)."""
import os
import sys

if "jax" not in sys.modules and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # not 'tests.': torch-fidelity
                                                                 # installs a top-level 'tests'

import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffusion_jax import autoencoders as A  # noqa: E402
from diffusion_jax.autoencoders import diagnostics as D  # noqa: E402
from diffusion_jax.processes import get_process  # noqa: E402
from test_autoencoders import FAST, PROCESS, X, random_variables, tiny  # noqa: E402

COSINE = get_process("cosine")


# --- z_dependence -------------------------------------------------------------------------------------

def _toy_eps(uses_z: bool):
    w = jnp.asarray(np.random.RandomState(0).standard_normal((6, 8 * 8 * 3)) * 0.3, jnp.float32)

    def eps_fn(x, t, cond):
        out = 0.5 * x
        if uses_z:
            out = out + (cond["z"] @ w).reshape(x.shape) * (1.0 - t)[:, None, None, None]
        return out
    return eps_fn


@pytest.mark.parametrize("uses_z", [False, True])
def test_z_dependence_is_zero_iff_z_is_ignored(uses_z):
    rs = np.random.RandomState(1)
    x0 = np.tanh(rs.standard_normal((16, 8, 8, 3))).astype(np.float32)
    z = rs.standard_normal((16, 6)).astype(np.float32)
    dep = D.z_dependence(_toy_eps(uses_z), COSINE, x0, z, jax.random.PRNGKey(0), ts=(0.2, 0.5, 0.8))
    assert dep["t"] == pytest.approx([0.2, 0.5, 0.8])
    if not uses_z:
        assert dep["share"] == [0.0, 0.0, 0.0]
        np.testing.assert_array_equal(dep["mse_z"], dep["mse_shuffled"])
        assert dep["gain"] == [1.0, 1.0, 1.0]
    else:
        # the z term (1 - t) W z against 0.5 x_t: its share falls with t, and it is large
        share = np.asarray(dep["share"])
        assert np.all(share > 0.05) and share[0] > share[1] > share[2]


def test_z_dependence_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="same B >= 2"):
        D.z_dependence(_toy_eps(True), COSINE, X, np.zeros((3, 6), np.float32), jax.random.PRNGKey(0))


# --- binary codes: usage, the usage term, hard-code metrics, mutual information ------------------------

def test_code_usage_counts_dead_bits_and_codes():
    bits = np.array([[0, 1, 1], [1, 1, 0], [0, 1, 1], [1, 1, 0]])
    u = D.code_usage(A.binary_code(bits))
    assert u["frequency"] == [0.5, 1.0, 0.5] and u["dead_bits"] == 1
    np.testing.assert_allclose(u["entropy"], [1.0, 0.0, 1.0], atol=1e-6)
    assert u["distinct_codes"] == 2 and u["code_entropy"] == pytest.approx(1.0)


def test_bit_usage_term_keeps_bits_alive_without_blurring_them():
    big = 8.0
    balanced = jnp.asarray([[[big, -big]], [[-big, big]]] * 4, jnp.float32)      # (8, 1, 2) certain, balanced
    constant = jnp.asarray([[[-big, big]]] * 8, jnp.float32)                       # always 1
    uncertain = jnp.zeros((8, 1, 2), jnp.float32)                                  # q = 1/2 everywhere
    assert float(A.bit_usage(balanced)) == pytest.approx(0.0, abs=1e-6)
    assert float(A.bit_usage(constant)) == pytest.approx(math.log(2.0), abs=1e-5)
    assert float(A.bit_usage(uncertain)) == pytest.approx(0.0, abs=1e-7)
    # the per-example KL to Bernoulli(1/2) instead penalises the informative, balanced code
    assert float(jnp.mean(A.binary_kl(balanced))) == pytest.approx(math.log(2.0), abs=1e-5)


def test_bit_metrics_use_hard_codes():
    # bit 0: logits tied (a dead bit whose soft Gumbel samples would look balanced); bit 1: informative
    logits = np.zeros((8, 2, 2), np.float32)
    logits[:4, 1] = [3.0, -3.0]
    logits[4:, 1] = [-3.0, 3.0]
    soft = np.asarray(A.gumbel_softmax(jax.random.PRNGKey(0), logits, 1.0)).reshape(8, 4)
    stats = A.latent_statistics(A.LatentOutput(jnp.asarray(soft), logits=jnp.asarray(logits)), "binary")
    assert float(stats["dead_bits"]) == 1.0
    assert float(stats["bit_entropy"]) == pytest.approx(0.5)                   # (0 + 1) / 2
    q = 1.0 / (1.0 + math.exp(-6.0))
    h = -(q * math.log2(q) + (1 - q) * math.log2(1 - q))
    assert float(stats["bit_mi"]) == pytest.approx(1.0 - h, abs=1e-5)          # bit 0 carries nothing


def test_mutual_information_estimator_closed_forms():
    big = 30.0
    one_bit = jnp.asarray([[[big, -big]], [[-big, big]]] * 32, jnp.float32)      # a deterministic, balanced bit
    lat = A.LatentOutput(jnp.zeros((64, 2)), logits=one_bit)
    assert D.mutual_information(lat, jax.random.PRNGKey(0)) == pytest.approx(1.0, abs=1e-5)
    lat0 = A.LatentOutput(jnp.zeros((64, 2)), logits=jnp.zeros((64, 1, 2)))
    assert D.mutual_information(lat0, jax.random.PRNGKey(0)) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(D.bitwise_mutual_information(one_bit), [1.0], atol=1e-6)
    g = A.LatentOutput(jnp.zeros((64, 3)), mean=jnp.zeros((64, 3)), logvar=jnp.zeros((64, 3)))
    assert D.mutual_information(g, jax.random.PRNGKey(0)) == pytest.approx(0.0, abs=1e-6)
    # two well-separated Gaussian posteriors, half the batch each: 1 bit
    m = jnp.asarray([[-20.0], [20.0]] * 32)
    g2 = A.LatentOutput(m, mean=m, logvar=jnp.zeros((64, 1)))
    assert D.mutual_information(g2, jax.random.PRNGKey(0)) == pytest.approx(1.0, abs=1e-4)
    assert D.mutual_information(A.LatentOutput(jnp.zeros((4, 2))), jax.random.PRNGKey(0)) is None


# --- BatchNorm: evaluation-mode losses and statistics for the EMA weights --------------------------------

def test_eval_loss_uses_running_statistics_and_leaves_them():
    module = tiny("binary", "conv")
    v = random_variables(module, seed=3)
    loss_eval = A.autoencoder_loss(module, PROCESS, train=False)
    state = A.init_model_state(module, v, loss_eval)
    _, aux = jax.jit(loss_eval, **FAST)(v["params"], {"x": X}, jax.random.PRNGKey(0), state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, aux["model_state"]["encoder"], state["encoder"])
    # the code the eval loss conditions on is the batch-independent evaluation code
    enc = jax.jit(A.encode_fn(module), static_argnames="train", **FAST)
    z_all = enc(v, X, train=False)[0].z
    z_two = enc(v, X[:2], train=False)[0].z
    np.testing.assert_array_equal(z_all[:2], z_two)


def test_recomputed_statistics_match_the_batch_statistics():
    module = tiny("continuous", "conv")
    v = random_variables(module, seed=4)
    stats = A.recompute_batch_stats(module, v, X, batch_size=len(X))
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(v["batch_stats"])
    enc = jax.jit(A.encode_fn(module), static_argnames="train", **FAST)
    z_train = enc(v, X, train=True, rng=jax.random.PRNGKey(0))[0].z          # batch statistics
    z_eval = enc({**v, "batch_stats": stats}, X, train=False)[0].z
    np.testing.assert_allclose(z_eval, z_train, rtol=1e-4, atol=1e-5)
    z_old = enc(v, X, train=False)[0].z                                       # stale statistics differ
    assert float(jnp.max(jnp.abs(z_old - z_train))) > 1e-2
    # with two batches: the average of the two batches' statistics
    both = A.recompute_batch_stats(module, v, np.concatenate([X, X[::-1] * 0.5]), batch_size=len(X))
    s2 = A.recompute_batch_stats(module, v, X[::-1] * 0.5, batch_size=len(X))
    jax.tree_util.tree_map(lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-5, atol=1e-6),
                           both, stats, s2)


# --- compile once --------------------------------------------------------------------------------------

def test_inference_with_new_parameters_does_not_recompile():
    from diffusion_jax.autoencoders import inference
    module = tiny()
    eps_fn = A.decoder_eps_fn(module)
    assert A.decoder_eps_fn(module) is eps_fn                    # one function per module
    z = np.zeros((2, 6), np.float32)
    x_T = np.asarray(X[:2])
    outs = []
    for seed in (1, 2, 3):
        params = random_variables(module, seed)["params"]
        outs.append(np.asarray(A.reconstruct(eps_fn, PROCESS, z, x_T, num_steps=2, params=params)))
        if seed == 1:
            size = inference._decode._cache_size()
    assert inference._decode._cache_size() == size
    assert np.max(np.abs(outs[0] - outs[1])) > 1e-4              # the parameters do reach the decoder
    # the closed-over form gives the same numbers
    closed = A.decoder_eps_fn(module, random_variables(module, 3))
    np.testing.assert_allclose(A.reconstruct(closed, PROCESS, z, x_T, num_steps=2), outs[2], rtol=1e-4, atol=1e-3)


def test_temperature_schedule_anneals_with_the_step_in_model_state():
    from diffusion_jax.autoencoders.objective import tau_at
    np.testing.assert_allclose([tau_at(s, (2.0, 0.5, 100)) for s in (0, 50, 100, 400)],
                               [2.0, 1.0, 0.5, 0.5], rtol=1e-6)
    module = tiny("binary", "conv")
    v = random_variables(module, seed=5)
    loss_fn = A.autoencoder_loss(module, PROCESS, tau_schedule=(2.0, 0.5, 100))
    state = A.init_model_state(module, v, loss_fn)
    assert int(state["step"]) == 0
    f = jax.jit(loss_fn, **FAST)
    _, aux = f(v["params"], {"x": X}, jax.random.PRNGKey(0), state)
    assert float(aux["tau"]) == pytest.approx(2.0) and int(aux["model_state"]["step"]) == 1
    _, aux = f(v["params"], {"x": X}, jax.random.PRNGKey(0), {**state, "step": jnp.int32(100)})
    assert float(aux["tau"]) == pytest.approx(0.5)
    # a lower temperature gives sharper soft codes from the same logits and noise
    enc = A.encode_fn(module)
    soft = [np.asarray(enc(v, X, train=True, rng=jax.random.PRNGKey(1), tau=t)[0].z) for t in (5.0, 0.2)]
    assert np.mean(np.abs(soft[1] - 0.5)) > np.mean(np.abs(soft[0] - 0.5))
    with pytest.raises(ValueError, match="binary"):
        A.autoencoder_loss(tiny(), PROCESS, tau_schedule=(1.0, 0.5, 10))
