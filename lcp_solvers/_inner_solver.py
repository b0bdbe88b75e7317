import math
from collections.abc import Callable

import diffrax
import equinox as eqx
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


InnerSolver = (
    optx.AbstractRootFinder | optx.AbstractFixedPointSolver | DiscreteTime
) | ContinuousTime


def check_solver(solver):
    if solver is None or isinstance(
        solver,
        (
            optx.AbstractRootFinder,
            optx.AbstractFixedPointSolver,
            DiscreteTime,
            ContinuousTime,
        ),
    ):
        return
    raise ValueError(
        "`least_control_grad(solver=...)` must be `None` (optx.Newton), an "
        "optimistix root finder (e.g. `optx.Newton`), an optimistix fixed-point "
        "solver (e.g. `lcp.AndersonAcceleration`, applied to the Euler map), "
        "`lcp.DiscreteTime(step_size, solver)` or `lcp.ContinuousTime(...)`, got "
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
    return type(solver).__name__


def divergence_fix(solver) -> str:
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

    `result` is `successful`, `control_max_steps_reached` or `control_divergence`.
    """
    if solver is None:
        solver = default_solver(rtol, atol)
    if isinstance(solver, optx.AbstractFixedPointSolver):
        solver = DiscreteTime(step_size=1.0, solver=solver)

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
        fp = solver.solver
        if fp is None:
            fp = optx.FixedPointIteration(rtol=rtol, atol=atol)
        h = solver.step_size

        def euler(z, _):
            v = velocity(z)
            return jtu.tree_map(lambda a, b: a + h * b, z, v)

        sol = optx.fixed_point(euler, fp, z0, max_steps=max_steps, throw=False)
        z, result, steps = (
            sol.value,
            RESULTS.promote(sol.result),
            sol.stats["num_steps"],
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
