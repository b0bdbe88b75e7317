"""The measured effects of `strength` and `alpha` in docs/knobs.md.

Run: python benchmarks/knobs.py  (float64, CPU; needs scikit-learn; about 2 minutes).
"""

import jax
import jax.numpy as jnp
import optimistix as optx
from sklearn.datasets import load_digits

import lcp_solvers as lcp


jax.config.update("jax_enable_x64", True)


def _cosine(a, b):
    return float(jnp.vdot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b))


def strength_sweep():
    # The README's layer z = tanh(W z + x): the drop-in update against the implicit
    # gradient.
    def cell(z, args):
        W, x = args
        return jnp.tanh(W @ z + x)

    def loss(W, x, adjoint):
        solver = optx.FixedPointIteration(rtol=1e-10, atol=1e-10)
        z = optx.fixed_point(cell, solver, jnp.zeros_like(x), (W, x), adjoint=adjoint)
        return jnp.sum((z.value - 0.5) ** 2)

    W, x = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (8, 8)), jnp.ones(8)
    implicit = jax.grad(loss)(W, x, optx.ImplicitAdjoint())
    print("| strength | relative difference | cosine |\n|---|---|---|")
    for strength in (1e-6, 1e-3, 1e-2, 1e-1, 1.0):
        g = jax.grad(loss)(W, x, lcp.LeastControlAdjoint(strength=strength))
        diff = float(jnp.linalg.norm(g - implicit) / jnp.linalg.norm(implicit))
        print(f"| {strength:g} | {diff:.2g} | {_cosine(g, implicit):.7f} |")


def alpha_sweep():
    # docs/howto_rnn.md's network at initialisation, 32 digits: the mean update of
    # dynamic inversion against the implicit gradient of the batch-mean loss.
    digits = load_digits()
    xs = jnp.asarray(digits.data[:32] / 16.0)
    targets = jax.nn.one_hot(digits.target[:32], 10)
    n = 74
    key_w, key_u = jax.random.split(jax.random.key(0))
    theta = {
        "W": 0.25 * jax.random.normal(key_w, (n, n)) / jnp.sqrt(n),
        "U": jax.random.normal(key_u, (n, 64)) / 8.0,
    }

    def f(phi, theta, args):
        return -phi + theta["W"] @ jnp.tanh(phi) + theta["U"] @ args[0]

    def loss(phi, args):
        return 0.5 * jnp.sum((phi[64:] - args[1]) ** 2)

    def batch_loss(theta):
        def one(x, t):
            phi = optx.fixed_point(
                lambda p, x: theta["W"] @ jnp.tanh(p) + theta["U"] @ x,
                optx.FixedPointIteration(1e-12, 1e-12),
                jnp.zeros(n),
                x,
                max_steps=2000,
                adjoint=optx.ImplicitAdjoint(),
            ).value
            return loss(phi, (x, t))

        return jnp.mean(jax.vmap(one)(xs, targets))

    def flat(t):
        return jnp.concatenate([t["W"].ravel(), t["U"].ravel()])

    gradient = flat(jax.grad(batch_loss)(theta))
    print(
        "| alpha | cosine to the gradient | alpha·‖update‖ / ‖gradient‖ "
        "| loss at φ_c / loss at φ* |\n|---|---|---|---|"
    )
    for alpha in (0.01, 0.1, 1.0, 10.0, 100.0):
        controller = lcp.DynamicInversion(alpha=alpha)

        def one(x, t, controller=controller):
            return lcp.least_control_grad(
                f, loss, theta, jnp.zeros(n), (x, t), controller=controller,
                solver=lcp.IMEX(), rtol=1e-10, atol=1e-10, max_steps=5000,
            )  # fmt: skip

        grads, info = jax.vmap(one)(xs, targets)
        update = flat(jax.tree.map(lambda g: g.mean(0), grads))
        ratio = alpha * float(jnp.linalg.norm(update) / jnp.linalg.norm(gradient))
        moved = float(jnp.mean(info.loss_controlled / info.loss_free))
        print(
            f"| {alpha:g} | {_cosine(update, gradient):.6f} | {ratio:.3f} "
            f"| {moved:.2g} |"
        )


if __name__ == "__main__":
    strength_sweep()
    alpha_sweep()
