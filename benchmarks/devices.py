"""One data-parallel training step on 1, 2, 4, ... devices, fixed batch per device.

The step is a batched DEQ layer (the tanh cell of `backward.py`) differentiated with
`lcp.LeastControlAdjoint` and, as the peer, `optx.ImplicitAdjoint` with GMRES: the
batch split over a one-axis mesh (`lcp_solvers.experiments.shard_batch`), parameters
replicated, one `jax.jit` step (forward, backward, SGD update). For every device count
it reports the time per step (median of interleaved repeats), the throughput, the
scaling efficiency against one device, and whether the compiled step has any
collective that grows with the batch (compiled again at twice the batch and compared,
`lcp_solvers.experiments.find_collectives`).

    python benchmarks/devices.py                        # 1, 2, 4, 8 devices
    python benchmarks/devices.py --counts 1 2 --per-device-batch 64 --width 512

Each device count runs in a process of its own, since JAX fixes the device count when
it starts. The devices are whatever JAX finds (GPUs, TPUs); on a machine without
accelerators they are simulated CPU devices (XLA's host device count), which share
the host's cores: there the step cannot get faster with more devices, and the numbers
show the overhead of partitioning and of the collectives, not a speed-up. A step that
does not finish within `--timeout` seconds is reported as stalled.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


METHODS = ("LeastControlAdjoint", "ImplicitAdjoint(GMRES)")


def worker(count, args):
    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np
    import optimistix as optx
    from jax.sharding import Mesh

    import lcp_solvers as lcp
    from lcp_solvers.experiments import find_collectives, replicate, shard_batch

    devices = jax.devices()[:count]
    if len(devices) < count:
        return {"count": count, "error": f"only {len(devices)} devices"}
    mesh = Mesh(np.array(devices), ("data",))
    width, tol = args.width, args.tol
    kw, ku = jax.random.split(jax.random.key(0))
    w = jax.random.normal(kw, (width, width))
    w = 0.9 * (w + w.T) / jnp.linalg.norm(w + w.T, ord=2)
    u = jax.random.normal(ku, (width, width)) / jnp.sqrt(width)
    params = replicate((w, u, jnp.zeros(width)), mesh)

    def cell(z, a):
        (w, u, b), x = a
        return jnp.tanh(w @ z + u @ x + b)

    def make_step(adjoint):
        solver = optx.FixedPointIteration(rtol=tol, atol=tol)

        def loss(params, x, target):
            def layer(xi):
                z0 = jnp.zeros(xi.shape, xi.dtype)
                return optx.fixed_point(
                    cell, solver, z0, (params, xi), adjoint=adjoint, max_steps=2048
                ).value

            return 0.5 * jnp.sum((jax.vmap(layer)(x) - target) ** 2)

        @jax.jit
        def step(params, x, target):
            grads = jax.grad(loss)(params, x, target)
            return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads)

        return step

    def batch(size):
        rng = np.random.default_rng(size)
        x = 0.1 * rng.standard_normal((size, width), dtype=np.float32)
        target = 0.5 * rng.standard_normal((size, width), dtype=np.float32)
        return shard_batch(x, mesh), shard_batch(target, mesh)

    adjoints = {
        "LeastControlAdjoint": lcp.LeastControlAdjoint(),
        "ImplicitAdjoint(GMRES)": optx.ImplicitAdjoint(
            linear_solver=lx.GMRES(rtol=tol, atol=tol)
        ),
    }
    adjoints = {k: v for k, v in adjoints.items() if k in args.methods}
    global_batch = args.per_device_batch * count
    x, target = batch(global_batch)
    steps, grows = {}, {}
    for name, adjoint in adjoints.items():
        step = make_step(adjoint)
        ops = []
        for size in (global_batch, 2 * global_batch):
            text = step.lower(params, *batch(size)).compile().as_text()
            ops.append([(c.op, c.size) for c in find_collectives(text)])
        grows[name] = ops[0] != ops[1]
        print(f"{count} devices, {name}: compiled", file=sys.stderr, flush=True)
        jax.block_until_ready(step(params, x, target))  # compile and warm up
        print(f"{count} devices, {name}: ran", file=sys.stderr, flush=True)
        steps[name] = step
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # interleaved
            start = time.perf_counter()
            jax.block_until_ready(step(params, x, target))
            times[name].append(time.perf_counter() - start)
    return {
        "count": count,
        "kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "global_batch": global_batch,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "grows_with_batch": grows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--per-device-batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return

    rows = []
    for count in args.counts:
        env = dict(os.environ)
        # Simulated CPU devices when there is no accelerator; ignored by GPUs/TPUs.
        flag = f"--xla_force_host_platform_device_count={count}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", str(count)]
        stalled = []
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired as e:
            # Which step stalled is the last one the worker announced; run the
            # others without it.
            log = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
            stalled = [m for m in METHODS if f"{m}: compiled" in log]
            stalled = stalled[-1:] or list(METHODS)
            others = [m for m in METHODS if m not in stalled]
            if not others:
                rows.append({"count": count, "error": "stalled"})
                continue
            proc = subprocess.run(
                [*cmd, "--methods", *others],
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            rows.append({"count": count, "error": proc.stderr.strip()[-300:]})
            continue
        row = json.loads(lines[-1])
        row["stalled"] = stalled
        rows.append(row)

    first = next((r for r in rows if "seconds" in r), None)
    if first is None:
        print("no device count ran:", rows)
        return
    print(
        f"jax on {first['platform']} ({first['kind']}); DEQ width {args.width}, "
        f"{args.per_device_batch} samples per device, float32, forward "
        f"FixedPointIteration(tol={args.tol:g}); median of {args.repeats} "
        "interleaved steps"
    )
    print(
        f"{'devices':>7} {'batch':>6} {'method':<24} {'ms/step':>9} "
        f"{'samples/s':>10} {'efficiency':>10} {'LCP/peer':>8} {'comm. grows':>11}"
    )
    base = {m: first["seconds"][m] / first["global_batch"] for m in first["seconds"]}
    for r in rows:
        if "error" in r:
            print(f"{r['count']:>7} {'':>6} {r['error']}")
            continue
        seconds = r["seconds"]
        ratio = ""
        if all(m in seconds for m in METHODS):
            ratio = f"{seconds[METHODS[0]] / seconds[METHODS[1]]:.2f}"
        for m in METHODS:
            head = f"{r['count']:>7} {r['global_batch']:>6} {m:<24}"
            if m not in seconds:
                why = "stalled" if m in r["stalled"] else "not run"
                print(f"{head} {why} (> {args.timeout:g} s for the first step)")
                continue
            t = seconds[m]
            # Time per sample on one device over time per sample on these devices,
            # divided by the device count: 1 is perfect scaling.
            efficiency = (
                base[m] / (t / r["global_batch"]) / r["count"]
                if m in base
                else float("nan")
            )
            versus = ratio if m == METHODS[0] else ""
            grows = "yes" if r["grows_with_batch"][m] else "no"
            print(
                f"{head} {t * 1e3:>9.1f} {r['global_batch'] / t:>10.0f} "
                f"{efficiency:>10.2f} {versus:>8} {grows:>11}"
            )


if __name__ == "__main__":
    main()
