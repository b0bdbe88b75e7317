from collections.abc import Callable

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def with_readout(
    f: Callable[[PyTree[Array], PyTree, PyTree], PyTree[Array]],
    readout: Callable[[PyTree[Array], PyTree, PyTree], PyTree[Array]],
) -> Callable:
    r"""Make a readout `y = h(φ, θ)` part of the state.

    Returns the velocity field of the state `(phi, y)`:

    $$\dot φ = f(φ, θ),\qquad \dot y = h(φ, θ) - y,$$

    for [`lcp_solvers.least_control_grad`][]. Its free equilibrium has `y = h(φ⋆, θ)`;
    write the loss on `y` (`loss(state, args)` reading `state[1]`). Under control the
    output controller acts on `y` (`ẏ = h - y + u` at steady state) and the readout
    parameters receive the local update `-(∂_θ h)ᵀ u`: the control of the `y`
    block equals `u` there, since `∂ẏ/∂y = -I`.

    **Arguments:**

    - `f`: the free velocity `f(phi, theta, args)` of the hidden state.
    - `readout`: `h(phi, theta, args)`, the readout (any pytree). Both get the same
        `theta`, so keep the readout parameters in it (e.g. `theta = (theta_f,
        theta_h)`).

    **Returns:**

    `f_aug(state, theta, args)` with `state = (phi, y)`. Start it from
    `(phi0, y0)` with `y0` of the readout's structure, e.g.
    `y0 = readout(phi0, theta, args)`.
    """

    def f_aug(state, theta, args):
        phi, y = state
        h = readout(phi, theta, args)
        return f(phi, theta, args), jtu.tree_map(jnp.subtract, h, y)

    return f_aug
