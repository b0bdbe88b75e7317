from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, PyTree

from ._adjoint import LeastControlAdjoint
from ._anderson import AndersonAcceleration
from ._misc import check_count, check_max_steps, tree_rms, tree_sub
from ._solution import RESULTS


_FixedPointOrRoot = optx.AbstractFixedPointSolver | optx.AbstractRootFinder


class DEQStats(eqx.Module):
    """Statistics of one forward solve of a [`lcp_solvers.DEQ`][].

    **Fields:**

    - `num_steps`: the number of steps the forward solver took. Under `jax.vmap` it
        is per sample (the batched loop itself runs for the largest of them).
    - `residual`: the root-mean-square of `cell(z, x) - z` at the returned state.
    - `result`: a [`lcp_solvers.RESULTS`][]; `RESULTS.successful` unless the solve
        failed (only seen with `DEQ(throw=False)`).
    - `contraction`: with `DEQ(contraction_steps=k)`, `k > 0`, an estimate of the
        spectral norm `‖∂cell/∂z‖₂` at the returned state, by `k` steps of power
        iteration on `JᵀJ` (one JVP and one VJP of the cell each). Below 1, the cell
        is locally a contraction in the 2-norm and fixed-point iteration converges
        near the equilibrium. Power iteration approaches the norm from below, so a
        value just under 1 is not a guarantee. `None` when `contraction_steps=0`
        (the default: it costs nothing then).
    """

    num_steps: Array
    residual: Array
    result: RESULTS
    contraction: Array | None = None


def _fn(z, args):
    cell, x = args
    return cell(z, x)


class DEQ(eqx.Module):
    r"""A deep equilibrium layer: the output is the fixed point `z* = cell(z*, x)`
    (Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019), trained by
    default with the least-control principle (Meulemans et al., NeurIPS 2022).

    The forward pass is any optimistix fixed-point solver or root finder; the backward
    pass is selectable, by default the least-control principle
    ([`lcp_solvers.LeastControlAdjoint`][]), or `optx.ImplicitAdjoint()` for the
    implicit-function-theorem gradient. Everything differentiable in `cell` (the array
    leaves of an `eqx.Module`, arrays a function closes over) and `x` receives
    gradients; `z0` receives none.

    ```python
    class Cell(eqx.Module):
        linear_z: eqx.nn.Linear
        linear_x: eqx.nn.Linear

        def __call__(self, z, x):
            return jnp.tanh(self.linear_z(z) + self.linear_x(x))

    deq = lcp.DEQ(Cell(...), z0=jnp.zeros(hidden))
    z = jax.vmap(deq)(xs)                  # a batch: vmap, as for any equinox layer
    z, stats = jax.vmap(deq.solve)(xs)     # stats.num_steps, stats.residual
    ```

    The layer acts on one sample, as equinox layers do; batch it with `jax.vmap`.
    (A cell that itself takes a batched state also works, and then solves the whole
    batch as one fixed-point problem with one tolerance.)
    """

    cell: Callable[[PyTree[Array], Any], PyTree[Array]]
    z0: PyTree[Array] | Callable[[Any], PyTree[Array]]
    solver: _FixedPointOrRoot
    adjoint: optx.AbstractAdjoint
    max_steps: int | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    contraction_steps: int = eqx.field(static=True)

    def __init__(
        self,
        cell: Callable[[PyTree[Array], Any], PyTree[Array]],
        z0: PyTree[Array] | Callable[[Any], PyTree[Array]],
        *,
        solver: _FixedPointOrRoot | None = None,
        adjoint: optx.AbstractAdjoint | None = None,
        max_steps: int | None = 256,
        throw: bool = True,
        contraction_steps: int = 0,
    ):
        """**Arguments:**

        - `cell`: the map `cell(z, x) -> z`: any callable, typically an `eqx.Module`,
            taking the state `z` (a pytree of arrays) and the input `x` and returning
            a new state of the same structure, shapes and dtypes.
        - `z0`: the initial state of the forward solve: a pytree of arrays, or a
            callable `x -> z0`. It also fixes the structure of the state.
        - `solver`: the forward solver, an optimistix fixed-point solver or root
            finder. Default `lcp.AndersonAcceleration(rtol=1e-4, atol=1e-4)`, a
            training-grade tolerance; tighten it when checking gradients.
            `LeastControlAdjoint` solves its controlled equilibrium to the same
            tolerances unless given its own.
        - `adjoint`: how to backpropagate: `lcp.LeastControlAdjoint()` (the default)
            or any `optx.AbstractAdjoint`, e.g. `optx.ImplicitAdjoint()`.
        - `max_steps`: the most steps of the forward solve.
        - `throw`: whether a forward solve that fails raises an error. With `False`
            the failure is reported in [`lcp_solvers.DEQStats`][]`.result` (see
            `DEQ.solve`).
        - `contraction_steps`: if positive, `DEQ.solve` also estimates the cell's
            spectral norm at the equilibrium with this many power-iteration steps
            ([`lcp_solvers.DEQStats`][]`.contraction`), outside the backward pass.
            20 is usually enough to see the trend while training; each step costs
            one JVP and one VJP of the cell.

        **Raises:**

        `ValueError`: `cell` not callable, `solver` not an optimistix fixed-point
        solver or root finder, `adjoint` not an `optx.AbstractAdjoint`, `max_steps`
        not a positive int or `None`, `contraction_steps` not a non-negative int.
        """
        if not callable(cell):
            raise ValueError(
                "`DEQ(cell=...)` must be a callable `cell(z, x) -> z`, e.g. an "
                f"`eqx.Module`, got {type(cell).__name__}."
            )
        if solver is None:
            solver = AndersonAcceleration(rtol=1e-4, atol=1e-4)
        if not isinstance(
            solver, (optx.AbstractFixedPointSolver, optx.AbstractRootFinder)
        ):
            raise ValueError(
                "`DEQ(solver=...)` must be an optimistix fixed-point solver (e.g. "
                "`lcp.AndersonAcceleration`, `optx.FixedPointIteration`) or root "
                f"finder (e.g. `optx.Newton`), got {type(solver).__name__}."
            )
        if adjoint is None:
            adjoint = LeastControlAdjoint()
        if not isinstance(adjoint, optx.AbstractAdjoint):
            raise ValueError(
                "`DEQ(adjoint=...)` must be an `optx.AbstractAdjoint`, e.g. "
                "`lcp.LeastControlAdjoint()` or `optx.ImplicitAdjoint()`, got "
                f"{type(adjoint).__name__}."
            )
        self.cell = cell
        self.z0 = z0
        self.solver = solver
        self.adjoint = adjoint
        check_max_steps(max_steps, "DEQ", allow_none=True)
        check_count(contraction_steps, "DEQ", "contraction_steps", minimum=0)
        self.max_steps = max_steps
        self.throw = throw
        self.contraction_steps = contraction_steps

    def solve(
        self, x: Any, z0: PyTree[Array] | None = None
    ) -> tuple[PyTree[Array], DEQStats]:
        """Solve for the equilibrium and report how the solve went.

        **Arguments:**

        - `x`: the input (any pytree the cell accepts).
        - `z0`: overrides the layer's initial state, e.g. to warm-start from the
            previous equilibrium. Same structure as the state.

        **Returns:**

        A pair `(z, stats)`: the equilibrium state and a [`lcp_solvers.DEQStats`][].

        **Raises:**

        - `ValueError` when traced: `z0` not a pytree of floating-point arrays, a cell
            that cannot be called as `cell(z, x)` or that returns a state of another
            structure, shape or dtype.
        - `EquinoxRuntimeError` (from `equinox.error_if`; with `throw=True`): the
            forward solve failed (optimistix's message), or, when differentiated,
            the errors of the `adjoint` (see [`lcp_solvers.LeastControlAdjoint`][]).
        """
        z0 = self._initial_state(x, z0)
        sol = optx.fixed_point(
            _fn,
            self.solver,
            z0,
            (self.cell, x),
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=self.throw,
        )
        z = sol.value
        # Statistics only: keep them out of the backward pass. (Unused, they cost
        # nothing under jit.)
        cell, z_stop, x_stop = _stop_gradient((self.cell, z, x))
        residual = tree_rms(tree_sub(cell(z_stop, x_stop), z_stop))
        contraction = None
        if self.contraction_steps > 0:
            contraction = _spectral_norm(
                lambda z: cell(z, x_stop), z_stop, self.contraction_steps
            )
        stats = DEQStats(
            num_steps=sol.stats["num_steps"],
            residual=residual,
            result=RESULTS.promote(sol.result),
            contraction=contraction,
        )
        return z, stats

    def jacobian_penalty(
        self, z: PyTree[Array], x: Any, key: Any, *, num_samples: int = 1
    ) -> Array:
        r"""Hutchinson estimate of `‖∂cell/∂z (z, x)‖_F²`, the Jacobian
        regularisation of DEQs (Bai, Koltun & Kolter, "Stabilizing equilibrium
        models by Jacobian regularization", ICML 2021).

        Add `gamma * penalty` to the training loss to keep the cell's Jacobian small
        at the equilibrium, and so the forward and backward solves fast and stable.
        It is differentiable: the cell's parameters, `x` and `z` receive gradients
        (through `z`, by the layer's `adjoint`).

        ```python
        z = deq(x)
        loss = task_loss(z) + gamma * deq.jacobian_penalty(z, x, key)
        ```

        **Arguments:**

        - `z`: the state at which to measure, normally the equilibrium `deq(x)`.
        - `x`: the input.
        - `key`: a `jax.random` key for the probe vectors (under `jax.vmap`, one per
            sample: `jax.random.split(key, batch_size)`).
        - `num_samples`: the number of Gaussian probes `ε` averaged.

        **Returns:**

        A scalar: the mean over the probes of `‖εᵀ ∂cell/∂z‖²` (one VJP of the cell
        each), whose expectation is `‖∂cell/∂z‖_F²`. Bai et al. divide it by the
        state's size; do so if you want a penalty that does not grow with the width.

        **Raises:**

        `ValueError` if `num_samples` is not a positive int.
        """
        check_count(num_samples, "DEQ.jacobian_penalty", "num_samples")
        _, vjp = jax.vjp(lambda z: self.cell(z, x), z)
        flat, unravel = jfu.ravel_pytree(z)

        def squared_norm(k):
            eps = unravel(jax.random.normal(k, flat.shape, flat.dtype))
            (row,) = vjp(eps)
            return sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(row))

        keys = jax.random.split(key, num_samples)
        return jnp.mean(jax.vmap(squared_norm)(keys))

    def __call__(
        self, x: Any, z0: PyTree[Array] | None = None, *, key: Any = None
    ) -> PyTree[Array]:
        """**Arguments:**

        - `x`: the input (any pytree the cell accepts).
        - `z0`: overrides the layer's initial state (e.g. a warm start).
        - `key`: ignored; accepted for compatibility with `eqx.nn.Sequential`.

        **Returns:**

        The equilibrium state `z*` with `z* = cell(z*, x)`.
        """
        del key
        z, _ = self.solve(x, z0)
        return z

    def _initial_state(self, x, z0):
        if z0 is None:
            z0 = self.z0
            if callable(z0) and not eqx.is_array(z0):
                z0 = z0(x)
            where = "`DEQ(z0=...)`"
        else:
            where = "`z0`"
        leaves = jtu.tree_leaves(z0)
        if not leaves or not all(eqx.is_inexact_array(leaf) for leaf in leaves):
            raise ValueError(
                f"{where} must be a pytree of floating-point arrays (the initial "
                "state, e.g. `jnp.zeros(hidden_size)`) or a callable `x -> z0`, got "
                f"{z0!r}."
            )
        z0 = _stop_gradient(z0)
        z_struct = jax.eval_shape(lambda: z0)
        x_desc = jtu.tree_map(_describe, x)
        try:
            out_struct = eqx.filter_eval_shape(self.cell, z0, x)
        except Exception as e:
            raise ValueError(
                "`DEQ` calls its cell as `cell(z, x) -> z` with the state `z` "
                f"(structure of `z0`: {jtu.tree_map(_describe, z_struct)}) and the "
                f"input `x` ({x_desc}), and that call failed with "
                f"{type(e).__name__}: {e}\nCheck the cell's signature and that "
                "`z0` has the shape the cell expects."
            ) from e
        same_structure = jtu.tree_structure(out_struct) == jtu.tree_structure(z_struct)
        if not same_structure or any(
            (a.shape, a.dtype) != (b.shape, b.dtype)
            for a, b in zip(
                jtu.tree_leaves(out_struct), jtu.tree_leaves(z_struct), strict=True
            )
        ):
            raise ValueError(
                "`DEQ`'s cell must return a new state with the structure, shapes and "
                f"dtypes of `z0`: expected {jtu.tree_map(_describe, z_struct)}, got "
                f"{jtu.tree_map(_describe, out_struct)} from `cell(z, x)`."
            )
        return z0


def _spectral_norm(fn, z, steps):
    # Power iteration on JᵀJ, J = ∂fn/∂z, over the flattened state; a fixed start
    # (not a user key) so that the statistic is deterministic.
    flat, unravel = jfu.ravel_pytree(z)
    _, jvp = jax.linearize(lambda v: jfu.ravel_pytree(fn(unravel(v)))[0], flat)
    vjp = jax.linear_transpose(jvp, flat)

    def normalise(v):
        return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(v.dtype).tiny)

    def step(_, v):
        (w,) = vjp(jvp(v))
        return normalise(w)

    v = normalise(jax.random.normal(jax.random.key(0), flat.shape, flat.dtype))
    v = lax.fori_loop(0, steps, step, v)
    return jnp.linalg.norm(jvp(v))


def _stop_gradient(tree):
    arrays, rest = eqx.partition(tree, eqx.is_array)
    return eqx.combine(lax.stop_gradient(arrays), rest)


def _describe(x):
    if isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x):
        return f"{x.dtype}{list(x.shape)}"
    return x
