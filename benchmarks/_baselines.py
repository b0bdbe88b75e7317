"""Peers shared by the benchmarks."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx


class NeumannIteration(lx.AbstractLinearSolver):
    """The implicit backward as recurrent backprop and DEQ libraries do it, as a
    lineax solver for `optx.ImplicitAdjoint`: linearise once at the equilibrium, then
    iterate `x ← x + (A x - b)` for `A = ∂(fn - id)`, i.e. the adjoint fixed point
    `λ ← (∂fn)ᵀ λ - ḡ` after lineax transposes the operator. Converges when `fn`
    contracts."""

    rtol: float
    atol: float
    max_steps: int = 4096

    def init(self, operator, options):
        del options
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        del options
        operator = state

        def cond(carry):
            _, step, err = carry
            return (err > 1) & (step < self.max_steps)

        def body(carry):
            x, step, _ = carry
            new = jtu.tree_map(lambda a, y, b: y + a - b, operator.mv(x), x, vector)
            scale = jtu.tree_map(lambda y: self.atol + self.rtol * jnp.abs(y), new)
            diff = jtu.tree_map(lambda a, b, c: (a - b) / c, new, x, scale)
            return new, step + 1, optx.max_norm(diff)

        x0 = jtu.tree_map(jnp.negative, vector)
        inf = jnp.array(jnp.inf, jtu.tree_leaves(vector)[0].dtype)
        x, steps, err = jax.lax.while_loop(cond, body, (x0, jnp.array(0), inf))
        result = lx.RESULTS.where(
            err <= 1, lx.RESULTS.successful, lx.RESULTS.max_steps_reached
        )
        return x, result, {"num_steps": steps}

    def transpose(self, state, options):
        return state.transpose(), options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True
