from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._misc import check_count, check_positive


def _spd_solve(a: Float[Array, "m m"], b: Float[Array, " m"]) -> Float[Array, " m"]:
    # Cholesky for a tiny (history-sized) matrix, unrolled into elementwise operations:
    # LAPACK calls cost far more than the arithmetic at this size, once per step and
    # per batch element.
    m = a.shape[0]
    lower: list[list[Any]] = [[None] * m for _ in range(m)]
    for i in range(m):
        for j in range(i + 1):
            s = a[i, j] - sum(lower[i][k] * lower[j][k] for k in range(j))
            if i == j:
                lower[i][j] = jnp.sqrt(s)
            else:
                lower[i][j] = s / lower[j][j]
    y: list[Any] = []
    for i in range(m):
        y.append((b[i] - sum(lower[i][k] * y[k] for k in range(i))) / lower[i][i])
    x: list[Any] = [None] * m
    for i in reversed(range(m)):
        x[i] = (y[i] - sum(lower[k][i] * x[k] for k in range(i + 1, m))) / lower[i][i]
    return jnp.stack(x)


def _ravel_real(tree: PyTree[Array]) -> tuple[Array, Callable]:
    """Flattens a pytree into one real vector (a complex leaf as its real and
    imaginary parts), so that the mixing is a real least-squares problem."""
    flat, unravel = jfu.ravel_pytree(tree)
    if not jnp.iscomplexobj(flat):
        return flat, unravel
    n = flat.size

    def unravel_complex(v):
        return unravel(jax.lax.complex(v[:n], v[n:]))

    return jnp.concatenate([flat.real, flat.imag]), unravel_complex


class _AndersonState(eqx.Module):
    # Ring buffers of the last `history_length` images g_i = G(x_i) and residuals
    # r_i = g_i - x_i, flattened so that the mixing is a small dense least-squares
    # problem, and their Gram matrix r_iᵀr_j, updated one row per step.
    gs: Float[Array, "m n"]
    rs: Float[Array, "m n"]
    gram: Float[Array, "m m"]
    count: Int[Array, ""]
    relative_error: Scalar


class AndersonAcceleration(optx.AbstractFixedPointSolver):
    """Anderson acceleration (type II) for fixed points `y = fn(y, args)`
    (Anderson, 1965; Walker & Ni, "Anderson acceleration for fixed-point
    iterations", SIAM J. Numer. Anal. 2011).

    Keeps the last `history_length` iterates and their images and takes the
    affine combination of them whose residual `fn(y) - y` is smallest in the
    least-squares sense. On a contraction it needs far fewer function evaluations than
    [`optimistix.FixedPointIteration`][fixed-point-iteration], at the cost of
    `O(history_length · size(y))` memory, independent of the number of steps.

    [fixed-point-iteration]: https://docs.kidger.site/optimistix/api/fixed_point/

    It is an ordinary optimistix fixed-point solver:
    `optx.fixed_point(fn, lcp.AndersonAcceleration(rtol=1e-6, atol=1e-6), y0)`.
    It is also the default solver of the controlled equilibrium in
    [`lcp_solvers.LeastControlAdjoint`][] for fixed-point problems.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    history_length: int = eqx.field(static=True, default=5)
    mixing: float = eqx.field(static=True, default=1.0)
    regularisation: float = 1e-10

    def __check_init__(self):
        check_positive(self.mixing, "AndersonAcceleration", "mixing")
        check_count(self.history_length, "AndersonAcceleration", "history_length")

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
        flat, _ = _ravel_real(y)
        # With a history of one, the mixing is the plain step: no history is kept.
        m = 0 if self.history_length == 1 else self.history_length
        buf = jnp.zeros((m, flat.size), flat.dtype)
        return _AndersonState(
            gs=buf,
            rs=buf,
            gram=jnp.zeros((m, m), flat.dtype),
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
        x_flat, unravel = _ravel_real(y)
        g_flat, _ = _ravel_real(g)
        g_flat = g_flat.astype(x_flat.dtype)
        r_flat = g_flat - x_flat
        if self.history_length == 1:
            # Plain iteration: under `vmap` every carried buffer is copied through
            # a select at each step, which cost as much as a 532-unit layer's step.
            new_state = _AndersonState(
                gs=state.gs,
                rs=state.rs,
                gram=state.gram,
                count=state.count + 1,
                relative_error=self._relative_error(r_flat, g_flat),
            )
            new_flat = (
                g_flat - (1 - self.mixing) * r_flat if self.mixing != 1 else g_flat
            )
            return unravel(new_flat), new_state, aux
        m = self.history_length
        slot = state.count % m
        # In-place row updates: the history is the bulk of the memory traffic.
        gs = state.gs.at[slot].set(g_flat)
        rs = state.rs.at[slot].set(r_flat)
        count = state.count + 1
        valid = jnp.arange(m) < count
        is_slot = jnp.arange(m) == slot
        # Only the new residual's row and column of the Gram matrix change: one pass
        # over the history per step instead of m.
        row = jnp.where(valid, rs @ r_flat, 0)
        gram = state.gram.at[slot, :].set(row).at[:, slot].set(row)

        # min ‖Σ α_i r_i‖ subject to Σ α_i = 1 is α = G⁻¹1 / (1ᵀG⁻¹1) with the
        # (regularised, positive definite) Gram matrix G. Unused slots get identity
        # rows and a zero right-hand side, so α_i = 0 there.
        diag_scale = jnp.max(jnp.where(valid, jnp.diag(gram), 0))
        eps = jnp.finfo(gram.dtype).tiny
        reg = self.regularisation * diag_scale + eps
        both = valid[:, None] & valid[None, :]
        system = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, reg, 1))
        z = _spd_solve(system, valid.astype(gram.dtype))
        alpha = z / jnp.sum(z)
        # A degenerate mixing problem (e.g. a repeated iterate) falls back to the plain
        # fixed-point step rather than poisoning the iterate with NaNs.
        plain = is_slot.astype(gram.dtype)
        alpha = jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, plain)
        new_flat = alpha @ gs
        if self.mixing != 1:
            # x_i = g_i - r_i, so β Σα g + (1-β) Σα x = Σα g - (1-β) Σα r.
            new_flat = new_flat - (1 - self.mixing) * (alpha @ rs)

        new_state = _AndersonState(
            gs=gs,
            rs=rs,
            gram=gram,
            count=count,
            relative_error=self._relative_error(r_flat, g_flat),
        )
        return unravel(new_flat), new_state, aux

    def _relative_error(self, r_flat, g_flat):
        with jax.numpy_dtype_promotion("standard"):
            scale = self.atol + self.rtol * jnp.abs(g_flat)
            return self.norm(r_flat / scale).astype(r_flat.dtype)

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
