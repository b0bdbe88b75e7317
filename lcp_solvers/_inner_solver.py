import abc
import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, PyTree

from ._anderson import AndersonAcceleration
from ._controller import AbstractController, AbstractImexController, EnergyBased
from ._misc import check_count, check_positive
from ._solution import RESULTS
from ._system import ControlledSystem


class SteadyStateProblem(eqx.Module):
    """What an inner solver is asked to solve: the steady state of a controller's
    dynamics (or of the free dynamics), in the solver's units.

    The engine hands one to [`lcp_solvers.AbstractInnerSolver.solve`][]. In the
    solver's units the controls are divided by the scale of the learning signal, so
    `rtol`/`atol` are relative to it; `to_units`/`from_units` convert an extended
    state `(phi, *controls)` to and from them.

    **Fields:**

    - `velocity`: `z ↦ ż`, the dynamics in solver units.
    - `residual`: `z ↦ r(z)`, whose root is the steady state (for root finders).
    - `system`: the [`lcp_solvers.ControlledSystem`][].
    - `controller`: the [`lcp_solvers.AbstractController`][], or `None` for the free
        dynamics `φ̇ = f(φ)` (state `(phi,)`).
    - `to_units`, `from_units`: the change of units.
    """

    velocity: Callable
    residual: Callable
    system: ControlledSystem
    controller: AbstractController | None
    to_units: Callable
    from_units: Callable


class AbstractInnerSolver(eqx.Module):
    """Base class of the solvers of the controlled (and free) equilibrium.

    A new solver implements `solve` and `divergence_hint`; if it needs more of the
    controller than its dynamics, it checks for a capability class (as
    [`lcp_solvers.IMEX`][] checks for [`lcp_solvers.AbstractImexController`][]) and
    raises a `ValueError` naming the controller otherwise. Any
    `optx.AbstractRootFinder` (applied to `residual`) and
    `optx.AbstractFixedPointSolver` (applied to the Euler map, as
    `lcp.DiscreteTime(1.0, solver)`) is accepted wherever an inner solver is.
    """

    @abc.abstractmethod
    def solve(
        self,
        problem: SteadyStateProblem,
        z0: tuple,
        *,
        rtol: float,
        atol: float,
        max_steps: int,
    ) -> tuple[tuple, RESULTS, Array]:
        """Find the steady state from `z0` (solver units). Returns `(z, result,
        num_steps)`: `result` is `RESULTS.successful`, or an optimistix failure
        (`nonlinear_max_steps_reached`, `nonlinear_divergence`, ...) that the engine
        maps to [`lcp_solvers.RESULTS`][]. Never raises on a failed solve."""

    @abc.abstractmethod
    def divergence_hint(self) -> str:
        """What to change when the dynamics diverge under this solver."""

    def name(self) -> str:
        return type(self).__name__


class DiscreteTime(AbstractInnerSolver):
    """Discrete-time (Euler/Picard) solver of the controlled equilibrium: iterates the
    Euler map `z ↦ z + step_size · v(z)` of the controller's dynamics `v` to its fixed
    point with an optimistix fixed-point solver.

    Plain iteration (`solver=None`) is the paper's Euler
    simulation: stable only for `step_size` below about `2/|λ_max|` of the controlled
    dynamics, so strong control (small `alpha`) needs small steps. Pass
    `solver=lcp.AndersonAcceleration(rtol, atol)` to accelerate it.

    **Arguments:**

    - `step_size`: the Euler step `h`.
    - `solver`: an `optx.AbstractFixedPointSolver`; `None` is plain iteration
        (`lcp.AndersonAcceleration(rtol, atol, history_length=1)`, which is
        `optx.FixedPointIteration` without its float32-under-x64 failure) with the
        `rtol`/`atol` of the entry point.
    """

    step_size: float = 0.5
    solver: optx.AbstractFixedPointSolver | None = None

    def __check_init__(self):
        # A zero step never moves: the start would pass as converged.
        check_positive(self.step_size, "DiscreteTime", "step_size")

    def solve(self, problem, z0, *, rtol, atol, max_steps):
        h = self.step_size

        def euler(z):
            return jtu.tree_map(lambda a, b: a + h * b, z, problem.velocity(z))

        return _iterate(self.solver, euler, z0, rtol, atol, max_steps)

    def divergence_hint(self):
        return (
            "lower `step_size` of `lcp.DiscreteTime`, raise `alpha` (weaker "
            "control), or use the root finder `optx.Newton(rtol, atol)` or "
            "`lcp.ContinuousTime()`, which do not need a step size"
        )

    def name(self):
        inner = "plain iteration" if self.solver is None else type(self.solver).__name__
        return f"DiscreteTime(step_size={self.step_size}, solver={inner})"


class ContinuousTime(AbstractInnerSolver):
    """Continuous-time solver of the controlled equilibrium: integrates the
    controller's ODE with diffrax until a steady state
    (`diffrax.Event(diffrax.steady_state_event())`).

    The default `diffrax.Kvaerno5` is implicit (A-stable), so the strong coupling of
    small `alpha` does not force small steps.

    **Arguments:**

    - `solver`: a `diffrax.AbstractSolver`.
    - `stepsize_controller`: `None` is `diffrax.PIDController` with the
        `rtol`/`atol` of `least_control_grad` (divided by 10, so that the steady state
        is resolved to the requested tolerance).
    - `dt0`: the initial step (`None`: diffrax picks one).
    - `t1`: the latest time; the steady-state event normally stops the solve first.
    """

    solver: diffrax.AbstractSolver = diffrax.Kvaerno5()
    stepsize_controller: diffrax.AbstractStepSizeController | None = None
    dt0: float | None = None
    t1: float = math.inf

    def solve(self, problem, z0, *, rtol, atol, max_steps):
        controller = self.stepsize_controller
        if controller is None:
            controller = diffrax.PIDController(rtol=rtol / 10, atol=atol / 10)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, z, args: problem.velocity(z)),
            self.solver,
            t0=0.0,
            t1=self.t1,
            dt0=self.dt0,
            y0=z0,
            stepsize_controller=controller,
            event=diffrax.Event(diffrax.steady_state_event(rtol, atol)),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=max_steps,
            throw=False,
        )
        z = jtu.tree_map(lambda x: x[-1], sol.ys)
        # Only the steady-state event counts as success: ending at `t1` or at
        # `max_steps` means the dynamics had not settled.
        stopped = sol.result == diffrax.RESULTS.event_occurred
        result = RESULTS.where(
            stopped,
            RESULTS.successful,  # pyright: ignore[reportArgumentType]
            RESULTS.nonlinear_max_steps_reached,  # pyright: ignore[reportArgumentType]
        )
        return z, result, sol.stats["num_steps"]

    def divergence_hint(self):
        return (
            "check that the free dynamics f are stable (the free equilibrium "
            "attracts), raise `alpha`, or use the root finder `optx.Newton`"
        )

    def name(self):
        return f"ContinuousTime(solver={type(self.solver).__name__})"


def _truncated_cg(matvec, b, steps):
    # A fixed number of conjugate-gradient steps from zero, unrolled: an approximate
    # inverse for the loss step below. lineax's CG is a while loop with convergence
    # checks whose fixed cost per call is about a forward step of a 256-unit layer;
    # here it runs once per iteration, and the iteration stays exact with any
    # approximate inverse (see `IMEX.loss_step`), so a short fixed count is enough.
    flat_b, unravel = jfu.ravel_pytree(b)
    mv = lambda v: jfu.ravel_pytree(matvec(unravel(v)))[0]
    safe_div = lambda a, c: jnp.where(c > 0, a / jnp.where(c > 0, c, 1), 0)
    x = jnp.zeros_like(flat_b)
    r = p = flat_b
    rr = r @ r
    for _ in range(steps):
        ap = mv(p)
        step = safe_div(rr, p @ ap)
        x = x + step * p
        r = r - step * ap
        rr_new = r @ r
        p = r + safe_div(rr_new, rr) * p
        rr = rr_new
    return unravel(x)


class IMEX(AbstractInnerSolver):
    r"""Implicit–explicit (IMEX) Euler iteration of the controlled equilibrium: the
    dynamics `f` and its Jacobian-transpose products explicit, the loss implicit.
    (This library's solver; the paper simulates the controller's ODE with explicit
    Euler steps, `lcp.DiscreteTime`.)

    Strong control (small `alpha`) is stiff only through the loss: the output
    controller feeds `∇L/α` back into the state. [`lcp_solvers.DiscreteTime`][] treats
    that feedback explicitly, so it needs small steps or an accelerator, and
    dozens of steps at `alpha = 0.1`. Here each step solves for the new state `z`
    with the loss term implicit,

    $$z = v - c\,∇L(z),$$

    (a proximal step on the loss; `v` and `c` come from the controller's Euler map),
    while `f` is still evaluated once and differentiated once per step. The
    iteration then converges at about the rate of the free dynamics and of
    recurrent backprop's adjoint iteration, whatever `alpha`: on the benchmark
    RNN about 10 steps at `alpha` from 0 to 1.

    The implicit equation is solved by one Newton step from the current state,
    `z = φ - M(φ - v + c∇L(φ))` with `M ≈ (I + c∇²L(φ))⁻¹`. Any such `M`
    leaves the fixed point exact; its accuracy only sets the speed.

    Supported controllers: those with the capability
    [`lcp_solvers.AbstractImexController`][]: [`lcp_solvers.DynamicInversion`][] (all
    variants, including a `feedback` hook) and [`lcp_solvers.EnergyBased`][] (whose
    explicit part is a gradient step on `½‖f‖²`, so it converges like gradient
    descent on the normal equations, slower than DI). Others raise a `ValueError`.
    The free equilibrium is found with the same Euler map as
    [`lcp_solvers.DiscreteTime`][].

    **Arguments:**

    - `step_size`: the Euler step `h`. `1.0` iterates `φ + f(φ)`, the layer's own
        map for `f = T(φ) - φ`; lower it when that map does not contract.
    - `solver`: an `optx.AbstractFixedPointSolver` for the iteration; `None` is
        plain iteration with the `rtol`/`atol` of the entry point. Where the
        plain iteration oscillates (on a small feedforward net with a
        cross-entropy loss it took hundreds of steps) pass
        `lcp.AndersonAcceleration(rtol, atol)`; where it contracts fast (the
        benchmark RNN: 10 steps), acceleration costs more per step than it saves.
    - `linear_solver`: `None` (default) applies `M` on the output components as
        `cg_steps` unrolled conjugate-gradient steps (exact for a loss whose Hessian
        has `cg_steps` distinct eigenvalues on the outputs, e.g. one for a squared
        error); or any lineax solver, e.g. `lx.CG(rtol, atol)` for an exact
        Newton step. `I + c∇²L` must be positive definite for CG: true for any convex
        loss; otherwise pass `lx.GMRES(...)`.
    - `cg_steps`: the number of conjugate-gradient steps when `linear_solver=None`.
    - `output_gain`: how much faster than in the controller's own dynamics the
        integral output controller `u` of [`lcp_solvers.DynamicInversion`][] runs
        during the iteration (`u̇` times `output_gain`). Any positive gain has the
        same steady state, hence the same update; the default 10 needs about as
        many steps as proportional control (at `gain = 1`, about 1.5x as many on the
        benchmark RNN). It matters only for `alpha = 0` or an `alpha` passed as an
        array: for a Python `alpha > 0` the steady state has `u = -∇L/α`, and the
        iteration eliminates `u` (proportional or integral alike).
    """

    step_size: float = 1.0
    solver: optx.AbstractFixedPointSolver | None = None
    linear_solver: lx.AbstractLinearSolver | None = None
    cg_steps: int = eqx.field(static=True, default=1)
    output_gain: float = 10.0

    def __check_init__(self):
        check_positive(self.step_size, "IMEX", "step_size")
        if isinstance(self.output_gain, (int, float)) and not self.output_gain > 0:
            raise ValueError(
                f"`IMEX(output_gain=...)` must be positive, got {self.output_gain}."
            )
        check_count(self.cg_steps, "IMEX", "cg_steps")

    def solve(self, problem, z0, *, rtol, atol, max_steps):
        controller, system = problem.controller, problem.system
        if controller is None:
            free = DiscreteTime(step_size=self.step_size, solver=self.solver)
            return free.solve(problem, z0, rtol=rtol, atol=atol, max_steps=max_steps)
        if not isinstance(controller, AbstractImexController):
            raise ValueError(
                "`lcp.IMEX` does not support the controller "
                f"{type(controller).__name__}"
                ": it needs the loss to enter the state through a symmetric "
                "(gradient) pathway, i.e. a controller with the capability "
                "`lcp.AbstractImexController`, such as `lcp.DynamicInversion` and "
                "`lcp.EnergyBased`. Use `lcp.DiscreteTime(step_size, "
                "lcp.AndersonAcceleration(rtol, atol))` or the default `optx.Newton` "
                "for this controller."
            )

        def loss_step(phi, v, c):
            return self.loss_step(system.loss_grad, system.output_mask, phi, v, c)

        def step(w):
            state = controller.imex_step(
                system,
                problem.from_units(w),
                self.step_size,
                self.output_gain,
                loss_step,
            )
            return problem.to_units(state)

        w0 = problem.to_units(controller.imex_init(system, problem.from_units(z0)))
        w, result, steps = _iterate(self.solver, step, w0, rtol, atol, max_steps)
        z = problem.to_units(controller.imex_final(system, problem.from_units(w)))
        return z, result, steps

    def divergence_hint(self):
        return (
            "lower `step_size` of `lcp.IMEX` (the free map φ + h·f(φ) must "
            "contract), or use the root finder `optx.Newton(rtol, atol)` or "
            "`lcp.ContinuousTime()`"
        )

    def name(self):
        return f"IMEX(step_size={self.step_size})"

    def loss_step(self, grad_loss, mask, phi, v, c):
        """`z` with `z = v - c ∇L(z)`, by one Newton step from `phi`. `mask` is 1
        on the components the loss depends on: elsewhere `∇²L` vanishes and the step
        is exact without any linear solve."""
        g, hvp = jax.linearize(grad_loss, phi)
        residual = jtu.tree_map(lambda p, vi, gi: p - vi + c * gi, phi, v, g)
        outputs = jtu.tree_map(jnp.multiply, mask, residual)
        matvec = lambda d: jtu.tree_map(lambda di, hi: di + c * hi, d, hvp(d))
        if self.linear_solver is None:
            delta = _truncated_cg(matvec, outputs, self.cg_steps)
        else:
            operator = lx.FunctionLinearOperator(
                matvec,
                jax.eval_shape(lambda: phi),
                tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
            )
            delta = lx.linear_solve(
                operator, outputs, self.linear_solver, throw=False
            ).value
        return jtu.tree_map(
            lambda p, r, o, d: p - (r - o) - d, phi, residual, outputs, delta
        )


class _RootFinder(AbstractInnerSolver):
    # An optimistix root finder on the steady-state residual. `None` is the default
    # `optx.Newton` with a dense LU solve, built with the entry point's tolerances.
    solver: optx.AbstractRootFinder | None

    def solve(self, problem, z0, *, rtol, atol, max_steps):
        solver = self.solver
        if solver is None:
            solver = optx.Newton(
                rtol=rtol, atol=atol, linear_solver=lx.AutoLinearSolver(well_posed=None)
            )
        sol = optx.root_find(
            lambda z, _: problem.residual(z),
            solver,
            z0,
            max_steps=max_steps,
            throw=False,
        )
        return sol.value, RESULTS.promote(sol.result), sol.stats["num_steps"]

    def divergence_hint(self):
        return (
            "raise `alpha` (weaker control), or use `lcp.ContinuousTime()`, which "
            "follows the controlled dynamics instead of jumping to their root"
        )

    def name(self):
        return (
            "optx.Newton (default)"
            if self.solver is None
            else type(self.solver).__name__
        )


InnerSolver = (
    AbstractInnerSolver | optx.AbstractRootFinder | optx.AbstractFixedPointSolver
)


# The largest state (in scalars) for which `solver=None` is dense Newton.
DENSE_NEWTON_MAX_SIZE = 16


def default_solver(
    controller: AbstractController, phi: PyTree[Array], rtol: float, atol: float
) -> AbstractInnerSolver:
    """`solver=None` of `least_control_grad`/`least_control_objective`.

    Beyond `DENSE_NEWTON_MAX_SIZE` scalars of state, a controller with the IMEX
    capability gets `lcp.IMEX` with Anderson acceleration (history 3; step 0.5 for
    `EnergyBased`, 1 otherwise): per step one evaluation of `f` and one transposed
    product, no Jacobian. Small states, and controllers without the capability
    (e.g. `LinearFeedback`, whose `Q` need not make the Euler map contract), get
    dense `optx.Newton`: exact to rounding in a few steps, and it finds an
    equilibrium whatever the stability of the dynamics.

    Dense Newton forms and factors the Jacobian of the extended state (`3n`
    columns for DI) at every step; plain IMEX misses `max_steps` on some layers at
    strong control with a cross-entropy loss; a history of 3 took as many steps as
    5 there. The measurements are in docs/cost.md."""
    size = sum(jnp.size(x) for x in jtu.tree_leaves(phi))
    if size > DENSE_NEWTON_MAX_SIZE and isinstance(controller, AbstractImexController):
        anderson = AndersonAcceleration(rtol=rtol, atol=atol, history_length=3)
        # EBD's explicit part is a gradient step on ½‖f‖²: stable below 2/‖∂f‖²,
        # which is 0.5 or more for contracting `T` in `f = T - φ`.
        step = 0.5 if isinstance(controller, EnergyBased) else 1.0
        return IMEX(step_size=step, solver=anderson)
    return _RootFinder(None)


def as_inner_solver(
    solver,
    where: str,
    *,
    default: str = "optx.Newton",
    fixed_point_on: str = "the Euler map",
) -> AbstractInnerSolver:
    """`solver` as an [`AbstractInnerSolver`][]: `None` is `optx.Newton`, a root finder
    is applied to the residual, a fixed-point solver to the Euler map with step 1.
    `default` and `fixed_point_on` describe the caller's own meaning of `None` and of
    a fixed-point solver in the error message."""
    if isinstance(solver, AbstractInnerSolver):
        return solver
    if solver is None or isinstance(solver, optx.AbstractRootFinder):
        return _RootFinder(solver)
    if isinstance(solver, optx.AbstractFixedPointSolver):
        return DiscreteTime(step_size=1.0, solver=solver)
    raise ValueError(
        f"`{where}(solver=...)` must be `None` ({default}), an optimistix root "
        "finder (e.g. `optx.Newton`), an optimistix fixed-point solver (e.g. "
        f"`lcp.AndersonAcceleration`, applied to {fixed_point_on}), or an "
        "`lcp.AbstractInnerSolver` such as `lcp.DiscreteTime(step_size, solver)`, "
        f"`lcp.IMEX(...)` or `lcp.ContinuousTime(...)`; got {type(solver).__name__}."
    )


def _iterate(fp, step, z0, rtol, atol, max_steps):
    if fp is None:
        # Plain iteration. `optx.FixedPointIteration` keeps its error in the default
        # float dtype, which breaks its loop for a float32 state under x64.
        fp = AndersonAcceleration(rtol=rtol, atol=atol, history_length=1)
    sol = optx.fixed_point(
        lambda z, _: step(z), fp, z0, max_steps=max_steps, throw=False
    )
    return sol.value, RESULTS.promote(sol.result), sol.stats["num_steps"]
