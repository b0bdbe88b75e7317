"""The one least-control engine: every entry point solves the controlled equilibrium
of a controller acting on a `ControlledSystem` here (docs/architecture.md)."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._controller import AbstractController
from ._inner_solver import AbstractInnerSolver, SteadyStateProblem
from ._misc import tree_allfinite, tree_error_if, tree_float_dtype, tree_rms
from ._solution import RESULTS
from ._system import ControlledSystem


def default_tolerance(tree: PyTree) -> float:
    """The one default `rtol`/`atol`: `1e-8` if every floating leaf of `tree` is
    (complex) float64, else `1e-5`. Tolerances apply in units where the controls are
    divided by the learning signal's scale, so they are relative to it."""
    dtype = tree_float_dtype(tree)
    return 1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-5


def resolve_tolerances(rtol, atol, tree, reference=None) -> tuple[float, float]:
    """`None` follows `reference`'s `rtol`/`atol` (e.g. the forward solver, so that a
    forward pass solved to `1e-12` gets a backward pass of matching accuracy), else
    `default_tolerance(tree)`."""
    default = default_tolerance(tree)
    if rtol is None:
        rtol = getattr(reference, "rtol", None)
        rtol = default if rtol is None else rtol
    if atol is None:
        atol = getattr(reference, "atol", None)
        atol = default if atol is None else atol
    return rtol, atol


def control_scale(
    system: ControlledSystem,
    controller: AbstractController,
    phi: PyTree[Array],
    atol: float,
) -> Array:
    """The scale of the controls at the start `phi`: `w·g` for a controller whose
    objective weighs the loss by `w > 0` (a leak `α = 1/w`: weak control makes the
    controls small), else `g`, with `g = rms(∇L(φ))`.

    `g` is kept above the rounding level of `∇L` itself: near a minimum of the loss
    the gradient is rounding noise, of order `eps·rms(∇²L·φ)`, and in units smaller
    than `10·eps/atol` times that noise a solver's test `|residual| < atol` could
    never be met (nor, below `√eps`, a relative one). Both terms scale with the loss,
    so the units stay invariant to the loss's scale. Zero only when `∇L(φ)` vanishes
    exactly."""
    g, floor = _signal_and_rounding_floor(system, phi, atol)
    g = jnp.where(g > 0, jnp.maximum(g, floor), g)
    return _weighted(controller, g)


def _signal_and_rounding_floor(system, phi, atol):
    g, hessian_phi = jax.jvp(system.loss_grad, (phi,), (phi,))
    g = tree_rms(g)
    eps = jnp.finfo(g.dtype).eps
    floor = jnp.maximum(jnp.sqrt(eps), 10 * eps / jnp.asarray(atol, g.dtype))
    return g, floor * tree_rms(hessian_phi).astype(g.dtype)


def polished_scale(
    system: ControlledSystem,
    controller: AbstractController,
    state: tuple,
    atol: float,
) -> Array:
    """The controls' own scale at a controlled `state` found away from rest:
    `rms(controls)`, kept above the rounding level of `∇L` (as in `control_scale`)
    and of the state itself (a control is a difference of velocities of the
    state's size, `ψ = -f(φ)` at rest, so it is not resolved below `eps·rms(φ)`,
    and in smaller units `|r| < atol` could not be met)."""
    _, floor = _signal_and_rounding_floor(system, state[0], atol)
    found = tree_rms(state[1:])
    floor = jnp.maximum(
        _weighted(controller, floor).astype(found.dtype),
        state_resolution(state[0], atol).astype(found.dtype),
    )
    return jnp.maximum(found, floor)


def state_resolution(phi: PyTree[Array], atol: float) -> Array:
    """The smallest units in which controls of a state like `phi` can be resolved to
    `atol`: `10·eps·rms(phi)/atol`. A control is a difference of velocities of the
    state's size (`ψ = -f(φ)` at rest), so it carries a rounding error of order
    `eps·rms(φ)`; in finer units `|r| < atol` could not be met (in float32 at
    `atol = 1e-4`, units below about `0.01·rms(φ)`)."""
    rms = tree_rms(phi)
    return 10 * jnp.finfo(rms.dtype).eps * rms / jnp.asarray(atol, rms.dtype)


def _weighted(controller, g):
    w = jnp.asarray(controller.loss_weight(), g.dtype)
    return jnp.where(w > 0, g * w, g)


def _units(scale):
    safe = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1)

    def to_units(state):
        phi, *controls = state
        return (phi, *jtu.tree_map(lambda x: x / safe.astype(x.dtype), controls))

    def from_units(z):
        phi, *controls = z
        return (phi, *jtu.tree_map(lambda x: x * safe.astype(x.dtype), controls))

    return to_units, from_units


def _max_abs(tree):
    leaves = [jnp.max(jnp.abs(x)) for x in jtu.tree_leaves(tree)]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.array(0.0)


def _map_result(z0, z, result):
    """The one mapping of a solver's outcome to `RESULTS`."""
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
        | jnp.invert(tree_allfinite(z))
        | exploded
    )
    return RESULTS.where(diverged, RESULTS.control_divergence, result)


def _raise(result, value, *, solver: AbstractInnerSolver, what: str):
    # One check with a message per failure (a check costs a callback branch per call
    # under vmap): divergence names the solver and what to change for it, every other
    # failure gives its RESULTS message.
    diverged = (
        f"{what}: the controlled dynamics diverged under the solver {solver.name()} "
        "(non-finite or exploding state or control). The free dynamics are unstable "
        f"or the control is too strong for this solver: {solver.divergence_hint()}."
    )
    index = jnp.where(result == RESULTS.control_divergence, 0, 1 + result._value)
    messages = [diverged] + list(RESULTS._index_to_message)  # pyright: ignore
    return tree_error_if(value, result != RESULTS.successful, index, messages)


def free_equilibrium(
    system: ControlledSystem,
    solver: AbstractInnerSolver,
    phi0: PyTree[Array],
    *,
    rtol: float,
    atol: float,
    max_steps: int,
) -> tuple[PyTree[Array], RESULTS, Array]:
    """The free equilibrium `f(φ) = 0` from `phi0` with the same solver."""
    identity = lambda z: z
    velocity = lambda z: (system.velocity(z[0]),)
    problem = SteadyStateProblem(velocity, velocity, system, None, identity, identity)
    z, result, steps = solver.solve(
        problem, (phi0,), rtol=rtol, atol=atol, max_steps=max_steps
    )
    result = _map_result((phi0,), z, result)
    return z[0], result, steps


def _where(pred, on_true, on_false):
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _silenced(system: ControlledSystem, off: Array) -> ControlledSystem:
    """`system` with its velocity and loss replaced by zero where `off`: every
    controller is at rest on it with zero controls."""

    def f(phi, theta, args):
        velocity = system.f(phi, theta, args)
        return _where(off, jtu.tree_map(jnp.zeros_like, velocity), velocity)

    def loss(phi, args):
        value = system.loss(phi, args)
        return jnp.where(off, jnp.zeros_like(value), value)

    return ControlledSystem(f, loss, system.theta, system.args, system.output_mask)


def controlled_equilibrium(
    system: ControlledSystem,
    controller: AbstractController,
    solver: AbstractInnerSolver,
    phi0: PyTree[Array],
    *,
    rtol: float,
    atol: float,
    max_steps: int,
    throw: bool,
    what: str,
    at_rest: bool = True,
) -> tuple[tuple, RESULTS, Array]:
    """The controlled equilibrium of `controller` acting on `system`, started at
    `phi0` with the control off: a free equilibrium (`at_rest=True`) or any state.

    The solver works in units where the controls are divided by `control_scale(system,
    controller, phi0, atol)`, so that `rtol`/`atol` are relative to the learning signal
    whatever the loss's scale or the controller's leak. Where `∇L(phi0)` vanishes
    identically the free equilibrium is already controlled (zero control): the state
    is `phi0` with zero controls, even where a solve could not run (e.g. a failed
    forward solve that the loss masks out). Away from rest (`at_rest=False`) a
    vanishing `∇L(phi0)` says nothing: the solve runs, and where the controls it
    finds are much smaller than the units (1 where `∇L(phi0)` vanishes) it is
    polished in the controls' own units.

    **Returns:** `(state, result, num_steps)`: the extended state `(phi, *controls)`
    in the controller's own units, a `RESULTS`, and the solver's step count. With
    `throw=True` a failure raises, its message starting with `what`.
    """
    scale = control_scale(system, controller, phi0, atol)
    if not at_rest:
        # Away from rest the controls are found by moving the state, so they are not
        # resolved below the state's rounding level: a weak learning signal (a
        # well-fitted example, a large leak) would otherwise ask for units in which
        # the tolerance cannot be met, and the solve would run to `max_steps` (in
        # float32, 2-3% of a trained network's examples, each holding its whole
        # vmapped batch for `max_steps`).
        resolution = state_resolution(phi0, atol).astype(scale.dtype)
        scale = jnp.where(scale > 0, jnp.maximum(scale, resolution), scale)
    state0 = controller.init(system, phi0)
    if at_rest:
        no_signal = scale == 0
        # Without a learning signal the solve runs on a silenced system (zero
        # velocity and loss from a finite start), which is at rest at once. Not
        # `lax.cond`: under `vmap` (a batch of examples) a cond with a per-example
        # predicate broadcasts every closed-over operand to the batch, so each
        # example's solve would carry its own copy of the weights (on a 512-unit
        # network, 64 copies of every matrix read at every step: 3x the cost of the
        # whole training step).
        active = _silenced(system, no_signal)
        finite_start = _where(no_signal, jtu.tree_map(jnp.zeros_like, phi0), phi0)
    else:
        no_signal = jnp.array(False)
        active, finite_start = system, phi0

    def solve_in_units(scale, initial):
        to_units, from_units = _units(scale)

        def in_units(fn):
            return lambda z: to_units(fn(active, from_units(z)))

        problem = SteadyStateProblem(
            in_units(controller.velocity),
            in_units(controller.residual),
            active,
            controller,
            to_units,
            from_units,
        )
        start = to_units(initial)
        z, result, steps = solver.solve(
            problem, start, rtol=rtol, atol=atol, max_steps=max_steps
        )
        z = jtu.tree_map(lambda a, b: jnp.asarray(a, b.dtype), z, start)
        return from_units(z), _map_result(start, z, result), jnp.asarray(steps)

    state, result, steps = solve_in_units(scale, controller.init(active, finite_start))
    if not at_rest and len(state0) > 1:
        # Away from rest, `∇L(phi0)` only estimates the controls' scale: where the
        # controls found are much smaller (e.g. `∇L(phi0) = 0`, or a start far from
        # a well-fitted equilibrium), the tolerances were loose relative to them.
        # Polish in their own units from there; the others are converged already
        # and stop after one step.
        found = polished_scale(active, controller, state, atol)
        safe = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1).astype(
            found.dtype
        )
        polish = (result == RESULTS.successful) & (found > 0) & (found < safe / 4)
        polished, result2, steps2 = solve_in_units(
            jnp.where(polish, found, scale), state
        )
        state = _where(polish, polished, state)
        result = RESULTS.where(polish, result2, result)
        steps = steps + jnp.where(polish, steps2, 0)
    state = _where(no_signal, state0, state)
    result = RESULTS.where(no_signal, RESULTS.successful, result)  # pyright: ignore
    steps = jnp.where(no_signal, 0, steps)
    start_finite = tree_allfinite(phi0)
    result = RESULTS.where(start_finite | no_signal, result, RESULTS.nonfinite_start)
    if throw:
        state = _raise(result, state, solver=solver, what=what)
    return state, result, steps
