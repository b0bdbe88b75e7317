"""`lcp.least_control_grad`: Theorem 1 against scipy, agreement of controllers and
solvers, the meta-learning instance against optimistix's implicit gradient, and the
error paths."""

import diffrax
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
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
def test_theorem1_against_scipy(alpha):
    grad, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0,
        controller=lcp.DynamicInversion(alpha=jnp.asarray(alpha)),
    )  # fmt: skip
    assert info.result == lcp.RESULTS.successful
    ref = central_difference(lambda t: _h_reference(t, alpha), _flat0, eps=1e-5)
    assert_tree_close(jfu.ravel_pytree(grad)[0], jnp.asarray(ref), 1e-4)
    # H itself: the control at the optimum is the objective's value.
    h = _h_reference(_flat0, alpha)
    expected = h if alpha == 0 else h - float(info.loss_controlled) / alpha
    assert abs(float(info.control) - expected) <= 1e-8 * max(1.0, abs(expected))
    if alpha == 0:
        assert float(info.loss_controlled) < 1e-16
        # u lives on the outputs only.
        assert jnp.all(info.u[: N - M] == 0)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
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
    assert abs(float(value) - expected) <= 1e-8 * max(1.0, abs(expected))
    ref = central_difference(lambda t: _h_reference(t, alpha), _flat0, eps=1e-5)
    assert_tree_close(jfu.ravel_pytree(grad)[0], jnp.asarray(ref), 1e-4)


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


def _optimal_q(alpha):
    """Q = -(∂f)^{-T} Pᵀ at the DI controlled equilibrium: Theorem 2's condition."""
    _, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0,
        controller=lcp.DynamicInversion(alpha=jnp.asarray(alpha)),
    )  # fmt: skip
    jac = jax.jacfwd(lambda p: _f(p, _theta0, _args0))(info.phi)
    return -jnp.linalg.solve(jac.T, jnp.eye(N)[:, -M:])


_anderson = lcp.DiscreteTime(
    step_size=0.5, solver=lcp.AndersonAcceleration(rtol=1e-10, atol=1e-10)
)


def _controllers(alpha):
    out = lambda phi: phi[-M:]
    q = _optimal_q(alpha)
    # A traced alpha compiles each controller once for all alphas.
    alpha = jnp.asarray(alpha)
    ctl = {
        "DI": lcp.DynamicInversion(alpha=alpha),
        "LF": lcp.LinearFeedback(q, alpha=alpha, output=out),
    }
    if alpha > 0:
        ctl["DI-proportional"] = lcp.DynamicInversion(alpha, proportional=True)
        ctl["EBD"] = lcp.EnergyBased(beta=1 / alpha)
    return ctl


_solvers = {  # solver, its tolerances, the accuracy expected of the update
    "newton": (None, 1e-10, 1e-8),
    "anderson": (_anderson, 1e-10, 1e-7),
    "euler": (lcp.DiscreteTime(step_size=0.5), 1e-10, 1e-6),
    "diffrax": (lcp.ContinuousTime(), 1e-7, 1e-5),
    # Any diffrax solver works; an explicit one compiles faster (no Jacobians).
    "diffrax-tsit5": (lcp.ContinuousTime(diffrax.Tsit5()), 1e-7, 1e-5),
    "imex": (lcp.IMEX(), 1e-10, 1e-7),
    # An exact Newton step for the implicit loss term instead of truncated CG.
    "imex-cg": (lcp.IMEX(linear_solver=lx.CG(rtol=1e-12, atol=1e-12)), 1e-10, 1e-7),
}


# (solver, alpha, controllers). Every controller runs in discrete and in continuous
# time; plain Euler only at alpha = 1 (it is the paper's slow simulation: thousands of
# steps at strong control), and the diffrax cases are few because each compiles two
# implicit ODE solves.
_cases = [
    ("newton", 0.0, ("DI", "LF")),
    ("newton", 0.1, ("DI", "DI-proportional", "EBD", "LF")),
    ("newton", 1.0, ("DI", "DI-proportional", "EBD", "LF")),
    ("anderson", 0.0, ("DI", "LF")),
    ("anderson", 0.1, ("DI", "DI-proportional", "EBD", "LF")),
    ("euler", 1.0, ("DI", "DI-proportional", "EBD", "LF")),
    ("diffrax", 0.0, ("DI",)),
    ("diffrax-tsit5", 0.1, ("DI-proportional", "EBD", "LF")),
    ("imex", 0.0, ("DI",)),
    ("imex", 0.01, ("DI", "DI-proportional", "EBD")),
    ("imex", 0.1, ("DI", "DI-proportional", "EBD")),
    ("imex-cg", 1.0, ("DI", "DI-proportional", "EBD")),
]


@pytest.mark.parametrize("solver, alpha, names", _cases)
def test_controllers_and_solvers_agree(solver, alpha, names):
    """Controllers in discrete and continuous time give DI's update (Newton)."""
    reference, _ = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0,
        controller=lcp.DynamicInversion(alpha=jnp.asarray(alpha)), rtol=1e-12,
        atol=1e-12,
    )  # fmt: skip
    solver_, solver_tol, tol = _solvers[solver]
    controllers = _controllers(alpha)
    for name in names:
        grad, info = lcp.least_control_grad(
            _f, _loss, _theta0, jnp.zeros(N), _args0,
            controller=controllers[name], solver=solver_, rtol=solver_tol,
            atol=solver_tol, max_steps=8192,
        )  # fmt: skip
        assert info.result == lcp.RESULTS.successful, name
        err = tree_rel_error(grad, reference)
        assert err <= tol, f"{name}: relative error {err:.2e}"


def test_free_equilibrium_already_optimal():
    sol = optx.root_find(
        lambda p, _: _f(p, _theta0, _args0), optx.Newton(1e-12, 1e-12), jnp.zeros(N)
    )
    args = dict(_args0, y=sol.value[-M:])
    for alpha in (0.0, 0.1):
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


@pytest.mark.parametrize("cg_steps", [1, 2])
def test_imex_nonquadratic_loss(cg_steps):
    """With a loss whose Hessian varies, one truncated-CG step per iteration is only
    an approximate Newton step on the implicit loss term, but the fixed point (the
    update) is still exact."""
    for controller in [
        lcp.DynamicInversion(alpha=0.05),
        lcp.DynamicInversion(alpha=0.05, proportional=True),
        lcp.EnergyBased(beta=20.0),
    ]:
        ref, _ = lcp.least_control_grad(
            _f, _cross_entropy, _theta0, jnp.zeros(N), _args0, controller=controller,
            rtol=1e-12, atol=1e-12,
        )  # fmt: skip
        grad, info = lcp.least_control_grad(
            _f, _cross_entropy, _theta0, jnp.zeros(N), _args0, controller=controller,
            solver=lcp.IMEX(cg_steps=cg_steps), rtol=1e-11, atol=1e-11,
            max_steps=1024,
        )  # fmt: skip
        assert info.result == lcp.RESULTS.successful
        assert tree_rel_error(grad, ref) <= 1e-8


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
    assert info.result == lcp.RESULTS.free_equilibrium_failed


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


def test_meta_learning_imaml():
    """f = -∇L_learn(φ) - λ(φ - ω), L = L_eval: Δω = λu* and, at weak control, the
    iMAML meta-gradient."""
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

    omega = 0.1 * jnp.ones(N)
    # Q = I satisfies Theorem 2 here (every unit is an output): LF's update is λu*.
    for alpha in (jnp.asarray(0.0), jnp.asarray(0.5)):
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


def test_error_divergence():
    solver = lcp.DiscreteTime(step_size=0.5)
    kwargs = dict(controller=lcp.EnergyBased(beta=100.0), solver=solver)
    with pytest.raises(Exception, match=r"EnergyBased diverged under the solver "):
        lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.control_divergence
    # Unstable free dynamics: the free solve already blows up.
    unstable = lambda p, t, a: p - 1.0
    with pytest.raises(Exception, match=r"free dynamics f diverged under the solver"):
        lcp.least_control_grad(unstable, _loss, None, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        unstable, _loss, None, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.free_equilibrium_failed


def test_error_max_steps():
    kwargs = dict(solver=lcp.DiscreteTime(step_size=0.5), max_steps=100)
    with pytest.raises(Exception, match=r"was not reached within `max_steps`"):
        lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.control_max_steps_reached
    # Too few steps for the free equilibrium itself.
    kwargs["max_steps"] = 20
    with pytest.raises(Exception, match=r"could not find the free equilibrium"):
        lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0, **kwargs)
    _, info = lcp.least_control_grad(
        _f, _loss, _theta0, jnp.zeros(N), _args0, throw=False, **kwargs
    )
    assert info.result == lcp.RESULTS.free_equilibrium_failed


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


def test_static_theta_leaves():
    theta = dict(_theta0, name="layer")
    grad, _ = lcp.least_control_grad(
        lambda p, t, a: _f(p, t, a), _loss, theta, jnp.zeros(N), _args0
    )
    assert grad["name"] is None
    ref, _ = lcp.least_control_grad(_f, _loss, _theta0, jnp.zeros(N), _args0)
    assert_tree_close(eqx.filter(grad, eqx.is_array), ref, 1e-12)
