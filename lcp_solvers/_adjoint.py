import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, PyTree

from ._anderson import AndersonAcceleration
from ._dropin import check_strength, least_control_cotangent
from ._engine import resolve_tolerances
from ._inner_solver import as_inner_solver, DiscreteTime, InnerSolver
from ._misc import check_max_steps, check_tolerances, is_none, theta_vjp


class LeastControlAdjoint(optx.AbstractAdjoint):
    r"""Backpropagate through a fixed-point or root solve with the least-control
    principle instead of the implicit function theorem.

    Source: Meulemans et al., "The least-control principle for local learning at
    equilibrium", NeurIPS 2022 (arXiv:2207.01332), Theorem 1 with leaky control,
    applied to the loss linearised at the equilibrium.

    Pass it as `adjoint=` to `optx.fixed_point` or `optx.root_find`; nothing else
    changes. The forward pass is the user's solver, untouched. On the backward pass,
    with incoming cotangent `ḡ = ∂ℓ/∂y*`, it drives the layer's dynamics
    `f(y, θ)` (`fn(y, args) - y` for a fixed point, `fn(y, args)` for a root) with the
    least control `ψ` that holds the output at a minimum of the linearised loss
    `ḡᵀy`, leaking at strength `β`:

    $$f(y_c, θ) + ψ = 0, \qquad (∂_y f(y_c, θ))^\top ψ = β\,ḡ,$$

    warm-started at `(y*, 0)`, and returns `θ̄ = -(∂_θ f(y_c, θ))ᵀ ψ / β` to every
    differentiable input (`args`, arrays closed over by `fn`, array fields of the
    solver). `y0` gets no gradient. Equivalently, `y_c` is a stationary point of
    `½‖f(y, θ)‖² + β ḡᵀy` and `θ̄` is the gradient of its minimum value over `β`.

    **Strength.** `β = strength / rms(ḡ)`, so `strength` is the root-mean-square size
    of the control force per state component, whatever the scale of the loss (sum or
    mean, batch size). As `strength → 0` the result is exactly the implicit gradient
    (what [`optimistix.ImplicitAdjoint`][implicit-adjoint] returns); for linear
    dynamics it is exact at any strength. A larger strength evaluates the update at a
    state moved further towards lower loss (a non-infinitesimal learning signal) and
    makes the controlled system stiffer. The controlled state moves from `y*` by roughly
    `strength · ‖(∂_y f)⁻¹‖²`, so a given strength matters more as the layer nears
    instability: on `benchmarks/backward.py`'s `tanh` layer (states of order 0.1,
    contraction 0.9) the default `1e-3` gives an update with cosine 0.997 to the
    implicit gradient and `1e-2` one with cosine 0.3, while on a small random layer
    `tanh(W y + x)` with `W = 0.5·N(0, 1/n)` `1e-2` changes the update by about 2%.
    `1e-8` reproduces the implicit gradient to about seven digits.

    [implicit-adjoint]: https://docs.kidger.site/optimistix/api/adjoints/

    **Solving the controlled equilibrium.** Unknowns `(y, λ = ψ/β)`, a root problem
    `(f(y) + βλ, (∂_y f)ᵀ λ - ḡ) = 0` (scaled so that its tolerances are relative
    to `rms(ḡ)`). With `solver=None`:

    - fixed-point problems (`optx.fixed_point` with a fixed-point solver) iterate the
        joint map `(y, λ) ↦ (fn(y) + βλ, (∂_y fn)ᵀ λ - ḡ)` with
        [`lcp_solvers.AndersonAcceleration`][]: one vector-Jacobian product of `fn`
        per step, no Jacobian materialised;
    - root problems (including `optx.fixed_point` solved by a root finder) use
        `optx.Newton` on the joint root problem with a dense LU solve; pass
        `solver=optx.Newton(rtol, atol, linear_solver=lx.GMRES(...))` for a
        matrix-free Newton–Krylov solve on large states.

    Any `optx.AbstractFixedPointSolver` (applied to the joint map) or
    `optx.AbstractRootFinder` (applied to the joint root problem) can be passed, or
    an [`lcp_solvers.AbstractInnerSolver`][] (e.g. `lcp.DiscreteTime`), which
    follows the joint dynamics to their steady state.

    **Forward mode.** The least-control map is not linear in `ḡ`, so it is the
    transpose rule of a linear primitive whose own evaluation is the implicit JVP:
    `jax.jvp`/`jax.jacfwd` through the solve return the **implicit** tangents
    (documented fallback), reverse mode returns least-control updates, and
    second-order forward mode (`jacfwd` of `jacfwd`) raises an error pointing to
    `optx.ImplicitAdjoint`.

    **Batches.** Under `jax.vmap` each sample's controlled equilibrium is solved on its
    own (normalised by its own cotangent, with its own solver state), so a sample's
    update does not depend on the rest of the batch, and a batch sharded over devices
    needs no batch-sized communication; shared parameters get one batched VJP rather
    than per-sample gradients.
    """

    strength: float | Array = 1e-3
    solver: InnerSolver | None = None
    rtol: float | None = None
    atol: float | None = None
    max_steps: int = eqx.field(static=True, default=1024)
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        check_strength(self.strength, "LeastControlAdjoint")
        check_max_steps(self.max_steps, "LeastControlAdjoint")
        check_tolerances(self.rtol, self.atol, "LeastControlAdjoint")
        if self.solver is not None:
            as_inner_solver(
                self.solver,
                "LeastControlAdjoint",
                default="lcp.AndersonAcceleration on the joint map for fixed-point "
                "problems, optx.Newton for root problems",
                fixed_point_on="the joint map",
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
        inputs = inputs + (_while_loop,)
        root, residual = least_control_layer(
            primal_fn, rewrite_fn, inputs, self, fixed_point_form
        )
        return root, jax.lax.stop_gradient(residual)


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

**Raises:**

- `ValueError` at construction: `strength` not positive and finite, `max_steps` not
    a positive int, `rtol`/`atol` negative, non-finite or both 0, `solver` of another
    kind.
- `ValueError` when differentiated: a root problem that optimistix reroutes through
    a minimiser or least-squares solver (the least-control update of `½‖f‖²` is not
    that of `f`).
- `NotImplementedError`: second-order forward mode (`jax.jacfwd` of `jax.jacfwd`).
- `EquinoxRuntimeError` (from `equinox.error_if`; with `throw=True`) when the
    backward pass fails: `RESULTS.control_max_steps_reached`, `control_divergence`,
    `nonfinite_cotangent` or `nonfinite_start`, each message saying what to change.
"""


def _is_rerouted(solver) -> bool:
    inner = getattr(solver, "solver", None)
    routed = (optx.AbstractMinimiser, optx.AbstractLeastSquaresSolver)
    return (
        isinstance(solver, routed)
        and isinstance(inner, routed)
        and type(solver).__module__.startswith("optimistix")
    )


def _while_loop(cond_fun, body_fun, init_val, *, max_steps=None, **kwargs):
    # The loop optimistix's forward solve runs in, on `jax.lax.while_loop` (the
    # forward pass is never differentiated through: the adjoint replaces it).
    del kwargs
    if max_steps is None:
        return lax.while_loop(cond_fun, body_fun, init_val)

    def cond(carry):
        step, val = carry
        return (step < max_steps) & cond_fun(val)

    def body(carry):
        step, val = carry
        return step + 1, body_fun(val)

    _, out = lax.while_loop(cond, body, (jnp.array(0), init_val))
    return out


def _cotangent(
    f,
    root,
    theta,
    grad_root,
    adjoint,
    fixed_point_form,
    forward_solver,
):
    rtol, atol = resolve_tolerances(adjoint.rtol, adjoint.atol, root, forward_solver)
    if adjoint.solver is not None:
        solver = as_inner_solver(adjoint.solver, "LeastControlAdjoint")
    elif fixed_point_form:
        # The Euler map of the joint dynamics with step 1 is the joint map
        # `(y, λ) ↦ (fn(y) + sλ, (∂_y fn)ᵀλ - ĝ)`: one VJP of `fn` per step.
        solver = DiscreteTime(1.0, AndersonAcceleration(rtol=rtol, atol=atol))
    else:
        solver = as_inner_solver(
            optx.Newton(
                rtol=rtol, atol=atol, linear_solver=lx.AutoLinearSolver(well_posed=None)
            ),
            "LeastControlAdjoint",
        )
    return least_control_cotangent(
        f,
        root,
        theta,
        grad_root,
        strength=adjoint.strength,
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=adjoint.max_steps,
        throw=adjoint.throw,
    )


# The layer is a custom JVP (like `optx.ImplicitAdjoint`) whose tangent is produced by
# the linear primitive `_tangent_p`. Evaluating that primitive is the implicit JVP, so
# forward mode works and gives implicit-function-theorem tangents. Reverse mode
# transposes it, and the transpose rule is the least-control VJP: this is how a
# cotangent map that is not linear in the cotangent gets into JAX's reverse mode while
# forward mode stays available. The primitive is built on JAX's public extension
# points (`jax.extend.core.Primitive`, `jax.interpreters.{ad,batching,mlir}`).
@eqx.filter_custom_jvp
def least_control_layer(primal_fn, rewrite_fn, inputs, adjoint, fixed_point_form):
    del rewrite_fn, adjoint, fixed_point_form
    return jtu.tree_map(jnp.asarray, primal_fn(inputs))


@least_control_layer.def_jvp
def _least_control_jvp(primals, tangents):
    primal_fn, rewrite_fn, inputs, adjoint, fixed_point_form = primals
    t_inputs = tangents[2]
    no_tangent = jtu.tree_map(is_none, t_inputs, is_leaf=is_none)
    nondiff, diff = eqx.partition(inputs, no_tangent, is_leaf=is_none)
    t_diff = eqx.filter(t_inputs, jtu.tree_map(lambda x: not x, no_tangent))
    root, residual = least_control_layer(
        primal_fn, rewrite_fn, inputs, adjoint, fixed_point_form
    )
    problem = _Problem(t_diff, root, residual, diff, nondiff)
    t_root = _bind(problem, _Static(rewrite_fn, fixed_point_form), adjoint, None)
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


class _Static(eqx.Module):
    rewrite_fn: Callable = eqx.field(static=True)
    fixed_point_form: bool = eqx.field(static=True)


class _Batching(eqx.Module):
    # How `_tangent_p` is vectorised when it handles `vmap` itself: `axes` gives, per
    # dynamic input, 0 (batched along the leading axis) or None.
    size: int = eqx.field(static=True)
    axes: tuple = eqx.field(static=True)


class _Missing:
    # Marks where a dynamic (array) leaf sits among the static leaves.
    def __repr__(self):
        return "<dynamic>"


_MISSING = _Missing()


def _is_leaf(x):
    return x is None


def _split(tree):
    leaves, treedef = jtu.tree_flatten(tree, is_leaf=_is_leaf)
    dynamic = [x for x in leaves if eqx.is_array(x) or _is_undefined(x)]
    static = tuple(
        _MISSING if (eqx.is_array(x) or _is_undefined(x)) else x for x in leaves
    )
    return dynamic, treedef, static


def _join(dynamic, treedef, static):
    it = iter(dynamic)
    leaves = [next(it) if x is _MISSING else x for x in static]
    return jtu.tree_unflatten(treedef, leaves)


def _bind(problem, static, adjoint, batching_):
    dynamic, treedef, leaves = _split((problem, static, adjoint))
    out = _tangent_p.bind(*dynamic, treedef=treedef, static=leaves, batching=batching_)
    return jtu.tree_unflatten(_out_treedef(problem), out)


def _out_treedef(problem):
    return jtu.tree_structure(problem.root)


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


def _tangent_impl(*dynamic, treedef, static, batching):
    problem, static_, _ = _join(dynamic, treedef, static)
    if batching is None:
        out = _implicit_tangent(problem, static_.rewrite_fn)
    else:
        axes = _join(batching.axes, treedef, _static_axes(static))[0]
        out = eqx.filter_vmap(
            _implicit_tangent, in_axes=(axes, None), axis_size=batching.size
        )(problem, static_.rewrite_fn)
    return jtu.tree_leaves(out)


def _static_axes(static):
    # The static leaves of the axes tree: the same structure, every dynamic leaf's
    # axis given separately.
    return tuple(_MISSING if x is _MISSING else None for x in static)


def _tangent_abstract_eval(*avals, treedef, static, batching):
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    out = jax.eval_shape(
        ft.partial(_tangent_impl, treedef=treedef, static=static, batching=batching),
        *structs,
    )
    return [jax.core.ShapedArray(o.shape, o.dtype) for o in out]


def _tangent_jvp(primals, tangents, **params):
    del primals, tangents, params
    raise NotImplementedError(
        "Second-order forward-mode derivatives (e.g. `jax.jacfwd(jax.jacfwd(...))`) "
        "through `LeastControlAdjoint` are not supported: its forward mode is the "
        "implicit JVP, and differentiating that again is not implemented. Use "
        "`optx.ImplicitAdjoint()` for them."
    )


def _instantiate(ct):
    # A symbolic zero cotangent carries a shaped aval (pyright sees the base class).
    if isinstance(ct, ad.Zero):
        aval: Any = ct.aval
        return jnp.zeros(aval.shape, aval.dtype)
    return ct


def _is_undefined(x):
    return isinstance(x, ad.UndefinedPrimal)


def _tangent_transpose(cts, *dynamic, treedef, static, batching):
    problem, static_, adjoint = _join(dynamic, treedef, static)
    rewrite_fn, fixed_point_form = static_.rewrite_fn, static_.fixed_point_form
    ct_root = jtu.tree_unflatten(
        jtu.tree_structure(problem.root),
        [_instantiate(c) for c in cts],
    )
    forward_solver = eqx.combine(problem.diff, problem.nondiff)[1]
    options = (adjoint, fixed_point_form, forward_solver)

    def dynamics(y, residual, diff, nondiff):
        return _rewrite_at(rewrite_fn, residual, nondiff)(y, diff)

    diff = problem.diff
    if batching is None:
        f = _rewrite_at(rewrite_fn, problem.residual, problem.nondiff)
        y_c, weight = _cotangent(f, problem.root, diff, ct_root, *options)
        theta_bar = theta_vjp(lambda t: f(y_c, t), diff, weight)
    else:
        axes = _join(batching.axes, treedef, _static_axes(static))[0]
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

        # Each sample's controlled equilibrium is solved on its own (its own units,
        # mixing, stopping test), vectorised: a sample's result does not depend on
        # the rest of the batch, so a batch sharded over devices needs no collective
        # but the loop's stopping test. Only the VJP into shared parameters below is
        # done once for the whole batch.
        def equilibrium(root, residual, diff, nondiff, ct):
            f = _rewrite_at(rewrite_fn, residual, nondiff)
            return _cotangent(f, root, diff, ct, *options)

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
    # One cotangent per dynamic input: the tangents' where they are undefined
    # (the linear inputs), None for everything else.
    ct_by_id = {}

    def record(t, g):
        if _is_undefined(t):
            ct_by_id[id(t)] = g

    jtu.tree_map(
        record,
        problem.t_diff,
        theta_bar,
        is_leaf=lambda x: x is None or _is_undefined(x),
    )
    return [
        (ad.Zero(x.aval) if ct_by_id.get(id(x)) is None else ct_by_id[id(x)])
        if _is_undefined(x)
        else None
        for x in dynamic
    ]


def _nones(tree):
    return jtu.tree_map(lambda _: None, tree)


def _tangent_batch(args, dims, *, treedef, static, batching):
    args = list(args)
    dims = list(dims)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if batching is None:
        args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
        axes = tuple(None if d is None else 0 for d in dims)
        out = _tangent_p.bind(
            *args, treedef=treedef, static=static, batching=_Batching(size, axes)
        )
        return out, [0] * len(out)
    # Nested `vmap`: merge the new batch axis with the one already handled into one
    # batch of `size * inner` samples, as if vectorised once.
    inner = batching.size
    merged_args, merged_axes = [], []
    for a, d, a1 in zip(args, dims, batching.axes):
        if d is None and a1 is None:
            merged_args.append(a)
            merged_axes.append(None)
            continue
        if d is None:
            a = jnp.broadcast_to(a[None], (size,) + a.shape)
        else:
            a = jnp.moveaxis(a, d, 0)
        if a1 is None:
            a = jnp.broadcast_to(a[:, None], (size, inner) + a.shape[1:])
        merged_args.append(a.reshape((size * inner,) + a.shape[2:]))
        merged_axes.append(0)
    out = _tangent_p.bind(
        *merged_args,
        treedef=treedef,
        static=static,
        batching=_Batching(size * inner, tuple(merged_axes)),
    )
    out = [o.reshape((size, inner) + o.shape[1:]) for o in out]
    return out, [0] * len(out)


_tangent_p = Primitive("least_control_tangent")
_tangent_p.multiple_results = True
_tangent_p.def_impl(_tangent_impl)
_tangent_p.def_abstract_eval(_tangent_abstract_eval)
mlir.register_lowering(_tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=True))
ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_tangent_p] = _tangent_transpose
batching.primitive_batchers[_tangent_p] = _tangent_batch
