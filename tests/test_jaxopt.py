"""`lcp.custom_fixed_point` / `lcp.custom_root` against jaxopt's own implicit
differentiation (dense LU, float64) and against an independent scipy computation of
the leaky least-control objective."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import optimistix as optx
import pytest
import scipy.optimize
from helpers import assert_tree_close, contraction_weights, tree_rel_error

import lcp_solvers as lcp


N = 4
TOL = 1e-12


def _problem():
    kw, kb, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    w = contraction_weights(kw, N, rho=0.6)
    b = jax.random.normal(kb, (N,))
    c = jax.random.normal(kc, (N,))
    return w, b, c


def _T(x, w, b):
    return jnp.tanh(w @ x + b)


def _F(x, w, b):
    return _T(x, w, b) - x


def _inner_objective(y, w, b):
    # Strongly convex (Hessian I + wᵀ diag(sech²) w): gradient descent finds the
    # unique root of its gradient.
    return 0.5 * jnp.sum(y**2) + jnp.sum(jnp.log(jnp.cosh(w @ y))) - b @ y


_grad_inner = jax.grad(_inner_objective)


# Each entry: (decorator applied to the jaxopt solver without implicit diff, the
# same jaxopt solver with its own implicit diff by dense LU).
def _solvers(name):
    lu = dict(implicit_diff_solve=jaxopt.linear_solve.solve_lu)
    if name == "fixed_point_iteration":
        make = lambda i, **kw: jaxopt.FixedPointIteration(
            fixed_point_fun=_T, tol=TOL, maxiter=2000, implicit_diff=i, **kw
        )
        deco = lcp.custom_fixed_point
        fn = _T
    elif name == "anderson":
        make = lambda i, **kw: jaxopt.AndersonAcceleration(
            fixed_point_fun=_T, tol=TOL, maxiter=500, implicit_diff=i, **kw
        )
        deco = lcp.custom_fixed_point
        fn = _T
    elif name == "broyden":
        make = lambda i, **kw: jaxopt.Broyden(
            fun=_F, tol=TOL, maxiter=500, implicit_diff=i, **kw
        )
        deco = lcp.custom_root
        fn = _F
    elif name == "gradient_descent":
        make = lambda i, **kw: jaxopt.GradientDescent(
            fun=_inner_objective,
            stepsize=0.5,
            acceleration=False,
            tol=TOL,
            maxiter=2000,
            implicit_diff=i,
            **kw,
        )
        deco = lcp.custom_root
        fn = _grad_inner
    else:
        raise AssertionError(name)
    return make, deco, fn, lu


def _loss(solve, w, b):
    # `b` goes in as a keyword argument: gradients must reach both routes.
    x = solve(jnp.zeros(N), w, b=b).params
    return jnp.sum(jnp.sin(3 * x)) + jnp.sum(x**2)


_SOLVERS = ["fixed_point_iteration", "anderson", "broyden", "gradient_descent"]


@pytest.mark.parametrize("name", _SOLVERS)
@pytest.mark.slow
def test_small_strength_matches_jaxopt_implicit_diff(name):
    w, b, _ = _problem()
    make, deco, fn, lu = _solvers(name)
    solve = deco(fn, has_aux=True, strength=1e-6)(make(False).run)
    grad = jax.jit(jax.grad(lambda w, b: _loss(solve, w, b), argnums=(0, 1)))
    expected = jax.grad(lambda w, b: _loss(make(True, **lu).run, w, b), (0, 1))(w, b)
    got = grad(w, b)
    assert_tree_close(got, expected, rtol=1e-4)


@pytest.mark.parametrize("form", ["fixed_point", "root"])
@pytest.mark.slow
def test_linear_dynamics_exact_at_any_strength(form):
    # f(x, θ) = (A - I) x + B θ is linear in (x, θ) jointly: the controlled state moves
    # but ∂θ f does not, so every strength gives the implicit gradient.
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = contraction_weights(ka, N, rho=0.5)
    bmat = jax.random.normal(kb, (N, 2))
    theta = jnp.array([0.3, -1.2])

    def T(x, theta):
        return a @ x + bmat @ theta

    def F(x, theta):
        return T(x, theta) - x

    if form == "fixed_point":
        solver = jaxopt.AndersonAcceleration(
            fixed_point_fun=T, tol=TOL, maxiter=500, implicit_diff=False
        )
        solve = lcp.custom_fixed_point(T, has_aux=True, strength=10.0)(solver.run)
    else:
        solver = jaxopt.Broyden(fun=F, tol=TOL, maxiter=500, implicit_diff=False)
        solve = lcp.custom_root(F, has_aux=True, strength=10.0)(solver.run)
    loss = lambda theta: jnp.sum(jnp.cos(solve(jnp.zeros(N), theta).params))
    got = jax.grad(loss)(theta)
    # The implicit gradient in closed form: θ̄ = Bᵀ (I - A)⁻ᵀ ḡ.
    x = np.linalg.solve(np.eye(N) - np.asarray(a), np.asarray(bmat @ theta))
    closed = np.asarray(bmat).T @ np.linalg.solve(
        (np.eye(N) - np.asarray(a)).T, -np.sin(x)
    )
    assert_tree_close(got, jnp.asarray(closed), rtol=1e-9)


def _leaky_min_value(w, b, g, beta):
    """min_x ½‖tanh(w x + b) - x‖² + β gᵀx, in numpy/scipy only."""

    def value_and_grad(x):
        t = np.tanh(w @ x + b)
        r = t - x
        jac = (1 - t**2)[:, None] * w - np.eye(len(x))
        return 0.5 * r @ r + beta * g @ x, jac.T @ r + beta * g

    x0 = np.tanh(b)
    res = scipy.optimize.minimize(
        value_and_grad, x0, jac=True, method="BFGS", options=dict(gtol=1e-13)
    )
    # Polish with Newton steps on the gradient (BFGS stalls a few digits short).
    x = res.x
    for _ in range(5):
        eps = 1e-7
        _, grad = value_and_grad(x)
        hess = np.stack(
            [
                (value_and_grad(x + eps * e)[1] - value_and_grad(x - eps * e)[1])
                / (2 * eps)
                for e in np.eye(len(x))
            ],
            axis=1,
        )
        x = x - np.linalg.solve(0.5 * (hess + hess.T), grad)
    return value_and_grad(x)[0]


@pytest.mark.parametrize("deco", ["custom_fixed_point", "custom_root"])
@pytest.mark.slow
def test_finite_strength_matches_leaky_objective(deco):
    w, b, c = _problem()
    strength = 0.5
    if deco == "custom_fixed_point":
        solver = jaxopt.AndersonAcceleration(
            fixed_point_fun=_T, tol=TOL, maxiter=500, implicit_diff=False
        )
        solve = lcp.custom_fixed_point(_T, has_aux=True, strength=strength)(solver.run)
    else:
        solver = jaxopt.Broyden(fun=_F, tol=TOL, maxiter=500, implicit_diff=False)
        solve = lcp.custom_root(_F, has_aux=True, strength=strength)(solver.run)
    # A linear loss cᵀx: the cotangent is c whatever the state, so the leaky objective
    # ½‖f‖² + β cᵀx with β = strength / rms(c) is a fixed function of θ = (w, b).
    loss = lambda w, b: c @ solve(jnp.zeros(N), w, b=b).params
    got = jax.grad(loss, argnums=(0, 1))(w, b)

    beta = strength / float(jnp.sqrt(jnp.mean(c**2)))
    wn, bn, cn = (np.asarray(v) for v in (w, b, c))
    theta = np.concatenate([wn.ravel(), bn])

    def objective(t):
        return _leaky_min_value(t[: N * N].reshape(N, N), t[N * N :], cn, beta)

    eps = 1e-5
    fd = np.array(
        [
            (objective(theta + eps * e) - objective(theta - eps * e)) / (2 * eps)
            for e in np.eye(theta.size)
        ]
    )
    expected = (fd[: N * N].reshape(N, N) / beta, fd[N * N :] / beta)
    assert_tree_close(got, expected, rtol=1e-5)
    # ...and this strength is far enough from the implicit gradient to tell them apart.
    implicit = jaxopt.AndersonAcceleration(
        fixed_point_fun=_T,
        tol=TOL,
        maxiter=500,
        implicit_diff_solve=jaxopt.linear_solve.solve_lu,
    )
    ift = jax.grad(
        lambda w, b: c @ implicit.run(jnp.zeros(N), w, b=b).params, argnums=(0, 1)
    )(w, b)
    assert tree_rel_error(got, ift) > 1e-3


@pytest.mark.slow
def test_closed_over_parameters_get_gradients():
    # jaxopt's own decorators raise for parameters closed over by `fixed_point_fun`;
    # ours hoist them and give them the least-control gradient.
    w, b, _ = _problem()

    def loss_closure(w, b):
        T = lambda x: _T(x, w, b)
        solver = jaxopt.AndersonAcceleration(
            fixed_point_fun=T, tol=TOL, maxiter=500, implicit_diff=False
        )
        # A plain function returning only the solution: `has_aux=False`.
        run = lambda x0: solver.run(x0).params
        solve = lcp.custom_fixed_point(T, strength=1e-6)(run)
        return jnp.sum(jnp.sin(3 * solve(jnp.zeros(N))))

    def loss_args(w, b):
        solver = jaxopt.AndersonAcceleration(
            fixed_point_fun=_T,
            tol=TOL,
            maxiter=500,
            implicit_diff_solve=jaxopt.linear_solve.solve_lu,
        )
        return jnp.sum(jnp.sin(3 * solver.run(jnp.zeros(N), w, b).params))

    expected = jax.grad(loss_args, argnums=(0, 1))(w, b)
    got = jax.jit(jax.grad(loss_closure, argnums=(0, 1)))(w, b)
    assert_tree_close(got, expected, 1e-4)


@pytest.mark.slow
def test_vmap_jit_init_params_and_pytrees():
    # Pytree state and parameters; per-sample `b` with shared `w` under vmap.
    w, b, _ = _problem()

    def T(x, params, b):
        u, v = x
        return jnp.tanh(params["w"] @ v + b), 0.5 * jnp.tanh(u)

    def fpi(x0, params, b):
        return jaxopt.FixedPointIteration(
            fixed_point_fun=T, tol=TOL, maxiter=2000, implicit_diff=False
        ).run(x0, params, b)

    solve = lcp.custom_fixed_point(T, has_aux=True, strength=1e-6)(fpi)
    params = {"w": w}

    def loss(params, b, x0):
        u, v = solve(x0, params, b).params
        return jnp.sum(u**2) + jnp.sum(jnp.sin(v))

    bs = jnp.stack([b, -0.5 * b, 2 * b])
    x0 = (jnp.zeros(N), jnp.ones(N))
    batched = jax.jit(
        jax.grad(lambda p, bs: jnp.sum(jax.vmap(lambda bb: loss(p, bb, x0))(bs)))
    )(params, bs)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    per_sample = [grad(params, bb, x0) for bb in bs]
    summed = jax.tree.map(lambda *g: sum(g), *[g[0] for g in per_sample])
    # Under vmap all samples' controlled equilibria are solved as one system, to the
    # default tolerance 1e-8 (not sample by sample, as `per_sample` is).
    assert_tree_close(batched, summed, rtol=1e-7)
    # init_params: no gradient, as in jaxopt.
    assert all(
        float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(per_sample[0][2])
    )

    # Independent reference for one sample: optimistix's implicit adjoint (jaxopt's
    # dense LU solve does not take pytrees).
    def ref_loss(params, b):
        u, v = optx.fixed_point(
            lambda x, a: T(x, *a),
            optx.FixedPointIteration(rtol=TOL, atol=TOL),
            x0,
            (params, b),
            max_steps=2000,
            adjoint=optx.ImplicitAdjoint(),
        ).value
        return jnp.sum(u**2) + jnp.sum(jnp.sin(v))

    expected = jax.grad(ref_loss, argnums=(0, 1))(params, bs[0])
    assert_tree_close(per_sample[0][:2], expected, rtol=1e-4)


@pytest.mark.slow
def test_defaults_float32():
    # Every option at its default, jaxopt's included (tol 1e-5), in float32: the
    # one-line swap of the issue, `custom_fixed_point(T, has_aux=True)(aa.run)`.
    w, b, _ = _problem()
    w32, b32 = w.astype(jnp.float32), b.astype(jnp.float32)
    aa = jaxopt.AndersonAcceleration(fixed_point_fun=_T, implicit_diff=False)
    solve = lcp.custom_fixed_point(_T, has_aux=True)(aa.run)
    got = jax.grad(lambda w, b: _loss(solve, w, b), argnums=(0, 1))(w32, b32)
    assert all(g.dtype == jnp.float32 for g in got)
    make, _, _, lu = _solvers("anderson")
    expected = jax.grad(lambda w, b: _loss(make(True, **lu).run, w, b), (0, 1))(w, b)
    # The default strength 1e-3 moves the update by about 0.1% from the implicit
    # gradient; float32 and the sqrt(eps) tolerances add less.
    assert_tree_close(got, expected, rtol=1e-2)


def test_errors():
    w, b, _ = _problem()
    solver = jaxopt.AndersonAcceleration(fixed_point_fun=_T, implicit_diff=False)
    # An `OptStep` without `has_aux=True`.
    with pytest.raises(ValueError, match="has_aux=True"):
        lcp.custom_fixed_point(_T)(solver.run)(jnp.zeros(N), w, b)
    with pytest.raises(ValueError, match="callable"):
        lcp.custom_fixed_point(_T)(None)  # pyright: ignore
    with pytest.raises(ValueError, match="optimality_fun"):
        lcp.custom_root(None)  # pyright: ignore
    with pytest.raises(ValueError, match="strength"):
        lcp.custom_root(_F, strength=0.0)
    # `init_params` missing, by position or keyword.
    solve = lcp.custom_fixed_point(_T, has_aux=True)(solver.run)
    with pytest.raises(TypeError, match="init_params"):
        solve()


def test_forward_mode_is_implicit():
    # The update is not linear in the cotangent, so forward mode is the implicit JVP
    # (as `LeastControlAdjoint`'s), checked against optimistix's implicit adjoint
    # (jaxopt's own decorators are reverse-mode only).
    w, b, _ = _problem()
    tangent = jnp.cos(jnp.arange(w.size, dtype=w.dtype)).reshape(w.shape)
    make, _, _, _ = _solvers("anderson")
    solve = lcp.custom_fixed_point(_T, has_aux=True)(make(False).run)
    _, got = jax.jvp(lambda w: solve(jnp.zeros(N), w, b).params, (w,), (tangent,))
    _, expected = jax.jvp(
        lambda w: optx.fixed_point(
            lambda x, a: _T(x, *a), optx.FixedPointIteration(rtol=TOL, atol=TOL),
            jnp.zeros(N), (w, b), max_steps=2000, adjoint=optx.ImplicitAdjoint(),
        ).value,
        (w,),
        (tangent,),
    )  # fmt: skip
    assert_tree_close(got, expected, rtol=1e-8)


def test_import_without_jaxopt():
    # jaxopt is an optional extra: the package (decorators included) must not need it.
    code = (
        "import sys; sys.modules['jaxopt'] = None; import lcp_solvers as lcp; "
        "lcp.custom_fixed_point(lambda x: x)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
