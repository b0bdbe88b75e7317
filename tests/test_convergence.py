"""Property test: `least_control_grad` with default arguments converges on random
contractive layers for every `alpha >= 0` (issue: strong control that converges).

Each sample is an equilibrium RNN `f(φ) = -φ + W tanh(φ) + b` with a random `W` of
spectral norm `ρ ∈ [0.3, 0.97]` (so `φ ↦ W tanh(φ) + b` contracts), a random `b`, a
random start `φ0`, and a loss on the last units: squared error to a random target
(its minimum is reachable, so perfect control, `alpha = 0`, has a solution) or
cross-entropy to a random class (no minimum: `alpha > 0` only). A solve counts as
converged when it reports success *and* its state satisfies DI's steady-state
equations, checked here with dense Jacobians, independently of the solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcp_solvers as lcp


SAMPLES = 3000  # at most 3 failures: a failure rate of about 0.1% or less
OUT = 4


def _sample(key, n):
    kw, kb, ky, kp, kr = jax.random.split(key, 5)
    w = jax.random.normal(kw, (n, n))
    rho = jax.random.uniform(kr, minval=0.3, maxval=0.97)
    w = rho * w / jnp.linalg.norm(w, ord=2)
    b = jax.random.normal(kb, (n,))
    phi0 = jax.random.normal(kp, (n,))
    return (w, b), phi0, ky


def _f(phi, theta, args):
    w, b = theta
    return -phi + w @ jnp.tanh(phi) + b


def _squared_error(phi, target):
    return 0.5 * jnp.sum((phi[-OUT:] - target) ** 2)


def _cross_entropy(phi, label):
    return -jax.nn.log_softmax(phi[-OUT:])[label]


def _steady_state_residual(theta, args, loss, alpha, phi, psi):
    # f + ψ = 0 and (∂φ f)ᵀψ = ∇L/α (alpha > 0), or ∇L = 0 (alpha = 0) with
    # (∂φ f)ᵀψ zero off the outputs.
    f = _f(phi, theta, args)
    jt_psi = jax.jacfwd(_f)(phi, theta, args).T @ psi
    g = jax.grad(loss)(phi, args)
    scale = 1 + jnp.max(jnp.abs(psi))
    if alpha > 0:
        scale = scale + jnp.max(jnp.abs(g)) / alpha
        adjoint = jt_psi - g / alpha
    else:
        adjoint = jnp.concatenate([jt_psi[:-OUT], g[-OUT:]])
    return jnp.maximum(jnp.max(jnp.abs(f + psi)), jnp.max(jnp.abs(adjoint))) / scale


CASES = [
    ("squared_error", 0.0),
    ("squared_error", 1e-3),
    ("squared_error", 0.1),
    ("squared_error", 10.0),
    ("cross_entropy", 1e-3),
    ("cross_entropy", 1e-2),
    ("cross_entropy", 0.1),
    ("cross_entropy", 10.0),
]
# Measured with the default max_steps = 1024 (3000 samples each, jax 0.10.2 and the
# floor jax 0.6.1, whose random layers differ): at most 1 failure in any cell (cross-
# entropy at alpha = 1e-3 and 1e-2), none at alpha >= 0.1. Every failure is a reported
# `max_steps`: Anderson stagnates on that layer (plain IMEX does not converge there
# either; step 0.5 fixes those samples but stalls on others and raises the median
# steps 1.5-2x). At max_steps = 256 the same cells had 2-4 failures, so the bound on the
# failure count sat at the edge of the measurement. States of at most 16 scalars get
# dense Newton, which from such random starts failed on 0.07-2% of samples at n = 8
# (docs/least_control.md); they are not part of this property.


def _cells():
    for n in (24, 64):  # beyond dense Newton's sizes: IMEX with Anderson
        for loss_id, alpha in CASES:
            yield pytest.param(n, loss_id, alpha, id=f"{loss_id}-{alpha}-{n}")


@pytest.mark.slow
@pytest.mark.parametrize("n, loss_id, alpha", list(_cells()))
def test_default_solver_converges(n, loss_id, alpha):
    loss = {"squared_error": _squared_error, "cross_entropy": _cross_entropy}[loss_id]
    controller = lcp.DynamicInversion(alpha=alpha)

    def one(key):
        theta, phi0, ky = _sample(key, n)
        if loss_id == "squared_error":
            args = jax.random.normal(ky, (OUT,))
        else:
            args = jax.random.randint(ky, (), 0, OUT)
        _, info = lcp.least_control_grad(
            _f, loss, theta, phi0, args, controller=controller, throw=False
        )
        residual = _steady_state_residual(theta, args, loss, alpha, info.phi, info.psi)
        return info.result == lcp.RESULTS.successful, residual

    keys = jax.random.split(jax.random.key(n), SAMPLES)
    ok, residual = jax.jit(jax.vmap(one))(keys)
    ok, residual = np.asarray(ok), np.asarray(residual)
    failures = int((~ok).sum())
    assert failures <= SAMPLES // 1000, f"{failures} of {SAMPLES} solves failed"
    # A solve reported successful is at DI's steady state: float64 at rtol = atol =
    # 1e-8 in units of the learning signal (measured at most 1.2e-7).
    assert residual[ok].max() < 1e-6, residual[ok].max()
