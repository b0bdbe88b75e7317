"""`lcp.least_control_grad`: Theorem 1 against scipy, IMEX with a non-quadratic loss,
the meta-learning instance against optimistix's implicit gradient, and the error
paths. Every controller with every inner solver against independent references is in
`test_reference.py`."""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
import scipy.optimize
from helpers import (
    assert_tree_close,
    central_difference,
    contraction_weights,
    tree_rel_error,
)

import lcp_solvers as lcp


N, M = 5, 2  # units, outputs (the last M units)


def _f(phi, theta, args):
    return -phi + theta["W"] @ jnp.tanh(phi) + theta["b"] + args["x"]


def _loss(phi, args):
    return 0.5 * jnp.sum((phi[-M:] - args["y"]) ** 2)


def _problem(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    theta = {
        "W": contraction_weights(k1, N, rho=0.6),
        "b": 0.3 * jax.random.normal(k2, (N,)),
    }
    args = {
        "x": 0.5 * jax.random.normal(k3, (N,)),
        "y": jnp.array([0.4, -0.3]),
    }
    return theta, args


_theta0, _args0 = _problem()
_flat0, _unravel = jfu.ravel_pytree(_theta0)


def _h_objective(z, theta_flat, alpha, args):
    """alpha = 0: ½‖f‖² over the hidden units with the outputs pinned at the loss
    minimum (∇L = 0); alpha > 0: ½‖f‖² + L/alpha over all units."""
    theta = _unravel(theta_flat)
    if z.shape[0] == N - M:
        phi = jnp.concatenate([z, args["y"]])
        return 0.5 * jnp.sum(_f(phi, theta, args) ** 2)
    return 0.5 * jnp.sum(_f(z, theta, args) ** 2) + _loss(z, args) / alpha


_h_obj = jax.jit(_h_objective)
_h_grad = jax.jit(jax.grad(_h_objective))
_h_hess = jax.jit(jax.hessian(_h_objective))


def _h_reference(theta_flat, alpha, args=_args0):
    """H(θ) solved independently with scipy (trust-region Newton)."""
    x0 = np.zeros(N - M if alpha == 0 else N)
    extra = (jnp.asarray(theta_flat), alpha, args)
    res = scipy.optimize.minimize(
        lambda z: float(_h_obj(z, *extra)),
        x0,
        jac=lambda z: np.asarray(_h_grad(z, *extra)),
        hess=lambda z: np.asarray(_h_hess(z, *extra)),
        method="trust-exact",
        options={"gtol": 1e-13},
    )
    return res.fun


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.1, 1.0])
@pytest.mark.slow
def test_theorem1_against_scipy(alpha):
    grad, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0,
        controller=lcp.DynamicInversion(alpha=jnp.asarray(alpha)),
    )  # fmt: skip
    assert info.result == lcp.RESULTS.successful
    ref = central_difference(lambda t: _h_reference(t, alpha), _flat0, eps=1e-5)
    # Measured 7.0e-11 (the central differences' own error).
    assert_tree_close(jfu.ravel_pytree(grad)[0], jnp.asarray(ref), 1e-9)
    # H itself: the control at the optimum is the objective's value.
    h = _h_reference(_flat0, alpha)
    expected = h if alpha == 0 else h - float(info.loss_controlled) / alpha
    # Measured 2.8e-17: rounding; allow a few ulps.
    assert abs(float(info.control) - expected) <= 1e-15 * max(1.0, abs(expected))
    if alpha == 0:
        assert float(info.loss_controlled) < 1e-16
        # u lives on the outputs only.
        assert jnp.all(info.u[: N - M] == 0)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.slow
def test_objective_value_and_derivative(alpha):
    """`least_control_objective`: its value is H (alpha = 0) or min ½‖f‖² + L/α,
    solved independently with scipy, and `jax.grad` of it is the finite-difference
    gradient of that value."""
    controller = lcp.DynamicInversion(alpha=alpha)

    def objective(theta):
        return lcp.least_control_objective(
            _f, _loss, theta, jnp.zeros(N), _args0, controller=controller
        )

    (value, info), grad = jax.value_and_grad(objective, has_aux=True)(_theta0)
    assert info.result == lcp.RESULTS.successful
    expected = _h_reference(_flat0, alpha)
    # Measured 2.8e-17 (rounding) and 4.9e-11 (the central differences' error).
    assert abs(float(value) - expected) <= 1e-15 * max(1.0, abs(expected))
    ref = central_difference(lambda t: _h_reference(t, alpha), _flat0, eps=1e-5)
    assert_tree_close(jfu.ravel_pytree(grad)[0], jnp.asarray(ref), 1e-9)


@pytest.mark.slow
def test_objective_batch_and_errors():
    xs = 0.5 * jax.random.normal(jax.random.key(3), (6, N))

    def batch_objective(theta):
        def one(x):
            args = dict(_args0, x=x)
            return lcp.least_control_objective(
                _f, _loss, theta, jnp.zeros(N), args, solver=lcp.IMEX()
            )[0]

        return jnp.mean(jax.vmap(one)(xs))

    grad = jax.jit(jax.grad(batch_objective))(_theta0)
    grads, _ = jax.vmap(
        lambda x: lcp.least_control_grad(
            _f, _loss, _theta0, jnp.zeros(N), dict(_args0, x=x), solver=lcp.IMEX()
        )
    )(xs)
    assert_tree_close(grad, jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), 1e-10)
    with pytest.raises(ValueError, match=r"differentiable in `theta` only"):
        jax.grad(
            lambda a: lcp.least_control_objective(_f, _loss, _theta0, jnp.zeros(N), a)[
                0
            ]
        )(_args0)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.slow
def test_free_equilibrium_already_optimal(alpha):
    sol = optx.root_find(
        lambda p, _: _f(p, _theta0, _args0), optx.Newton(1e-12, 1e-12), jnp.zeros(N)
    )
    args = dict(_args0, y=sol.value[-M:])
    grad, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), args,
        controller=lcp.DynamicInversion(alpha=jnp.asarray(alpha)),
    )  # fmt: skip
    assert float(info.control) < 1e-20
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) < 1e-10


def test_descent_drives_control_and_loss_to_zero():
    theta = _theta0
    step = jax.jit(
        lambda th: lcp.least_control_grad(
            _f,
            _loss,
            th,
            jnp.zeros(N),
            _args0,
            controller=lcp.DynamicInversion(alpha=0.0),
        )
    )
    _, info0 = step(theta)
    for _ in range(300):
        grad, info = step(theta)
        theta = jax.tree.map(lambda t, g: t - 0.5 * g, theta, grad)
    _, info = step(theta)
    assert float(info0.control) > 1e-2
    assert float(info.control) < 1e-6 * float(info0.control)
    assert float(info.loss_free) < 1e-6 * float(info0.loss_free)


@pytest.mark.slow
def test_vmap_and_jit():
    xs = 0.5 * jax.random.normal(jax.random.key(3), (3, N))

    def one(x):
        return lcp.least_control_grad(
            _f, _loss, _theta0, jnp.zeros(N), dict(_args0, x=x)
        )

    grads, infos = jax.jit(jax.vmap(one))(xs)
    assert infos.phi.shape == (3, N)
    for i in range(3):
        g, _ = one(xs[i])
        assert_tree_close(jax.tree.map(lambda a, i=i: a[i], grads), g, 1e-10)


@pytest.mark.slow
def test_feedback_hook():
    def exact(phi, theta, args, psi):
        # (∂φ f)ᵀψ for f = -φ + W tanh(φ) + ..., written out by hand.
        return -psi + (1 - jnp.tanh(phi) ** 2) * (theta["W"].T @ psi)

    ref, _ = lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0)
    grad, _ = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0,
        controller=lcp.DynamicInversion(alpha=0.1, feedback=exact),
    )  # fmt: skip
    assert_tree_close(grad, ref, 1e-10)
    # Feedback weights S ≠ Wᵀ (Kolen–Pollack before alignment) change the update.
    s = contraction_weights(jax.random.key(7), N)

    def kp(phi, theta, args, psi):
        return -psi + (1 - jnp.tanh(phi) ** 2) * (s @ psi)

    grad_kp, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0,
        controller=lcp.DynamicInversion(alpha=0.1, feedback=kp),
    )  # fmt: skip
    assert info.result == lcp.RESULTS.successful
    assert tree_rel_error(grad_kp, ref) > 1e-2
    # Its steady state satisfies the KP adjoint equation, not the autodiff one.
    resid = kp(info.phi, _theta0, _args0, info.psi) + info.u
    assert float(jnp.max(jnp.abs(resid))) < 1e-8


def _cross_entropy(phi, args):
    return -jax.nn.log_softmax(phi[-M:])[1] + 0.1 * jnp.sum(phi[-M:] ** 4)


def _leaky_objective(z, alpha):
    return (
        0.5 * jnp.sum(_f(z, _theta0, _args0) ** 2) + _cross_entropy(z, _args0) / alpha
    )


_leaky_obj = jax.jit(_leaky_objective)
_leaky_grad = jax.jit(jax.grad(_leaky_objective))
_leaky_hess = jax.jit(jax.hessian(_leaky_objective))


def _cross_entropy_reference(alpha):
    """-(∂θ f)ᵀψ⋆ = (∂θ f)ᵀ f at scipy's minimiser of ½‖f‖² + L/α (the envelope
    theorem), solved without lcp_solvers."""
    res = scipy.optimize.minimize(
        lambda z: float(_leaky_obj(z, alpha)),
        np.zeros(N),
        jac=lambda z: np.asarray(_leaky_grad(z, alpha)),
        hess=lambda z: np.asarray(_leaky_hess(z, alpha)),
        method="trust-exact",
        options={"gtol": 1e-13},
    )
    phi = jnp.asarray(res.x)
    for _ in range(2):  # Newton polish: trust-exact stops at |grad| ~ 1e-13
        phi = phi - jnp.linalg.solve(_leaky_hess(phi, alpha), _leaky_grad(phi, alpha))
    _, vjp = jax.vjp(lambda t: _f(phi, t, _args0), _theta0)
    return vjp(_f(phi, _theta0, _args0))[0]


@pytest.mark.parametrize("cg_steps", [1, 2])
@pytest.mark.parametrize(
    "controller",
    [
        lcp.DynamicInversion(alpha=0.05),
        lcp.DynamicInversion(alpha=0.05, proportional=True),
        lcp.EnergyBased(beta=20.0),
    ],
    ids=["DI", "DI-proportional", "EBD"],
)
@pytest.mark.slow
def test_imex_nonquadratic_loss(controller, cg_steps):
    """With a loss whose Hessian varies, one truncated-CG step per iteration is only
    an approximate Newton step on the implicit loss term, but the fixed point (the
    update) is still exact: scipy's minimiser of ½‖f‖² + L/α gives it."""
    grad, info = lcp.least_control_grad(
        _f, _cross_entropy, _theta0, jnp.zeros(N), _args0, controller=controller,
        solver=lcp.IMEX(cg_steps=cg_steps), rtol=1e-11, atol=1e-11, max_steps=1024,
    )  # fmt: skip
    assert info.result == lcp.RESULTS.successful
    assert (
        tree_rel_error(grad, _cross_entropy_reference(0.05)) <= 1e-10
    )  # measured 6.7e-12


def test_imex_feedback_hook_and_unsupported():
    s = contraction_weights(jax.random.key(7), N)

    def kp(phi, theta, args, psi):
        return -psi + (1 - jnp.tanh(phi) ** 2) * (s @ psi)

    controller = lcp.DynamicInversion(alpha=0.1, feedback=kp)
    ref, _ = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, controller=controller
    )
    grad, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, controller=controller,
        solver=lcp.IMEX(),
    )  # fmt: skip
    assert info.result == lcp.RESULTS.successful
    assert_tree_close(grad, ref, 1e-7)
    lf = lcp.LinearFeedback(jnp.zeros((N, M)), 0.1, lambda p: p[-M:])
    with pytest.raises(
        ValueError, match=r"`lcp.IMEX` does not support the controller "
    ):
        lcp.least_control_grad(
            _f, _loss, _theta0, jnp.zeros(N), _args0, controller=lf, solver=lcp.IMEX()
        )


def test_imex_divergence():
    # The Euler map φ + h·f(φ) contracts at step 1 but not at step 3, where the
    # iteration blows up: the error names the solver and says to lower its step.
    kwargs = dict(controller=lcp.EnergyBased(beta=10.0), solver=lcp.IMEX(3.0))
    with pytest.raises(
        Exception, match=r"diverged under the solver IMEX\(step_size=3.0\).*lower "
    ):
        lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.control_divergence
    assert info.free_result == lcp.RESULTS.free_equilibrium_failed


@pytest.mark.slow
def test_readout():
    def h(phi, theta, args):
        return theta["V"] @ jnp.tanh(phi) + theta["c"]

    def loss(state, args):
        return 0.5 * jnp.sum((state[1] - args["y"]) ** 2)

    theta = dict(_theta0, V=0.5 * jnp.ones((M, N)), c=jnp.zeros(M))
    f_aug = lcp.with_readout(_f, h)
    phi0 = (jnp.zeros(N), jnp.zeros(M))
    grad, info = lcp.least_control_grad(
        f_aug, loss, theta, phi0, _args0,
        controller=lcp.DynamicInversion(alpha=jnp.asarray(0.1)),
    )  # fmt: skip
    phi, y = info.phi
    # The readout's control equals its output controller, so its parameters get
    # the local update -(∂θ h)ᵀ u.
    assert_tree_close(info.psi[1], info.u[1], 1e-8)
    _, vjp = jax.vjp(
        lambda V, c: h(phi, dict(theta, V=V, c=c), _args0), *[theta["V"], theta["c"]]
    )
    gV, gc = vjp(-info.u[1])
    assert_tree_close(grad["V"], gV, 1e-8)
    assert_tree_close(grad["c"], gc, 1e-8)
    # Weak control recovers the implicit gradient of the readout loss (optimistix).
    alpha = jnp.asarray(1e6)

    def implicit(theta):
        sol = optx.root_find(
            lambda s, th: f_aug(s, th, _args0), optx.Newton(1e-12, 1e-12), phi0,
            theta, adjoint=optx.ImplicitAdjoint(),
        )  # fmt: skip
        return loss(sol.value, _args0)

    ref = jax.grad(implicit)(theta)
    grad_w, _ = lcp.least_control_grad(
        f_aug, loss, theta, phi0, _args0, controller=lcp.DynamicInversion(alpha=alpha)
    )
    assert_tree_close(jax.tree.map(lambda g: alpha * g, grad_w), ref, 1e-4)


def _meta_problem():
    """f = -∇L_learn(φ) - λ(φ - ω), L = L_eval (the meta-learning instance)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(11), 4)
    a = jax.random.normal(k1, (6, N))
    b = jax.random.normal(k2, (6,))
    c = jax.random.normal(k3, (6, N))
    d = jax.random.normal(k4, (6,))
    lam = 2.0

    def l_learn(phi):
        return 0.5 * jnp.sum((a @ jnp.tanh(phi) - b) ** 2) / 6

    def l_eval(phi, args):
        return 0.5 * jnp.sum((c @ phi - d) ** 2) / 6

    def f(phi, omega, args):
        return -jax.grad(l_learn)(phi) - lam * (phi - omega)

    return f, l_eval, lam, 0.1 * jnp.ones(N)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.slow
def test_meta_learning_local_updates(alpha):
    """Δω = λu* for LF with Q = I (Theorem 2 holds: every unit is an output) and
    -λψ* for DI; at perfect control the two agree."""
    f, l_eval, lam, omega = _meta_problem()
    alpha = jnp.asarray(alpha)
    grad_lf, info_lf = lcp.least_control_grad(
        f, l_eval, omega, jnp.zeros(N),
        controller=lcp.LinearFeedback(jnp.eye(N), alpha=alpha),
    )  # fmt: skip
    assert_tree_close(-grad_lf, lam * info_lf.u, 1e-10)
    grad_di, info_di = lcp.least_control_grad(
        f, l_eval, omega, jnp.zeros(N), controller=lcp.DynamicInversion(alpha)
    )
    assert_tree_close(grad_di, -lam * info_di.psi, 1e-10)
    if float(alpha) == 0:
        assert_tree_close(grad_lf, grad_di, 1e-8)


@pytest.mark.slow
def test_meta_learning_imaml():
    """At weak control the meta-update is the iMAML meta-gradient (optimistix)."""
    f, l_eval, _, omega = _meta_problem()

    def imaml(omega):
        sol = optx.root_find(
            lambda p, w: f(p, w, None), optx.Newton(1e-12, 1e-12), jnp.zeros(N),
            omega, adjoint=optx.ImplicitAdjoint(),
        )  # fmt: skip
        return l_eval(sol.value, None)

    ref = jax.grad(imaml)(omega)
    alpha = jnp.asarray(1e6)
    grad, _ = lcp.least_control_grad(
        f, l_eval, omega, jnp.zeros(N), controller=lcp.DynamicInversion(alpha)
    )
    assert_tree_close(alpha * grad, ref, 1e-4)


@pytest.mark.slow
def test_error_divergence():
    solver = lcp.DiscreteTime(step_size=0.5)
    kwargs = dict(controller=lcp.EnergyBased(beta=100.0), solver=solver)
    with pytest.raises(Exception, match=r"EnergyBased diverged under the solver "):
        lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.control_divergence
    # Unstable free dynamics: every controller diverges with them, and the message
    # says that this may be why.
    unstable = lambda p, t, a: p - 1.0
    with pytest.raises(Exception, match=r"or the free dynamics f are unstable"):
        lcp.least_control_grad(unstable, _loss, None, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        unstable, _loss, None, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.control_divergence
    assert info.free_result == lcp.RESULTS.free_equilibrium_failed


def test_error_max_steps():
    kwargs = dict(solver=lcp.DiscreteTime(step_size=0.5), max_steps=100)
    with pytest.raises(Exception, match=r"was not reached within `max_steps`"):
        lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.control_max_steps_reached


# f(φ) = -φ² - θ has no root for θ > 0, but with DI (alpha = 0.1) and
# L = ½(φ - 1)² the controlled equilibrium exists: ψ = φ² + θ, 2φψ = -(φ - 1)/α.
def _no_root(phi, theta, args):
    return -(phi**2) - theta


def _half_square(phi, args):
    return 0.5 * (phi - 1.0) ** 2


def test_update_without_free_equilibrium():
    theta = jnp.array(1.0)
    kwargs = dict(controller=lcp.DynamicInversion(alpha=0.1), rtol=1e-12, atol=1e-12)
    grad, info = lcp.least_control_grad(
        _no_root, _half_square, theta, jnp.zeros(()), throw=False, **kwargs
    )
    # The real root of 2φ(φ² + 1) + 10(φ - 1) = 0, and -(∂θ f)ᵀψ = ψ = φ² + 1.
    roots = np.roots([2.0, 0.0, 12.0, -10.0])
    phi = float(roots[np.abs(roots.imag) < 1e-12].real[0])
    assert info.result == lcp.RESULTS.successful
    assert info.free_result == lcp.RESULTS.free_equilibrium_failed
    assert abs(float(info.phi) - phi) < 1e-11  # measured 3.6e-12
    assert abs(float(grad) - (phi**2 + 1)) < 1e-11
    # Raised where the free equilibrium is returned ...
    with pytest.raises(Exception, match=r"could not find the free equilibrium"):
        lcp.least_control_grad(_no_root, _half_square, theta, jnp.zeros(()), **kwargs)

    # ... but not where only the update is used: the free solve is then not run.
    @jax.jit
    def update(theta):
        g, _ = lcp.least_control_grad(
            _no_root, _half_square, theta, jnp.zeros(()), **kwargs
        )
        return g

    assert float(update(theta)) == float(grad)


def test_free_solve_runs_only_for_info():
    # The compiled update holds one solve (one while loop per solve and Newton's
    # inner loops alike); asking for `info.phi_free` adds the free solve's.
    theta, args = _problem()

    def run(with_free):
        def fn(theta):
            g, info = lcp.least_control_grad(_f, _loss, theta, jnp.zeros(N), args)
            return (g, info.phi_free) if with_free else g

        text = jax.jit(fn).lower(theta).compile().as_text()
        return text.count(" while(")

    without, with_free = run(False), run(True)
    assert with_free > without > 0


def test_error_structures():
    with pytest.raises(ValueError, match=r"same pytree structure, shapes"):
        lcp.least_control_grad(
            lambda p, t, a: _f(p, t, a)[:-1], _loss, _theta0, jnp.zeros(N), _args0
        )
    with pytest.raises(ValueError, match=r"must return a scalar"):
        lcp.least_control_grad(
            _f, lambda p, a: p[-M:] - a["y"], _theta0, jnp.zeros(N), _args0
        )
    with pytest.raises(ValueError, match=r"LinearFeedback\(Q=...\)` must have shape"):
        lcp.least_control_grad(
            _f, _loss, _theta0, jnp.zeros(N), _args0,
            controller=lcp.LinearFeedback(jnp.zeros((N, N)), 0.1, lambda p: p[-M:]),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"alpha=0, proportional=True"):
        lcp.DynamicInversion(0.0, proportional=True)
    with pytest.raises(ValueError, match=r"solver=...\)` must be"):
        lcp.least_control_grad(
            _f, _loss, _theta0, jnp.zeros(N), _args0, solver=optx.BFGS(1e-6, 1e-6)
        )


@pytest.mark.slow
def test_static_theta_leaves():
    theta = dict(_theta0, name="layer")
    grad, _ = lcp.least_control_grad(
        lambda p, t, a: _f(p, t, a), _loss, theta, jnp.zeros(N), _args0
    )
    assert grad["name"] is None
    ref, _ = lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0)
    assert_tree_close(eqx.filter(grad, eqx.is_array), ref, 1e-12)


def _relu_loss(phi, y):
    return 0.5 * jnp.sum((jax.nn.relu(phi[-M:]) - y) ** 2)


def test_outputs_detected_where_the_loss_is_flat_at_the_start():
    # A loss on relu(φ) has zero gradient and Hessian at φ0 = 0: the outputs are
    # still found, so the update is the one from a start off zero (with the mask
    # taken at φ0 alone it was 0 here).
    theta, args = _problem()
    theta = dict(theta, b=theta["b"] + 1.0)
    y = jnp.array([2.0, 3.0])
    f = lambda p, t, a: _f(p, t, args)
    kwargs = dict(controller=lcp.DynamicInversion(alpha=0.1), rtol=1e-12, atol=1e-12)
    grad, _ = lcp.least_control_grad(f, _relu_loss, theta, jnp.zeros(N), y, **kwargs)
    ref, _ = lcp.least_control_grad(
        f, _relu_loss, theta, jnp.full(N, 0.01), y, **kwargs
    )
    assert float(jnp.max(jnp.abs(ref["W"]))) > 0.1
    assert tree_rel_error(grad, ref) < 1e-9


def test_tolerances_relative_to_the_controls_when_the_start_has_no_signal():
    # Targets equal to the outputs at φ0 = 0: ∇L(φ0) = 0, so the start says nothing
    # about the controls' size (1e-6 here at alpha = 1e6); they are still solved to
    # the tolerance relative to themselves.
    theta, args = _problem()
    y = jnp.zeros(M)
    controller = lcp.DynamicInversion(alpha=1e6)
    newton = optx.Newton(rtol=1e-13, atol=1e-13)
    # The default beyond small states (here the default is Newton, exact anyway).
    solver = lcp.IMEX(solver=lcp.AndersonAcceleration(1e-8, 1e-8, history_length=3))
    grad, ref = (
        lcp.least_control_grad(
            _f, _loss, theta, jnp.zeros(N), dict(args, y=y), controller=controller,
            solver=s,
        )[0]
        for s in (solver, newton)
    )  # fmt: skip
    assert tree_rel_error(grad, ref) < 1e-7  # default tolerance 1e-8


def test_float32_weak_signal_converges_at_the_state_resolution():
    # A confident float32 classifier started at its free equilibrium, as a training
    # step is: logits of about 6, so the controls at alpha = 10 are about 1e-4 of
    # the state, which does not resolve them below `eps·rms(φ)`. Asked for in their
    # own units, 2 of 16 solves ran to `max_steps` at the default tolerance (and two
    # more took 185 and 348 steps); at the state's resolution all take 5-7 steps and
    # the update matches float64 to 2.0e-4 (tolerance 1e-4) and 2.6e-4 (default).
    n, c, batch = 24, 3, 16
    keys = jax.random.split(jax.random.key(3), 4)
    theta = {
        "W": contraction_weights(keys[0], n, rho=0.6),
        "R": jax.random.normal(keys[1], (c, n)) / np.sqrt(n),
        "c": jnp.array([6.0, 0.0, 0.0]),
    }
    xs = jax.random.normal(keys[2], (batch, n))

    def f(phi, theta, x):
        h, y = phi
        return -h + jnp.tanh(theta["W"] @ h + x), -y + theta["R"] @ h + theta["c"]

    def loss(phi, x):
        return -jax.nn.log_softmax(phi[1])[0]

    def updates(dtype, **kwargs):
        cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
        th, x = cast(theta), cast(xs)
        phi0 = (jnp.zeros((batch, n), dtype), jnp.zeros((batch, c), dtype))
        for _ in range(100):  # to the free equilibrium, as a training step starts
            phi0 = jax.tree.map(jnp.add, phi0, jax.vmap(f, (0, None, 0))(phi0, th, x))
        one = lambda p, xi: lcp.least_control_grad(  # noqa: E731
            f, loss, th, p, xi, controller=lcp.DynamicInversion(alpha=10.0),
            throw=False, **kwargs,
        )  # fmt: skip
        return jax.jit(jax.vmap(one))(phi0, x)

    ref, _ = updates(jnp.float64, rtol=1e-12, atol=1e-12)
    for tol in (1e-4, None):  # the experiments' tolerance and the default (1e-5)
        grads, info = updates(jnp.float32, rtol=tol, atol=tol)
        assert bool(jnp.all(info.result == lcp.RESULTS.successful)), info.num_steps
        assert int(jnp.max(info.num_steps)) < 20
        err = tree_rel_error(jax.tree.map(lambda a: a.astype(jnp.float64), grads), ref)
        assert err < 1e-3, (tol, err)
