from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from ._controller import AbstractController, DynamicInversion
from ._engine import controlled_equilibrium, free_equilibrium, resolve_tolerances
from ._inner_solver import as_inner_solver, default_solver, InnerSolver
from ._misc import (
    check_max_steps,
    check_tolerances,
    is_none,
    theta_vjp,
    tree_allfinite,
    tree_error_if,
)
from ._solution import RESULTS
from ._system import ControlledSystem, output_mask


class LeastControlInfo(eqx.Module):
    """What [`lcp_solvers.least_control_grad`][] found.

    **Fields:**

    - `phi`: the controlled equilibrium `φ⋆`.
    - `psi`: the control `ψ⋆` (so that `f(φ⋆, θ) + ψ⋆ = 0`).
    - `u`: the output controller `u⋆` (state-shaped, zero off the outputs).
    - `control`: `H = ½‖ψ⋆‖²`, the least-control objective.
    - `phi_free`: the free equilibrium `f(φ, θ) = 0`.
    - `loss_free`, `loss_controlled`: the loss at the free and controlled equilibria.
    - `num_steps`: steps of the controlled solve.
    - `num_steps_free`: steps of the free solve.
    - `result`: an [`lcp_solvers.RESULTS`][] item for the controlled solve (the one
        the update comes from), `RESULTS.successful` on success.
    - `free_result`: `RESULTS.successful`, or `RESULTS.free_equilibrium_failed`
        where the free solve failed (then `phi_free` and `loss_free` are undefined).

    The free equilibrium is solved separately from `phi0`, for these fields only:
    under `jax.jit` it costs nothing when `phi_free`, `loss_free`,
    `num_steps_free` and `free_result` are not used.
    """

    phi: PyTree[Array]
    psi: PyTree[Array]
    u: PyTree[Array]
    control: Scalar
    phi_free: PyTree[Array]
    loss_free: Scalar
    loss_controlled: Scalar
    num_steps: Array
    num_steps_free: Array
    result: RESULTS
    free_result: RESULTS


def _struct(tree):
    return jtu.tree_map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _check_structures(f, loss, theta, phi0, args, controller):
    phi_struct = jax.eval_shape(lambda: phi0)
    try:
        f_struct = eqx.filter_eval_shape(f, phi0, theta, args)
    except Exception as e:
        raise ValueError(
            "`least_control_grad` could not evaluate `f(phi0, theta, args)`; `f` must "
            f"have the signature `f(phi, theta, args)`. The error was: {e}"
        ) from e
    if jtu.tree_structure(f_struct) != jtu.tree_structure(phi_struct) or _struct(
        f_struct
    ) != _struct(phi_struct):
        raise ValueError(
            "`f(phi, theta, args)` must return a velocity with the same pytree "
            "structure, shapes and dtypes as `phi0`; got "
            f"{jtu.tree_map(lambda x: (x.shape, x.dtype), f_struct)} for `phi0` of "
            f"{jtu.tree_map(lambda x: (x.shape, x.dtype), phi_struct)}. For a "
            "fixed-point layer `phi = T(phi, theta)` pass `f = T(phi, theta) - phi`."
        )
    loss_struct = eqx.filter_eval_shape(loss, phi0, args)
    if (
        not isinstance(loss_struct, jax.ShapeDtypeStruct)
        or loss_struct.shape != ()
        or not jnp.issubdtype(loss_struct.dtype, jnp.floating)
    ):
        raise ValueError(
            "`loss(phi, args)` must return a scalar float; got "
            f"{jtu.tree_map(lambda x: (x.shape, x.dtype), loss_struct)}. Reduce it "
            "(e.g. `jnp.sum` or `jnp.mean`); for a batch, `jax.vmap` "
            "`least_control_grad` over samples instead."
        )


def _check_arguments(
    f, loss, theta, phi0, args, controller, solver, rtol, atol, max_steps, name
):
    check_max_steps(max_steps, name)
    check_tolerances(rtol, atol, name)
    if not isinstance(controller, AbstractController):
        raise ValueError(
            f"`{name}(controller=...)` must be an `lcp.AbstractController` "
            "such as `lcp.DynamicInversion(alpha=0.1)`, got "
            f"{type(controller).__name__}."
        )
    _check_structures(f, loss, theta, phi0, args, controller)
    # `None` stays `None`: the default depends on the tolerances, known only once
    # `phi0`'s dtype is (`_least_control_solve`).
    return None if solver is None else as_inner_solver(solver, name)


def _check_finite(theta, phi0, args, name):
    # Name the input that is not finite: otherwise it surfaces as a diverging solve
    # and the advice would be about the dynamics.
    inputs = {"theta": theta, "phi0": phi0, "args": args}
    finite = [
        tree_allfinite(eqx.filter(x, eqx.is_inexact_array)) for x in inputs.values()
    ]
    bad = jnp.stack([jnp.invert(x) for x in finite])
    messages = [
        f"`{name}`: `{key}` contains inf or NaN; the least-control update is not "
        f"defined there. Check `{key}` before the call."
        for key in inputs
    ]
    return tree_error_if(phi0, jnp.any(bad), jnp.argmax(bad), messages)


def _least_control_solve(
    f, loss, theta, phi0, args, controller, solver, rtol, atol, max_steps, throw, name
) -> LeastControlInfo:
    """The solves shared by `least_control_grad` and `least_control_objective`, both
    through the one engine: the controlled equilibrium straight from `phi0` (one
    phase), and the free equilibrium for `info` only.

    Nothing the update depends on reads the free solve, so under `jit` it is not
    computed unless `info.phi_free`, `info.loss_free`, `info.num_steps_free` or
    `info.free_result` is used."""
    phi0 = jtu.tree_map(jnp.asarray, phi0)
    if throw:
        phi0 = _check_finite(theta, phi0, args, name)
    rtol, atol = resolve_tolerances(rtol, atol, phi0)
    if solver is None:
        solver = default_solver(controller, phi0, rtol, atol)
    system = ControlledSystem(f, loss, theta, args, output_mask(loss, phi0, args))
    state, result, steps = controlled_equilibrium(
        system,
        controller,
        solver,
        phi0,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        throw=False,
        what=f"`{name}`",
        at_rest=False,
    )
    phi, psi, u = controller.unpack(system, state)
    phi_free, free_result, free_steps = free_equilibrium(
        system, solver, phi0, rtol=rtol, atol=atol, max_steps=max_steps
    )
    free_diverged = free_result == RESULTS.control_divergence
    free_result = RESULTS.where(
        free_result == RESULTS.successful,
        free_result,
        RESULTS.free_equilibrium_failed,
    )
    if throw:
        messages = [
            f"`{name}`: the controlled dynamics of {type(controller).__name__} "
            f"diverged under the solver {solver.name()} (non-finite or exploding "
            "state or control). The control is too strong for this solver, or the "
            "free dynamics f are unstable at this theta (then every controller "
            f"diverges): {solver.divergence_hint()}.",
        ] + list(RESULTS._index_to_message)  # pyright: ignore
        index = jnp.where(result == RESULTS.control_divergence, 0, 1 + result._value)
        psi = tree_error_if(psi, result != RESULTS.successful, index, messages)
        # Raised only where the free equilibrium is used (the check goes with it
        # when `jit` drops an unused free solve), and only after a successful
        # controlled solve, whose failure is the one to report.
        free_messages = [
            f"`{name}`: the free dynamics f diverged under the solver "
            f"{solver.name()} (non-finite or exploding state), so `info.phi_free` "
            "and `info.loss_free` are undefined. f is unstable at this theta (its "
            f"equilibrium repels) or the solver is: {solver.divergence_hint()}.",
            RESULTS[RESULTS.free_equilibrium_failed],
        ]
        failed = (result == RESULTS.successful) & (free_result != RESULTS.successful)
        phi_free = tree_error_if(
            phi_free, failed, jnp.where(free_diverged, 0, 1), free_messages
        )
    leaves = jtu.tree_leaves(psi)
    control = 0.5 * sum(jnp.sum(jnp.square(jnp.abs(x))) for x in leaves)
    return LeastControlInfo(
        phi=phi,
        psi=psi,
        u=u,
        control=jnp.asarray(control),
        phi_free=phi_free,
        loss_free=loss(phi_free, args),
        loss_controlled=loss(phi, args),
        num_steps=steps,
        num_steps_free=free_steps,
        result=result,
        free_result=free_result,
    )


@eqx.filter_jit
def least_control_grad(
    f: Callable[[PyTree[Array], PyTree, PyTree], PyTree[Array]],
    loss: Callable[[PyTree[Array], PyTree], Scalar],
    theta: PyTree,
    phi0: PyTree[Array],
    args: PyTree = None,
    *,
    controller: AbstractController = DynamicInversion(alpha=0.1),
    solver: InnerSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 1024,
    throw: bool = True,
) -> tuple[PyTree, LeastControlInfo]:
    r"""The least-control update of `theta` for the dynamics `f` and loss `loss`.

    Finds the controlled equilibrium `(φ⋆, ψ⋆)` of `controller` (the least control
    `ψ` that holds the state at a minimum of the loss, or of `½‖f‖² + L/α` for a
    leaky controller) in one phase, the controller acting from `phi0` on, and
    returns

    $$\text{grad} = -(∂_θ f(φ⋆, θ))^\top ψ⋆,$$

    the gradient of the least-control objective `H(θ)` (Theorem 1): *descend* it.
    Only one vector-Jacobian product of `f` in `θ` is needed, at the controlled
    equilibrium. For the equilibrium RNN `f = -φ + Wσ(φ) + Ux` it is the local rule
    `-grad_W = ψ σ(φ)ᵀ`. A batch of samples is a `jax.vmap` over `phi0`/`args`.

    The free equilibrium `f(φ, θ) = 0` is not needed for the update. It is solved
    from `phi0` for `info.phi_free`/`loss_free`/`num_steps_free`/`free_result`
    only, and under `jax.jit` not at all when those are not used.

    **Arguments:**

    - `f`: the free velocity field `f(phi, theta, args)`, with `phi`'s structure. A
        fixed-point layer `phi = T(phi, theta)` is `f = T - phi`.
    - `loss`: `loss(phi, args)`, a scalar. `u` lives on the components where it
        depends on `phi` (detected around `phi0`: nonzero gradient or Hessian
        probe at `phi0` and at two shifted points).
    - `theta`: the parameters, any pytree; `grad` has its structure (`None` where
        `theta` has no inexact arrays).
    - `phi0`: where the dynamics start (e.g. zeros, or the last free equilibrium);
        the controls start at zero.
    - `args`: anything else (e.g. the input `x` and the target), passed to `f` and
        `loss`.
    - `controller`: [`lcp_solvers.DynamicInversion`][] (default, `alpha=0.1`),
        [`lcp_solvers.EnergyBased`][], [`lcp_solvers.LinearFeedback`][], or any
        [`lcp_solvers.AbstractController`][].
    - `solver`: how both equilibria are found.
        - `None` (default): for states of more than 16 scalars and
          [`lcp_solvers.DynamicInversion`][] or [`lcp_solvers.EnergyBased`][]
          (controllers with the IMEX capability),
          `lcp.IMEX(solver=lcp.AndersonAcceleration(rtol, atol, history_length=3))`
          (`step_size=0.5` for `EnergyBased`):
          no Jacobian is formed, each step costs one `f` and one transposed
          product. It is meant for maps `φ ↦ φ + f(φ)` that contract, as for a
          fixed-point layer `f = T - φ` with a contracting `T` (convergence on
          random contractive layers: docs/least_control.md). For small states
          and other controllers, `optx.Newton` with a dense LU solve,
          which finds an equilibrium whatever its stability (it does not check
          that the dynamics attract).
        - any `optx.AbstractRootFinder` (e.g. `optx.Newton(rtol, atol,
          linear_solver=lx.GMRES(...))` for Newton–Krylov on large states).
        - [`lcp_solvers.DiscreteTime`][]`(step_size, solver)`: Euler/Picard iteration
          of the controller's dynamics, optionally accelerated (e.g.
          `lcp.AndersonAcceleration`); a bare optimistix fixed-point solver means
          `DiscreteTime(step_size=1.0, solver=...)`.
        - [`lcp_solvers.IMEX`][]`(step_size)`: Euler iteration with the loss term
          implicit; converges at about the rate of recurrent backprop whatever
          `alpha` (DI and EBD only). The fastest choice for large states.
        - [`lcp_solvers.ContinuousTime`][]`(...)`: the controller's ODE with diffrax
          until a steady-state event.
        - any [`lcp_solvers.AbstractInnerSolver`][].
    - `rtol`, `atol`: tolerances of both solves (ignored by a `solver` that carries
        its own). `None` is `1e-8` for a float64 state and `1e-5` for float32 or
        lower precision. The controls are solved for in units of their scale at
        `phi0` (`rms(∇L)/α` for a leaky controller, `rms(∇L)` for `alpha = 0`; 1
        where `∇L(phi0)` vanishes), so the tolerances are relative to the learning
        signal whatever the loss's scale or `alpha`, but never finer than the
        rounding level of the state, `10·eps·rms(phi0)/atol` (a control is a
        difference of velocities of the state's size): in float32 a weak signal
        against a large state is resolved only to that level, not to `rtol`.
        Where the controls found are much smaller than the units, the solve is
        polished in the controls' own units (docs/architecture.md).
    - `max_steps`: the most steps of each solve. The default is higher than
        optimistix's 256: on random contractive layers with a cross-entropy loss at
        `alpha <= 1e-2` a few samples in 3000 need 256-750 steps (the median is 42).
        A solve stops when it converges, but under `jax.vmap` a batch runs as long
        as its slowest sample, so a sample that never converges costs the batch
        `max_steps` steps: lower it where a failed sample is cheaper to drop
        (`throw=False` and `info.result`) than to wait for.
    - `throw`: if `True`, a failed solve raises an error saying what to change
        (divergence names the controller and the solver; a non-finite `theta`,
        `phi0` or `args` is named). If `False`, the failure is reported in
        `info.result` and `grad` is the best estimate. A failed free solve (the
        `info` fields above) raises only where they are used, and only after a
        successful controlled solve.

    **Returns:**

    `(grad, info)`: `grad` as above, `info` a [`lcp_solvers.LeastControlInfo`][].

    **Raises:**

    - `ValueError` when called (before any solve): `controller` or `solver` of
        another kind, `max_steps`/`rtol`/`atol` out of range, a loss that is not a
        scalar, `f(phi0, theta, args)` not of `phi0`'s structure, shapes and dtypes,
        `lcp.IMEX` with a controller that lacks the IMEX capability (e.g.
        `LinearFeedback`), a controller's own argument checks (e.g. `Q`'s shape).
    - `EquinoxRuntimeError` (from `equinox.error_if`; with `throw=True`): a
        non-finite `theta`, `phi0` or `args` (named), a failed controlled solve
        (`RESULTS.control_max_steps_reached` or `control_divergence`), or, where
        `info.phi_free` or `info.loss_free` is used, a failed free solve
        (`RESULTS.free_equilibrium_failed`), each message saying what to change.
    """
    inner = _check_arguments(
        f, loss, theta, phi0, args, controller, solver, rtol, atol, max_steps,
        "least_control_grad",
    )  # fmt: skip
    info = _least_control_solve(
        f, loss, theta, phi0, args, controller, inner, rtol, atol, max_steps, throw,
        "least_control_grad",
    )  # fmt: skip
    grad = theta_vjp(
        lambda t: f(info.phi, t, args), theta, jtu.tree_map(jnp.negative, info.psi)
    )
    return grad, info


class _Config(eqx.Module):
    # Everything but the differentiable inputs, passed positionally so that
    # `filter_custom_jvp` sees it (its tangent is ignored).
    f: Callable = eqx.field(static=True)
    loss: Callable = eqx.field(static=True)
    controller: AbstractController
    solver: Any
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)


@eqx.filter_custom_jvp
def _objective(theta, phi0, args, config):
    info = _least_control_solve(
        config.f, config.loss, theta, phi0, args, config.controller, config.solver,
        config.rtol, config.atol, config.max_steps, config.throw,
        "least_control_objective",
    )  # fmt: skip
    value = info.control + config.controller.loss_weight() * info.loss_controlled
    return value, info


def _has_tangent(tangent):
    return any(t is not None for t in jtu.tree_leaves(tangent, is_leaf=is_none))


@jax.custom_jvp
def _first_order_only(x):
    return x


def _first_order_only_jvp(primals, tangents):
    # The rule below treats the controlled equilibrium as fixed: exact for the first
    # derivative (Theorem 1), wrong for the second, which also needs how (φ⋆, ψ⋆)
    # move with θ. That happens only when an outer derivative reaches them, i.e.
    # they carry a tangent here.
    if any(
        not isinstance(t, jax.custom_derivatives.SymbolicZero)
        for t in jtu.tree_leaves(tangents)
    ):
        raise ValueError(
            "Second derivatives of `least_control_objective` (e.g. `jax.hessian`, "
            "`jax.jacrev(jax.grad(...))`) are not supported: its derivative is the "
            "least-control update at the controlled equilibrium, and how that "
            "equilibrium moves with `theta` is not computed. Differentiate the update "
            "itself by finite differences, or use implicit differentiation "
            "(`optx.ImplicitAdjoint`) for second-order quantities."
        )
    return primals[0], jtu.tree_map(
        lambda t, x: (
            jnp.zeros_like(x)
            if isinstance(t, jax.custom_derivatives.SymbolicZero)
            else t
        ),
        tangents[0],
        primals[0],
        is_leaf=lambda t: isinstance(t, jax.custom_derivatives.SymbolicZero),
    )


_first_order_only.defjvp(_first_order_only_jvp, symbolic_zeros=True)


@_objective.def_jvp
def _objective_jvp(primals, tangents):
    theta, phi0, args, config = primals
    t_theta, t_phi0, t_args, _ = tangents
    if _has_tangent(t_phi0) or _has_tangent(t_args):
        raise ValueError(
            "`least_control_objective` is differentiable in `theta` only, not in "
            "`phi0` or `args`. Put everything you train (e.g. an input encoder's "
            "parameters) into `theta` and let `f` use it."
        )
    value, info = _objective(theta, phi0, args, config)
    phi_c, psi_c = _first_order_only((info.phi, info.psi))
    diff_theta, static_theta = eqx.partition(theta, eqx.is_inexact_array)
    # Tangents of the inexact leaves only; integer leaves (float0 tangents) and
    # leaves without a tangent get none.
    t_diff = jtu.tree_map(
        lambda d, t: (
            None
            if d is None
            else jnp.zeros_like(d)
            if t is None or not eqx.is_inexact_array(t)
            else t
        ),
        diff_theta,
        eqx.filter(t_theta, eqx.is_array, is_leaf=is_none),
        is_leaf=is_none,
    )

    def work(d):
        # -⟨ψ⋆, f(φ⋆, θ)⟩ at the fixed controlled equilibrium: its derivative in θ
        # is the update -(∂θ f)ᵀψ⋆. Taken as a JVP, reverse mode transposes it after
        # any `vmap`, so a batch-mean update is one product, not a mean of
        # per-sample weight gradients.
        velocity = config.f(phi_c, eqx.combine(d, static_theta), args)
        products = jtu.tree_map(lambda p, v: -jnp.sum(p * v), psi_c, velocity)
        return sum(jtu.tree_leaves(products), jnp.zeros((), value.dtype))

    _, t_value = jax.jvp(work, (diff_theta,), (t_diff,))
    # Zeros that depend on the input tangent, so that no trace (`jvp`, or the
    # `linearize` of reverse mode, which drops tangents that are constants) sees
    # them as symbolic: an outer derivative then reaches `_first_order_only` above
    # and raises, instead of treating the equilibrium as a constant.
    linked_zero = 0 * t_value
    t_info = jtu.tree_map(
        lambda x: (
            jnp.broadcast_to(linked_zero.astype(x.dtype), x.shape)
            if eqx.is_inexact_array(x)
            else jax.custom_derivatives.zero_from_primal(  # pyright: ignore
                x, symbolic_zeros=False
            )
        ),
        info,
    )
    return (value, info), (t_value.astype(value.dtype), t_info)


@eqx.filter_jit
def least_control_objective(
    f: Callable[[PyTree[Array], PyTree, PyTree], PyTree[Array]],
    loss: Callable[[PyTree[Array], PyTree], Scalar],
    theta: PyTree,
    phi0: PyTree[Array],
    args: PyTree = None,
    *,
    controller: AbstractController = DynamicInversion(alpha=0.1),
    solver: InnerSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 1024,
    throw: bool = True,
) -> tuple[Scalar, LeastControlInfo]:
    r"""The least-control objective as a differentiable function of `theta`, so that
    `jax.grad` gives the least-control update.

    Runs the same solves as [`lcp_solvers.least_control_grad`][] and returns

    $$\mathcal{L}(θ) = ½‖ψ⋆‖² + w\,L(φ⋆),$$

    with `w = 0` for perfect control (`alpha = 0`: this is `H`), `1/α` for a leaky
    output controller and `β` for [`lcp_solvers.EnergyBased`][]: the minimum of
    `½‖f‖² + w L` that the controlled equilibrium attains. Its derivative in `theta`
    (a custom JVP) is the least-control update `-(∂_θ f(φ⋆, θ))ᵀ ψ⋆`, the same
    value `least_control_grad` returns; by Theorem 1 it is the exact gradient of
    this objective for [`lcp_solvers.DynamicInversion`][] and
    [`lcp_solvers.EnergyBased`][] (and for [`lcp_solvers.LinearFeedback`][] with an
    optimal `Q`); with other feedback (Kolen–Pollack before alignment, a non-optimal
    `Q`) it is that controller's update. The solves are not differentiated through.

    Use it to train on a batch without forming per-sample weight gradients: `vmap`
    inside the `grad`,

    ```python
    def batch_objective(theta, x, y):
        objective = lambda xi, yi: lcp.least_control_objective(
            f, loss, theta, phi0, (xi, yi))[0]
        return jnp.mean(jax.vmap(objective)(x, y))

    update = jax.grad(batch_objective)(theta, x, y)
    ```

    The arguments are those of [`lcp_solvers.least_control_grad`][]. Only `theta`
    may be differentiated; differentiating `phi0` or `args` raises a `ValueError`.

    **Returns:**

    `(objective, info)`: the scalar objective and a
    [`lcp_solvers.LeastControlInfo`][].

    **Raises:**

    As [`lcp_solvers.least_control_grad`][], and a `ValueError` when `phi0` or
    `args` is differentiated or when second derivatives are taken (`jax.hessian`,
    `jax.jacrev(jax.grad(...))`): the principle defines the first-order update only.
    """
    inner = _check_arguments(
        f, loss, theta, phi0, args, controller, solver, rtol, atol, max_steps,
        "least_control_objective",
    )  # fmt: skip
    config = _Config(f, loss, controller, inner, rtol, atol, max_steps, throw)
    value, info = _objective(theta, phi0, args, config)
    # `info` reports the solves; it carries no derivative (as optimistix's stats).
    return value, eqx.tree_at(lambda i: i, info, replace_fn=jax.lax.stop_gradient)
