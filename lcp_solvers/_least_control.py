from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from ._controller import (
    _output_mask,
    _System,
    AbstractController,
    DynamicInversion,
    LinearFeedback,
)
from ._inner_solver import (
    check_solver,
    divergence_fix,
    IMEX,
    InnerSolver,
    iterate,
    solve,
    solver_name,
)
from ._misc import is_none, theta_vjp
from ._solution import RESULTS


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
    if isinstance(controller, LinearFeedback):
        out = (
            phi_struct
            if controller.output is None
            else jax.eval_shape(controller.output, phi0)
        )
        n = jfu.ravel_pytree(phi0)[0].size
        m = sum(x.size for x in jtu.tree_leaves(out))
        if controller.Q.shape != (n, m):
            raise ValueError(
                f"`LinearFeedback(Q=...)` must have shape (size(phi), "
                f"size(output(phi))) = ({n}, {m}), got {controller.Q.shape}."
            )


def _check_arguments(f, loss, theta, phi0, args, controller, solver, name):
    check_solver(solver)
    if not isinstance(controller, AbstractController):
        raise ValueError(
            f"`{name}(controller=...)` must be an `lcp.AbstractController` "
            "such as `lcp.DynamicInversion(alpha=0.1)`, got "
            f"{type(controller).__name__}."
        )
    _check_structures(f, loss, theta, phi0, args, controller)


def default_tolerance(tree: PyTree[Array]) -> float:
    """The default `rtol`/`atol`: `1e-8` if every floating leaf of `tree` is float64,
    else `1e-5`."""
    leaves = [jnp.asarray(x) for x in jtu.tree_leaves(tree)]
    leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    double = bool(leaves) and all(jnp.finfo(x.dtype).bits >= 64 for x in leaves)
    return 1e-8 if double else 1e-5


def _controlled_equilibrium(
    f, loss, theta, phi0, args, controller, solver, rtol, atol, max_steps, throw
) -> LeastControlInfo:
    """The free and controlled solves shared by `least_control_grad` and
    `least_control_objective`."""
    phi0 = jtu.tree_map(jnp.asarray, phi0)
    default_tol = default_tolerance(phi0)
    rtol = default_tol if rtol is None else rtol
    atol = default_tol if atol is None else atol
    free_f = lambda phi: f(phi, theta, args)
    phi_free, free_result, free_steps = solve(
        solver,
        free_f,
        free_f,
        phi0,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    mask = _output_mask(loss, phi_free, args)
    sys = _System(f, loss, theta, args, mask)
    z0 = controller.init(sys, phi_free)
    if isinstance(solver, IMEX):
        imex = solver
        loss_step = lambda phi, v, c: imex.loss_step(sys.grad_loss, sys.mask, phi, v, c)
        imex_map = lambda z: controller.imex_step(
            sys, z, imex.step_size, imex.output_gain, loss_step
        )
        z, result, steps = iterate(
            solver.solver,
            imex_map,
            controller.imex_state(sys, z0),
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
        )
        z = controller.imex_full(sys, z)
    else:
        z, result, steps = solve(
            solver,
            lambda z: controller.velocity(sys, z),
            lambda z: controller.residual(sys, z),
            z0,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
        )
    phi, psi, u = controller.unpack(sys, z)
    result = RESULTS.where(
        result == RESULTS.control_max_steps_reached,
        RESULTS.least_control_max_steps_reached,
        result,
    )
    result = RESULTS.where(
        free_result == RESULTS.successful,
        result,
        RESULTS.free_equilibrium_failed,
    )
    if throw:
        used = "optx.Newton (default)" if solver is None else solver_name(solver)
        control_diverged = (
            f"`least_control_grad`: the controlled dynamics of "
            f"{type(controller).__name__} diverged under the solver {used} "
            "(non-finite state or control). The free dynamics are unstable or the "
            f"control is too strong for this solver: {divergence_fix(solver)}."
        )
        free_diverged = (
            "`least_control_grad`: the free dynamics f diverged under the solver "
            f"{used} before any control was applied (non-finite state). f is unstable "
            "at this theta (its equilibrium repels) or the solver is: "
            f"{divergence_fix(solver)}."
        )
        # One check with a message per failure (a check costs a callback branch
        # per call under vmap): the two divergences, else the result's own message.
        index = jnp.where(
            result == RESULTS.control_divergence,
            0,
            jnp.where(free_result == RESULTS.control_divergence, 1, 2 + result._value),
        )
        psi = eqx.branched_error_if(
            psi,
            result != RESULTS.successful,
            index,
            [control_diverged, free_diverged] + list(RESULTS._index_to_message),  # pyright: ignore
        )
    leaves = jtu.tree_leaves(psi)
    control = 0.5 * sum(jnp.sum(jnp.square(x)) for x in leaves)
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


_DEFAULT_CONTROLLER = DynamicInversion(alpha=0.1)


@eqx.filter_jit
def least_control_grad(
    f: Callable[[PyTree[Array], PyTree, PyTree], PyTree[Array]],
    loss: Callable[[PyTree[Array], PyTree], Scalar],
    theta: PyTree,
    phi0: PyTree[Array],
    args: PyTree = None,
    *,
    controller: AbstractController = _DEFAULT_CONTROLLER,
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
        [`lcp_solvers.EnergyBased`][] or [`lcp_solvers.LinearFeedback`][].
    - `solver`: how both equilibria are found.
        - `None` (default): `optx.Newton` with a dense LU solve on the steady-state
          equations; converges in a few steps for any `alpha >= 0`.
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
    - `rtol`, `atol`: tolerances of both solves (ignored by a `solver` that carries
        its own). `None` is `1e-8` for a float64 state and `1e-5` for float32 or
        lower precision. With a leaky controller `ψ⋆` is of order `1/alpha`, so at
        weak control scale `atol` down with it: at a fixed tolerance the update's
        relative error grows like `alpha · atol`.
    - `max_steps`: the most steps of each solve.
    - `throw`: if `True`, a failed solve raises an error saying what to change
        (divergence names the controller and the solver). If `False`, the failure is
        reported in `info.result` and `grad` is the best estimate.

    **Returns:**

    `(grad, info)`: `grad` as above, `info` a [`lcp_solvers.LeastControlInfo`][].
    """
    _check_arguments(
        f, loss, theta, phi0, args, controller, solver, "least_control_grad"
    )
    info = _controlled_equilibrium(
        f, loss, theta, phi0, args, controller, solver, rtol, atol, max_steps, throw
    )
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
    info = _controlled_equilibrium(
        config.f, config.loss, theta, phi0, args, config.controller, config.solver,
        config.rtol, config.atol, config.max_steps, config.throw,
    )  # fmt: skip
    value = info.control + config.controller.loss_weight() * info.loss_controlled
    return value, info


def _has_tangent(tangent):
    return any(t is not None for t in jtu.tree_leaves(tangent, is_leaf=is_none))


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
    diff_theta, static_theta = eqx.partition(theta, eqx.is_inexact_array)
    t_diff = jtu.tree_map(
        lambda d, t: jnp.zeros_like(d) if t is None else t,
        diff_theta,
        eqx.filter(t_theta, eqx.is_inexact_array, is_leaf=is_none),
        is_leaf=is_none,
    )

    def work(d):
        # -⟨ψ⋆, f(φ⋆, θ)⟩ at the fixed controlled equilibrium: its derivative in θ
        # is the update -(∂θ f)ᵀψ⋆. Taken as a JVP, reverse mode transposes it after
        # any `vmap`, so a batch-mean update is one product, not a mean of
        # per-sample weight gradients.
        velocity = config.f(info.phi, eqx.combine(d, static_theta), args)
        products = jtu.tree_map(lambda p, v: -jnp.sum(p * v), info.psi, velocity)
        return sum(jtu.tree_leaves(products), jnp.zeros((), value.dtype))

    _, t_value = jax.jvp(work, (diff_theta,), (t_diff,))
    t_info = jax.custom_derivatives.zero_from_primal(  # pyright: ignore
        info, symbolic_zeros=True
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
    controller: AbstractController = _DEFAULT_CONTROLLER,
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
    (a custom JVP) is the least-control update `-(∂_θ f(φ⋆, θ))^\top ψ⋆`, the same
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
    """
    _check_arguments(
        f, loss, theta, phi0, args, controller, solver, "least_control_objective"
    )
    config = _Config(f, loss, controller, solver, rtol, atol, max_steps, throw)
    return _objective(theta, phi0, args, config)
