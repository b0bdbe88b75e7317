"""The drop-in least-control VJP (docs/architecture.md): the engine's
controlled equilibrium for the linearised loss `L(y) = ḡᵀy` under proportional
dynamic inversion. Shared by `LeastControlAdjoint` and the jaxopt decorators."""

import math
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._controller import DynamicInversion
from ._engine import controlled_equilibrium
from ._inner_solver import AbstractInnerSolver
from ._misc import tree_allfinite, tree_float_dtype, tree_rms, tree_scale
from ._solution import RESULTS
from ._system import ControlledSystem


def _linear_loss(y, g_hat):
    # `Re Σ ĝ·y`: JAX's cotangent of a complex output is the conjugate-free pairing
    # `dℓ = Re(ḡ·dy)`, so this is the linearised loss for real and complex states.
    products = jtu.tree_map(lambda g, x: jnp.sum(jnp.real(g * x)), g_hat, y)
    return sum(jtu.tree_leaves(products))


def check_strength(strength, where: str):
    if isinstance(strength, (int, float)):
        if not (strength > 0 and math.isfinite(strength)):
            raise ValueError(
                f"`{where}(strength=...)` must be positive and finite, got "
                f"{strength}. Use a small value such as 1e-6 to recover the "
                "implicit gradient."
            )
        return strength
    strength = jnp.asarray(strength)
    return eqx.error_if(
        strength,
        ~((strength > 0) & jnp.isfinite(strength)),
        f"`{where}(strength=...)` must be positive and finite. Use a small value such "
        "as 1e-6 to recover the implicit gradient.",
    )


def least_control_cotangent(
    f: Callable[[PyTree[Array], PyTree], PyTree[Array]],
    root: PyTree[Array],
    theta: PyTree,
    grad_root: PyTree[Array],
    *,
    strength,
    solver: AbstractInnerSolver,
    rtol: float,
    atol: float,
    max_steps: int,
    throw: bool,
) -> tuple[PyTree[Array], PyTree[Array]]:
    """The leaky least-control system of the dynamics `f(y, theta)` at the
    equilibrium `root` with cotangent `grad_root`, at strength `β = strength /
    rms(ḡ)`.

    **Returns:** `(y_c, w)` such that the least-control cotangent of `theta` is
    `(∂θ f(y_c, θ))ᵀ w`, i.e. `w = -ψ/β`.
    """
    strength = check_strength(strength, "LeastControlAdjoint")
    diff_theta, static_theta = eqx.partition(theta, eqx.is_inexact_array)
    g_scale = tree_rms(grad_root)
    if throw:
        # Blame the forward solve for a non-finite state (the engine raises for it),
        # the loss for a non-finite cotangent at a finite state.
        bad_cotangent = tree_allfinite(root) & jnp.invert(tree_allfinite(grad_root))
        g_scale = RESULTS.nonfinite_cotangent.error_if(g_scale, bad_cotangent)
    no_signal = g_scale == 0
    safe_scale = jnp.where(no_signal, 1, g_scale)
    # The cotangent normalised to unit rms: the controller's leak is then
    # `1/strength` whatever the loss's scale, and the scale comes back in `w`.
    g_hat = tree_scale(grad_root, 1 / safe_scale)
    dtype = tree_float_dtype(root)
    strength = jnp.asarray(strength, jnp.real(jnp.zeros((), dtype)).dtype)
    system = ControlledSystem(
        lambda y, d, _: f(y, eqx.combine(d, static_theta)),
        _linear_loss,
        diff_theta,
        g_hat,
        jtu.tree_map(lambda x: jnp.ones(x.shape, jnp.real(x).dtype), root),
    )
    controller = DynamicInversion(alpha=1 / strength, proportional=True)
    state, _, _ = controlled_equilibrium(
        system,
        controller,
        solver,
        root,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        throw=throw,
        what="`LeastControlAdjoint` (least-control backward pass)",
    )
    y_c, psi, _ = controller.unpack(system, state)
    weight = tree_scale(psi, -safe_scale / strength)
    # A zero cotangent has a zero update wherever the state is.
    weight = jtu.tree_map(lambda w: jnp.where(no_signal, jnp.zeros_like(w), w), weight)
    y_c = jtu.tree_map(lambda yc, r: jnp.where(no_signal, r, yc), y_c, root)
    return y_c, weight
