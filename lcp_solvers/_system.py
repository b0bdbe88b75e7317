from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar


class ControlledSystem(eqx.Module):
    r"""The system a controller acts on: the free dynamics `φ̇ = f(φ, θ, args)` and the
    loss `L(φ, args)`, at fixed parameters `θ` and `args`.

    Every entry point builds one and hands it to the controller's methods
    ([`lcp_solvers.AbstractController`][]) and to the inner solver: a controller needs
    nothing else to define its dynamics. For the drop-in
    [`lcp_solvers.LeastControlAdjoint`][] the loss is the linearised `L(φ) = ḡᵀφ` of
    the incoming cotangent `ḡ` (the drop-in mode, docs/architecture.md).

    **Fields:**

    - `f`: the free velocity `f(phi, theta, args)`, a pytree like `phi`.
    - `loss`: the loss `loss(phi, args)`, a scalar.
    - `theta`: the parameters.
    - `args`: everything else (inputs, targets).
    - `output_mask`: a pytree like the state, 1 on the output components (where the
        loss depends on the state) and 0 elsewhere. The output controller `u` lives
        there.
    """

    f: Callable
    loss: Callable
    theta: PyTree
    args: PyTree
    output_mask: PyTree[Array]

    def velocity(self, phi: PyTree[Array]) -> PyTree[Array]:
        """The free velocity `f(φ, θ, args)`."""
        return self.f(phi, self.theta, self.args)

    def velocity_and_vjp(self, phi: PyTree[Array]) -> tuple[PyTree[Array], Callable]:
        """`(f(φ), v ↦ (∂_φ f)ᵀv)`: one linearisation gives both."""
        return jax.vjp(self.velocity, phi)

    def loss_value(self, phi: PyTree[Array]) -> Scalar:
        """`L(φ, args)`."""
        return self.loss(phi, self.args)

    def loss_grad(self, phi: PyTree[Array]) -> PyTree[Array]:
        """`∇_φ L(φ, args)`."""
        return jax.grad(self.loss_value)(phi)


def output_mask(loss: Callable, phi: PyTree[Array], args: PyTree) -> PyTree[Array]:
    """1 where the loss depends on the state, 0 elsewhere, detected around `phi`.

    A component is an output if its loss gradient or a generic Hessian probe is
    nonzero at `phi` or at `phi` shifted by the probe either way; components the
    loss never reads have both identically zero. The shifted points catch losses
    flat at `phi` itself (e.g. a loss on `relu(phi)` at `phi = 0`, a common start).
    """
    grad = jax.grad(lambda p: loss(p, args))
    # A fixed, generic probe (a low-discrepancy sequence in [0.5, 1.5)): no exact
    # cancellation in the Hessian product, and cheaper than drawing random numbers.
    probe = jtu.tree_map(
        lambda x: (
            (0.5 + jnp.mod(0.1234 + 0.6180339887 * jnp.arange(x.size), 1.0))
            .reshape(x.shape)
            .astype(x.dtype)
        ),
        phi,
    )
    mask = jtu.tree_map(lambda x: jnp.zeros(x.shape, bool), phi)
    for sign in (0.0, 1.0, -1.0):
        point = jtu.tree_map(lambda x, p, c=sign: x + c * p, phi, probe)
        g, hp = jax.jvp(grad, (point,), (probe,))
        mask = jtu.tree_map(lambda m, a, b: m | (a != 0) | (b != 0), mask, g, hp)
    return jtu.tree_map(lambda m, x: m.astype(jnp.real(x).dtype), mask, phi)
