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

from ._misc import tree_allfinite
from ._solution import RESULTS


class DiscreteTime(eqx.Module):
    """Discrete-time (Euler/Picard) solver of the controlled equilibrium: iterates the
    Euler map `z ↦ z + step_size · v(z)` of the controller's dynamics `v` to its fixed
    point with an optimistix fixed-point solver.

    Plain iteration (`solver=None`, `optx.FixedPointIteration`) is the paper's Euler
    simulation: stable only for `step_size` below about `2/|λ_max|` of the controlled
    dynamics, so strong control (small `alpha`) needs small steps. Pass
    `solver=lcp.AndersonAcceleration(rtol, atol)` to accelerate it.

    **Arguments:**

    - `step_size`: the Euler step `h`.
    - `solver`: an `optx.AbstractFixedPointSolver`; `None` is
        `optx.FixedPointIteration` with the `rtol`/`atol` of `least_control_grad`.
    """

    step_size: float = 0.5
    solver: optx.AbstractFixedPointSolver | None = None


class ContinuousTime(eqx.Module):
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


class IMEX(eqx.Module):
    r"""Implicit–explicit (IMEX) Euler iteration of the controlled equilibrium: the
    dynamics `f` and its Jacobian-transpose products explicit, the loss implicit.

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
    `z = φ - M(φ - v + c∇L(φ))` with `M ≈ (I + c∇²L(φ))^{-1}`. Any such `M`
    leaves the fixed point exact; its accuracy only sets the speed.

    Supported controllers: [`lcp_solvers.DynamicInversion`][] (all variants,
    including a `feedback` hook) and [`lcp_solvers.EnergyBased`][] (whose explicit
    part is a gradient step on `½‖f‖²`, so it converges like gradient descent on the
    normal equations, slower than DI). The free equilibrium is found with the same
    Euler map as [`lcp_solvers.DiscreteTime`][].

    **Arguments:**

    - `step_size`: the Euler step `h`. `1.0` iterates `φ + f(φ)`, the layer's own
        map for `f = T(φ) - φ`; lower it when that map does not contract.
    - `solver`: an `optx.AbstractFixedPointSolver` for the iteration; `None` is
        `optx.FixedPointIteration` with the `rtol`/`atol` of `least_control_grad`.
        Where the plain iteration oscillates (on a small feedforward net with a
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
        if isinstance(self.step_size, (int, float)) and not self.step_size > 0:
            raise ValueError(
                f"`IMEX(step_size=...)` must be positive, got {self.step_size}."
            )
        if isinstance(self.output_gain, (int, float)) and not self.output_gain > 0:
            raise ValueError(
                f"`IMEX(output_gain=...)` must be positive, got {self.output_gain}."
            )
        if self.cg_steps < 1:
            raise ValueError(
                f"`IMEX(cg_steps=...)` must be at least 1, got {self.cg_steps}."
            )

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


InnerSolver = (
    optx.AbstractRootFinder | optx.AbstractFixedPointSolver | DiscreteTime
) | (ContinuousTime | IMEX)


def check_solver(solver):
    if solver is None or isinstance(
        solver,
        (
            optx.AbstractRootFinder,
            optx.AbstractFixedPointSolver,
            DiscreteTime,
            ContinuousTime,
            IMEX,
        ),
    ):
        return
    raise ValueError(
        "`least_control_grad(solver=...)` must be `None` (optx.Newton), an "
        "optimistix root finder (e.g. `optx.Newton`), an optimistix fixed-point "
        "solver (e.g. `lcp.AndersonAcceleration`, applied to the Euler map), "
        "`lcp.DiscreteTime(step_size, solver)`, `lcp.IMEX(...)` or "
        "`lcp.ContinuousTime(...)`, got "
        f"{type(solver).__name__}."
    )


def solver_name(solver) -> str:
    if isinstance(solver, DiscreteTime):
        inner = (
            "FixedPointIteration"
            if solver.solver is None
            else type(solver.solver).__name__
        )
        return f"DiscreteTime(step_size={solver.step_size}, solver={inner})"
    if isinstance(solver, ContinuousTime):
        return f"ContinuousTime(solver={type(solver.solver).__name__})"
    if isinstance(solver, IMEX):
        return f"IMEX(step_size={solver.step_size})"
    return type(solver).__name__


def divergence_fix(solver) -> str:
    if isinstance(solver, IMEX):
        return (
            "lower `step_size` of `lcp.IMEX` (the free map φ + h·f(φ) must "
            "contract), or use the default `solver=None` (optx.Newton) or "
            "`lcp.ContinuousTime()`"
        )
    if isinstance(solver, DiscreteTime) or isinstance(
        solver, optx.AbstractFixedPointSolver
    ):
        return (
            "lower `step_size` of `lcp.DiscreteTime`, raise `alpha` (weaker "
            "control), or use the default `solver=None` (optx.Newton) or "
            "`lcp.ContinuousTime()`, which do not need a step size"
        )
    if isinstance(solver, ContinuousTime):
        return (
            "check that the free dynamics f are stable (the free equilibrium "
            "attracts), raise `alpha`, or use the root finder `optx.Newton`"
        )
    return (
        "raise `alpha` (weaker control), or use `lcp.ContinuousTime()`, which "
        "follows the controlled dynamics instead of jumping to their root"
    )


def default_solver(rtol, atol):
    return optx.Newton(
        rtol=rtol, atol=atol, linear_solver=lx.AutoLinearSolver(well_posed=None)
    )


def solve(
    solver,
    velocity: Callable[[PyTree[Array]], PyTree[Array]],
    residual: Callable[[PyTree[Array]], PyTree[Array]],
    z0: PyTree[Array],
    *,
    rtol: float,
    atol: float,
    max_steps: int,
) -> tuple[PyTree[Array], RESULTS, Array]:
    """Find the steady state of `velocity` from `z0`; returns `(z, result, steps)`.

    `lcp.IMEX` here means its explicit Euler map (the free solve: there is no loss
    to treat implicitly); its controlled solve is `iterate` on the controller's IMEX
    step. `result` is `successful`, `control_max_steps_reached` or
    `control_divergence`.
    """
    if solver is None:
        solver = default_solver(rtol, atol)
    if isinstance(solver, optx.AbstractFixedPointSolver):
        solver = DiscreteTime(step_size=1.0, solver=solver)
    if isinstance(solver, IMEX):
        solver = DiscreteTime(step_size=solver.step_size, solver=solver.solver)

    if isinstance(solver, optx.AbstractRootFinder):
        sol = optx.root_find(
            lambda z, _: residual(z), solver, z0, max_steps=max_steps, throw=False
        )
        z, result, steps = (
            sol.value,
            RESULTS.promote(sol.result),
            sol.stats["num_steps"],
        )
    elif isinstance(solver, DiscreteTime):
        h = solver.step_size

        def euler(z):
            return jtu.tree_map(lambda a, b: a + h * b, z, velocity(z))

        return iterate(
            solver.solver, euler, z0, rtol=rtol, atol=atol, max_steps=max_steps
        )
    else:
        controller = solver.stepsize_controller
        if controller is None:
            controller = diffrax.PIDController(rtol=rtol / 10, atol=atol / 10)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, z, args: velocity(z)),
            solver.solver,
            t0=0.0,
            t1=solver.t1,
            dt0=solver.dt0,
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
        steps = sol.stats["num_steps"]
    return _finish(z0, z, result, steps)


def iterate(
    fp: optx.AbstractFixedPointSolver | None,
    step: Callable[[PyTree[Array]], PyTree[Array]],
    z0: PyTree[Array],
    *,
    rtol: float,
    atol: float,
    max_steps: int,
) -> tuple[PyTree[Array], RESULTS, Array]:
    """The fixed point of `step` from `z0` with `fp` (`None`:
    `optx.FixedPointIteration`); returns `(z, result, steps)` as `solve` does."""
    if fp is None:
        fp = optx.FixedPointIteration(rtol=rtol, atol=atol)
    sol = optx.fixed_point(
        lambda z, _: step(z), fp, z0, max_steps=max_steps, throw=False
    )
    return _finish(z0, sol.value, RESULTS.promote(sol.result), sol.stats["num_steps"])


def _finish(z0, z, result, steps):
    finite = tree_allfinite(z)
    result = RESULTS.where(
        result == RESULTS.nonlinear_max_steps_reached,
        RESULTS.control_max_steps_reached,
        result,
    )
    # A solve that failed with a state many orders of magnitude beyond its start has
    # exploded (a growing Euler iteration stays finite for a long time in float64).
    exploded = (result != RESULTS.successful) & (_max_abs(z) > 1e8 * (1 + _max_abs(z0)))
    diverged = (
        (result == RESULTS.nonlinear_divergence)
        | (result == RESULTS.nonfinite)
        | ~finite
        | exploded
    )
    result = RESULTS.where(diverged, RESULTS.control_divergence, result)
    return z, result, steps


def _max_abs(tree):
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        return jnp.array(0.0)
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
