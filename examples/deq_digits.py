"""Train a deep equilibrium (DEQ) classifier on scikit-learn's 8x8 digits, once with
implicit differentiation (`optx.ImplicitAdjoint`) and once with the least-control
principle (`lcp.LeastControlAdjoint`), and compare them side by side.

    python examples/deq_digits.py            # well under a minute on 2 CPU cores
    python examples/deq_digits.py --quick    # a few seconds: a smoke test
    python examples/deq_digits.py --devices 4 --adjoints lcp   # over 4 devices

The model: a DEQ layer `z* = tanh(W z* + U x + b)` (with `W` kept at Frobenius norm
<= 0.95, so the equilibrium always exists) solved by `lcp.AndersonAcceleration`, and a
linear readout of `z*`. Everything else (data, optax
optimiser, seed, forward solver) is shared between the two runs; only the `adjoint=`
of the `lcp.DEQ` changes.

With `--devices N` every batch is split over N devices
(`lcp_solvers.experiments.shard_batch`) and the model and optimiser state are
replicated (`lcp_solvers.experiments.replicate`): the same jitted step, run
data-parallel. On a machine without accelerators the N devices are simulated CPU
devices (XLA's host device count, set below before JAX starts): the numbers match one
device (to float32 rounding), the time does not improve. On this project's 2-core CPU
machine the `ImplicitAdjoint` run stalls in XLA's CPU runtime on simulated devices in
most tries (not diagnosed), hence `--adjoints lcp` above. See docs/devices.md.

"Backward steps" counts evaluations of the cell in the backward pass per batch (each
is one vector-Jacobian product): the iterations of the least-control solve for
`LeastControlAdjoint`; for `ImplicitAdjoint`'s default dense LU solve, the
materialised Jacobian (one batched evaluation). They are counted with
`jax.debug.callback` inside the cell, in a separate call from the timed training.
"""

import argparse
import os
import sys
import time


def _simulate_cpu_devices(argv):
    # XLA fixes the number of host (CPU) devices when JAX starts, so `--devices` is
    # read before the import. On a GPU/TPU machine the accelerators are used.
    args = sys.argv[1:] if argv is None else argv
    count = None
    for i, arg in enumerate(args):
        if arg == "--devices" and i + 1 < len(args):
            count = args[i + 1]
        elif arg.startswith("--devices="):
            count = arg.split("=", 1)[1]
    flags = os.environ.get("XLA_FLAGS", "")
    if count and count.isdigit() and int(count) > 1:
        if "xla_force_host_platform_device_count" not in flags:
            flag = f"--xla_force_host_platform_device_count={count}"
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


if __name__ == "__main__":
    _simulate_cpu_devices(None)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optimistix as optx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import lcp_solvers as lcp  # noqa: E402
from lcp_solvers.experiments import replicate, shard_batch  # noqa: E402


HIDDEN = 64


class Cell(eqx.Module):
    """`z ↦ tanh(W z + U x + b)`; see `Model.contractive` for how it stays a
    contraction."""

    weight: jax.Array
    inject: eqx.nn.Linear
    # A boolean array rather than a static flag, so that counting cell evaluations
    # reuses the compiled training step instead of compiling a new one.
    count: jax.Array

    def __init__(self, in_size, hidden, key):
        kw, ku = jax.random.split(key)
        w = jax.random.normal(kw, (hidden, hidden))
        self.weight = 0.95 * w / jnp.linalg.norm(w)
        self.inject = eqx.nn.Linear(in_size, hidden, key=ku)
        self.count = jnp.array(False)

    def __call__(self, z, x):
        jax.lax.cond(self.count, lambda: jax.debug.callback(_count), lambda: None)
        return jnp.tanh(self.weight @ z + self.inject(x))


_evals = [0]


def _count():
    _evals[0] += 1


class Model(eqx.Module):
    deq: lcp.DEQ
    readout: eqx.nn.Linear

    def __init__(self, adjoint, key):
        kc, kr = jax.random.split(key)
        self.deq = lcp.DEQ(
            Cell(64, HIDDEN, kc),
            z0=jnp.zeros(HIDDEN),
            solver=lcp.AndersonAcceleration(rtol=1e-4, atol=1e-4),
            adjoint=adjoint,
        )
        self.readout = eqx.nn.Linear(HIDDEN, 10, key=kr)

    def contractive(self):
        # Rescale W to Frobenius norm at most 0.95, which bounds its spectral norm:
        # tanh is 1-Lipschitz, so the cell stays a contraction and the equilibrium
        # exists throughout training. (A Frobenius bound rather than the spectral
        # norm itself: the gradient of an SVD would cost more than the whole DEQ.)
        # Done once per batch, outside the solve and outside `vmap`; gradients flow
        # through the rescaling.
        w = self.deq.cell.weight
        w = w * jnp.minimum(1, 0.95 / jnp.linalg.norm(w))
        return eqx.tree_at(lambda m: m.deq.cell.weight, self, w)

    def __call__(self, x):
        z, stats = self.deq.solve(x)
        return self.readout(z), stats


def loss_fn(model, x, y):
    logits, stats = jax.vmap(model.contractive())(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, stats


def make_step(optim):
    @eqx.filter_jit
    def step(model, opt_state, x, y):
        (loss, stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, x, y
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss, stats.num_steps

    return step


@eqx.filter_jit
def num_correct(model, x, y):
    logits, _ = jax.vmap(model.contractive())(x)
    return jnp.sum(jnp.argmax(logits, axis=-1) == y)


def batches(n, batch_size, rng=None):
    perm = np.arange(n) if rng is None else rng.permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def count_evals(fn, *args):
    """Cell evaluations while running `fn(*args)` (with counting switched on)."""
    _evals[0] = 0
    jax.block_until_ready(fn(*args))
    jax.effects_barrier()
    return _evals[0]


def train(model, step, optim, data, epochs, batch_size, max_batches, seed, mesh):
    x_train, y_train, x_test, y_test = data
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    if mesh is None:
        put = jnp.asarray
    else:
        model, opt_state = replicate((model, opt_state), mesh)
        put = lambda a: shard_batch(a, mesh)  # noqa: E731
    rng = np.random.default_rng(seed)
    epoch_times, fwd_steps = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in batches(len(x_train), batch_size, rng)[:max_batches]:
            model, opt_state, _, num_steps = step(
                model, opt_state, put(x_train[idx]), put(y_train[idx])
            )
            fwd_steps.append(np.asarray(num_steps).mean())
        jax.block_until_ready(model)
        epoch_times.append(time.perf_counter() - start)
    test_batches = batches(len(x_test), batch_size)
    correct = sum(
        int(num_correct(model, put(x_test[i]), put(y_test[i]))) for i in test_batches
    )
    # Same shapes and pytree structure as in training: no new compilation.
    counting = eqx.tree_at(lambda m: m.deq.cell.count, model, jnp.array(True))
    idx = test_batches[0]
    xb, yb = put(x_test[idx]), put(y_test[idx])
    fwd_evals = count_evals(num_correct, counting, xb, yb)
    all_evals = count_evals(step, counting, opt_state, xb, yb)
    return dict(
        acc=correct / (len(test_batches) * batch_size),
        epoch_times=epoch_times,
        fwd=float(np.mean(fwd_steps)),
        bwd_evals=all_evals - fwd_evals,
    )


def run(
    adjoint, data, epochs, seeds, max_batches=None, batch_size=64, lr=1e-3, mesh=None
):
    optim = optax.adam(lr)
    # One step function for all seeds: it compiles once.
    step = make_step(optim)
    runs = []
    for seed in range(seeds):
        model = Model(adjoint, jax.random.PRNGKey(seed))
        runs.append(
            train(model, step, optim, data, epochs, batch_size, max_batches, seed, mesh)
        )
    # The very first epoch includes compilation; report it separately.
    first = runs[0]["epoch_times"][0]
    steady = [t for i, r in enumerate(runs) for t in r["epoch_times"][i == 0 :]]
    accs = [100 * r["acc"] for r in runs]
    return dict(
        acc=float(np.mean(accs)),
        acc_std=float(np.std(accs)),
        first=first,
        epoch=float(np.mean(steady)) if steady else first,
        fwd=float(np.mean([r["fwd"] for r in runs])),
        bwd_evals=float(np.mean([r["bwd_evals"] for r in runs])),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--strength", type=float, default=lcp.LeastControlAdjoint().strength
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split every batch of 64 over this many devices (a divisor of 64)",
    )
    parser.add_argument(
        "--adjoints",
        nargs="+",
        choices=("implicit", "lcp"),
        default=["implicit", "lcp"],
        help="which adjoints to train with",
    )
    args = parser.parse_args(argv)
    mesh = None
    if args.devices < 1:
        parser.error(f"--devices {args.devices}: needs at least one device")
    if args.devices > 1:
        if 64 % args.devices or len(jax.devices()) < args.devices:
            parser.error(
                f"--devices {args.devices}: needs a divisor of the batch size 64 "
                f"and that many devices ({len(jax.devices())} visible)"
            )
        mesh = Mesh(np.array(jax.devices()[: args.devices]), ("data",))
    epochs, seeds, max_batches = args.epochs, args.seeds, None
    if args.quick:
        epochs, seeds, max_batches = 2, 1, 3

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pyright: ignore
    y = digits.target.astype(np.int32)  # pyright: ignore
    # 448 = 7 batches of 64 test digits (a quarter of the data).
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=448, random_state=0, stratify=y
    )
    data = (x_train, y_train, x_test, y_test)
    if args.quick:
        data = tuple(a[:256] for a in data[:2]) + tuple(a[:64] for a in data[2:])
    print(
        f"digits: {len(data[0])} train / {len(data[2])} test, DEQ hidden size "
        f"{HIDDEN}, batch 64, Adam 1e-3, {epochs} epochs, {seeds} seed(s), float32, "
        f"{args.devices} {jax.default_backend()} device(s)"
    )
    adjoints = {}
    if "implicit" in args.adjoints:
        adjoints["ImplicitAdjoint()"] = optx.ImplicitAdjoint()
    if "lcp" in args.adjoints:
        name = f"LeastControlAdjoint({args.strength:g})"
        adjoints[name] = lcp.LeastControlAdjoint(strength=args.strength)
    header = (
        f"{'adjoint':<26} {'test acc (%)':>13} {'s/epoch':>8} {'1st epoch':>9} "
        f"{'fwd steps':>9} {'bwd evals':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, adjoint in adjoints.items():
        r = run(adjoint, data, epochs, seeds, max_batches, mesh=mesh)
        acc = f"{r['acc']:.2f} ± {r['acc_std']:.2f}"
        print(
            f"{name:<26} {acc:>13} {r['epoch']:>8.3f} {r['first']:>9.2f} "
            f"{r['fwd']:>9.1f} {r['bwd_evals']:>9.1f}"
        )
    print(
        "test acc: mean ± std over seeds; s/epoch: after compilation; fwd steps: "
        "mean forward\nAnderson steps per sample; bwd evals: cell evaluations in the "
        "backward pass of one\nbatch of 64 (vmapped), counted with jax.debug.callback."
    )


if __name__ == "__main__":
    main()
