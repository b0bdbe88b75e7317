import dataclasses
import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, PyTree

from ._adjoint import least_control_vjp, LeastControlAdjoint
from ._misc import is_none, structure_of, tree_float_dtype, tree_sub


_FixedPointOrRoot = optx.AbstractFixedPointSolver | optx.AbstractRootFinder


def custom_fixed_point(
    fixed_point_fun: Callable,
    has_aux: bool = False,
    *,
    strength: float = 1e-3,
    solver: _FixedPointOrRoot | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = 1024,
    throw: bool = True,
) -> Callable[[Callable], Callable]:
    r"""Decorator that makes a fixed-point solver backpropagate with the least-control
    principle. A drop-in replacement for `jaxopt.implicit_diff.custom_fixed_point`.

    It decorates any function `solver(init_params, *args, **kwargs)` that returns the
    fixed point `params = fixed_point_fun(params, *args, **kwargs)` (or, with
    `has_aux=True`, a pair `(params, aux)` such as jaxopt's `OptStep`). The forward
    pass runs the solver untouched. The backward pass ignores how the solver got there:
    it solves the leaky least-control problem of the dynamics
    `f(y, θ) = fixed_point_fun(y, *args, **kwargs) - y` at the returned fixed point,
    exactly as [`lcp_solvers.LeastControlAdjoint`][] does for optimistix.

    ```python
    import jaxopt
    import lcp_solvers as lcp

    def T(x, w, b):
        return jnp.tanh(w @ x + b)

    aa = jaxopt.AndersonAcceleration(fixed_point_fun=T, implicit_diff=False)
    solve = lcp.custom_fixed_point(T, has_aux=True, strength=1e-3)(aa.run)
    loss = lambda w, b: jnp.sum(solve(jnp.zeros(3), w, b).params ** 2)
    jax.grad(loss, argnums=(0, 1))(w, b)
    ```

    Gradients flow to `*args` and `**kwargs` and to arrays that `fixed_point_fun`
    closes over (unlike jaxopt, which raises an error for those); `init_params` and
    `aux` get none. Only reverse mode is supported: `jax.jvp`/`jax.jacfwd` through a
    decorated solver raise JAX's error "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function"; use `lcp.LeastControlAdjoint` with `optx.fixed_point`, or
    jaxopt's own `implicit_diff=True`, for forward-mode derivatives.

    **Arguments:**

    - `fixed_point_fun`: the map `T(params, *args, **kwargs)` whose fixed point the
        decorated solver returns.
    - `has_aux`: whether the decorated solver returns `(params, aux)`.
    - `strength`, `solver`, `max_steps`, `throw`: as in
        [`lcp_solvers.LeastControlAdjoint`][]. `solver=None` solves the controlled
        equilibrium with `lcp.AndersonAcceleration` on the joint map (one
        vector-Jacobian product of `fixed_point_fun` per step).
    - `rtol`, `atol`: tolerances of the controlled solve. The decorated solver is
        opaque, so unlike `LeastControlAdjoint` they cannot follow its tolerances;
        `None` means `sqrt(eps)` of the fixed point's dtype (`1.5e-8` in float64,
        `3.5e-4` in float32). Ignored when `solver` is given.

    **Returns:**

    A decorator: `custom_fixed_point(fixed_point_fun)(solver)` has the signature and
    return value of `solver`.
    """

    def f(y, theta):
        fn, args, kwargs = theta
        return tree_sub(fn(y, *args, **kwargs), y)

    return _decorator(
        fixed_point_fun,
        f,
        True,
        has_aux,
        LeastControlAdjoint(
            strength=strength,
            solver=solver,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            throw=throw,
        ),
    )


def custom_root(
    optimality_fun: Callable,
    has_aux: bool = False,
    *,
    strength: float = 1e-3,
    solver: _FixedPointOrRoot | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = 1024,
    throw: bool = True,
) -> Callable[[Callable], Callable]:
    r"""Decorator that makes a root solver backpropagate with the least-control
    principle. A drop-in replacement for `jaxopt.implicit_diff.custom_root`.

    It decorates any function `solver(init_params, *args, **kwargs)` that returns a
    root of `optimality_fun(params, *args, **kwargs) = 0` (or, with `has_aux=True`, a
    pair `(params, aux)` such as jaxopt's `OptStep`). The backward pass solves the
    leaky least-control problem of the dynamics
    `f(y, θ) = optimality_fun(y, *args, **kwargs)` at the returned root, exactly as
    [`lcp_solvers.LeastControlAdjoint`][] does for optimistix. For an inner
    optimisation `min_y g(y, θ)` (jaxopt's `GradientDescent`, `LBFGS`, ...) pass its
    gradient, `optimality_fun = jax.grad(g)`, as jaxopt does.

    ```python
    def inner_loss(y, theta):
        return 0.5 * jnp.sum((y - theta) ** 2) + 0.1 * jnp.sum(y**4)

    gd = jaxopt.LBFGS(fun=inner_loss, implicit_diff=False, tol=1e-10)
    solve = lcp.custom_root(jax.grad(inner_loss), has_aux=True)(gd.run)
    jax.grad(lambda theta: jnp.sum(solve(jnp.zeros(3), theta).params))(theta)
    ```

    Gradients, closures and forward mode: as [`lcp_solvers.custom_fixed_point`][].

    **Arguments:**

    - `optimality_fun`: the function `F(params, *args, **kwargs)` whose root the
        decorated solver returns.
    - `has_aux`: whether the decorated solver returns `(params, aux)`.
    - `strength`, `solver`, `max_steps`, `throw`: as in
        [`lcp_solvers.LeastControlAdjoint`][]. `solver=None` solves the controlled
        equilibrium with `optx.Newton` and a dense LU solve; pass
        `solver=optx.Newton(rtol, atol, linear_solver=lx.GMRES(...))` for large
        states.
    - `rtol`, `atol`: tolerances of the controlled solve; `None` means `sqrt(eps)` of
        the root's dtype (`1.5e-8` in float64, `3.5e-4` in float32). Ignored when
        `solver` is given.

    **Returns:**

    A decorator: `custom_root(optimality_fun)(solver)` has the signature and return
    value of `solver`.
    """

    def f(y, theta):
        fn, args, kwargs = theta
        return fn(y, *args, **kwargs)

    return _decorator(
        optimality_fun,
        f,
        False,
        has_aux,
        LeastControlAdjoint(
            strength=strength,
            solver=solver,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            throw=throw,
        ),
    )


def _decorator(fn, f, fixed_point_form, has_aux, adjoint):
    if not callable(fn):
        name = "fixed_point_fun" if fixed_point_form else "optimality_fun"
        raise ValueError(
            f"`{name}` must be a callable `{name}(params, *args, **kwargs)`, got "
            f"{type(fn).__name__}."
        )

    def wrapper(solver_fun: Callable) -> Callable:
        if not callable(solver_fun):
            raise ValueError(
                "The decorated solver must be a callable "
                "`solver(init_params, *args, **kwargs)` (e.g. the `run` method of a "
                f"jaxopt solver), got {type(solver_fun).__name__}."
            )

        @ft.wraps(solver_fun)
        def solve(init_params: PyTree[Array], *args: Any, **kwargs: Any) -> Any:
            # Both functions may close over arrays that are being differentiated (e.g.
            # `jax.grad` of a loss that builds `fixed_point_fun` from its weights).
            # A custom VJP may not close over those, so hoist them into explicit
            # inputs: those of `fn` get the least-control cotangent; those of the
            # solver get none (they only decide how the fixed point is found).
            solver_conv = eqx.filter_closure_convert(
                solver_fun, init_params, *args, **kwargs
            )
            out_struct = solver_conv.out_struct  # pyright: ignore
            params_struct = _split_params(out_struct, has_aux)
            if jtu.tree_structure(params_struct) != jtu.tree_structure(
                init_params
            ) or any(
                jnp.shape(a) != jnp.shape(b)
                for a, b in zip(
                    jtu.tree_leaves(params_struct),
                    jtu.tree_leaves(init_params),
                    strict=True,
                )
            ):
                raise ValueError(
                    "The decorated solver must return the solution with the "
                    "structure and shapes of `init_params`"
                    + (
                        ", as the first element of a pair `(params, aux)` "
                        "(`has_aux=True`)"
                        if has_aux
                        else " (if it returns a pair `(params, aux)` such as "
                        "jaxopt's `OptStep`, pass `has_aux=True`)"
                    )
                    + f"; got {params_struct} for `init_params` "
                    f"{structure_of(init_params)}."
                )
            fn_conv = eqx.filter_closure_convert(fn, params_struct, *args, **kwargs)
            return _least_control_call(
                (solver_conv, fn_conv, args, kwargs),
                # As in jaxopt, the solution does not depend on where the solver
                # starts, so `init_params` gets a zero gradient.
                lax.stop_gradient(init_params),
                f,
                fixed_point_form,
                has_aux,
                adjoint,
            )

        return solve

    return wrapper


def _split_params(out, has_aux):
    if not has_aux:
        return out
    try:
        params, _ = out
    except (TypeError, ValueError) as e:
        raise ValueError(
            "With `has_aux=True` the decorated solver must return a pair "
            "`(params, aux)`, such as jaxopt's `OptStep`."
        ) from e
    return params


@eqx.filter_custom_vjp
def _least_control_call(vjp_arg, init_params, f, fixed_point_form, has_aux, adjoint):
    del f, fixed_point_form, has_aux, adjoint
    solver_conv, _, args, kwargs = vjp_arg
    return solver_conv(init_params, *args, **kwargs)


@_least_control_call.def_fwd
def _least_control_fwd(
    perturbed, vjp_arg, init_params, f, fixed_point_form, has_aux, adjoint
):
    del perturbed
    out = _least_control_call.fn(
        vjp_arg, init_params, f, fixed_point_form, has_aux, adjoint
    )
    root = _split_params(out, has_aux)
    return out, jtu.tree_map(jnp.asarray, root)


@_least_control_call.def_bwd
def _least_control_bwd(
    root,
    grad_out,
    perturbed,
    vjp_arg,
    init_params,
    f,
    fixed_point_form,
    has_aux,
    adjoint,
):
    del init_params
    grad_root = _split_params(grad_out, has_aux)
    # Symbolic zeros (`None`) for outputs that do not reach the loss.
    grad_root = jtu.tree_map(
        lambda r, g: jnp.zeros_like(r) if g is None else g,
        root,
        grad_root,
        is_leaf=is_none,
    )
    solver_conv, fn_conv, args, kwargs = vjp_arg
    # Differentiate only what is perturbed, so that e.g. a non-differentiated weight
    # closed over by `fn` costs nothing.
    theta = (fn_conv, args, kwargs)
    theta_diff, theta_nondiff = eqx.partition(theta, perturbed[1:])
    rtol, atol = adjoint.rtol, adjoint.atol
    if adjoint.solver is None and (rtol is None or atol is None):
        default = float(np.sqrt(np.finfo(tree_float_dtype(root)).eps))
        adjoint = dataclasses.replace(
            adjoint,
            rtol=default if rtol is None else rtol,
            atol=default if atol is None else atol,
        )
    theta_bar = least_control_vjp(
        lambda y, d: f(y, eqx.combine(d, theta_nondiff)),
        root,
        theta_diff,
        grad_root,
        adjoint=adjoint,
        fixed_point_form=fixed_point_form,
    )
    fn_bar, args_bar, kwargs_bar = eqx.filter(
        eqx.combine(theta_bar, jtu.tree_map(lambda _: None, theta_nondiff)),
        eqx.is_inexact_array,
    )
    solver_bar = jtu.tree_map(lambda _: None, solver_conv)
    return solver_bar, fn_bar, args_bar, kwargs_bar
