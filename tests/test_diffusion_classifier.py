"""The diffusion classifier (Li et al. 2023) driven by the exact class-conditional eps of Gaussian classes."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffusion_jax.likelihood import class_errors, diffusion_classify  # noqa: E402
from diffusion_jax.processes import get_process  # noqa: E402
from diffusion_jax.reference import mixtures  # noqa: E402

VP = get_process("vp")


def two_classes(dim, sep, std):
    mu = np.zeros(dim, np.float32)
    mu[0] = sep
    return [mixtures.gaussian(-mu, std ** 2 * np.eye(dim)), mixtures.gaussian(mu, std ** 2 * np.eye(dim))]


def exact_eps_fn(classes):
    def eps_fn(x, t, cond):
        per_class = jnp.stack([mixtures.eps(g, x, VP, t) for g in classes])      # (K, B, D)
        return jnp.take_along_axis(per_class, cond["label"][None, :, None], axis=0)[0]
    return eps_fn


def test_exact_conditional_scores_classify_perfectly():
    classes = two_classes(4, 1.0, 0.3)
    xs = [mixtures.sample(g, jax.random.PRNGKey(i), 32)[0] for i, g in enumerate(classes)]
    x, y = jnp.concatenate(xs), np.repeat([0, 1], 32)
    for weighting in ("none", "elbo"):
        pred, err = diffusion_classify(exact_eps_fn(classes), VP, x, jax.random.PRNGKey(7), num_classes=2,
                                       num_samples=32, weighting=weighting)
        assert err.shape == (64, 2)
        np.testing.assert_array_equal(np.asarray(pred), y)


def test_elbo_weighting_gives_the_log_likelihood_ratio():
    """With the exact model the ELBO is tight: (E_0 - E_1) (t_max - t_min) D = log p(x|1) - log p(x|0)."""
    classes = two_classes(1, 0.5, 0.5)
    x = jnp.linspace(-1.0, 1.0, 9)[:, None]
    err = class_errors(exact_eps_fn(classes), VP, x, jax.random.PRNGKey(0), num_classes=2, num_samples=16384,
                       weighting="elbo")
    est = (err[:, 0] - err[:, 1]) * (VP.t_max - VP.t_min)
    exact = mixtures.log_prob(classes[1], x) - mixtures.log_prob(classes[0], x)   # = 4 x
    np.testing.assert_allclose(est, exact, atol=0.08)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown weighting"):
        class_errors(exact_eps_fn(two_classes(1, 1, 1)), VP, jnp.zeros((2, 1)), jax.random.PRNGKey(0),
                     num_classes=2, weighting="snr")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        class_errors(exact_eps_fn(two_classes(1, 1, 1)), VP, jnp.zeros((2, 1)), jax.random.PRNGKey(0), num_classes=1)
