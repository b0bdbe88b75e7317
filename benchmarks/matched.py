"""Cost of the backward pass through a DEQ layer at matched accuracy, over a grid of
problem families (issue #15, items 1-3).

Each cell is one batched layer `z = tanh(W z + U x)` (float32, `x ~ N(0, I_64)`,
`U = N(0, 1)/8`) with a loss on `z`, differentiated by the whole jitted `jax.grad`
step; only `adjoint=` changes. Families: `W` symmetric with spectral norm `c`, or
non-symmetric `N(0, 1)·c/√d` (spectral radius about `c`, norm about `2c`); a sum or a
mean squared-error loss.

Every method's update error is measured against its own exact target, computed in
float64 with tight solves: the implicit gradient for the implicit baselines
(`optx.ImplicitAdjoint` with GMRES at 1e-13), the leaky least-control update at the
same strength for `LeastControlAdjoint` (its own solver at 1e-13, up to 32768
steps; `tests/test_convergence.py::test_drop_in_converges_at_strong_control`
checks that target against scipy). The implicit baselines (linearise once and
iterate the adjoint as recurrent backprop and DEQ libraries do; GMRES) are run at
the loosest tolerance, relative to the cotangent, whose error is at most the default
drop-in's; optimistix's default dense LU is exact and is timed where the state is
small. Times are medians of interleaved repeats (each repeat runs every method
once).

    python benchmarks/matched.py --quick          # 4 families at d = 128, batch 32
    python benchmarks/matched.py                  # the grid below
    python benchmarks/matched.py --widths 2048 --batches 256 --families nonsym-0.9-mean
"""

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from _baselines import NeumannIteration

import lcp_solvers as lcp


INPUTS = 64
FORWARD_TOL = 1e-5
TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)


def make_problem(family, width, batch, key):
    structure, contraction, reduce = family.split("-")
    contraction = float(contraction)
    kw, ku, kx, kt = jax.random.split(key, 4)
    w = jax.random.normal(kw, (width, width))
    if structure == "sym":
        w = w + w.T
        w = contraction * w / jnp.linalg.norm(w, ord=2)
    else:
        w = contraction * w / jnp.sqrt(width)
    u = jax.random.normal(ku, (width, INPUTS)) / 8
    x = jax.random.normal(kx, (batch, INPUTS))
    target = jax.random.normal(kt, (batch, width))
    return (w, u), x, target, reduce


def cell(z, args):
    (w, u), x = args
    return jnp.tanh(w @ z + u @ x)


def make_step(adjoint, forward, reduce):
    @jax.jit
    def step(params, x, target):
        def loss(params):
            def layer(xi):
                z0 = jnp.zeros(target.shape[1:], xi.dtype)
                return optx.fixed_point(
                    cell, forward, z0, (params, xi), adjoint=adjoint, max_steps=4096
                ).value

            error = 0.5 * (jax.vmap(layer)(x) - target) ** 2
            return jnp.mean(error) if reduce == "mean" else jnp.sum(error)

        return jax.grad(loss)(params)

    return step


def rel_error(a, b):
    # In numpy float64: `b` is a float64 target, `a` a float32 update.
    a = [np.asarray(p, np.float64) for p in jtu.tree_leaves(a)]
    num = sum(np.sum((p - q) ** 2) for p, q in zip(a, b, strict=True))
    return float(np.sqrt(num / sum(np.sum(q**2) for q in b)))


def to(dtype, tree):
    return jtu.tree_map(lambda a: a.astype(dtype), tree)


def run_cell(family, width, batch, repeats, strengths, dense_max):
    params, x, target, reduce = make_problem(family, width, batch, jax.random.key(0))
    p32, x32, t32 = to(jnp.float32, (params, x, target))
    forward32 = optx.FixedPointIteration(rtol=FORWARD_TOL, atol=FORWARD_TOL)
    forward64 = lcp.AndersonAcceleration(rtol=1e-13, atol=1e-13, history_length=5)

    def exact(adjoint):
        # x64 only here: the timed float32 runs keep JAX's default dtypes.
        with jax.enable_x64(True):
            p64, x64, t64 = to(jnp.float64, (p32, x32, t32))  # the same problem
            g = make_step(adjoint, forward64, reduce)(p64, x64, t64)
            return [np.asarray(a) for a in jtu.tree_leaves(g)]

    implicit_exact = exact(
        optx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-13, atol=1e-13))
    )
    candidates = {}  # name -> (step, error)
    for s in strengths:
        target_s = exact(
            lcp.LeastControlAdjoint(
                strength=s, rtol=1e-13, atol=1e-13, max_steps=1 << 15
            )
        )
        step = make_step(lcp.LeastControlAdjoint(strength=s), forward32, reduce)
        candidates[f"LeastControlAdjoint(strength={s:g})"] = (
            step,
            rel_error(step(p32, x32, t32), target_s),
        )
    goal = candidates[f"LeastControlAdjoint(strength={strengths[0]:g})"][1]

    baselines = {
        "implicit, linearise once + iteration": lambda tol: optx.ImplicitAdjoint(
            linear_solver=NeumannIteration(rtol=tol, atol=0.0)
        ),
        "implicit, GMRES": lambda tol: optx.ImplicitAdjoint(
            linear_solver=lx.GMRES(rtol=tol, atol=0.0)
        ),
    }
    matched = {}
    for name, make in baselines.items():
        # The loosest tolerance reaching the drop-in's error; the most accurate run
        # if none does (marked).
        best = None
        for tol in TOLERANCES:
            step = make_step(make(tol), forward32, reduce)
            try:
                err = rel_error(step(p32, x32, t32), implicit_exact)
            except jax.errors.JaxRuntimeError:
                # A reported failure: lineax's GMRES stagnating at a loose float32
                # tolerance, or a float32 iteration not reaching a tight one.
                continue
            if err <= goal:
                matched[f"{name} [tol {tol:g}]"] = (step, err)
                break
            if best is None or err < best[2]:
                best = (tol, step, err)
        else:
            if best is not None:
                tol, step, err = best
                matched[f"{name} [tol {tol:g}, most accurate]"] = (step, err)
    if width * batch <= dense_max:
        step = make_step(optx.ImplicitAdjoint(), forward32, reduce)
        err = rel_error(step(p32, x32, t32), implicit_exact)
        matched["optx.ImplicitAdjoint() [dense LU]"] = (step, err)

    methods = {**matched, **candidates}
    for step, _ in methods.values():
        jax.block_until_ready(step(p32, x32, t32))  # compiled above; warm
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (step, _) in methods.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(p32, x32, t32))
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    fastest = min(medians[name] for name in matched)
    rows = []
    for name, (_, err) in methods.items():
        rows.append((name, medians[name], medians[name] / fastest, err))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families",
        nargs="+",
        default=[
            f"{s}-{c}-{r}"
            for s, c, r in itertools.product(
                ("sym", "nonsym"), ("0.6", "0.9", "0.95"), ("sum", "mean")
            )
        ],
        help="<sym|nonsym>-<contraction>-<sum|mean>",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--strengths", type=float, nargs="+", default=[1e-3, 0.1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--dense-max",
        type=int,
        default=128 * 32,
        help="time optx's dense LU only where width x batch is at most this",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 families (sym/nonsym at 0.9, sum/mean) at width 128, batch 32",
    )
    args = parser.parse_args()
    if args.quick:
        args.families = ["sym-0.9-sum", "sym-0.9-mean", "nonsym-0.9-sum"]
        args.families.append("nonsym-0.9-mean")
        args.widths, args.batches = [128], [32]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; forward "
        f"FixedPointIteration(rtol=atol={FORWARD_TOL:g}); {args.repeats} interleaved "
        "repeats; ratio = time / fastest implicit at matched accuracy\n"
    )
    print("| family | d | batch | method | ms | ratio | update error |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for family, width, batch in itertools.product(
        args.families, args.widths, args.batches
    ):
        try:
            rows = run_cell(
                family, width, batch, args.repeats, args.strengths, args.dense_max
            )
        except jax.errors.JaxRuntimeError as e:
            # A solve that does not converge is a result: the row says so.
            reason = str(e).split("EquinoxRuntimeError: ")[-1].split(".")[0]
            print(f"| {family} | {width} | {batch} | failed: {reason} | | | |")
            continue
        for name, t, ratio, err in rows:
            print(
                f"| {family} | {width} | {batch} | {name} | {t * 1e3:.2f} | "
                f"{ratio:.2f}x | {err:.1e} |",
                flush=True,
            )
        summary.append(
            (family, width, batch, [r[2] for r in rows if r[0].startswith("LeastC")])
        )
    print("\nLeastControlAdjoint / fastest matched implicit, per strength:")
    for family, width, batch, ratios in summary:
        shown = ", ".join(
            f"{s:g}: {r:.2f}x" for s, r in zip(args.strengths, ratios, strict=True)
        )
        print(f"  {family} d={width} batch={batch}: {shown}")
    if summary:
        worst = max(ratios[0] for *_, ratios in summary)
        print(f"worst ratio at strength {args.strengths[0]:g}: {worst:.2f}x")


if __name__ == "__main__":
    main()
