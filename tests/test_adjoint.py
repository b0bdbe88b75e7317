"""`LeastControlAdjoint` against independent references.

References: `optx.ImplicitAdjoint` (weak-control limit, linear dynamics), and the
θ-gradient of the leaky objective min_φ ½‖f(φ,θ)‖²/β + ḡᵀφ computed by scipy's
minimiser and central finite differences (finite strength).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
import scipy.optimize

import lcp_solvers as lcp

from .helpers import (
    assert_tree_close,
    central_difference,
    contraction_weights,
    tree_rel_error,
)


TOL = 1e-11
N = 5

fixed_point_solvers = {
    "fixed_point_iteration": optx.FixedPointIteration(rtol=TOL, atol=TOL),
    "anderson": lcp.AndersonAcceleration(rtol=TOL, atol=TOL),
    # A root finder in `optx.fixed_point`: optimistix re-routes the problem through
    # `root_find` with the optimality condition rewritten as fn(y) - y.
    "newton": optx.Newton(rtol=TOL, atol=TOL),
    "chord": optx.Chord(rtol=TOL, atol=TOL),
}
root_solvers = {
    "newton": optx.Newton(rtol=TOL, atol=TOL),
    "chord": optx.Chord(rtol=TOL, atol=TOL),
}


def _params(seed=0, n=N):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = contraction_weights(k1, n, rho=0.7)
    b = 0.3 * jax.random.normal(k2, (n,))
    x = jax.random.normal(k3, (n,))
    return {"w": w, "b": b}, x


def _tanh_cell(y, args):
    params, x = args
    return jnp.tanh(params["w"] @ y + params["b"] + 0.5 * x)


def _loss_of_state(y):
    # A nonlinear loss, so that the cotangent depends on the equilibrium.
    return jnp.sum(jnp.sin(y) * jnp.arange(1.0, y.size + 1)) + 0.5 * jnp.sum(y**2)


def _fixed_point_loss(params, x, solver, adjoint):
    y0 = jnp.zeros(x.shape)
    sol = optx.fixed_point(_tanh_cell, solver, y0, (params, x), adjoint=adjoint)
    return _loss_of_state(sol.value)


def _root_loss(params, x, solver, adjoint):
    fn = lambda y, args: _tanh_cell(y, args) - y
    y0 = jnp.zeros(x.shape)
    sol = optx.root_find(fn, solver, y0, (params, x), adjoint=adjoint)
    return _loss_of_state(sol.value)


weak = lcp.LeastControlAdjoint(strength=1e-8)


@pytest.mark.parametrize("name", list(fixed_point_solvers))
@pytest.mark.slow
def test_weak_control_fixed_point(name):
    solver = fixed_point_solvers[name]
    params, x = _params()
    grad = jax.grad(_fixed_point_loss, argnums=(0, 1))
    expected = grad(params, x, solver, optx.ImplicitAdjoint())
    got = grad(params, x, solver, weak)
    assert_tree_close(got, expected, rtol=1e-4)


@pytest.mark.parametrize("name", list(root_solvers))
@pytest.mark.slow
def test_weak_control_root_find(name):
    solver = root_solvers[name]
    params, x = _params(1)
    grad = jax.grad(_root_loss, argnums=(0, 1))
    expected = grad(params, x, solver, optx.ImplicitAdjoint())
    got = grad(params, x, solver, weak)
    assert_tree_close(got, expected, rtol=1e-4)


@pytest.mark.parametrize("name", ["fixed_point_iteration", "newton"])
@pytest.mark.slow
def test_weak_control_pytree_state_and_closure(name):
    solver = fixed_point_solvers[name]
    params, x = _params(2)
    v = jnp.linspace(-1.0, 1.0, 3)

    def loss(params, x, v, adjoint):
        # The parameter `v` is closed over by `fn`, not passed through `args`; the
        # state is a dict of two arrays.
        def fn(y, args):
            p, xx = args
            a = jnp.tanh(p["w"] @ y["a"] + p["b"] + 0.1 * jnp.sum(y["c"]))
            c = 0.5 * jnp.tanh(v * y["c"] + jnp.sum(y["a"]) * 0.1 + xx[:3])
            return {"a": a, "c": c}

        y0 = {"a": jnp.zeros(N), "c": jnp.zeros(3)}
        sol = optx.fixed_point(fn, solver, y0, (params, x), adjoint=adjoint)
        return _loss_of_state(sol.value["a"]) + jnp.sum(jnp.cos(sol.value["c"]))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    expected = grad(params, x, v, optx.ImplicitAdjoint())
    got = grad(params, x, v, weak)
    assert_tree_close(got, expected, rtol=1e-4)
    assert float(jnp.max(jnp.abs(got[2]))) > 0  # the closed-over array is reached


@pytest.mark.parametrize("name", ["anderson", "newton"])
@pytest.mark.slow
def test_weak_control_vmap(name):
    solver = fixed_point_solvers[name]
    params, _ = _params(3)
    xs = jax.random.normal(jax.random.PRNGKey(4), (4, N))

    def batch_loss(params, xs, adjoint):
        # Shared parameters, per-sample inputs: the usual batched layer.
        per_sample = jax.vmap(lambda x: _fixed_point_loss(params, x, solver, adjoint))
        return jnp.mean(per_sample(xs))

    grad = jax.grad(batch_loss, argnums=(0, 1))
    expected = grad(params, xs, optx.ImplicitAdjoint())
    got = grad(params, xs, weak)
    assert_tree_close(got, expected, rtol=1e-4)


@pytest.mark.slow
def test_vmap_equals_per_sample_loop_at_finite_strength():
    # Under vmap every sample's controlled equilibrium is solved on its own (own
    # cotangent scale, own solver state), so the batched gradient is the sum of the
    # per-sample ones (computed one at a time here) to rounding: a sample's update
    # does not depend on the rest of the batch (the joint solve of all samples this
    # replaced agreed to 9e-13 only).
    solver = fixed_point_solvers["anderson"]
    params, _ = _params(5)
    xs = jax.random.normal(jax.random.PRNGKey(6), (3, N))
    adjoint = lcp.LeastControlAdjoint(strength=0.3)
    grad = eqx.filter_jit(jax.grad(_fixed_point_loss))
    batched = jax.grad(
        lambda p: jnp.sum(
            jax.vmap(lambda x: _fixed_point_loss(p, x, solver, adjoint))(xs)
        )
    )(params)
    looped = [grad(params, x, solver, adjoint) for x in xs]
    looped = jtu.tree_map(lambda *g: sum(g), *looped)
    assert_tree_close(batched, looped, rtol=1e-13)
    implicit = jax.grad(
        lambda p: jnp.sum(
            jax.vmap(lambda x: _fixed_point_loss(p, x, solver, optx.ImplicitAdjoint()))(
                xs
            )
        )
    )(params)
    # A finite strength really changes the update.
    assert tree_rel_error(batched, implicit) > 1e-3


@pytest.mark.slow
def test_nested_vmap_equals_per_sample_loop():
    # vmap of vmap: the inner vmap is handled by the adjoint's own batching rule, the
    # outer one vectorises that batched rule.
    solver = fixed_point_solvers["fixed_point_iteration"]
    params, _ = _params(19)
    xs = jax.random.normal(jax.random.PRNGKey(20), (2, 3, N))
    adjoint = lcp.LeastControlAdjoint(strength=0.3)

    def nested(p):
        per_sample = jax.vmap(
            jax.vmap(lambda x: _fixed_point_loss(p, x, solver, adjoint))
        )
        return jnp.sum(per_sample(xs))

    grad = eqx.filter_jit(jax.grad(_fixed_point_loss))
    looped = [grad(params, x, solver, adjoint) for x in xs.reshape(-1, N)]
    looped = jtu.tree_map(lambda *g: sum(g), *looped)
    assert_tree_close(jax.grad(nested)(params), looped, rtol=1e-13)


@pytest.mark.parametrize("strength", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("entry", ["fixed_point", "root_find"])
@pytest.mark.slow
def test_linear_dynamics_exact_at_any_strength(strength, entry):
    # f(y, θ) = M y + U θ - y: the Jacobians do not depend on y, so the controlled
    # equilibrium gives exactly the implicit gradient.
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    m = np.asarray(contraction_weights(k1, N, rho=0.8))
    u = np.asarray(jax.random.normal(k2, (N, 3)))
    theta = jnp.array([0.3, -1.0, 2.0])
    c = jnp.arange(1.0, N + 1)

    def loss(theta, adjoint):
        if entry == "fixed_point":
            sol = optx.fixed_point(
                lambda y, t: m @ y + u @ t,
                optx.FixedPointIteration(rtol=TOL, atol=TOL),
                jnp.zeros(N),
                theta,
                adjoint=adjoint,
            )
        else:
            sol = optx.root_find(
                lambda y, t: m @ y + u @ t - y,
                optx.Newton(rtol=TOL, atol=TOL),
                jnp.zeros(N),
                theta,
                adjoint=adjoint,
            )
        return jnp.sum(c * sol.value**2)

    expected = jax.grad(loss)(theta, optx.ImplicitAdjoint())
    got = jax.grad(loss)(theta, lcp.LeastControlAdjoint(strength=strength))
    assert_tree_close(got, expected, rtol=1e-9)


def _leaky_reference_gradient(fn, theta, y_star, cotangent, beta, eps=1e-5):
    """θ-gradient of V(θ) = min_φ ½‖fn(φ, θ) - φ‖²/β + ḡᵀφ, by scipy's minimiser
    (warm-started at the free equilibrium) and central finite differences."""
    cotangent = jnp.asarray(cotangent)

    def objective(phi, th):
        r = fn(phi, th) - phi
        return 0.5 * jnp.sum(r**2) / beta + jnp.dot(cotangent, phi)

    obj = jax.jit(objective)
    jac = jax.jit(jax.grad(objective))
    hess = jax.jit(jax.hessian(objective))

    def value(th):
        res = scipy.optimize.minimize(
            lambda p: float(obj(p, th)),
            np.asarray(y_star),
            jac=lambda p: np.asarray(jac(p, th)),
            hess=lambda p: np.asarray(hess(p, th)),
            method="trust-exact",
            options={"gtol": 1e-13},
        )
        assert res.success, res.message
        return res.fun

    return central_difference(value, theta, eps)


@pytest.mark.parametrize(
    "strength, solver_name",
    [
        (0.05, "default"),
        (0.5, "default"),
        (0.5, "fixed_point_iteration"),
        (0.5, "newton"),
    ],
)
@pytest.mark.slow
def test_finite_strength_matches_leaky_objective(strength, solver_name):
    k1, k2 = jax.random.split(jax.random.PRNGKey(8))
    w = contraction_weights(k1, 4, rho=0.6)
    theta = jnp.concatenate([0.5 * jax.random.normal(k2, (4,)), jnp.array([1.3])])
    c = jnp.array([1.0, -2.0, 0.5, 3.0])

    def fn(y, th):
        return jnp.tanh(th[4] * (w @ y) + th[:4])

    backward = {
        "default": None,
        "fixed_point_iteration": optx.FixedPointIteration(rtol=1e-12, atol=1e-12),
        "newton": optx.Newton(rtol=1e-12, atol=1e-12),
    }[solver_name]
    # (Newton: a root finder for the controlled system of a fixed-point problem.)
    adjoint = lcp.LeastControlAdjoint(strength=strength, solver=backward)

    def loss(theta):
        sol = optx.fixed_point(
            fn,
            optx.FixedPointIteration(rtol=TOL, atol=TOL),
            jnp.zeros(4),
            theta,
            adjoint=adjoint,
        )
        return jnp.dot(c, sol.value)  # cotangent ḡ = c

    got = jax.grad(loss)(theta)
    y_star = optx.fixed_point(
        fn, optx.Newton(rtol=TOL, atol=TOL), jnp.zeros(4), theta
    ).value
    beta = strength / float(jnp.sqrt(jnp.mean(c**2)))
    expected = _leaky_reference_gradient(fn, theta, y_star, c, beta)
    assert_tree_close(got, jnp.asarray(expected), rtol=1e-4)
    implicit = jax.grad(
        lambda t: jnp.dot(
            c,
            optx.fixed_point(
                fn, optx.Newton(rtol=TOL, atol=TOL), jnp.zeros(4), t
            ).value,
        )
    )(theta)
    assert tree_rel_error(got, implicit) > 1e-3  # finite strength is not implicit


@pytest.mark.parametrize("scale", [1e-4, 1e3])
def test_strength_is_invariant_to_loss_scale(scale):
    params, x = _params(9)
    solver = fixed_point_solvers["anderson"]
    adjoint = lcp.LeastControlAdjoint(strength=0.5)
    base = jax.grad(_fixed_point_loss)(params, x, solver, adjoint)
    scaled = jax.grad(lambda p, s: s * _fixed_point_loss(p, x, solver, adjoint))(
        params, scale
    )
    unscaled = jtu.tree_map(lambda g: g / scale, scaled)
    assert_tree_close(unscaled, base, rtol=1e-8)


@pytest.mark.slow
def test_tolerances_follow_forward_solver():
    params, x = _params(10)
    adjoint = lcp.LeastControlAdjoint(strength=1e-12)
    errors = {}
    for tol in (1e-4, 1e-12):
        solver = optx.FixedPointIteration(rtol=tol, atol=tol)
        reference = jax.grad(_fixed_point_loss)(
            params, x, optx.Newton(rtol=1e-13, atol=1e-13), optx.ImplicitAdjoint()
        )
        got = jax.grad(_fixed_point_loss)(params, x, solver, adjoint)
        errors[tol] = tree_rel_error(got, reference)
    assert errors[1e-12] < 1e-9
    assert errors[1e-4] > 10 * errors[1e-12]


@pytest.mark.slow
def test_no_gradient_to_y0_and_zero_cotangent():
    params, x = _params(12)
    solver = fixed_point_solvers["fixed_point_iteration"]
    adjoint = lcp.LeastControlAdjoint(strength=0.1)

    def loss(y0, params, scale):
        sol = optx.fixed_point(_tanh_cell, solver, y0, (params, x), adjoint=adjoint)
        return scale * _loss_of_state(sol.value)

    g_y0, g_params = jax.grad(loss, argnums=(0, 1))(jnp.ones(N), params, 1.0)
    assert jnp.all(g_y0 == 0)
    assert all(jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(g_params))
    zero = jax.grad(loss, argnums=1)(jnp.ones(N), params, 0.0)
    assert all(jnp.all(g == 0) for g in jtu.tree_leaves(zero))


@pytest.mark.slow
def test_float32():
    params, x = _params(13)
    params, x = jtu.tree_map(lambda a: a.astype(jnp.float32), (params, x))
    solver = lcp.AndersonAcceleration(rtol=1e-6, atol=1e-6)
    got = jax.grad(_fixed_point_loss)(
        params, x, solver, lcp.LeastControlAdjoint(strength=1e-4)
    )
    expected = jax.grad(_fixed_point_loss)(params, x, solver, optx.ImplicitAdjoint())
    assert all(g.dtype == jnp.float32 for g in jtu.tree_leaves(got))
    assert_tree_close(got, expected, rtol=2e-3)


@pytest.mark.slow
def test_jit():
    params, x = _params(14)
    solver = fixed_point_solvers["anderson"]
    grad = eqx.filter_jit(jax.grad(_fixed_point_loss))
    got = grad(params, x, solver, weak)
    expected = jax.grad(_fixed_point_loss)(params, x, solver, optx.ImplicitAdjoint())
    assert_tree_close(got, expected, rtol=1e-4)


def test_forward_mode_falls_back_to_implicit_jvp():
    params, x = _params(15)
    solver = fixed_point_solvers["fixed_point_iteration"]
    tangent = jtu.tree_map(jnp.ones_like, params)
    f = lambda adjoint: (
        lambda p: (
            _fixed_point_loss(p, x, solver, lcp.LeastControlAdjoint(0.5))
            if adjoint
            else _fixed_point_loss(p, x, solver, optx.ImplicitAdjoint())
        )
    )
    _, got = jax.jvp(f(True), (params,), (tangent,))
    _, expected = jax.jvp(f(False), (params,), (tangent,))
    assert abs(float(got - expected)) <= 1e-9 * abs(float(expected))


def test_second_order_forward_mode_is_a_clear_error():
    params, x = _params(16)
    solver = fixed_point_solvers["fixed_point_iteration"]
    adjoint = lcp.LeastControlAdjoint(strength=0.1)
    loss = lambda b: _fixed_point_loss({**params, "b": b}, x, solver, adjoint)
    with pytest.raises(NotImplementedError, match="ImplicitAdjoint"):
        jax.jacfwd(jax.jacfwd(loss))(params["b"])


# ---------------------------------------------------------------------------- errors


def test_nonfinite_cotangent_raises():
    params, x = _params(17)
    solver = fixed_point_solvers["fixed_point_iteration"]

    def loss(params):
        sol = optx.fixed_point(
            _tanh_cell, solver, jnp.zeros(N), (params, x), adjoint=weak
        )
        return jnp.sum(jnp.sqrt(sol.value - 10.0))  # NaN: sqrt of a negative number

    with pytest.raises(Exception, match="cotangent .* contains inf or NaN"):
        jax.grad(loss)(params)


def test_nonfinite_state_raises():
    # The forward solve fails (an expanding map) and, with throw=False, hands a
    # non-finite "equilibrium" to the backward pass.
    def loss(a):
        sol = optx.fixed_point(
            lambda y, a: 3.0 * y + a,
            optx.FixedPointIteration(rtol=1e-8, atol=1e-8),
            jnp.ones(2),
            a,
            adjoint=lcp.LeastControlAdjoint(),
            throw=False,
            max_steps=2000,
        )
        return jnp.sum(sol.value)

    with pytest.raises(
        Exception, match="least-control solve starts from contains inf or NaN"
    ):
        jax.grad(loss)(jnp.ones(2))


def test_controlled_solve_not_converging_raises_and_flags():
    params, x = _params(18)
    solver = fixed_point_solvers["fixed_point_iteration"]
    strict = lcp.LeastControlAdjoint(strength=0.5, max_steps=2)
    with pytest.raises(Exception, match="(?i)raise `max_steps`"):
        jax.grad(_fixed_point_loss)(params, x, solver, strict)
    # throw=False: the best estimate, finite, near the converged answer's direction.
    lenient = lcp.LeastControlAdjoint(strength=0.5, max_steps=2, throw=False)
    estimate = jax.grad(_fixed_point_loss)(params, x, solver, lenient)
    assert all(jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(estimate))


@pytest.mark.slow
def test_diverging_controlled_dynamics_raises():
    # Root problem whose map y ↦ y + f(y) expands: the forward Newton solve is fine,
    # but iterating the controlled system with a fixed-point solver diverges.
    def loss(a, adjoint):
        sol = optx.root_find(
            lambda y, a: 2.0 * y - a,
            optx.Newton(rtol=1e-10, atol=1e-10),
            jnp.zeros(3),
            a,
            adjoint=adjoint,
        )
        return jnp.sum(sol.value**2)

    bad = lcp.LeastControlAdjoint(
        strength=0.1, solver=optx.FixedPointIteration(rtol=1e-8, atol=1e-8)
    )
    with pytest.raises(Exception, match="controlled dynamics diverged|max_steps"):
        jax.grad(loss)(jnp.ones(3), bad)
    # The default solver for a root problem (Newton) handles it.
    got = jax.grad(loss)(jnp.ones(3), lcp.LeastControlAdjoint(strength=0.1))
    expected = jax.grad(loss)(jnp.ones(3), optx.ImplicitAdjoint())
    assert_tree_close(got, expected, rtol=1e-9)  # linear dynamics: exact


def test_rerouted_minimiser_is_rejected():
    def loss(a):
        sol = optx.root_find(
            lambda y, a: y - a,
            optx.BFGS(rtol=1e-8, atol=1e-8),
            jnp.zeros(2),
            a,
            adjoint=lcp.LeastControlAdjoint(),
        )
        return jnp.sum(sol.value)

    with pytest.raises(ValueError, match="minimiser or least-squares"):
        jax.grad(loss)(jnp.ones(2))


@pytest.mark.parametrize("strength", [0.0, -1.0])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        lcp.LeastControlAdjoint(strength=strength)


@pytest.mark.parametrize("max_steps", [0, -3, None, 2.5, True])
def test_bad_max_steps(max_steps):
    with pytest.raises(
        ValueError, match=r"\(max_steps=\.\.\.\)` must be a positive int"
    ):
        lcp.LeastControlAdjoint(max_steps=max_steps)
    with pytest.raises(
        ValueError, match=r"\(max_steps=\.\.\.\)` must be a positive int"
    ):
        lcp.custom_fixed_point(lambda p, x: 0.5 * p + x, max_steps=max_steps)


def test_bad_solver():
    with pytest.raises(ValueError, match="solver"):
        lcp.LeastControlAdjoint(solver=lx.LU())  # pyright: ignore
