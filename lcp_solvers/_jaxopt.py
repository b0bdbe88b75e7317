import functools as ft
import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from ._adjoint import least_control_layer, LeastControlAdjoint
from ._misc import structure_of, tree_sub


_FixedPointOrRoot = optx.AbstractFixedPointSolver | optx.AbstractRootFinder


def custom_fixed_point(
    fixed_point_fun: Callable,
    has_aux: bool = False,
    *,
    strength: float = 1e-3,
    solver: _FixedPointOrRoot | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 1024,
    throw: bool = True,
) -> Callable[[Callable], Callable]:
    r"""Decorator that makes a fixed-point solver backpropagate with the least-control
    principle. A drop-in replacement for `jaxopt.implicit_diff.custom_fixed_point`
    (Blondel et al., "Efficient and modular implicit differentiation", NeurIPS
    2022), with the update of Meulemans et al. (NeurIPS 2022, Theorem 1).

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
    `aux` get none. Forward mode (`jax.jvp`, `jax.jacfwd`) gives the implicit
    tangents, as [`lcp_solvers.LeastControlAdjoint`][] does (jaxopt's decorators are
    reverse-mode only); reverse mode gives least-control updates.

    **Arguments:**

    - `fixed_point_fun`: the map `T(params, *args, **kwargs)` whose fixed point the
        decorated solver returns.
    - `has_aux`: whether the decorated solver returns `(params, aux)`.
    - `strength`, `solver`, `max_steps`, `throw`: as in
        [`lcp_solvers.LeastControlAdjoint`][]. `solver=None` solves the controlled
        equilibrium with `lcp.AndersonAcceleration` on the joint map (one
        vector-Jacobian product of `fixed_point_fun` per step).
    - `rtol`, `atol`: tolerances of the controlled solve (relative to the
        cotangent's scale for the control). The decorated solver is opaque, so
        unlike `LeastControlAdjoint` they cannot follow its tolerances; `None` means
        the library default: `1e-8` for a float64 fixed point, `1e-5` otherwise.
        Ignored when `solver` is given.

    **Returns:**

    A decorator: `custom_fixed_point(fixed_point_fun)(solver)` has the signature and
    return value of `solver`.

    **Raises:**

    - `ValueError` at decoration for bad options (as `lcp.LeastControlAdjoint`), and
        when `fixed_point_fun` returns a pytree of another structure or shapes than
        the solution.
    - `TypeError` when the decorated solver is called with arguments that do not
        match its signature (as Python would).
    - When differentiated, the runtime errors of `lcp.LeastControlAdjoint`.
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
    max_steps: int = 1024,
    throw: bool = True,
) -> Callable[[Callable], Callable]:
    r"""Decorator that makes a root solver backpropagate with the least-control
    principle. A drop-in replacement for `jaxopt.implicit_diff.custom_root`
    (Blondel et al., "Efficient and modular implicit differentiation", NeurIPS
    2022), with the update of Meulemans et al. (NeurIPS 2022, Theorem 1).

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
    - `rtol`, `atol`: tolerances of the controlled solve; `None` means the library
        default: `1e-8` for a float64 root, `1e-5` otherwise. Ignored when `solver`
        is given.

    **Returns:**

    A decorator: `custom_root(optimality_fun)(solver)` has the signature and return
    value of `solver`.

    **Raises:**

    As [`lcp_solvers.custom_fixed_point`][].
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

    def rewrite_fn(y, residual, inputs):
        del residual
        return f(y, inputs[0])

    def wrapper(solver_fun: Callable) -> Callable:
        if not callable(solver_fun):
            raise ValueError(
                "The decorated solver must be a callable "
                "`solver(init_params, *args, **kwargs)` (e.g. the `run` method of a "
                f"jaxopt solver), got {type(solver_fun).__name__}."
            )

        @ft.wraps(solver_fun)
        def solve(*args: Any, **kwargs: Any) -> Any:
            # As jaxopt: bound to the solver's signature (defaults applied), so that
            # `init_params` may come by keyword and every argument the solver takes
            # by position reaches `fn` by position.
            args, kwargs = _bind_to_solver(solver_fun, args, kwargs)
            init_params, args = args[0], args[1:]
            # The forward pass is the solver, untouched and not differentiated:
            # the solution does not depend on where the solver starts (as in jaxopt,
            # `init_params` gets no gradient) nor on how it was found (arrays the
            # solver closes over get none either).
            out = lax.stop_gradient(solver_fun(init_params, *args, **kwargs))
            params = _split_params(out, has_aux)
            if init_params is not None and not _same_shapes(params, init_params):
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
                    + f"; got {structure_of(params)} for `init_params` "
                    f"{structure_of(init_params)}."
                )
            # As jaxopt's `reference_signature`: keyword arguments that name
            # parameters of `fn` are passed to it positionally.
            args, kwargs = _bind_to(fn, args, kwargs)
            # A traced Python number (`jax.grad(loss)(1.0)`) has a Python-number
            # primal, which the backward pass would see as static: make it an array.
            args, kwargs = jtu.tree_map(
                lambda x: jnp.asarray(x) if isinstance(x, jax.core.Tracer) else x,
                (args, kwargs),
            )
            _check_output(fn, params, args, kwargs, fixed_point_form)
            # `fn` may close over arrays that are being differentiated (e.g.
            # `jax.grad` of a loss that builds `fixed_point_fun` from its weights). A
            # custom VJP may not close over those, so hoist them into explicit inputs,
            # which get the least-control cotangent with `args` and `kwargs`.
            fn_conv = eqx.filter_closure_convert(fn, params, *args, **kwargs)
            # The same layer as `LeastControlAdjoint`'s, on optimistix's input layout
            # `(θ, forward solver, ...)`: reverse mode is the least-control VJP,
            # forward mode the implicit JVP.
            inputs = ((fn_conv, args, kwargs), None, params)
            params, _ = least_control_layer(
                _given_root, rewrite_fn, inputs, adjoint, fixed_point_form
            )
            if has_aux:
                return _replace_params(out, params)
            return params

        return solve

    return wrapper


def _same_shapes(a, b) -> bool:
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(
        jnp.shape(x) == jnp.shape(y)
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    )


def _bind_to_solver(solver_fun, args, kwargs):
    try:
        signature = inspect.signature(solver_fun)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(
                f"The decorated solver was called with arguments that do not match "
                f"its signature {signature}: {e}"
            ) from None
        bound.apply_defaults()
        args, kwargs = tuple(bound.args), dict(bound.kwargs)
    if not args:
        raise TypeError(
            "The decorated solver must be called as "
            "`solver(init_params, *args, **kwargs)`: `init_params` is missing."
        )
    return args, kwargs


def _bind_to(fn, args, kwargs):
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return args, kwargs
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return args, kwargs
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _check_output(fn, params, args, kwargs, fixed_point_form):
    name = "fixed_point_fun" if fixed_point_form else "optimality_fun"
    out = eqx.filter_eval_shape(fn, params, *args, **kwargs)
    if not _same_shapes(out, params):
        raise ValueError(
            f"`{name}(params, *args, **kwargs)` must return one pytree with the "
            f"structure and shapes of the solution ({structure_of(params)}), got "
            f"{out}. If it returns `(value, aux)`, pass a function returning only "
            "`value` (jaxopt's `has_aux` refers to the decorated solver's output, "
            f"not to `{name}`)."
        )


def _replace_params(out, params):
    if hasattr(out, "_replace"):  # jaxopt's `OptStep` and other named tuples
        return (
            out._replace(params=params)
            if hasattr(out, "params")
            else type(out)(params, *out[1:])
        )
    return (params, *out[1:]) if isinstance(out, tuple) else [params, *out[1:]]


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


def _given_root(inputs):
    # The layer's primal: the solution the (opaque) solver returned, no residual.
    _, _, root = inputs
    return root, None
