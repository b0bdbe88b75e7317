"""`lcp.DEQ`: gradients against optimistix's implicit adjoint, batching, statistics,
and errors for wrong cells."""

import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
import pytest
from helpers import assert_tree_close, contraction_weights

import lcp_solvers as lcp


H, D = 5, 3


class Cell(eqx.Module):
    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __init__(self, key):
        kw, ku, kb = jax.random.split(key, 3)
        self.w = contraction_weights(kw, H, rho=0.7)
        self.u = jax.random.normal(ku, (H, D))
        self.b = jax.random.normal(kb, (H,))

    def __call__(self, z, x):
        return jnp.tanh(self.w @ z + self.u @ x + self.b)


def _data():
    cell = Cell(jax.random.PRNGKey(0))
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, D))
    return cell, xs


def _loss(deq, xs):
    z = jax.vmap(deq)(xs)
    return jnp.sum(jnp.sin(2 * z)) + jnp.sum(z**2)


_TOL = 1e-11
_FORWARD = {
    "anderson": lcp.AndersonAcceleration(rtol=_TOL, atol=_TOL),
    "newton": optx.Newton(rtol=_TOL, atol=_TOL),
}


@pytest.mark.parametrize("forward", list(_FORWARD))
@pytest.mark.slow
def test_gradients_match_implicit_adjoint(forward):
    cell, xs = _data()
    solver = _FORWARD[forward]
    deq = lcp.DEQ(
        cell,
        jnp.zeros(H),
        solver=solver,
        adjoint=lcp.LeastControlAdjoint(strength=1e-6),
    )
    ref = lcp.DEQ(cell, jnp.zeros(H), solver=solver, adjoint=optx.ImplicitAdjoint())
    # Gradients with respect to the cell's parameters and to the input.
    grad = eqx.filter_jit(eqx.filter_grad(lambda deq_xs: _loss(*deq_xs)))
    got = grad((deq, xs))
    expected = grad((ref, xs))
    assert_tree_close(got[0].cell, expected[0].cell, rtol=1e-4)
    assert_tree_close(got[1], expected[1], rtol=1e-4)
    # z0 gets no gradient.
    assert float(jnp.max(jnp.abs(got[0].z0))) == 0


@pytest.mark.slow
def test_batching_pytree_state_and_stats():
    # A pytree state, z0 given as a function of the input, solve statistics.
    cell, xs = _data()

    def pair_cell(z, x):
        a, b = z
        return cell(b, x), 0.5 * jnp.tanh(a)

    deq = lcp.DEQ(
        pair_cell,
        lambda x: (jnp.zeros(H), jnp.zeros(H)),
        solver=lcp.AndersonAcceleration(rtol=1e-8, atol=1e-8),
    )
    (a, b), stats = jax.jit(jax.vmap(deq.solve))(xs)
    assert a.shape == b.shape == (len(xs), H)
    assert stats.num_steps.shape == stats.residual.shape == (len(xs),)
    assert bool(jnp.all(stats.num_steps > 1))
    assert bool(jnp.all(stats.result == lcp.RESULTS.successful))
    assert float(jnp.max(stats.residual)) < 1e-7
    # The batched solve is the per-sample solve.
    for i, x in enumerate(xs):
        (ai, bi), si = deq.solve(x)
        assert_tree_close((a[i], b[i]), (ai, bi), rtol=1e-7)
        assert int(si.num_steps) == int(stats.num_steps[i])
    # A warm start at the equilibrium needs (almost) no steps.
    _, warm = deq.solve(xs[0], z0=(a[0], b[0]))
    assert int(warm.num_steps) < int(stats.num_steps[0])


def test_throw_false_reports_failure():
    cell, xs = _data()
    solver = optx.FixedPointIteration(rtol=1e-12, atol=1e-12)
    deq = lcp.DEQ(cell, jnp.zeros(H), solver=solver, max_steps=3, throw=False)
    _, stats = deq.solve(xs[0])
    assert stats.result == lcp.RESULTS.nonlinear_max_steps_reached
    assert int(stats.num_steps) == 3
    with pytest.raises(Exception, match="maximum number of steps"):
        lcp.DEQ(cell, jnp.zeros(H), solver=solver, max_steps=3)(xs[0])


def test_wrong_cells_raise_value_error():
    cell, xs = _data()
    x = xs[0]
    with pytest.raises(ValueError, match=r"cell\(z, x\) -> z"):
        lcp.DEQ(lambda z: z, jnp.zeros(H))(x)
    with pytest.raises(ValueError, match=r"expected float64\[5\], got float64\[3\]"):
        lcp.DEQ(lambda z, x: x, jnp.zeros(H))(x)
    with pytest.raises(ValueError, match=r"z0.*float64\[7\]"):
        lcp.DEQ(cell, jnp.zeros(7))(x)
    with pytest.raises(ValueError, match="pytree of floating-point arrays"):
        lcp.DEQ(cell, jnp.zeros(H, dtype=jnp.int32))(x)
    with pytest.raises(ValueError, match="callable"):
        lcp.DEQ(jnp.zeros(H), jnp.zeros(H))  # pyright: ignore
    with pytest.raises(ValueError, match="solver"):
        lcp.DEQ(cell, jnp.zeros(H), solver=optx.BFGS(1e-6, 1e-6))  # pyright: ignore
    with pytest.raises(ValueError, match="adjoint"):
        lcp.DEQ(cell, jnp.zeros(H), adjoint=lcp.AndersonAcceleration(1e-6, 1e-6))  # pyright: ignore


@pytest.mark.slow
def test_example_quick_runs():
    # A smoke test of the example: a few steps of training with both adjoints.
    root = pathlib.Path(__file__).parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "deq_digits.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ImplicitAdjoint" in out.stdout and "LeastControlAdjoint" in out.stdout
