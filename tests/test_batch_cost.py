"""A batch of least-control solves holds one copy of the weights, not one per example.

Under `jax.vmap` every example's controlled equilibrium is solved on its own. A
construct whose batching rule broadcasts its closed-over operands (a `lax.cond` with a
per-example predicate does) would give each example its own copy of the weights, read
at every step of the solve: on the 2 x 256-unit network of Table 1 that made a training
step 3.7 times slower. The compiled program's temporary memory shows it: here it must
grow with the batch by far less than one weight matrix per example.
"""

import jax
import jax.numpy as jnp
import optimistix as optx
import pytest

import lcp_solvers as lcp


N = 384


def _weights():
    w = jax.random.normal(jax.random.key(0), (N, N), jnp.float32)
    return 0.5 * w / jnp.sqrt(N)


def _vector_field(phi, x, w):
    return jnp.tanh(w @ phi + x) - phi


def _loss(phi, x):
    del x
    return jnp.sum((phi[:10] - 1.0) ** 2)


# Both updates are taken with respect to the example's input `x`, so that no entry
# point forms a per-example weight gradient of its own.
def _least_control_grad(w, x):
    grads, _ = lcp.least_control_grad(
        _vector_field, _loss, x, jnp.zeros(N, x.dtype), w, solver=lcp.IMEX()
    )
    return grads


def _drop_in(w, x):
    def loss(x):
        sol = optx.fixed_point(
            lambda y, a: jnp.tanh(a[0] @ y + a[1]),
            optx.FixedPointIteration(rtol=1e-4, atol=1e-4),
            jnp.zeros(N, x.dtype),
            (w, x),
            adjoint=lcp.LeastControlAdjoint(),
        )
        return _loss(sol.value, x)

    return jax.grad(loss)(x)


entry_points = {"least_control_grad": _least_control_grad, "drop_in": _drop_in}


@pytest.mark.parametrize("name", list(entry_points))
def test_temporary_memory_does_not_hold_weights_per_example(name):
    one = entry_points[name]

    def temp_bytes(batch):
        xs = jnp.ones((batch, N), jnp.float32)
        w = _weights()
        step = jax.jit(jax.vmap(one, (None, 0)))
        return step.lower(w, xs).compile().memory_analysis().temp_size_in_bytes

    weights_bytes = N * N * 4
    growth_per_example = (temp_bytes(16) - temp_bytes(2)) / 14
    assert growth_per_example < weights_bytes / 4, (
        f"{growth_per_example:.0f} bytes per example, weights {weights_bytes}"
    )
