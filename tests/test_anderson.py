"""`lcp.AndersonAcceleration` as an ordinary optimistix fixed-point solver: against
`optx.FixedPointIteration`, on pytrees, float32/float64, under vmap, and its failure
flags."""

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import assert_tree_close, contraction_weights

import lcp_solvers as lcp


N = 6


def _vector_problem(dtype):
    # A symmetric W with spectral radius 0.95 and a small bias, so the fixed point sits
    # where tanh is nearly linear: plain iteration contracts at a rate close to 0.95.
    kw, kb = jax.random.split(jax.random.PRNGKey(0))
    w = contraction_weights(kw, N, rho=1.0)
    w = w + w.T
    w = (0.95 * w / jnp.max(jnp.abs(jnp.linalg.eigvalsh(w)))).astype(dtype)
    b = (0.1 * jax.random.normal(kb, (N,))).astype(dtype)
    fn = lambda z, args: jnp.tanh(args[0] @ z + args[1])
    return fn, jnp.zeros(N, dtype), (w, b)


def _pytree_problem(dtype):
    # A dict state with a matrix leaf, a vector leaf and a float32 leaf.
    fn0, _, (w, b) = _vector_problem(dtype)

    def fn(z, args):
        v = fn0(z["v"] + 0.1 * jnp.sum(z["m"], axis=1), args)
        m = 0.5 * jnp.cos(z["m"]) * v[:, None]
        s = (0.5 * jnp.sin(z["s"]) + 0.1).astype(jnp.float32)
        return {"v": v, "m": m, "s": s}

    z0 = {"v": jnp.zeros(N, dtype), "m": jnp.zeros((N, 2), dtype), "s": jnp.zeros(())}
    z0["s"] = z0["s"].astype(jnp.float32)
    return fn, z0, (w, b)


_PROBLEMS = {"vector": _vector_problem, "pytree": _pytree_problem}


@pytest.mark.parametrize(
    "problem, dtype",
    [("vector", jnp.float64), ("pytree", jnp.float64), ("pytree", jnp.float32)],
)
@pytest.mark.slow
def test_converges_to_fixed_point_iteration_solution(problem, dtype):
    fn, z0, args = _PROBLEMS[problem](dtype)
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    anderson = optx.fixed_point(
        fn, lcp.AndersonAcceleration(rtol=tol, atol=tol), z0, args, max_steps=200
    )
    # The reference runs in float64 whatever the dtype under test (optimistix's own
    # FixedPointIteration cannot take a float32 state when x64 is enabled).
    fn64, z64, args64 = _PROBLEMS[problem](jnp.float64)
    fpi = optx.fixed_point(
        fn64, optx.FixedPointIteration(rtol=tol, atol=tol), z64, args64, max_steps=5000
    )
    assert anderson.result == optx.RESULTS.successful
    assert jax.tree.structure(anderson.value) == jax.tree.structure(z0)
    for a, z in zip(jax.tree.leaves(anderson.value), jax.tree.leaves(z0), strict=True):
        assert a.dtype == z.dtype and a.shape == z.shape
    # Both converged to tolerance on a contraction with rate 0.9: same fixed point up
    # to about tol / (1 - 0.9).
    assert_tree_close(anderson.value, fpi.value, rtol=30 * tol)
    residual = jax.tree.map(
        lambda a, b: a - b, fn(anderson.value, args), anderson.value
    )
    assert max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(residual)) < 10 * tol
    # Acceleration: far fewer function evaluations than plain iteration.
    assert int(anderson.stats["num_steps"]) < int(fpi.stats["num_steps"]) / 2


def test_history_one_is_damped_fixed_point_iteration():
    # With one history slot the mixing is trivial (α = 1), so each step is the damped
    # iteration y ← β fn(y) + (1 - β) y, i.e. optx.FixedPointIteration(damp=1 - β).
    fn, z0, args = _vector_problem(jnp.float64)
    solver = lcp.AndersonAcceleration(
        rtol=1e-14, atol=1e-14, history_length=1, mixing=0.7
    )
    kwargs = dict(max_steps=7, throw=False)
    got = optx.fixed_point(fn, solver, z0, args, **kwargs)
    fpi = optx.FixedPointIteration(rtol=1e-14, atol=1e-14, damp=0.3)
    expected = optx.fixed_point(fn, fpi, z0, args, **kwargs)
    assert_tree_close(got.value, expected.value, rtol=1e-13)


def test_affine_expansive_map():
    # y = A y + c with spectral radius 1.5: plain iteration diverges, but Anderson
    # with a long enough history is GMRES on (I - A) y = c and finds the fixed point.
    ka, kc = jax.random.split(jax.random.PRNGKey(3))
    a = np.asarray(jax.random.normal(ka, (N, N)))
    a = 1.5 * a / np.max(np.abs(np.linalg.eigvals(a)))
    c = np.asarray(jax.random.normal(kc, (N,)))
    fn = lambda y, _: jnp.asarray(a) @ y + jnp.asarray(c)
    solver = lcp.AndersonAcceleration(rtol=1e-9, atol=1e-9, history_length=N + 2)
    sol = optx.fixed_point(fn, solver, jnp.zeros(N), max_steps=4 * N)
    expected = np.linalg.solve(np.eye(N) - a, c)
    assert_tree_close(sol.value, jnp.asarray(expected), rtol=1e-7)
    fpi = optx.fixed_point(
        fn,
        optx.FixedPointIteration(rtol=1e-9, atol=1e-9),
        jnp.zeros(N),
        max_steps=4 * N,
        throw=False,
    )
    assert fpi.result != optx.RESULTS.successful


def test_vmap_matches_per_sample():
    fn, z0, (w, b) = _vector_problem(jnp.float64)
    bs = jnp.stack([b, -b, 3 * b, 0 * b])
    solver = lcp.AndersonAcceleration(rtol=1e-10, atol=1e-10)

    def solve(b):
        sol = optx.fixed_point(fn, solver, z0, (w, b), max_steps=200)
        return sol.value, sol.stats["num_steps"]

    values, steps = jax.jit(jax.vmap(solve))(bs)
    for i, bi in enumerate(bs):
        v, s = solve(bi)
        assert_tree_close(values[i], v, rtol=1e-12)
        assert int(steps[i]) == int(s)
    assert steps.shape == (len(bs),)


def test_failure_flags():
    # Not converged within max_steps.
    fn, z0, args = _vector_problem(jnp.float64)
    solver = lcp.AndersonAcceleration(rtol=1e-12, atol=1e-12)
    sol = optx.fixed_point(fn, solver, z0, args, max_steps=2, throw=False)
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    with pytest.raises(Exception, match="maximum number of steps"):
        optx.fixed_point(fn, solver, z0, args, max_steps=2)
    # y ↦ √y - 1 leaves its domain after one step: a NaN iterate is reported as
    # divergence at once rather than iterated on until max_steps.
    nan_map = lambda y, _: jnp.sqrt(y) - 1
    sol = optx.fixed_point(
        nan_map, solver, jnp.full(3, 0.5), max_steps=100, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert int(sol.stats["num_steps"]) < 100
    with pytest.raises(ValueError, match="history_length"):
        lcp.AndersonAcceleration(rtol=1e-6, atol=1e-6, history_length=0)
