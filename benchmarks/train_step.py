"""One training step of `lcp_solvers.experiments` per update rule, against recurrent
backprop on the same batch: the cost that `lcp-solvers reproduce table1` reports per
epoch, without the data loop around it.

    digits (64 features, 10 classes), batch 64, float32, Adam,
    the paper's widths: "ff" = 2 x 256 units, "rnn" = 256 units,
    each rule with the settings `lcp-solvers reproduce table1` uses (alpha 10).

Every rule's step (`experiments._train._train_step`: update, Adam, spectral-norm
limit) is compiled once, then timed on the same batch from the same initial network,
the rules interleaved within each repeat (median wall time over repeats,
`block_until_ready`). Reported: milliseconds per step
and the ratio to BP/RBP. A regression in the training loop (e.g. a batch mean that
XLA cannot fuse with the per-example outer products `ψσᵀ`) shows here as a ratio
jump.

    .venv/bin/python benchmarks/train_step.py [--repeats 7] [--arch ff rnn]
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from lcp_solvers.experiments import LeastControl, load_dataset, RecurrentBackprop
from lcp_solvers.experiments._train import _adam, _train_step
from lcp_solvers_cli._cli import _initial_model


def _compiled_step(rule, model, x, y):
    optim = _adam(1e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    state = rule.init(model, jax.random.key(1))
    key = jax.random.key(2)

    def step():
        out = _train_step(model, opt_state, state, x, y, key, rule, optim, 0.95)
        jax.block_until_ready(out)
        return out

    stats = step()[3]  # compiles
    return step, stats


def _interleaved_medians(steps, repeats):
    # One round times every rule once, so that a slow spell of the machine hits all
    # rules alike rather than the ones that happened to run during it.
    times = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--arch", nargs="+", default=["ff", "rnn"])
    parser.add_argument("--alpha", type=float, default=10.0)
    args = parser.parse_args()

    ds = load_dataset("digits")
    x = jnp.asarray(ds.x_train[:64], jnp.float32)
    y = jnp.asarray(ds.y_train[:64])
    print("| arch | rule | ms / step | ratio to BP/RBP | solve steps |")
    print("|---|---|---|---|---|")
    for arch in args.arch:
        rules, steps, stats = [], [], []
        for variant in ("rbp", "di", "kp", "lf", "ebd"):
            model, _ = _initial_model(ds, arch, 256, 0, feedback=variant == "kp")
            if variant == "rbp":
                rule = RecurrentBackprop()
            else:
                rule = LeastControl(variant=variant, alpha=args.alpha)
            step, rule_stats = _compiled_step(rule, model, x, y)
            rules.append(rule)
            steps.append(step)
            stats.append(rule_stats)
        seconds = _interleaved_medians(steps, args.repeats)
        for rule, sec, st in zip(rules, seconds, stats):
            print(
                f"| {arch} | {rule.name} | {1e3 * sec:.1f} | "
                f"{sec / seconds[0]:.2f} | {float(st['steps']):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
