"""Diagnostics behind docs/results.md's analysis of the learned-feedback variants.

    python diagnose_feedback.py kp --dataset mnist1d --arch rnn --alpha 100
    python diagnose_feedback.py lf-oracle --dataset digits --arch ff
    python diagnose_feedback.py kp-init --dataset mnist1d --alpha 100
    python diagnose_feedback.py kp-decay --dataset mnist1d --alpha 100 --decay 3e-5

`kp`: trains LCP-DI (KP) exactly as `lcp-solvers reproduce table1` does (seed 0) and
every 5 epochs prints the alignment of the learned feedback weights with the forward
ones (cosine of `W` with `S_Wᵀ`, `R` with `S_Rᵀ`) and the cosine of the KP update with
the exact DI update on 256 training examples.

`kp-init`: trains LCP-DI (KP) as the table does (seeds 0-2, both architectures), but
from the feedback initialisation of the paper's code: `S_W` scaled to Frobenius norm 1
(its one block, in both architectures), `S_R ~ N(0, 1/(c·n))` for `c` outputs and `n`
readout units, and no decay (`--decay`, default 0; the paper decays by 1e-6 per step
outside Adam, 3% over 30,000 steps). Prints each run's final test accuracy and the
mean over seeds every 30 epochs.

`kp-decay`: the same from the table's initialisation with the Kolen-Pollack decay
`--decay` (default 1e-4, the table's: then the runs are the table's KP runs), and
after each run the alignment of the feedback weights (cosine of `W` with `S_Wᵀ`, `R`
with `S_Rᵀ`).

`lf-oracle`: trains LCP-LF with `Q` replaced, before every batch, by an oracle instead
of the noise-driven rule: `--oracle rule` is the exact fixed point of the noise rule
on that batch (`Q = -Σ Aᵀ (Σ A Aᵀ)⁻¹` with `A = [0, I](∂_φ f)⁻¹` per example), and
`--oracle mean` the batch mean of DI's feedback `Aᵀ`. If even these shared matrices
lag BP/RBP, the gap is the shared `Q`, not how it is learned. The hidden units'
learning signal is modulated by their own `σ'(h)` (`LeastControl`'s default) unless
`--no-modulate` is given.

Written for the dense networks as they were when these diagnostics ran: the feedforward
net as an `EquilibriumNetwork` with a masked dense `W` (attributes `W`, `S_W`, `R`,
`S_R`). The recurrent runs (`--arch rnn`) still run as they did; the feedforward net is
now `Feedforward` (layer weights and a `feedback` tuple), so the `--arch ff` runs need
the code before commit 4f8b284.
"""

import argparse

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np

from lcp_solvers.experiments import (
    evaluate,
    LeastControl,
    load_dataset,
    train_classifier,
)
from lcp_solvers.experiments._train import _adam, _train_step
from lcp_solvers_cli._cli import _initial_model


def _cos(a, b):
    a, b = jfu.ravel_pytree(a)[0], jfu.ravel_pytree(b)[0]
    return round(float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))), 3)


def kp(args):
    ds = load_dataset(args.dataset)
    model, key = _initial_model(ds, args.arch, 64, 0, feedback=True)
    rule = LeastControl(variant="kp", alpha=args.alpha)
    di = eqx.filter_jit(LeastControl(variant="di", alpha=args.alpha))
    kp_rule = eqx.filter_jit(rule)
    optim = _adam(1e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    x = jnp.asarray(ds.x_train, jnp.float32)
    y = jnp.asarray(ds.y_train)
    n = len(x)
    key, _ = jax.random.split(key)  # as `train_classifier` (its rule-state key)
    for epoch in range(args.epochs + 1):
        if epoch % 5 == 0:
            g_di, _, _ = di(model, None, x[:256], y[:256], jax.random.key(0))
            g_kp, _, _ = kp_rule(model, None, x[:256], y[:256], jax.random.key(0))
            assert model.S_W is not None and model.S_R is not None
            acc = evaluate(model, ds.x_test, ds.y_test)
            print(
                f"epoch {epoch:2d}  test acc {acc:.3f}"
                f"  cos(W, S_W^T) {_cos(model.W, model.S_W.T)}"
                f"  cos(R, S_R^T) {_cos(model.R, model.S_R.T)}"
                f"  cos(update, DI update): W {_cos(g_kp.W, g_di.W)}"
                f" U {_cos(g_kp.U, g_di.U)} R {_cos(g_kp.R, g_di.R)}",
                flush=True,
            )
        if epoch == args.epochs:
            break
        # The same shuffling and steps as `train_classifier`: the table's run.
        key, perm_key = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(perm_key, n))
        for i in range(n // 64):
            idx = perm[i * 64 : (i + 1) * 64]
            key, sub = jax.random.split(key)
            model, opt_state, _, _ = _train_step(
                model, opt_state, None, x[idx], y[idx], sub, rule, optim, 0.95
            )


class _OracleFeedback(LeastControl):
    oracle: str = eqx.field(static=True, default="rule")

    def _lf_update(self, model, q, x, key, phi_free):
        h, y = phi_free
        n, c = model.num_hidden, model.num_outputs

        def response(hi, yi, xi):
            def f(z):
                return jnp.concatenate(model.vector_field((z[:n], z[n:]), xi))

            jac = jax.jacfwd(f)(jnp.concatenate([hi, yi]))
            # A = [0, I] J⁻¹, the outputs' response to a push on every unit.
            return jnp.linalg.solve(jac.T, jnp.eye(n + c)[:, n:]).T

        a = jax.vmap(response)(h, y, x)
        if self.oracle == "rule":
            q = -jnp.einsum("sci->ic", a) @ jnp.linalg.inv(
                jnp.einsum("sci,sdi->cd", a, a)
            )
        else:
            q = jnp.einsum("sci->ic", a) / a.shape[0]
        # The learned Q's output block is positive (it feeds u back with gain > 0).
        return q * jnp.sign(jnp.trace(q[n:]))


def lf_oracle(args):
    ds = load_dataset(args.dataset)
    model, key = _initial_model(ds, args.arch, 64, 0, feedback=False)
    rule = _OracleFeedback(
        variant="lf",
        alpha=args.alpha,
        oracle=args.oracle,
        modulate=not args.no_modulate,
    )
    _, history = train_classifier(
        model, rule, ds, epochs=args.epochs, key=key, max_recurrent_norm=0.95
    )
    acc = [round(100 * a, 2) for a in history["test_accuracy"]]
    signal = "plain" if args.no_modulate else "modulated"
    print(
        f"LCP-LF ({signal}), oracle {args.oracle!r} Q, {args.dataset} {args.arch}, "
        f"alpha {args.alpha:g}: test acc. every 5 epochs"
    )
    print(acc[4::5], "solve_success", history["solve_success"][-1])


def kp_init(args):
    _kp_runs(args, "paper-code feedback init", paper_init=True)


def kp_decay(args):
    _kp_runs(args, "the table's init", paper_init=False)


def _kp_runs(args, init_name, paper_init):
    ds = load_dataset(args.dataset)
    print(
        f"LCP-DI (KP), {init_name}, decay {args.decay:g}, "
        f"{args.dataset}, alpha {args.alpha:g}, batch {args.batch_size}, "
        f"{args.epochs} epochs"
    )
    for arch in ("ff", "rnn"):
        curves = []
        for seed in range(3):
            model, key = _initial_model(ds, arch, 64, seed, feedback=True)
            assert model.S_W is not None and model.S_R is not None
            if paper_init:
                c = model.S_R.shape[1]
                model = eqx.tree_at(
                    lambda m: (m.S_W, m.S_R),
                    model,
                    (
                        model.S_W / jnp.linalg.norm(model.S_W),
                        # `_initial_model` draws S_R ~ N(0, 1/n).
                        model.S_R / np.sqrt(c),
                    ),
                )
            rule = LeastControl(variant="kp", alpha=args.alpha, weight_decay=args.decay)
            model, history = train_classifier(
                model,
                rule,
                ds,
                epochs=args.epochs,
                batch_size=args.batch_size,
                key=key,
                max_recurrent_norm=0.95,
            )
            curves.append(100 * np.asarray(history["test_accuracy"]))
            line = f"{arch} seed {seed}: {curves[-1][-1]:.2f}"
            if not paper_init:
                assert model.S_W is not None and model.S_R is not None
                line += (
                    f"  cos(W, S_W^T) {_cos(model.W, model.S_W.T)}"
                    f"  cos(R, S_R^T) {_cos(model.R, model.S_R.T)}"
                )
            print(line, flush=True)
        mean = np.mean(curves, axis=0)
        every = {
            e: round(float(mean[e - 1]), 2) for e in range(30, args.epochs + 1, 30)
        }
        print(f"{arch} mean over seeds at epochs {every}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("kp", "lf-oracle", "kp-init", "kp-decay"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="digits")
        p.add_argument("--arch", choices=("ff", "rnn"), default="ff")
        p.add_argument("--alpha", type=float, default=10.0)
        p.add_argument("--epochs", type=int, default=30)
        if name in ("kp-init", "kp-decay"):
            p.add_argument("--batch-size", type=int, default=64)
            # kp-init: the paper's code (no decay); kp-decay: the table's default.
            default = 0.0 if name == "kp-init" else 1e-4
            p.add_argument("--decay", type=float, default=default)
        if name == "lf-oracle":
            p.add_argument("--oracle", choices=("rule", "mean"), default="rule")
            p.add_argument(
                "--no-modulate",
                action="store_true",
                help="plain -(d_theta f)^T Qu, without the sigma'(h) modulation",
            )
    args = parser.parse_args()
    commands = {
        "kp": kp,
        "lf-oracle": lf_oracle,
        "kp-init": kp_init,
        "kp-decay": kp_decay,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
