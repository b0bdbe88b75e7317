from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar




class _AndersonState(eqx.Module):
    # Ring buffers of the last `history_length` iterates x_i and their images G(x_i),
    # flattened so that the mixing is a small dense least-squares problem.
    xs: Float[Array, "m n"]
    gs: Float[Array, "m n"]
    count: Int[Array, ""]
    relative_error: Scalar


class AndersonAcceleration(optx.AbstractFixedPointSolver):
    """Anderson acceleration (type II) for fixed points `y = fn(y, args)`.

    Keeps the last `history_length` iterates and their images and takes the
    affine combination of them whose residual `fn(y) - y` is smallest in the
    least-squares sense. On a contraction it needs far fewer function evaluations than
    [`optimistix.FixedPointIteration`][], at the cost of `O(history_length · size(y))`
    memory, independent of the number of steps.

    It is an ordinary optimistix fixed-point solver:
    `optx.fixed_point(fn, lcp.AndersonAcceleration(rtol=1e-6, atol=1e-6), y0)`.
    It is also the default solver of the controlled equilibrium in
    [`lcp_solvers.LeastControlAdjoint`][] for fixed-point problems.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    history_length: int = eqx.field(static=True, default=5)
    mixing: float = 1.0
    regularisation: float = 1e-10

    def __check_init__(self):
        if self.history_length < 1:
            raise ValueError(
                "`AndersonAcceleration(history_length=...)` must be at least 1, got "
                f"{self.history_length}."
            )

    def init(
        self,
        fn: Callable,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _AndersonState:
        del fn, args, options, f_struct, aux_struct, tags
        flat, _ = jfu.ravel_pytree(y)
        buf = jnp.zeros((self.history_length, flat.size), flat.dtype)
        return _AndersonState(
            xs=buf,
            gs=buf,
            count=jnp.array(0),
            relative_error=jnp.array(jnp.inf, dtype=flat.dtype),
        )

    def step(
        self,
        fn: Callable,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[PyTree[Array], _AndersonState, Any]:
        del options, tags
        g, aux = fn(y, args)
        x_flat, unravel = jfu.ravel_pytree(y)
        g_flat, _ = jfu.ravel_pytree(g)
        g_flat = g_flat.astype(x_flat.dtype)
        m = self.history_length
        slot = state.count % m
        xs = state.xs.at[slot].set(x_flat)
        gs = state.gs.at[slot].set(g_flat)
        count = state.count + 1
        valid = jnp.arange(m) < count

        # min ‖Σ α_i r_i‖² subject to Σ α_i = 1, with r_i = g_i - x_i; unused slots
        # are pinned to α_i = 0 by an identity row. Solved as the bordered system.
        res = jnp.where(valid[:, None], gs - xs, 0)
        gram = res @ res.T
        diag_scale = jnp.max(jnp.where(valid, jnp.diag(gram), 0))
        eps = jnp.finfo(gram.dtype).tiny
        reg = self.regularisation * diag_scale + eps
        both = valid[:, None] & valid[None, :]
        gram = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, reg, 1))
        ones = valid.astype(gram.dtype)
        system = jnp.block([[gram, ones[:, None]], [ones[None, :], jnp.zeros((1, 1))]])
        rhs = jnp.zeros(m + 1, gram.dtype).at[m].set(1)
        alpha = jnp.linalg.solve(system, rhs)[:m]
        # A singular mixing problem (e.g. a repeated iterate) falls back to the plain
        # fixed-point step rather than poisoning the iterate with NaNs.
        plain = jnp.zeros(m, gram.dtype).at[slot].set(1)
        alpha = jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, plain)
        new_flat = alpha @ (self.mixing * gs + (1 - self.mixing) * xs)

        with jax.numpy_dtype_promotion("standard"):
            scale = self.atol + self.rtol * jnp.abs(g_flat)
            relative_error = self.norm((g_flat - x_flat) / scale)
        new_state = _AndersonState(
            xs=xs, gs=gs, count=count, relative_error=relative_error
        )
        return unravel(new_flat), new_state, aux

    def terminate(
        self,
        fn: Callable,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, options, tags
        diverged = jnp.invert(jnp.isfinite(state.relative_error))
        diverged = diverged & (state.count > 0)
        result = optx.RESULTS.where(
            diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return (state.relative_error < 1) | diverged, result

    def postprocess(
        self,
        fn: Callable,
        y: PyTree[Array],
        aux: Any,
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[PyTree[Array], Any, dict[str, Any]]:
        return y, aux, {}


AndersonAcceleration.__init__.__doc__ = """**Arguments:**

- `rtol`: relative tolerance on the fixed-point residual `fn(y) - y`.
- `atol`: absolute tolerance on the fixed-point residual.
- `norm`: the norm of the scaled residual used for termination (as in optimistix:
    `optx.max_norm`, `optx.rms_norm` or `optx.two_norm`).
- `history_length`: how many past iterates to mix (`m`). Memory is `2 m size(y)`.
- `mixing`: the damping `β` of type-II Anderson: the new iterate mixes the images
    `G(x_i)` with weight `β` and the iterates `x_i` with `1 - β`.
- `regularisation`: Tikhonov regularisation of the mixing least-squares problem,
    relative to the largest squared residual in the history.
"""
