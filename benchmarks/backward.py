"""Cost of one training step's gradient through a DEQ layer, by backward method.

Same batched DEQ layer (tanh cell, contraction about 0.9), same forward solver, float32;
only `adjoint=` changes. Times the whole jitted `jax.grad` step (forward + backward),
prints each method's time relative to the fastest implicit backward and each
gradient's cosine with optimistix's implicit gradient, then the compiled temporary
memory of the least-control backward for two values of `max_steps`.

    python benchmarks/backward.py                 # widths 256 and 1024
    python benchmarks/backward.py --widths 256 --repeats 5
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from _baselines import NeumannIteration

import lcp_solvers as lcp


def make_problem(width, batch, key, contraction=0.9, dtype=jnp.float32):
    kw, ku, kx, ky = jax.random.split(key, 4)
    # Symmetric, so the spectral radius equals the norm: plain iteration converges at
    # the rate `contraction`, not at the (much faster) rate of a random matrix's
    # spectral radius.
    w = jax.random.normal(kw, (width, width), dtype)
    w = w + w.T
    w = contraction * w / jnp.linalg.norm(w, ord=2)
    u = jax.random.normal(ku, (width, width), dtype) / jnp.sqrt(width)
    b = jnp.zeros(width, dtype)
    # Small inputs keep tanh near its linear regime, so the layer's contraction factor
    # (the spectral norm of its Jacobian) is close to `contraction` itself.
    x = 0.1 * jax.random.normal(kx, (batch, width), dtype)
    target = jax.random.normal(ky, (batch, width), dtype) * 0.5
    return (w, u, b), x, target


def cell(z, args):
    (w, u, b), x = args
    return jnp.tanh(w @ z + u @ x + b)


def make_step(adjoint, solver):
    @jax.jit
    def step(params, x, target):
        def loss(params):
            def layer(xi):
                z0 = jnp.zeros(xi.shape, xi.dtype)
                return optx.fixed_point(
                    cell, solver, z0, (params, xi), adjoint=adjoint, max_steps=2048
                ).value

            z = jax.vmap(layer)(x)
            # A sum, not a mean: the cotangent is of order one, so every method's
            # `atol` means the same as its `rtol` (a mean would let an absolute
            # tolerance stop some solvers at once).
            return 0.5 * jnp.sum((z - target) ** 2)

        return jax.grad(loss)(params)

    return step


_clock = time.perf_counter


def timeit(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = _clock()
        jax.block_until_ready(fn(*args))
        times.append(_clock() - t0)
    return statistics.median(times)


def rel_error(a, b):
    va = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(a)])
    vb = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(b)])
    return float(jnp.linalg.norm(va - vb) / jnp.linalg.norm(vb))


def cosine(a, b):
    va = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(a)])
    vb = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(b)])
    return float(va @ vb / (jnp.linalg.norm(va) * jnp.linalg.norm(vb)))


def temp_bytes(adjoint, solver, params, x, target):
    compiled = make_step(adjoint, solver).lower(params, x, target).compile()
    analysis = compiled.memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument(
        "--skip-dense",
        action="store_true",
        help="skip optimistix's default ImplicitAdjoint (dense Jacobian + LU)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time instead of wall time (for a shared machine)",
    )
    args = parser.parse_args()
    if args.cpu_time:
        global _clock
        _clock = time.process_time
    tol = args.tol
    solver = optx.FixedPointIteration(rtol=tol, atol=tol)
    methods = {
        "optx.ImplicitAdjoint() [default: dense LU]": optx.ImplicitAdjoint(),
        "optx.ImplicitAdjoint(lx.GMRES)": optx.ImplicitAdjoint(
            linear_solver=lx.GMRES(rtol=tol, atol=tol)
        ),
        "implicit, linearised once + fixed-point iteration": optx.ImplicitAdjoint(
            linear_solver=NeumannIteration(rtol=tol, atol=tol)
        ),
        "LeastControlAdjoint(strength=1e-6)": lcp.LeastControlAdjoint(strength=1e-6),
        "LeastControlAdjoint() [default strength]": lcp.LeastControlAdjoint(),
    }
    implicit_names = list(methods)[:3]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; "
        f"batch {args.batch}; forward FixedPointIteration(rtol=atol={tol:g})"
    )
    for width in args.widths:
        params, x, target = make_problem(width, args.batch, jax.random.PRNGKey(0))
        results = {}
        for name, adjoint in methods.items():
            if args.skip_dense and name.endswith("dense LU]"):
                continue
            step = make_step(adjoint, solver)
            t = timeit(step, params, x, target, repeats=args.repeats)
            results[name] = (t, step(params, x, target))
        reference = results.get(implicit_names[0], results[implicit_names[1]])[1]
        fastest = min(results[n][0] for n in implicit_names if n in results)
        print(f"\nwidth {width}")
        print(
            f"{'method':52s} {'time/step':>10s} {'vs fastest implicit':>20s} "
            f"{'cos(grad, implicit)':>20s} {'rel. diff':>10s}"
        )
        for name, (t, g) in results.items():
            print(
                f"{name:52s} {t * 1e3:8.1f}ms {t / fastest:19.2f}x "
                f"{cosine(g, reference):20.6f} {rel_error(g, reference):10.2e}"
            )
        small = {}
        for steps in (64, 4096):
            adjoint = lcp.LeastControlAdjoint(max_steps=steps)
            small[steps] = temp_bytes(adjoint, solver, params, x, target)
        print(
            f"LeastControlAdjoint compiled temp memory: max_steps=64 -> "
            f"{small[64]} B, max_steps=4096 -> {small[4096]} B"
        )


if __name__ == "__main__":
    main()
