from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from ._controller import AbstractController, DynamicInversion
from ._engine import controlled_equilibrium, free_equilibrium, resolve_tolerances
from ._inner_solver import as_inner_solver, InnerSolver
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
    - `result`: an [`lcp_solvers.RESULTS`][] item, `RESULTS.successful` on success.
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
    return as_inner_solver(solver, name)


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
    """The free and controlled solves shared by `least_control_grad` and
    `least_control_objective`: both through the one engine."""
    phi0 = jtu.tree_map(jnp.asarray, phi0)
    if throw:
        phi0 = _check_finite(theta, phi0, args, name)
    rtol, atol = resolve_tolerances(rtol, atol, phi0)
    system = ControlledSystem(f, loss, theta, args, None)
    phi_free, free_result, free_steps = free_equilibrium(
        system, solver, phi0, rtol=rtol, atol=atol, max_steps=max_steps
    )
    system = ControlledSystem(f, loss, theta, args, output_mask(loss, phi_free, args))
    state, result, steps = controlled_equilibrium(
        system,
        controller,
        solver,
        phi_free,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        throw=False,
        what=f"`{name}`",
    )
    phi, psi, u = controller.unpack(system, state)
    # A failed free solve is the cause whatever the controlled solve did after it.
    result = RESULTS.where(
        free_result == RESULTS.successful, result, RESULTS.free_equilibrium_failed
    )
    if throw:
        free_diverged = free_result == RESULTS.control_divergence
        messages = [
            f"`{name}`: the free dynamics f diverged under the solver "
            f"{solver.name()} before any control was applied (non-finite or "
            "exploding state). f is unstable at this theta (its equilibrium repels) "
            f"or the solver is: {solver.divergence_hint()}.",
            f"`{name}`: the controlled dynamics of {type(controller).__name__} "
            f"diverged under the solver {solver.name()} (non-finite or exploding "
            "state or control). The control is too strong for this solver: "
            f"{solver.divergence_hint()}.",
        ] + list(RESULTS._index_to_message)  # pyright: ignore
        index = jnp.where(
            free_diverged,
            0,
            jnp.where(result == RESULTS.control_divergence, 1, 2 + result._value),
        )
        psi = tree_error_if(psi, result != RESULTS.successful, index, messages)
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
    max_steps: int = 256,
    throw: bool = True,
) -> tuple[PyTree, LeastControlInfo]:
    r"""The least-control update of `theta` for the dynamics `f` and loss `loss`.

    Finds the free equilibrium `f(φ, θ) = 0` from `phi0`, then, warm-started there,
    the controlled equilibrium `(φ⋆, ψ⋆)` of `controller` (the least control `ψ` that
    holds the state at a minimum of the loss, or of `½‖f‖² + L/α` for a leaky
    controller), and returns

    $$\text{grad} = -(∂_θ f(φ⋆, θ))^\top ψ⋆,$$

    the gradient of the least-control objective `H(θ)` (Theorem 1): *descend* it.
    Only one vector-Jacobian product of `f` in `θ` is needed, at the controlled
    equilibrium. For the equilibrium RNN `f = -φ + Wσ(φ) + Ux` it is the local rule
    `-grad_W = ψ σ(φ)ᵀ`. A batch of samples is a `jax.vmap` over `phi0`/`args`.

    **Arguments:**

    - `f`: the free velocity field `f(phi, theta, args)`, with `phi`'s structure. A
        fixed-point layer `phi = T(phi, theta)` is `f = T - phi`.
    - `loss`: `loss(phi, args)`, a scalar. `u` lives on the components where it
        depends on `phi` (detected at the free equilibrium: nonzero gradient or
        Hessian probe).
    - `theta`: the parameters, any pytree; `grad` has its structure (`None` where
        `theta` has no inexact arrays).
    - `phi0`: the initial guess of the free equilibrium.
    - `args`: anything else (e.g. the input `x` and the target), passed to `f` and
        `loss`.
    - `controller`: [`lcp_solvers.DynamicInversion`][] (default, `alpha=0.1`),
        [`lcp_solvers.EnergyBased`][], [`lcp_solvers.LinearFeedback`][], or any
        [`lcp_solvers.AbstractController`][].
    - `solver`: how both equilibria are found.
        - `None` (default): `optx.Newton` with a dense LU solve on the steady-state
          equations; converges in a few steps for any `alpha >= 0`. A root finder
          finds an equilibrium whatever its stability: it does not check that the
          free dynamics attract (a solver that follows the dynamics,
          `DiscreteTime`/`IMEX`/`ContinuousTime`, reports an unstable `f` as
          divergence).
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
        lower precision. The controls are solved for in units of their scale at the
        free equilibrium (`rms(∇L)/α` for a leaky controller, `rms(∇L)` for
        `alpha = 0`), so the tolerances are relative to the learning signal
        whatever the loss's scale or `alpha`.
    - `max_steps`: the most steps of each solve.
    - `throw`: if `True`, a failed solve raises an error saying what to change
        (divergence names the controller and the solver; a non-finite `theta`,
        `phi0` or `args` is named). If `False`, the failure is reported in
        `info.result` and `grad` is the best estimate. Where `∇L` vanishes at the
        free equilibrium the update is exactly zero and no controlled solve runs.

    **Returns:**

    `(grad, info)`: `grad` as above, `info` a [`lcp_solvers.LeastControlInfo`][].

    **Raises:**

    - `ValueError` when called (before any solve): `controller` or `solver` of
        another kind, `max_steps`/`rtol`/`atol` out of range, a loss that is not a
        scalar, `f(phi0, theta, args)` not of `phi0`'s structure, shapes and dtypes,
        `lcp.IMEX` with a controller that lacks the IMEX capability (e.g.
        `LinearFeedback`), a controller's own argument checks (e.g. `Q`'s shape).
    - `EquinoxRuntimeError` (from `equinox.error_if`; with `throw=True`): a
        non-finite `theta`, `phi0` or `args` (named), or a failed solve:
        `RESULTS.free_equilibrium_failed`, `control_max_steps_reached` or
        `control_divergence`, each message saying what to change.
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
    max_steps: int = 256,
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
