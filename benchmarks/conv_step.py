"""One training step of Table 2's convolutional networks per update rule, on
CIFAR-10-sized inputs (3x32x32, 10 classes), against BP/RBP on the same batch: what
`lcp-solvers reproduce table2 --dataset cifar10` would cost per step, known before
anyone runs it.

    random images (standard normal), batch 64, float32, Adam, at initialisation;
    conv-ff: convolutions of C and 2C channels, dense blocks of 8C units;
    conv-deq: a C-channel state, 2C channels inside the cell
    (the networks `lcp-solvers reproduce table2 --channels C` builds).

Every rule's step (`experiments._train._train_step`: update and Adam) is compiled
once, then the rules are timed in turn on the same batch from the same network, the
turns interleaved over `--repeats` rounds so that a slow moment of the machine hits
every rule alike (median wall time, `block_until_ready`). Reported: milliseconds
per step, the ratio to BP/RBP of the same network, and the mean solve steps. A
trained DEQ contracts less than one at initialisation, so its solves take more
steps (docs/results.md has the training runs).

    .venv/bin/python benchmarks/conv_step.py [--channels 32] [--repeats 5]
        [--size 32] [--batch 64]
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from lcp_solvers.experiments import (
    Dataset,
    LeastControl,
    LeastControlDropIn,
    RecurrentBackprop,
)
from lcp_solvers.experiments._train import _adam, _train_step
from lcp_solvers_cli._cli import _initial_conv_model


def _step(rule, model, x, y):
    optim = _adam(1e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    key = jax.random.key(2)

    def step():
        out = _train_step(model, opt_state, None, x, y, key, rule, optim, None)
        jax.block_until_ready(out)
        return out

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height = width")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=10.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch, 3, args.size, args.size)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    dataset = Dataset(x, y, x, y, 10, "random")
    runs = []
    for arch, rules in (
        ("conv-ff", (RecurrentBackprop(), LeastControl(alpha=args.alpha))),
        (
            "conv-deq",
            (
                RecurrentBackprop(),
                LeastControlDropIn(),
                LeastControl(alpha=args.alpha),
            ),
        ),
    ):
        model, _ = _initial_conv_model(dataset, arch, args.channels, 0)
        for rule in rules:
            step = _step(rule, model, jnp.asarray(x), jnp.asarray(y))
            stats = step()[3]  # compile
            runs.append((arch, rule.name, step, stats))
    times = {i: [] for i in range(len(runs))}
    for _ in range(args.repeats):
        for i, (_, _, step, _) in enumerate(runs):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    print(
        f"{args.batch} random {shape[1]}x{args.size}x{args.size} images, width "
        f"{args.channels}, alpha {args.alpha:g}, median of {args.repeats} "
        f"interleaved repeats, {jax.devices()[0].device_kind}\n"
    )
    print("| network | rule | ms / step | ratio to BP/RBP | solve steps | success |")
    print("|---|---|---|---|---|---|")
    base = {}
    for i, (arch, name, _, stats) in enumerate(runs):
        seconds = statistics.median(times[i])
        base.setdefault(arch, seconds)
        print(
            f"| {arch} | {name} | {1e3 * seconds:.0f} | {seconds / base[arch]:.2f} | "
            f"{float(stats['steps']):.1f} | {float(stats['ok']):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
