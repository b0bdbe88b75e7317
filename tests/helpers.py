"""Shared problems and tolerance helpers for the tests."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def tree_rel_error(a, b) -> float:
    """max |a - b| / max |b| over all leaves (b is the reference)."""
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    assert len(la) == len(lb), "pytrees differ in structure"
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / max(den, 1e-300)


def assert_tree_close(a, b, rtol: float):
    err = tree_rel_error(a, b)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def tree_cosine(a, b) -> float:
    va = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(a)])
    vb = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(b)])
    return float(va @ vb / (jnp.linalg.norm(va) * jnp.linalg.norm(vb)))


def contraction_weights(key, n: int, rho: float = 0.6, dtype=jnp.float64):
    """A random n x n matrix with spectral norm rho, so tanh(W z + b) contracts."""
    w = jax.random.normal(key, (n, n), dtype)
    return rho * w / jnp.linalg.norm(w, ord=2)


def central_difference(fun, theta, eps: float = 1e-6):
    """Gradient of a scalar function of a flat numpy vector by central differences."""
    theta = np.asarray(theta, dtype=np.float64)
    grad = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = eps
        grad[i] = (fun(theta + e) - fun(theta - e)) / (2 * eps)
    return grad
