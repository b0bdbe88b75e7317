"""Every entry point against references computed WITHOUT lcp_solvers.

The references (tests/helpers.py) are numpy/scipy in float64: the free and the
controlled equilibria by scipy's root finder and minimiser, Jacobians by complex-step
differentiation of the same dynamics evaluated with numpy, and gradients by the
envelope theorem at scipy's minimiser or by central differences of scipy's minimum
value. Nothing is compared with another output of lcp_solvers.

- `least_control_grad` / `least_control_objective`, over problems x controllers x
  inner solvers x {leaky (alpha = 0.1), perfect (alpha = 0)}: the update is the
  θ-gradient of V(θ) = min_φ ½‖f‖² + L/α, or of H(θ) = min ½‖f‖² over φ with the
  outputs at the loss minimum.
- `LeastControlAdjoint` through `optx.fixed_point` / `optx.root_find`, the jaxopt
  decorators and `DEQ`: the finite-strength definition θ̄ = (∂θ f(y_c))ᵀ f(y_c) / β with
  y_c = argmin ½‖f(y)‖² + β ḡᵀy and β = strength / rms(ḡ); at strength 1e-8 the
  implicit gradient and central differences of the loss.

Tolerances are set about 10-30x above the error measured on this problem set (each
stated next to it), so that an update evaluated at the wrong state fails.
"""

import itertools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import jaxopt
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from helpers import (
    CONTROLLERS,
    downstream_fd_gradient,
    downstream_loss,
    drop_in_directional_fd,
    drop_in_reference,
    flat_rel_error,
    gradient_potential,
    LEAKY_ALPHA,
    least_control_directional_fd,
    least_control_fd_gradient,
    least_control_reference,
    linear_closed_form,
    np_flatten,
    PROBLEMS,
    SolverCase,
    SOLVERS,
)

import lcp_solvers as lcp


ALPHAS = {"leaky": LEAKY_ALPHA, "perfect": 0.0}

# Relative error of the update (max |grad - ref| / max |ref|) allowed per inner
# solver, about 20x the largest error measured over the cells of
# `test_least_control_grad` (all problems and controllers, both alphas):
GRAD_TOL = {
    "newton": 1e-14,  # measured 5.7e-16
    "imex": 5e-11,  # measured 2.9e-12
    "anderson": 2e-10,  # measured 9.7e-12
    "continuous": 3e-7,  # measured 1.5e-8 (rtol = atol = 1e-9)
    "imex-anderson": 4e-11,  # measured 1.8e-12 (Newton for LF: it raises)
}
# max |φ - φ_ref| of the controlled state, same cells.
STATE_TOL = {
    "newton": 5e-15,  # measured 2.2e-16
    "imex": 1e-11,  # measured 6.6e-13
    "anderson": 8e-11,  # measured 4.0e-12
    "continuous": 2e-7,  # measured 1.2e-8
    "imex-anderson": 1e-11,  # measured 6.7e-13
}

# Cells where the inner solver cannot reach the controlled equilibrium, for reasons
# of the problem, not of the library; there the library must report the failure
# (`info.result`) rather than return an update.
CANNOT_CONVERGE = {
    # The integral DI controller's ODE is linearly unstable at these controlled
    # equilibria (largest real part of an eigenvalue of its Jacobian at the reference
    # state: tanh +0.10 leaky / +0.14 perfect; pytree, not run, +0.04 / +0.08)
    # although the free dynamics are stable, so no time integration settles there.
    # Root finders and accelerated iterations still find the equilibrium.
    ("tanh", "DI", "continuous"): "the DI ODE's steady state is unstable",
    # IMEX's explicit part for EBD is a gradient step of size 1 on ½‖f‖²; here
    # ‖∂φ f‖² = 3.0 > 2 at the controlled state, so the iteration oscillates.
    ("pytree", "EBD", "imex"): "IMEX(step_size=1) overshoots EBD's gradient step",
    # IMEX(step_size=1) finds the free equilibrium by iterating φ + f(φ), whose
    # Jacobian has spectral radius 3.3 here (not a fixed-point form).
    **{
        ("gradient", c, "imex"): "φ + f(φ) does not contract"
        for c in ("DI", "DI-proportional", "EBD")
    },
}


def _lcg_is_slow(problem_id, controller_id, solver_id, alpha_id):
    """Which cells run only without `-m "not slow"`. Every compilation costs 2-4 s
    of CPU (ContinuousTime: 15-20 s, two implicit diffrax solves), so the quick set
    is DI, EBD and LF with the default solver and DI with IMEX and Anderson on
    `tanh`, DI with the default solver on `pytree`, and the cells that must raise
    (no compilation)."""
    case = CONTROLLERS[controller_id]
    if solver_id == "imex-anderson":
        return not (problem_id == "tanh" and controller_id == "DI")
    if (alpha_id == "perfect" and case.perfect == "ValueError") or (
        solver_id in ("imex", "imex-anderson") and not case.imex
    ):
        return False
    if problem_id == "pytree":
        return (controller_id, solver_id) != ("DI", "newton")
    if problem_id != "tanh" or solver_id == "continuous":
        return True
    if solver_id == "newton":
        return controller_id == "DI-proportional"
    return controller_id != "DI"


# ContinuousTime compiles two implicit diffrax solves per cell (15-25 s each on 2
# cores): it runs on the problems where its steady state is stable for every
# controller but DI ("tanh": the DI ODE's steady state is unstable there, reported
# as a failure) and on the linear one, not on all five.
CONTINUOUS_PROBLEMS = ("tanh", "linear")


def _lcg_cells():
    for problem_id, controller_id, solver_id, alpha_id in itertools.product(
        PROBLEMS, CONTROLLERS, SOLVERS, ALPHAS
    ):
        if solver_id == "continuous" and problem_id not in CONTINUOUS_PROBLEMS:
            continue
        perfect = CONTROLLERS[controller_id].perfect
        # Cells with no meaning (e.g. EBD at alpha = 0: beta = inf) are not generated
        # rather than skipped; `helpers.CONTROLLERS` says why for each.
        if alpha_id == "perfect" and perfect.startswith("none: "):
            continue
        marks = []
        if _lcg_is_slow(problem_id, controller_id, solver_id, alpha_id):
            marks.append(pytest.mark.slow)
        yield pytest.param(
            problem_id,
            controller_id,
            solver_id,
            alpha_id,
            id=f"{problem_id}-{controller_id}-{solver_id}-{alpha_id}",
            marks=marks,
        )


def _grad(problem, controller, solver_id, **kwargs):
    solver = {**SOLVERS, **MORE_SOLVERS}[solver_id]
    return lcp.least_control_grad(
        problem.f,
        problem.loss,
        problem.theta,
        problem.phi0,
        problem.args,
        controller=controller,
        solver=solver.make(),
        rtol=solver.tol,
        atol=solver.tol,
        max_steps=solver.max_steps,
        **kwargs,
    )


def _assert_matches_reference(grad, info, ref, solver_id, record_property):
    # The update and the controlled state against scipy's, at the solver's tolerance.
    assert info.result == lcp.RESULTS.successful
    err = flat_rel_error(grad, ref.grad)
    state_err = float(np.max(np.abs(np_flatten(info.phi) - ref.phi)))
    record_property("grad_rel_error", err)
    record_property("state_error", state_err)
    assert err <= GRAD_TOL[solver_id]
    assert state_err <= STATE_TOL[solver_id]


@pytest.mark.parametrize(
    "problem_id, controller_id, solver_id, alpha_id", list(_lcg_cells())
)
def test_least_control_grad(
    problem_id, controller_id, solver_id, alpha_id, record_property
):
    """The update is ∇θ V (leaky) or ∇θ H (perfect control), at scipy's controlled
    equilibrium; unsupported cells raise a ValueError."""
    problem, case, alpha = (
        PROBLEMS[problem_id],
        CONTROLLERS[controller_id],
        ALPHAS[alpha_id],
    )
    if alpha == 0 and case.perfect == "ValueError":
        with pytest.raises(ValueError, match=r"alpha=0, proportional=True"):
            case.make(problem, alpha)
        return
    controller = case.make(problem, alpha)
    if solver_id in ("imex", "imex-anderson") and not case.imex:
        with pytest.raises(ValueError, match=r"`lcp.IMEX` does not support"):
            _grad(problem, controller, solver_id)
        return
    if (problem_id, controller_id, solver_id) in CANNOT_CONVERGE:
        _, info = _grad(problem, controller, solver_id, throw=False)
        reason = CANNOT_CONVERGE[problem_id, controller_id, solver_id]
        assert info.result != lcp.RESULTS.successful, reason
        return
    grad, info = _grad(problem, controller, solver_id)
    ref = least_control_reference(problem_id, alpha)
    assert jtu.tree_structure(grad) == jtu.tree_structure(problem.theta)
    _assert_matches_reference(grad, info, ref, solver_id, record_property)
    # ½‖ψ⋆‖² is the control the reference needs, ½‖f(φ_c)‖²; its error is at most
    # the state's times ‖(∂φ f)ᵀ f‖₁, which is below 3.8 on these problems.
    assert abs(float(info.control) - ref.control) <= 4 * STATE_TOL[solver_id]
    if alpha == 0:
        assert float(info.loss_controlled) <= 1e-20 + STATE_TOL[solver_id]


# Inner solvers and leaks beyond the grid (those of the agreement test this file
# replaces): plain Euler, the paper's simulation, needs thousands of steps at strong
# control, so alpha = 1; an explicit diffrax solver; IMEX with an exact CG step on the
# loss; and strong control (alpha = 0.01) with IMEX. On `tanh`, against the reference
# at that alpha.
MORE_SOLVERS = {
    s.id: s
    for s in [
        SolverCase("euler", lambda: lcp.DiscreteTime(step_size=0.5), 1e-12, 8192),
        SolverCase("tsit5", lambda: lcp.ContinuousTime(diffrax.Tsit5()), 1e-9, 8192),
        SolverCase(
            "imex-cg",
            lambda: lcp.IMEX(linear_solver=lx.CG(rtol=1e-13, atol=1e-13)),
            1e-12,
            4096,
        ),
    ]
}
# Measured maxima over `_MORE_CELLS`: grad 7.5e-12 / 1.5e-8 / 8.7e-13, state
# 1.5e-12 / 4.9e-9 / 2.7e-13 (imex at alpha = 0.01: 3.2e-12 / 9.9e-13, within the
# grid's imex tolerances).
GRAD_TOL.update({"euler": 1.5e-10, "tsit5": 3e-7, "imex-cg": 2e-11})
STATE_TOL.update({"euler": 3e-11, "tsit5": 1e-7, "imex-cg": 5e-12})
_MORE_CELLS = [
    ("euler", 1.0, ("DI", "DI-proportional", "EBD", "LF")),
    ("tsit5", 0.1, ("DI-proportional", "EBD", "LF")),  # DI's ODE: unstable on tanh
    ("imex-cg", 1.0, ("DI", "DI-proportional", "EBD")),
    ("imex", 0.01, ("DI", "DI-proportional", "EBD")),
]


def _more_cells():
    for solver_id, alpha, controllers in _MORE_CELLS:
        for controller_id in controllers:
            yield pytest.param(
                solver_id,
                alpha,
                controller_id,
                id=f"{solver_id}-{alpha:g}-{controller_id}",
                marks=pytest.mark.slow,
            )


@pytest.mark.parametrize("solver_id, alpha, controller_id", list(_more_cells()))
def test_least_control_grad_more_solvers(
    solver_id, alpha, controller_id, record_property
):
    problem = PROBLEMS["tanh"]
    controller = CONTROLLERS[controller_id].make(problem, alpha)
    grad, info = _grad(problem, controller, solver_id)
    ref = least_control_reference("tanh", alpha)
    _assert_matches_reference(grad, info, ref, solver_id, record_property)


def _objective_cells():
    for problem_id, controller_id, alpha_id in itertools.product(
        PROBLEMS, CONTROLLERS, ALPHAS
    ):
        perfect = CONTROLLERS[controller_id].perfect
        # Not generated: no alpha = 0 form, or refused at construction
        # (test_least_control_grad checks that refusal).
        if alpha_id == "perfect" and perfect != "ok":
            continue
        marks = []
        if not (problem_id == "tanh" and controller_id == "DI"):
            marks.append(pytest.mark.slow)  # one compilation each, 2-4 s of CPU
        yield pytest.param(
            problem_id,
            controller_id,
            alpha_id,
            id=f"{problem_id}-{controller_id}-{alpha_id}",
            marks=marks,
        )


@pytest.mark.parametrize(
    "problem_id, controller_id, alpha_id", list(_objective_cells())
)
def test_least_control_objective(problem_id, controller_id, alpha_id, record_property):
    """`least_control_objective`'s value is scipy's min V (or H) and `jax.grad` of it
    is ∇θ V."""
    problem, alpha = PROBLEMS[problem_id], ALPHAS[alpha_id]
    controller = CONTROLLERS[controller_id].make(problem, alpha)

    def objective(theta):
        return lcp.least_control_objective(
            problem.f, problem.loss, theta, problem.phi0, problem.args,
            controller=controller, rtol=1e-12, atol=1e-12,
        )  # fmt: skip

    (value, info), grad = jax.value_and_grad(objective, has_aux=True)(problem.theta)
    ref = least_control_reference(problem_id, alpha)
    assert info.result == lcp.RESULTS.successful
    value_err = abs(float(value) - ref.value) / abs(ref.value)
    err = flat_rel_error(grad, ref.grad)
    record_property("value_rel_error", value_err)
    record_property("grad_rel_error", err)
    assert value_err <= 1e-14  # measured 5.3e-16
    assert err <= 1e-14  # measured 5.7e-16


@pytest.mark.parametrize("alpha_id", list(ALPHAS))
@pytest.mark.parametrize(
    "problem_id",
    [
        p if p in ("tanh", "pytree") else pytest.param(p, marks=pytest.mark.slow)
        for p in PROBLEMS
    ],
)
def test_update_is_finite_difference_gradient(problem_id, alpha_id, record_property):
    """Independently of Theorem 1: directional derivatives of scipy's minimum value V
    (or H) by central differences equal the update's (DI, default solver)."""
    problem, alpha = PROBLEMS[problem_id], ALPHAS[alpha_id]
    grad, _ = _grad(problem, CONTROLLERS["DI"].make(problem, alpha), "newton")
    directions = np.random.default_rng(0).normal(size=(3, problem.p))
    fd = least_control_directional_fd(problem_id, alpha, directions)
    got = directions @ np_flatten(grad)
    err = float(np.max(np.abs(got - fd)) / np.max(np.abs(fd)))
    record_property("rel_error", err)
    assert err <= 2e-8  # measured 1.0e-9 (central differences, eps = 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("alpha_id", list(ALPHAS))
@pytest.mark.parametrize("problem_id", list(PROBLEMS))
def test_reference_envelope_equals_finite_differences(problem_id, alpha_id):
    """The reference itself: the envelope-theorem gradient equals central differences
    of scipy's minimum value in every parameter (no lcp_solvers involved)."""
    ref = least_control_reference(problem_id, ALPHAS[alpha_id])
    fd = least_control_fd_gradient(problem_id, ALPHAS[alpha_id])
    err = float(np.max(np.abs(ref.grad - fd)) / np.max(np.abs(fd)))
    assert err <= 3e-9  # measured 1.6e-10


@pytest.mark.parametrize("alpha_id", list(ALPHAS))
def test_reference_linear_closed_form(alpha_id):
    """The reference itself: for f = Aφ + b the normal equations (leaky) or least
    squares (perfect control) in closed form give scipy's state, value and update
    (the grid compares the library with the latter on `linear`)."""
    alpha = ALPHAS[alpha_id]
    phi, value, grad_ref = linear_closed_form(alpha)
    ref = least_control_reference("linear", alpha)
    assert np.max(np.abs(ref.phi - phi)) <= 1e-14  # measured 6.7e-16
    assert abs(ref.value - value) <= 1e-14 * abs(value)  # measured 4.1e-16
    assert flat_rel_error(np_flatten(grad_ref), ref.grad) <= 1e-14  # measured 6.3e-16


# ------------------------------------------------------------------- drop-in adjoint

_TOL = 1e-12
ENTRIES = {
    # (optimistix entry point, forward solver, solver of the controlled equilibrium).
    # `None` is the default: `lcp.AndersonAcceleration` after a fixed-point solver,
    # `optx.Newton` (dense) after a root finder, also one that optimistix uses for a
    # fixed-point problem.
    "fixed_point-iteration": (
        "fixed_point",
        optx.FixedPointIteration(_TOL, _TOL),
        None,
    ),
    "fixed_point-anderson": ("fixed_point", lcp.AndersonAcceleration(_TOL, _TOL), None),
    "fixed_point-newton": ("fixed_point", optx.Newton(_TOL, _TOL), None),
    # Matrix-free Newton-Krylov for the controlled equilibrium.
    "fixed_point-krylov": (
        "fixed_point",
        optx.FixedPointIteration(_TOL, _TOL),
        optx.Newton(_TOL, _TOL, linear_solver=lx.GMRES(rtol=1e-13, atol=1e-13)),
    ),
    "root_find-newton": ("root_find", optx.Newton(_TOL, _TOL), None),
    "root_find-chord": ("root_find", optx.Chord(_TOL, _TOL), None),
}
STRENGTHS = [1e-1, 1e-2]


@eqx.filter_jit
def _drop_in_grad(problem_id, entry_id, theta, adjoint, y0=None):
    problem = PROBLEMS[problem_id]
    kind, solver, _ = ENTRIES[entry_id]
    y0 = problem.phi0 if y0 is None else y0

    def loss(theta):
        if kind == "fixed_point":
            sol = optx.fixed_point(
                problem.fixed_point_fn, solver, y0, theta, adjoint=adjoint,
                max_steps=1024,
            )  # fmt: skip
        else:
            sol = optx.root_find(
                problem.root_fn, solver, y0, theta, adjoint=adjoint, max_steps=1024
            )
        return downstream_loss(sol.value)

    return jax.grad(loss)(theta)


def _drop_in_cells(strengths, quick):
    for problem_id, entry_id, strength in itertools.product(
        PROBLEMS, ENTRIES, strengths
    ):
        # Not generated: a fixed-point entry on a problem where y + f(y) does not
        # contract (a root problem only).
        if (
            ENTRIES[entry_id][0] == "fixed_point"
            and not PROBLEMS[problem_id].fixed_point_ok
        ):
            continue
        marks = []
        if (problem_id, entry_id) not in quick:
            marks.append(pytest.mark.slow)  # one compilation each, 3-5 s of CPU
        yield pytest.param(
            problem_id, entry_id, strength, id=f"{problem_id}-{entry_id}-{strength:g}",
            marks=marks,
        )  # fmt: skip


# One compilation each (3-5 s of CPU, shared by both strengths): a fixed-point
# solver with the default Anderson backward, a root finder used for a fixed-point
# problem (pytree state), and a root problem.
_QUICK_DROP_IN = {
    ("tanh", "fixed_point-iteration"),
    ("pytree", "fixed_point-newton"),
    ("gradient", "root_find-newton"),
}


@pytest.mark.parametrize(
    "problem_id, entry_id, strength", list(_drop_in_cells(STRENGTHS, _QUICK_DROP_IN))
)
def test_least_control_adjoint(problem_id, entry_id, strength, record_property):
    """`LeastControlAdjoint(strength)` returns θ̄ = (∂θ f(y_c))ᵀ f(y_c) / β with y_c
    scipy's minimiser of ½‖f(y)‖² + β ḡᵀy, a state measurably away from y*."""
    problem = PROBLEMS[problem_id]
    # A traced strength: one compilation serves both strengths.
    adjoint = lcp.LeastControlAdjoint(
        strength=jnp.asarray(strength), solver=ENTRIES[entry_id][2]
    )
    got = _drop_in_grad(problem_id, entry_id, problem.theta, adjoint)
    ref = drop_in_reference(problem_id, strength)
    err = flat_rel_error(got, ref.theta_bar)
    record_property("rel_error", err)
    assert err <= 1e-11  # measured 4.7e-13
    # The test can tell: the finite-strength update is not the implicit gradient.
    assert flat_rel_error(ref.theta_bar, ref.implicit) > 1e-3
    assert np.max(np.abs(ref.y_c - ref.y_star)) > 1e-3


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("problem_id", list(PROBLEMS))
def test_drop_in_reference_is_gradient_of_min_value(
    problem_id, strength, record_property
):
    """The reference itself: θ̄ equals central differences of
    min_y ½‖f(y, θ)‖² + β ḡᵀy over β, along random directions (no lcp_solvers)."""
    ref = drop_in_reference(problem_id, strength)
    directions = np.random.default_rng(1).normal(size=(3, PROBLEMS[problem_id].p))
    fd = drop_in_directional_fd(problem_id, strength, directions)
    got = directions @ ref.theta_bar
    err = float(np.max(np.abs(got - fd)) / np.max(np.abs(fd)))
    record_property("rel_error", err)
    assert err <= 1e-7  # measured 5.8e-9 (central differences over β)


@pytest.mark.parametrize(
    "problem_id, entry_id",
    [
        # optx.ImplicitAdjoint costs a compilation of its own: all slow (the quick
        # comparisons with it are in test_adjoint.py).
        pytest.param(
            "tanh",
            "fixed_point-iteration",
            id="tanh-fixed_point-iteration",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "pytree",
            "fixed_point-anderson",
            id="pytree-fixed_point-anderson",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "gradient",
            "root_find-newton",
            id="gradient-root_find-newton",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_least_control_adjoint_weak_strength(problem_id, entry_id, record_property):
    """Strength 1e-8 is the implicit gradient: optimistix's `ImplicitAdjoint`, the
    implicit function theorem in numpy, and central differences of the loss through
    scipy's root solve."""
    problem = PROBLEMS[problem_id]
    weak = lcp.LeastControlAdjoint(strength=jnp.asarray(1e-8))
    got = _drop_in_grad(problem_id, entry_id, problem.theta, weak)
    implicit = _drop_in_grad(
        problem_id, entry_id, problem.theta, optx.ImplicitAdjoint()
    )
    ref = drop_in_reference(problem_id, 1e-8)
    fd = downstream_fd_gradient(problem_id)
    errors = {
        "optx": flat_rel_error(got, np_flatten(implicit)),
        "numpy": flat_rel_error(got, ref.implicit),
        "fd": flat_rel_error(got, fd),
    }
    for k, v in errors.items():
        record_property(f"rel_error_{k}", v)
    # The references agree (numpy's implicit function theorem, finite differences).
    assert flat_rel_error(ref.implicit, fd) <= 3e-9  # measured 1.8e-10
    # The strength's own bias.
    assert errors["optx"] <= 1e-6  # measured 5.1e-8
    assert errors["numpy"] <= 1e-6  # measured 5.1e-8
    assert errors["fd"] <= 1e-6  # measured 5.1e-8


@pytest.mark.parametrize(
    "entry_id",
    [
        # Batched with a fixed-point solver: one joint controlled system for all
        # samples; with a root finder: the controlled solve is vmapped.
        "fixed_point-iteration",
        pytest.param("root_find-newton", marks=pytest.mark.slow),
    ],
)
def test_least_control_adjoint_vmap(entry_id, record_property):
    """Under `jax.vmap` (shared θ, per-sample initial guess and loss weight) each
    sample is the finite-strength reference scaled by its loss weight: the strength is
    relative to each sample's own cotangent, so the controlled state is the same."""
    problem_id, strength = "tanh", 1e-1
    problem = PROBLEMS[problem_id]
    adjoint = lcp.LeastControlAdjoint(strength=strength)
    kind, solver, _ = ENTRIES[entry_id]
    y0s = jnp.stack([jnp.zeros(problem.n), 0.1 * jnp.ones(problem.n)])
    weights = jnp.array([1.0, 3.0])

    def batch_loss(theta):
        def one(y0, w):
            if kind == "fixed_point":
                sol = optx.fixed_point(
                    problem.fixed_point_fn, solver, y0, theta, adjoint=adjoint
                )
            else:
                sol = optx.root_find(
                    problem.root_fn, solver, y0, theta, adjoint=adjoint
                )
            return w * downstream_loss(sol.value)

        return jnp.sum(jax.vmap(one)(y0s, weights))

    got = jax.jit(jax.grad(batch_loss))(problem.theta)
    ref = drop_in_reference(problem_id, strength)
    err = flat_rel_error(got, float(jnp.sum(weights)) * ref.theta_bar)
    record_property("rel_error", err)
    assert err <= 1e-11  # measured 7.0e-13


# ---------------------------------------------------------- jaxopt decorators, DEQ

# A Python strength is static there: one compilation per strength.
_ONE_QUICK_STRENGTH = [
    STRENGTHS[0],
    pytest.param(STRENGTHS[1], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strength", _ONE_QUICK_STRENGTH)
def test_custom_fixed_point_jaxopt(strength, record_property):
    """`lcp.custom_fixed_point` around `jaxopt.FixedPointIteration` on `tanh`."""
    problem = PROBLEMS["tanh"]
    fixed_point_fun = problem.fixed_point_fn  # T(y, theta)
    jaxopt_solver = jaxopt.FixedPointIteration(
        fixed_point_fun=fixed_point_fun, tol=1e-13, maxiter=2000, implicit_diff=False
    )
    solve = lcp.custom_fixed_point(
        fixed_point_fun, has_aux=True, strength=strength, rtol=1e-12, atol=1e-12
    )(jaxopt_solver.run)
    loss = lambda theta: downstream_loss(solve(problem.phi0, theta).params)
    got = jax.jit(jax.grad(loss))(problem.theta)
    err = flat_rel_error(got, drop_in_reference("tanh", strength).theta_bar)
    record_property("rel_error", err)
    assert err <= 3e-12  # measured 1.5e-13


@pytest.mark.parametrize("strength", _ONE_QUICK_STRENGTH)
def test_custom_root_jaxopt(strength, record_property):
    """`lcp.custom_root` around `jaxopt.GradientDescent` minimising the potential g
    of the `gradient` problem, with jaxopt's optimality function ∇g = -f: the sign
    of the dynamics does not change the update."""
    problem = PROBLEMS["gradient"]
    descent = jaxopt.GradientDescent(
        fun=gradient_potential, stepsize=0.2, acceleration=False, tol=1e-13,
        maxiter=2000, implicit_diff=False,
    )  # fmt: skip
    solve = lcp.custom_root(
        jax.grad(gradient_potential), has_aux=True, strength=strength, rtol=1e-12,
        atol=1e-12,
    )(descent.run)  # fmt: skip
    loss = lambda theta: downstream_loss(solve(problem.phi0, theta).params)
    got = jax.jit(jax.grad(loss))(problem.theta)
    err = flat_rel_error(got, drop_in_reference("gradient", strength).theta_bar)
    record_property("rel_error", err)
    assert err <= 1e-12  # measured 5.6e-14 (the forward solve's tolerance)


class _TanhCell(eqx.Module):
    """The `tanh` problem's map as an equinox cell: z ↦ tanh(W z + U x + b)."""

    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.W @ z + self.U @ x + self.b)


@pytest.mark.parametrize("strength", _ONE_QUICK_STRENGTH)
def test_deq(strength, record_property):
    """`lcp.DEQ` with `LeastControlAdjoint(strength)`: the gradient reaching the cell's
    weights is the finite-strength reference of `tanh`."""
    problem = PROBLEMS["tanh"]
    cell = _TanhCell(**problem.theta)
    deq = lcp.DEQ(
        cell,
        problem.phi0,
        solver=lcp.AndersonAcceleration(rtol=1e-12, atol=1e-12),
        adjoint=lcp.LeastControlAdjoint(strength=strength),
    )
    grad = eqx.filter_jit(
        eqx.filter_grad(lambda m: downstream_loss(m(problem.args["x"])))
    )(deq)
    ref = problem.theta_tree(drop_in_reference("tanh", strength).theta_bar)
    got = {k: getattr(grad.cell, k) for k in ("W", "U", "b")}
    err = flat_rel_error(got, np_flatten(ref))
    record_property("rel_error", err)
    assert err <= 3e-12  # measured 1.3e-13
