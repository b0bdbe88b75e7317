"""`lcp.DEQ`: gradients against optimistix's implicit adjoint, batching, statistics,
the Jacobian penalty and contraction estimate against dense Jacobians, and errors for
wrong cells."""

import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
import pytest
from helpers import assert_tree_close, contraction_weights, requires_sharding_jax

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


def _dense_jacobian(cell, z, x):
    return jax.jacfwd(lambda z: cell(z, x))(z)


def test_contraction_estimate_is_the_spectral_norm():
    cell, xs = _data()
    deq = lcp.DEQ(
        cell, jnp.zeros(H), solver=optx.Newton(rtol=1e-12, atol=1e-12),
        contraction_steps=100,
    )  # fmt: skip
    z, stats = jax.vmap(deq.solve)(xs)
    dense = jax.vmap(lambda z, x: _dense_jacobian(cell, z, x))(z, xs)
    expected = jnp.linalg.norm(dense, ord=2, axis=(1, 2))
    assert_tree_close(stats.contraction, expected, 1e-8)
    # Off by default: no estimate, nothing computed.
    _, stats = lcp.DEQ(cell, jnp.zeros(H)).solve(xs[0])
    assert stats.contraction is None


@pytest.mark.slow
def test_contraction_estimate_pytree_state():
    cell, xs = _data()
    w2 = 0.3 * jnp.eye(2)

    def pair_cell(z, x):
        a, b = z
        return (cell(a, x) + 0.1 * jnp.sum(b), jnp.tanh(w2 @ b + a[:2]))

    z0 = (jnp.zeros(H), jnp.zeros(2))
    deq = lcp.DEQ(pair_cell, z0, contraction_steps=200)
    z, stats = deq.solve(xs[0])

    def flat_cell(v):
        out = pair_cell((v[:H], v[H:]), xs[0])
        return jnp.concatenate(out)

    dense = jax.jacfwd(flat_cell)(jnp.concatenate(z))
    assert_tree_close(stats.contraction, jnp.linalg.norm(dense, ord=2), 1e-6)


@pytest.mark.slow
def test_jacobian_penalty_is_unbiased_for_the_frobenius_norm():
    cell, xs = _data()
    deq = lcp.DEQ(cell, jnp.zeros(H))
    z = deq(xs[0])
    frobenius = jnp.sum(_dense_jacobian(cell, z, xs[0]) ** 2)
    n = 20_000
    estimate = deq.jacobian_penalty(z, xs[0], jax.random.key(3), num_samples=n)
    # Gaussian probes: relative standard deviation at most sqrt(2 / n) = 1%.
    assert abs(estimate / frobenius - 1) < 0.04, (estimate, frobenius)


def test_jacobian_penalty_gradient_matches_dense_formula():
    # With the same probes, the penalty and its gradient with respect to the cell's
    # weights equal those of mean ‖εᵀJ‖² with J from forward-mode jacfwd.
    cell, xs = _data()
    x = xs[0]
    z = lcp.DEQ(cell, jnp.zeros(H), solver=optx.Newton(rtol=1e-12, atol=1e-12))(x)
    key = jax.random.key(5)
    eps = jax.vmap(lambda k: jax.random.normal(k, (H,), z.dtype))(
        jax.random.split(key, 7)
    )

    def penalty(c):
        return lcp.DEQ(c, jnp.zeros(H)).jacobian_penalty(z, x, key, num_samples=7)

    def dense(c):
        return jnp.mean(jnp.sum((eps @ _dense_jacobian(c, z, x)) ** 2, axis=1))

    assert_tree_close(penalty(cell), dense(cell), 1e-12)
    assert_tree_close(
        eqx.filter_grad(penalty)(cell), eqx.filter_grad(dense)(cell), 1e-10
    )


@pytest.mark.slow
def test_jacobian_penalty_through_the_equilibrium_matches_implicit_adjoint():
    # Training-style use: the penalty at z* = deq(x) differentiated end to end; with
    # weak control the least-control gradient matches implicit differentiation.
    cell, xs = _data()
    solver = optx.Newton(rtol=1e-12, atol=1e-12)
    key = jax.random.key(2)

    def total(c, adjoint):
        deq = lcp.DEQ(c, jnp.zeros(H), solver=solver, adjoint=adjoint)
        z = deq(xs[0])
        return jnp.sum(z**2) + 0.5 * deq.jacobian_penalty(z, xs[0], key)

    got = eqx.filter_grad(total)(cell, lcp.LeastControlAdjoint(strength=1e-8))
    want = eqx.filter_grad(total)(cell, optx.ImplicitAdjoint())
    assert_tree_close(got, want, 1e-6)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_jacobian_tools_bad_arguments(bad):
    cell, xs = _data()
    with pytest.raises(ValueError, match="num_samples"):
        lcp.DEQ(cell, jnp.zeros(H)).jacobian_penalty(
            jnp.zeros(H), xs[0], jax.random.key(0), num_samples=bad
        )
    if bad != 0:
        with pytest.raises(ValueError, match="contraction_steps"):
            lcp.DEQ(cell, jnp.zeros(H), contraction_steps=bad)


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


@pytest.mark.slow
@requires_sharding_jax
def test_example_on_two_simulated_devices_matches_one():
    # `--devices 2` splits every batch over two (simulated CPU) devices: the same
    # accuracy, forward steps and backward evaluations as on one device.
    root = pathlib.Path(__file__).parent.parent
    rows = {}
    for devices in ("1", "2"):
        out = subprocess.run(
            [
                sys.executable,
                str(root / "examples" / "deq_digits.py"),
                "--quick",
                "--adjoints",
                "lcp",
                "--devices",
                devices,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"{devices} cpu device(s)" in out.stdout
        (row,) = [x for x in out.stdout.splitlines() if x.startswith("LeastControl")]
        fields = row.split()
        # Accuracy, forward steps, backward evaluations (not the times).
        rows[devices] = (fields[1], fields[-2], fields[-1])
    assert rows["1"] == rows["2"]
