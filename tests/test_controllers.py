"""Controllers on their own: the noise-driven rule that learns LinearFeedback's Q, and
the constructors' checks."""

import jax
import jax.numpy as jnp
import pytest
from helpers import contraction_weights, tree_cosine

import lcp_solvers as lcp


N, M = 6, 2


def _f(phi, theta, args):
    return -phi + theta["W"] @ jnp.tanh(phi) + theta["b"] + args["x"]


def _loss(phi, args):
    return 0.5 * jnp.sum((phi[-M:] - args["y"]) ** 2)


def _out(phi):
    return phi[-M:]


@pytest.mark.slow
def test_learned_feedback_aligns_with_dynamic_inversion():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    theta = {
        "W": contraction_weights(k1, N, rho=0.6),
        "b": 0.5 * jax.random.normal(k2, (N,)),
    }
    args = {"x": jnp.linspace(-1.0, 1.0, N), "y": jnp.array([0.3, -0.2])}
    alpha = jnp.asarray(0.1)
    grad_di, info = lcp.least_control_grad(
        _f, _loss, theta, jnp.zeros(N), args, controller=lcp.DynamicInversion(alpha)
    )
    q0 = jnp.zeros((N, M))
    grad_q0, _ = lcp.least_control_grad(
        _f, _loss, theta, jnp.zeros(N), args,
        controller=lcp.LinearFeedback(q0 + 1e-3, alpha, _out), throw=False,
    )  # fmt: skip
    q = lcp.linear_feedback_update(
        _f, theta, info.phi_free, q0, args, key=k3, output=_out
    )
    grad_lf, info_lf = lcp.least_control_grad(
        _f, _loss, theta, jnp.zeros(N), args,
        controller=lcp.LinearFeedback(q, alpha, _out),
    )  # fmt: skip
    assert info_lf.result == lcp.RESULTS.successful
    assert tree_cosine(grad_lf, grad_di) >= 0.99
    # Learning did the work: a feedback matrix that is not learned is far off.
    assert tree_cosine(grad_q0, grad_di) < 0.9
    # The learned Q lies (nearly) in Theorem 2's column space.
    jac = jax.jacfwd(lambda p: _f(p, theta, args))(info.phi_free)
    a = jnp.linalg.solve(jac.T, jnp.eye(N)[:, -M:])
    proj = a @ jnp.linalg.pinv(a)
    assert jnp.linalg.norm(q - proj @ q) < 0.1 * jnp.linalg.norm(q)


def test_constructor_checks():
    with pytest.raises(
        ValueError, match=r"DynamicInversion\(alpha=...\)` must be >= 0"
    ):
        lcp.DynamicInversion(-1.0)
    with pytest.raises(ValueError, match=r"EnergyBased\(beta=...\)` must be positive"):
        lcp.EnergyBased(0.0)
    with pytest.raises(ValueError, match=r"LinearFeedback\(Q=...\)` must be a 2D"):
        lcp.LinearFeedback(jnp.zeros(3), 0.1)
    with pytest.raises(ValueError, match=r"linear_feedback_update\(Q=...\)"):
        lcp.linear_feedback_update(
            _f, None, jnp.zeros(N), jnp.zeros((N, N)), key=jax.random.key(0),
            output=_out,
        )  # fmt: skip
