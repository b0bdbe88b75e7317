from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree


@eqx.filter_jit
def linear_feedback_update(
    f: Callable[[PyTree[Array], PyTree, PyTree], PyTree[Array]],
    theta: PyTree,
    phi: PyTree[Array],
    Q: Array,
    args: PyTree = None,
    *,
    key: PRNGKeyArray,
    output: Callable | None = None,
    sigma: float = 0.05,
    noise_time: float = 20.0,
    alpha: float = 3.0,
    dt: float = 0.05,
    num_steps: int = 400_000,
    learning_rate: float = 0.01,
    decay: float = 0.0,
) -> Array:
    r"""Learn the feedback matrix `Q` of [`lcp_solvers.LinearFeedback`][] with the
    local noise-driven rule, on one sample.

    Around the free equilibrium `phi` (e.g. `info.phi_free`), with no target, the
    output controller holds the outputs at their free values while Ornstein–Uhlenbeck
    noise `σε` (time constant `noise_time`, unit variance) is injected into every unit:

    $$\dot φ = f(φ, θ) + Q u + σ ε,\qquad \dot u = -(P φ - P φ_{free}) - α u,$$

    $$\dot Q = -σ^{-2} (Q u + σ ε)(u - \bar u)^\top - γ Q,$$

    (`P = output`, `ū` a running mean of `u`), simulated with Euler–Maruyama. `u`
    responds only to the part of the noise that reaches the outputs, i.e. to
    `[0, I](∂_φ f)⁻¹ ε`, so at the rule's fixed point `col(Q) = col((∂_φ f)⁻ᵀ
    Pᵀ)`: the optimality condition of `LinearFeedback` (Theorem 2). Every quantity is
    local to a unit (its input `Qu + σε`) and the controller (`u`).

    The rule assumes the noise is slow compared with the relaxation of `f`
    (`noise_time` well above the free dynamics' time constant), so that `u` sees the
    quasi-static response `[0, I](∂_φ f)⁻¹ σε`; a leaky controller (`alpha > 0`)
    keeps the loop stable while `Q` is still wrong. Start from `Q = 0` (a random `Q`
    can make the loop unstable). The defaults are for dynamics with time constants of
    order one (e.g. `f = -φ + Wσ(φ) + Ux`) and reach a cosine of about 0.99 between the
    resulting update and the DI update on one sample; shorter runs (fewer steps,
    `noise_time` nearer 1) are cheaper and less exact.

    Call it in a training loop between (or alongside) parameter updates, e.g. on each
    sample's `info.phi_free`, and pass the returned `Q` to the next
    `LinearFeedback(Q, alpha, output)`.

    **Arguments:**

    - `f`, `theta`, `args`: the free dynamics, as in `least_control_grad`.
    - `phi`: the free equilibrium to learn around.
    - `Q`: the current feedback matrix, `(size(phi), size(output(phi)))`.
    - `key`: a JAX PRNG key for the noise.
    - `output`: the output selector of `LinearFeedback` (`None`: the whole state).
    - `sigma`: the noise amplitude (small: the rule linearises `f` around `phi`).
    - `noise_time`: the correlation time of the OU noise.
    - `alpha`: the leak of the output controller during feedback learning.
    - `dt`, `num_steps`: the Euler–Maruyama step and number of steps.
    - `learning_rate`: the rate `η` of `dQ = η Q̇ dt`.
    - `decay`: the weight decay `γ`.

    **Returns:**

    The updated `Q`.
    """
    out = (lambda p: p) if output is None else output
    phi_flat, unravel = jfu.ravel_pytree(phi)
    y_ref, _ = jfu.ravel_pytree(out(phi))
    n, m = phi_flat.size, y_ref.size
    if Q.shape != (n, m):
        raise ValueError(
            f"`linear_feedback_update(Q=...)` must have shape (size(phi), "
            f"size(output(phi))) = ({n}, {m}), got {Q.shape}."
        )
    dtype = phi_flat.dtype

    def fv(x):
        return jfu.ravel_pytree(f(unravel(x), theta, args))[0]

    def outv(x):
        return jfu.ravel_pytree(out(unravel(x)))[0]

    decay_eps = jnp.exp(-dt / noise_time)
    kick = jnp.sqrt(1 - decay_eps**2)

    def step(carry, k):
        x, u, ubar, eps, q = carry
        v = q @ u + sigma * eps
        q = q + learning_rate * dt * (-jnp.outer(v, u - ubar) / sigma**2 - decay * q)
        x_new = x + dt * (fv(x) + v)
        u_new = u + dt * (-(outv(x) - y_ref) - alpha * u)
        ubar = ubar + (dt / (10 * noise_time)) * (u - ubar)
        # Exact OU update: stationary unit variance, correlation time `noise_time`.
        eps = decay_eps * eps + kick * jax.random.normal(k, (n,), dtype)
        return (x_new, u_new, ubar, eps, q), None

    zeros_m = jnp.zeros(m, dtype)
    eps0 = jax.random.normal(jax.random.fold_in(key, 1), (n,), dtype)
    keys = jax.random.split(key, num_steps)
    carry = (phi_flat, zeros_m, zeros_m, eps0, jnp.asarray(Q, dtype))
    (_, _, _, _, q), _ = lax.scan(step, carry, keys)
    return q
