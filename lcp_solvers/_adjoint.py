import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from equinox.internal._primitive import _missing_dynamic
from jax._src.interpreters.batching import fancy_primitive_batchers as _batchers
from jax.core import ShapedArray
from jax.interpreters import ad
from jaxtyping import Array, PyTree

from ._anderson import AndersonAcceleration
from ._misc import (
    is_none,
    theta_vjp,
    tree_allfinite,
    tree_float_dtype,
    tree_rms,
    tree_scale,
)
from ._solution import RESULTS


_FixedPointOrRoot = optx.AbstractFixedPointSolver | optx.AbstractRootFinder


class LeastControlAdjoint(optx.AbstractAdjoint):
    r"""Backpropagate through a fixed-point or root solve with the least-control
    principle instead of the implicit function theorem.

    Pass it as `adjoint=` to `optx.fixed_point` or `optx.root_find`; nothing else
    changes. The forward pass is the user's solver, untouched. On the backward pass,
    with incoming cotangent `ḡ = ∂ℓ/∂y*`, it drives the layer's dynamics
    `f(y, θ)` (`fn(y, args) - y` for a fixed point, `fn(y, args)` for a root) with the
    least control `ψ` that holds the output at a minimum of the linearised loss
    `ḡᵀy`, leaking at strength `β`:

    $$f(y_c, θ) + ψ = 0, \qquad (∂_y f(y_c, θ))^\top ψ = β\,ḡ,$$

    warm-started at `(y*, 0)`, and returns `θ̄ = -(∂_θ f(y_c, θ))^\top ψ / β` to every
    differentiable input (`args`, arrays closed over by `fn`, array fields of the
    solver). `y0` gets no gradient. Equivalently, `y_c` is a stationary point of
    `½‖f(y, θ)‖² + β ḡᵀy` and `θ̄` is the gradient of its minimum value over `β`.

    **Strength.** `β = strength / rms(ḡ)`, so `strength` is the root-mean-square size
    of the control force per state component, whatever the scale of the loss (sum or
    mean, batch size). As `strength → 0` the result is exactly the implicit gradient
    (what [`optimistix.ImplicitAdjoint`][] returns); for linear dynamics it is exact at
    any strength. A larger strength evaluates the update at a state moved further
    towards lower loss (a non-infinitesimal learning signal) and makes the controlled
    system stiffer. The controlled state moves from `y*` by roughly
    `strength · ‖(∂_y f)^{-1}‖²`, so a given strength matters more as the layer nears
    instability: on `benchmarks/backward.py`'s `tanh` layer (states of order 0.1,
    contraction 0.9) the default `1e-3` gives an update with cosine 0.997 to the
    implicit gradient and `1e-2` one with cosine 0.3, while on a small random layer
    `tanh(W y + x)` with `W = 0.5·N(0, 1/n)` `1e-2` changes the update by about 2%.
    `1e-8` reproduces the implicit gradient to about seven digits.

    **Solving the controlled equilibrium.** Unknowns `(y, λ = ψ/β)`, a root problem
    `(f(y) + βλ, (∂_y f)^\top λ - ḡ) = 0` (scaled so that its tolerances are relative
    to `rms(ḡ)`). With `solver=None`:

    - fixed-point problems (`optx.fixed_point` with a fixed-point solver) iterate the
        joint map `(y, λ) ↦ (fn(y) + βλ, (∂_y fn)^\top λ - ḡ)` with
        [`lcp_solvers.AndersonAcceleration`][]: one vector-Jacobian product of `fn`
        per step, no Jacobian materialised;
    - root problems (including `optx.fixed_point` solved by a root finder) use
        `optx.Newton` on the joint root problem with a dense LU solve; pass
        `solver=optx.Newton(rtol, atol, linear_solver=lx.GMRES(...))` for a
        matrix-free Newton–Krylov solve on large states.

    Any `optx.AbstractFixedPointSolver` (applied to the joint map) or
    `optx.AbstractRootFinder` (applied to the joint root problem) can be passed.

    **Forward mode.** The least-control map is not linear in `ḡ`, so it is the
    transpose rule of a linear primitive whose own evaluation is the implicit JVP:
    `jax.jvp`/`jax.jacfwd` through the solve return the **implicit** tangents
    (documented fallback), reverse mode returns least-control updates, and
    second-order forward mode (`jacfwd` of `jacfwd`) raises an error pointing to
    `optx.ImplicitAdjoint`.

    **Batches.** Under `jax.vmap` each sample is normalised by its own cotangent; with a
    fixed-point solver all samples' controlled equilibria are solved as one system,
    and shared parameters get one batched VJP rather than per-sample gradients.
    """

    strength: float = 1e-3
    solver: _FixedPointOrRoot | None = None
    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = eqx.field(static=True, default=1024)
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if isinstance(self.strength, (int, float)) and not self.strength > 0:
            raise ValueError(
                f"`LeastControlAdjoint(strength=...)` must be positive, got "
                f"{self.strength}. Use a small value such as 1e-6 to recover the "
                "implicit gradient."
            )
        if self.solver is not None and not isinstance(
            self.solver, (optx.AbstractFixedPointSolver, optx.AbstractRootFinder)
        ):
            raise ValueError(
                "`LeastControlAdjoint(solver=...)` must be an optimistix fixed-point "
                "solver (e.g. `lcp.AndersonAcceleration`, `optx.FixedPointIteration`) "
                "or root finder (e.g. `optx.Newton`), got "
                f"{type(self.solver).__name__}."
            )

    def apply(
        self,
        primal_fn: Callable,
        rewrite_fn: Callable,
        inputs: PyTree,
        tags: frozenset[object],
    ) -> PyTree[Array]:
        forward_solver = inputs[1]
        # optimistix re-routes a fixed-point or root problem through a minimiser or a
        # least-squares solver by rewriting the optimality condition as the gradient of
        # ½‖f‖²; the least-control update of that rewritten system is not the update
        # of the user's dynamics, so refuse rather than return something else.
        if _is_rerouted(forward_solver):
            raise ValueError(
                "`LeastControlAdjoint` supports `optx.fixed_point` and "
                "`optx.root_find` with a fixed-point solver (e.g. "
                "`optx.FixedPointIteration`, `lcp.AndersonAcceleration`) or a root "
                "finder (e.g. `optx.Newton`, `optx.Chord`), got "
                f"{type(forward_solver.solver).__name__}, a minimiser or least-squares "
                "solver. Use a root finder such as `optx.Newton`, or "
                "`adjoint=optx.ImplicitAdjoint()`."
            )
        fixed_point_form = isinstance(forward_solver, optx.AbstractFixedPointSolver)
        inputs = inputs + (ft.partial(eqxi.while_loop, kind="lax"),)
        root, residual = _least_control_impl(
            primal_fn, rewrite_fn, inputs, self, fixed_point_form
        )
        return root, jtu.tree_map(eqxi.nondifferentiable_backward, residual)


LeastControlAdjoint.__init__.__doc__ = """**Arguments:**

- `strength`: the control strength, as the root-mean-square control force per state
    component (`β = strength / rms(ḡ)`). Small values recover the implicit gradient.
- `solver`: the solver of the controlled equilibrium; `None` picks
    `lcp.AndersonAcceleration` for fixed-point problems and `optx.Newton` for root
    problems, with the tolerances below.
- `rtol`, `atol`: tolerances of the controlled solve (relative to `rms(ḡ)` for the
    control part). `None` follows the forward solver's `rtol`/`atol`, so a forward pass
    solved to `1e-12` gets a backward pass of matching accuracy. Ignored when `solver`
    is given (it carries its own).
- `max_steps`: the most steps of the controlled solve.
- `throw`: if `True`, a backward pass that fails (non-finite cotangent or state, a
    controlled solve that does not converge or diverges) raises an error saying what to
    change. If `False` it returns the best estimate it has.
"""


def _is_rerouted(solver) -> bool:
    inner = getattr(solver, "solver", None)
    routed = (optx.AbstractMinimiser, optx.AbstractLeastSquaresSolver)
    return (
        isinstance(solver, routed)
        and isinstance(inner, routed)
        and type(solver).__module__.startswith("optimistix")
    )


# The layer is a custom JVP (like `optx.ImplicitAdjoint`) whose tangent is produced by
# the linear primitive `_tangent_p`. Evaluating that primitive is the implicit JVP, so
# forward mode works and gives implicit-function-theorem tangents. Reverse mode
# transposes it, and the transpose rule is the least-control VJP: this is how a
# cotangent map that is not linear in the cotangent gets into JAX's reverse mode while
# forward mode stays available.
@eqx.filter_custom_jvp
def _least_control_impl(primal_fn, rewrite_fn, inputs, adjoint, fixed_point_form):
    del rewrite_fn, adjoint, fixed_point_form
    return jtu.tree_map(jnp.asarray, primal_fn(inputs))


@_least_control_impl.def_jvp
def _least_control_jvp(primals, tangents):
    primal_fn, rewrite_fn, inputs, adjoint, fixed_point_form = primals
    t_inputs = tangents[2]
    no_tangent = jtu.tree_map(is_none, t_inputs, is_leaf=is_none)
    nondiff, diff = eqx.partition(inputs, no_tangent, is_leaf=is_none)
    t_diff = eqx.filter(t_inputs, jtu.tree_map(lambda x: not x, no_tangent))
    root, residual = _least_control_impl(
        primal_fn, rewrite_fn, inputs, adjoint, fixed_point_form
    )
    (t_root,) = eqxi.filter_primitive_bind(
        _tangent_p,
        _Problem(t_diff, root, residual, diff, nondiff),
        rewrite_fn,
        adjoint,
        fixed_point_form,
        None,
    )
    t_residual = jax.custom_derivatives.zero_from_primal(  # pyright: ignore
        residual, symbolic_zeros=True
    )
    return (root, residual), (t_root, t_residual)


class _Problem(eqx.Module):
    t_diff: Any  # the only input the tangent is linear in
    root: Any
    residual: Any
    diff: Any
    nondiff: Any


class _Batching(eqx.Module):
    # How `_tangent_p` is vectorised when it handles `vmap` itself: `axes` is a
    # `_Problem` of batch axes (0 or None per array). Static, so hashable.
    size: int = eqx.field(static=True)
    axes: Any = eqx.field(static=True)


def _rewrite_at(rewrite_fn, residual, nondiff):
    def f(y, diff):
        return rewrite_fn(y, residual, eqx.combine(diff, nondiff))

    return f


def _implicit_tangent(problem: _Problem, rewrite_fn):
    f = _rewrite_at(rewrite_fn, problem.residual, problem.nondiff)
    t_diff = jtu.tree_map(
        lambda d, t: t if d is None or t is not None else jnp.zeros_like(d),
        problem.diff,
        problem.t_diff,
        is_leaf=is_none,
    )
    _, rhs = jax.jvp(lambda d: f(problem.root, d), (problem.diff,), (t_diff,))
    operator = lx.JacobianLinearOperator(lambda y, _: f(y, problem.diff), problem.root)
    sol = lx.linear_solve(operator, rhs, lx.AutoLinearSolver(well_posed=None))
    return jtu.tree_map(jnp.negative, sol.value)


def _tangent_impl(problem, rewrite_fn, adjoint, fixed_point_form, batching):
    del adjoint, fixed_point_form
    if batching is None:
        return (_implicit_tangent(problem, rewrite_fn),)
    tangent = eqx.filter_vmap(
        _implicit_tangent, in_axes=(batching.axes, None), axis_size=batching.size
    )
    return (tangent(problem, rewrite_fn),)


def _tangent_abstract_eval(problem, rewrite_fn, adjoint, fixed_point_form, batching):
    to_struct = lambda x: (
        jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, ShapedArray) else x
    )
    problem, adjoint = jtu.tree_map(to_struct, (problem, adjoint))
    out = eqx.filter_eval_shape(
        _tangent_impl, problem, rewrite_fn, adjoint, fixed_point_form, batching
    )
    return jtu.tree_map(lambda x: ShapedArray(x.shape, x.dtype), out)


def _tangent_jvp(primals, tangents):
    del primals, tangents
    raise NotImplementedError(
        "Second-order forward-mode derivatives (e.g. `jax.jacfwd(jax.jacfwd(...))`) "
        "through `LeastControlAdjoint` are not supported: its forward mode is the "
        "implicit JVP, and differentiating that again is not implemented. Use "
        "`optx.ImplicitAdjoint()` for them."
    )


def _is_undefined(x):
    return isinstance(x, ad.UndefinedPrimal)


def _tangent_transpose(inputs, cts_out):
    problem, rewrite_fn, adjoint, fixed_point_form, batching = inputs
    (ct_root,) = cts_out
    forward_solver = eqx.combine(problem.diff, problem.nondiff)[1]

    options = dict(
        adjoint=adjoint,
        fixed_point_form=fixed_point_form,
        forward_solver=forward_solver,
    )

    def equilibrium(root, residual, diff, nondiff, ct):
        f = _rewrite_at(rewrite_fn, residual, nondiff)
        return controlled_equilibrium(f, root, diff, ct, **options)

    def dynamics(y, residual, diff, nondiff):
        return _rewrite_at(rewrite_fn, residual, nondiff)(y, diff)

    diff = problem.diff
    if batching is None:
        f = _rewrite_at(rewrite_fn, problem.residual, problem.nondiff)
        theta_bar = least_control_vjp(f, problem.root, diff, ct_root, **options)
    else:
        # Solve each sample's controlled equilibrium on its own (its own cotangent
        # scale), then take one VJP of the vectorised dynamics: JAX contracts over the
        # batch for shared parameters instead of forming a per-sample gradient.
        axes = batching.axes
        t_batched = jtu.tree_map(
            lambda t, a: a is not None,
            problem.t_diff,
            axes.t_diff,
            is_leaf=_is_undefined,
        )
        # A tangent batched where its parameter is not (vmap over tangents only) needs
        # a per-sample cotangent: broadcast that parameter.
        diff = jtu.tree_map(
            lambda d, tb, a: (
                jnp.broadcast_to(d, (batching.size,) + d.shape)
                if tb and a is None and d is not None
                else d
            ),
            diff,
            t_batched,
            axes.diff,
            is_leaf=is_none,
        )
        diff_axes = jtu.tree_map(
            lambda tb, a: 0 if tb else a, t_batched, axes.diff, is_leaf=is_none
        )
        in_axes = (0, axes.residual, diff_axes, axes.nondiff)
        batched_dynamics = eqx.filter_vmap(
            dynamics, in_axes=in_axes, axis_size=batching.size
        )
        root = problem.root
        if axes.root is None:
            root = jtu.tree_map(
                lambda x: jnp.broadcast_to(x, (batching.size,) + x.shape), root
            )
        solver = _controlled_solver(adjoint, fixed_point_form, forward_solver)
        if isinstance(solver, optx.AbstractFixedPointSolver):
            # All samples' controlled equilibria are solved as one system (each with
            # its own cotangent scale) rather than by a vectorised solver: a
            # `vmap`ped loop carries and masks every sample's solver state at every
            # step, which costs more than the solve itself on small problems.
            y_c, weight = controlled_equilibrium(
                lambda y, d: batched_dynamics(y, problem.residual, d, problem.nondiff),
                root,
                diff,
                ct_root,
                per_sample=True,
                **options,
            )
        else:
            # A root finder (e.g. Newton's dense Jacobian) must not see the batch as
            # one system: its linear algebra would couple all samples. Vectorise it.
            y_c, weight = eqx.filter_vmap(
                equilibrium, in_axes=in_axes + (0,), axis_size=batching.size
            )(root, problem.residual, diff, problem.nondiff, ct_root)
        _, vjp = jax.vjp(
            lambda d: batched_dynamics(y_c, problem.residual, d, problem.nondiff),
            diff,
        )
        (theta_bar,) = vjp(weight)
        theta_bar = jtu.tree_map(
            lambda g, tb, a: g if tb or a is None or g is None else g.sum(0),
            theta_bar,
            t_batched,
            diff_axes,
            is_leaf=is_none,
        )
    ct_t_diff = jtu.tree_map(
        lambda t, g: g if _is_undefined(t) else None,
        problem.t_diff,
        theta_bar,
        is_leaf=lambda x: x is None or _is_undefined(x),
    )
    none = lambda tree: jtu.tree_map(lambda _: None, tree)
    ct_problem = _Problem(
        ct_t_diff,
        none(problem.root),
        none(problem.residual),
        none(problem.diff),
        none(problem.nondiff),
    )
    return ct_problem, none(rewrite_fn), none(adjoint), None, none(batching)


_tangent_p = eqxi.create_vprim(
    "least_control_tangent",
    eqxi.filter_primitive_def(_tangent_impl),
    eqxi.filter_primitive_def(_tangent_abstract_eval),
    eqxi.filter_primitive_jvp(_tangent_jvp),
    eqxi.filter_primitive_transpose(materialise_zeros=True)(_tangent_transpose),  # pyright: ignore
)
_generic_batch_rule = _batchers[_tangent_p]


def _tangent_batch_rule(axis_data, values, dims, *, treedef, static, flatten):
    params = dict(treedef=treedef, static=static, flatten=flatten)
    if all(d is None for d in dims):
        return _generic_batch_rule(axis_data, values, dims, **params)
    values = [v if d is None else jnp.moveaxis(v, d, 0) for v, d in zip(values, dims)]
    dims = [None if d is None else 0 for d in dims]
    iter_values, iter_dims = iter(values), iter(dims)
    flat = [next(iter_values) if x is _missing_dynamic else x for x in static]
    flat_dims = [next(iter_dims) if x is _missing_dynamic else None for x in static]
    problem, rewrite_fn, adjoint, fixed_point_form, batching = jtu.tree_unflatten(
        treedef, flat
    )
    if batching is not None:
        # Nested `vmap`: let equinox vectorise the already-batched primitive.
        # Tangents of unbatched parameters are broadcast so that their per-sample
        # cotangents have somewhere to go (JAX transposes the broadcast into a sum).
        num_t = treedef.children()[0].children()[0].num_leaves
        num_t_dynamic = sum(1 for x in static[:num_t] if x is _missing_dynamic)
        for i in range(num_t_dynamic):
            if dims[i] is None:
                x = values[i]
                values[i] = jnp.broadcast_to(x[None], (axis_data.size,) + x.shape)
                dims[i] = 0
        return _generic_batch_rule(axis_data, tuple(values), tuple(dims), **params)
    axes = jtu.tree_unflatten(treedef, flat_dims)[0]
    batching = _Batching(axis_data.size, axes)
    out = eqxi.filter_primitive_bind(
        _tangent_p, problem, rewrite_fn, adjoint, fixed_point_form, batching
    )
    flat_out = jtu.tree_leaves(out)
    return flat_out, [0] * len(flat_out)


_batchers[_tangent_p] = _tangent_batch_rule


def controlled_equilibrium(
    f: Callable[[PyTree[Array], PyTree], PyTree[Array]],
    root: PyTree[Array],
    theta: PyTree,
    grad_root: PyTree[Array],
    *,
    adjoint: LeastControlAdjoint,
    fixed_point_form: bool,
    forward_solver: Any = None,
    per_sample: bool = False,
) -> tuple[PyTree[Array], PyTree[Array]]:
    """Solves the leaky least-control system for the dynamics `f(y, theta)` at the
    equilibrium `root` with cotangent `grad_root`.

    With `per_sample=True` the leading axis of `root` and `grad_root` indexes
    independent samples: each gets its own cotangent scale (as under `vmap`).

    **Returns:** `(y_c, w)` with `w = ψ/β` scaled back to the cotangent's units and
    negated, so that the least-control cotangent is `(∂θ f(y_c, θ))ᵀ w`.
    """
    diff_theta, static_theta = eqx.partition(theta, eqx.is_inexact_array)

    def f_diff(y, d):
        return f(y, eqx.combine(d, static_theta))

    g_scale = tree_rms(grad_root, per_sample=per_sample)
    if adjoint.throw:
        finite = tree_allfinite(grad_root)
        g_scale = RESULTS.nonfinite_cotangent.error_if(g_scale, jnp.invert(finite))
        g_scale = RESULTS.nonfinite_state.error_if(
            g_scale, jnp.invert(tree_allfinite(root))
        )
    # An all-zero cotangent has an all-zero update; avoid dividing by zero.
    safe_scale = jnp.where(g_scale > 0, g_scale, 1)
    g_hat = tree_scale(grad_root, 1 / safe_scale)
    strength = jnp.asarray(adjoint.strength, dtype=tree_float_dtype(root))

    solver = _controlled_solver(adjoint, fixed_point_form, forward_solver)
    lam0 = jtu.tree_map(jnp.zeros_like, root)

    def joint_residual(z, d):
        y, lam = z
        # One VJP per step gives both f(y) and (∂y f)ᵀ λ.
        f_y, vjp = jax.vjp(lambda _y: f_diff(_y, d), y)
        (jt_lam,) = vjp(lam)
        r1 = jtu.tree_map(lambda a, c: a + strength * c, f_y, lam)
        r2 = jtu.tree_map(jnp.subtract, jt_lam, g_hat)
        return r1, r2

    if isinstance(solver, optx.AbstractFixedPointSolver):

        def joint_map(z, d):
            return jtu.tree_map(jnp.add, z, joint_residual(z, d))

        sol = optx.fixed_point(
            joint_map,
            solver,
            (root, lam0),
            diff_theta,
            max_steps=adjoint.max_steps,
            throw=False,
        )
    else:
        sol = optx.root_find(
            joint_residual,
            solver,
            (root, lam0),
            diff_theta,
            max_steps=adjoint.max_steps,
            throw=False,
        )
    y_c, lam = sol.value
    result = RESULTS.promote(sol.result)
    result = RESULTS.where(
        result == RESULTS.nonlinear_max_steps_reached,
        RESULTS.control_max_steps_reached,
        result,
    )
    result = RESULTS.where(
        (result == RESULTS.nonlinear_divergence) | (result == RESULTS.nonfinite),
        RESULTS.control_divergence,
        result,
    )
    if adjoint.throw:
        lam = result.error_if(lam, result != RESULTS.successful)
    return y_c, tree_scale(lam, -g_scale)


def least_control_vjp(
    f: Callable[[PyTree[Array], PyTree], PyTree[Array]],
    root: PyTree[Array],
    theta: PyTree,
    grad_root: PyTree[Array],
    *,
    adjoint: LeastControlAdjoint,
    fixed_point_form: bool,
    forward_solver: Any = None,
) -> PyTree:
    """The least-control vector-Jacobian product for the dynamics `f(y, theta)`,
    equilibrium `root` and cotangent `grad_root`: returns `-(∂θ f(y_c))ᵀ ψ / β` with the
    structure of `theta` (`None` where `theta` has no inexact arrays).

    Shared by `LeastControlAdjoint` and the jaxopt-style decorators.
    """
    y_c, weight = controlled_equilibrium(
        f,
        root,
        theta,
        grad_root,
        adjoint=adjoint,
        fixed_point_form=fixed_point_form,
        forward_solver=forward_solver,
    )
    return theta_vjp(lambda t: f(y_c, t), theta, weight)


def _controlled_solver(adjoint, fixed_point_form, forward_solver):
    if adjoint.solver is not None:
        return adjoint.solver
    rtol, atol = adjoint.rtol, adjoint.atol
    if rtol is None:
        rtol = getattr(forward_solver, "rtol", None)
    if atol is None:
        atol = getattr(forward_solver, "atol", None)
    if rtol is None or atol is None:
        raise ValueError(
            "`LeastControlAdjoint` could not read `rtol`/`atol` from the forward "
            "solver; pass `LeastControlAdjoint(rtol=..., atol=...)`."
        )
    if fixed_point_form:
        return AndersonAcceleration(rtol=rtol, atol=atol)
    return optx.Newton(
        rtol=rtol, atol=atol, linear_solver=lx.AutoLinearSolver(well_posed=None)
    )
