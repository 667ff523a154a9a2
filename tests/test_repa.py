"""REPA (Yu et al. 2025): the alignment term, its gradients and the one-forward-pass base loss."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffusion_jax import objectives  # noqa: E402
from diffusion_jax.networks import UNet, make_apply_fn  # noqa: E402
from diffusion_jax.processes import get_process  # noqa: E402
from diffusion_jax.readouts import repa_loss, repa_similarity  # noqa: E402

P = get_process("cosine")
NET = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
           repa_block="down_1_0", repa_dim=6)
X = np.tanh(np.random.RandomState(0).standard_normal((4, 8, 8, 3))).astype(np.float32)


def _params():
    # jitted: an eager init dispatches every initialiser op by op (~45 s on a busy 2-core CPU)
    return jax.jit(NET.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))["params"]


def test_similarity_closed_forms():
    rs = np.random.RandomState(1)
    a = rs.standard_normal((2, 4, 4, 6)).astype(np.float32)
    assert float(repa_similarity(a, 3.0 * a)) == pytest.approx(1.0, abs=1e-6)
    assert float(repa_similarity(a, -a)) == pytest.approx(-1.0, abs=1e-6)
    # a (B, D) target is compared with every position; a coarser grid is matched by average pooling
    g = rs.standard_normal((2, 6)).astype(np.float32)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    expect = np.mean(np.sum(unit(a) * unit(g)[:, None, None, :], -1))
    assert float(repa_similarity(a, g)) == pytest.approx(float(expect), abs=1e-6)
    coarse = rs.standard_normal((2, 2, 2, 6)).astype(np.float32)
    pooled = a.reshape(2, 2, 2, 2, 2, 6).mean(axis=(2, 4))
    expect = np.mean(np.sum(unit(pooled) * unit(coarse), -1))
    assert float(repa_similarity(a, coarse)) == pytest.approx(float(expect), abs=1e-6)
    with pytest.raises(ValueError, match="set repa_dim"):
        repa_similarity(a, g[:, :5])


def test_repa_loss_is_the_base_loss_plus_the_alignment_term():
    params = _params()
    target = lambda x0: jnp.tile(jnp.mean(x0, axis=(1, 2)), (1, 2))          # (B, 6), a frozen "encoder"
    key = jax.random.PRNGKey(3)
    loss_fn = repa_loss(P, NET, target, base_factory=objectives.v_loss, weight=0.5)
    loss, aux = jax.jit(loss_fn)(params, {"x": X}, key)
    base, _ = jax.jit(objectives.v_loss(P, make_apply_fn(NET)))(params, {"x": X}, key)
    np.testing.assert_allclose(aux["diffusion_loss"], base, rtol=1e-6)
    np.testing.assert_allclose(loss, base + 0.5 * (1.0 - aux["repa_cos"]), rtol=1e-6)
    assert -1.0 <= float(aux["repa_cos"]) <= 1.0
    # the alignment term trains the projector and the blocks up to the aligned one, nothing after it
    only = repa_loss(P, NET, target, base_factory=objectives.v_loss, weight=1.0)
    g = jax.jit(jax.grad(lambda p: only(p, {"x": X}, key)[0]
                         - objectives.v_loss(P, make_apply_fn(NET))(p, {"x": X}, key)[0]))(params)
    norm = lambda t: float(sum(jnp.sum(jnp.abs(v)) for v in jax.tree_util.tree_leaves(t)))
    assert norm(g["repa_proj2"]) > 0 and norm(g["down_0_0_res"]) > 0 and norm(g["down_1_0_res"]) > 0
    assert norm(g["up_0_0_res"]) == 0.0 and norm(g["conv_out"]) == 0.0 and norm(g["mid_res0"]) == 0.0


def test_repa_needs_a_projector():
    plain = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    with pytest.raises(ValueError, match="repa_block"):
        repa_loss(P, plain, lambda x: x)
