"""`lcp.least_control_grad` against the implicit (recurrent-backprop) gradient of the
same loss on the same equilibrium RNN.

    f(φ) = -φ + W tanh(φ) + U x + b,   256 units, batch 64, float32,
    loss = ½‖φ_out - y‖² on the last 10 units (one-hot targets).

The implicit side finds the free equilibrium by iterating `φ ← φ + f(φ)` with
`optx.FixedPointIteration`, then differentiates through it with
`optx.ImplicitAdjoint`, with a dense LU solve of the 256 x 256 adjoint system per
sample (optimistix's default), GMRES, or recurrent backprop's adjoint fixed-point
iteration. The least-control update solves for the controlled equilibrium in one
phase from `phi0 = 0` (the free solve runs only for `info`'s free fields, which the
timed calls do not read; "steps free" comes from a separate call): with the default
solver (`lcp.IMEX` with Anderson acceleration, history 3), plain `lcp.IMEX` (Euler
iteration with the loss implicit), and, for comparison, the Anderson-accelerated
explicit joint iteration (`lcp.DiscreteTime`). The batch update is either the mean
of a `vmap` of `least_control_grad` (per-sample weight updates, then their mean) or
`jax.grad` of the mean of a `vmap` of `least_control_objective` (one weight product
for the batch, as the implicit side's `jax.grad` does). Reported: median wall time
over repeats (compiled, `block_until_ready`), steps per sample (mean / max), and the
cosine between the updates.

    .venv/bin/python benchmarks/least_control.py [--repeats 7] [--quick]
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from _baselines import NeumannIteration

import lcp_solvers as lcp


N, N_IN, N_OUT, BATCH = 256, 100, 10, 64
RTOL = ATOL = 1e-4


def make_problem(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w = jax.random.normal(k1, (N, N))
    theta = {
        "W": 0.8 * w / jnp.linalg.norm(w, ord=2),
        "U": jax.random.normal(k2, (N, N_IN)) / jnp.sqrt(N_IN),
        "b": jnp.zeros(N),
    }
    x = jax.random.normal(k3, (BATCH, N_IN))
    labels = jax.random.randint(k4, (BATCH,), 0, N_OUT)
    y = jax.nn.one_hot(labels, N_OUT)
    return theta, x, y


def f(phi, theta, args):
    x, _ = args
    return -phi + theta["W"] @ jnp.tanh(phi) + theta["U"] @ x + theta["b"]


def loss(phi, args):
    _, y = args
    return 0.5 * jnp.sum((phi[-N_OUT:] - y) ** 2)


TIGHT = 2e-6  # the references each update's error is measured against (float32)
anderson = lcp.AndersonAcceleration(rtol=RTOL, atol=ATOL)


_DENSE = lx.AutoLinearSolver(well_posed=None)


@eqx.filter_jit
def implicit_grad(theta, x, y, linear_solver=_DENSE, tol=RTOL):
    def one(theta, x, y):
        sol = optx.fixed_point(
            lambda phi, th: f(phi, th, (x, y)) + phi,
            optx.FixedPointIteration(rtol=tol, atol=tol),
            jnp.zeros(N),
            theta,
            adjoint=optx.ImplicitAdjoint(linear_solver=linear_solver),
            max_steps=4096,
        )
        return loss(sol.value, (x, y)), sol.stats["num_steps"]

    def batch_loss(theta):
        losses, steps = jax.vmap(one, in_axes=(None, 0, 0))(theta, x, y)
        # The sum, divided by the batch size below (the same update as the mean's
        # gradient): each sample's adjoint then sees a cotangent of order one, as
        # each least-control solve does, so the same tolerances give updates of
        # the same accuracy. With the mean, the cotangents are 64x smaller and the
        # adjoint's absolute tolerance 64x looser (update error 1e-3, not 2e-5).
        return jnp.sum(losses), steps

    (_, steps), grad = jax.value_and_grad(batch_loss, has_aux=True)(theta)
    grad = jax.tree.map(lambda g: g / x.shape[0], grad)
    return grad, (jnp.mean(steps), jnp.max(steps))


def _steps(info, free):
    # The free solve runs only where its `info` fields are used: the timed call
    # reads only the controlled solve's; a separate call counts the free steps
    # (the update is solved in one phase, from `phi0`).
    controlled = (jnp.mean(info.num_steps), jnp.max(info.num_steps))
    if free:
        return (jnp.mean(info.num_steps_free), jnp.max(info.num_steps_free))
    return controlled, info.result


def make_lcp_grad(controller, solver, tol=RTOL, free=False):
    # vmap(least_control_grad), then the mean of the per-sample updates.
    @eqx.filter_jit
    def lcp_grad(theta, x, y):
        def one(x, y):
            return lcp.least_control_grad(
                f, loss, theta, jnp.zeros(N), (x, y),
                controller=controller, solver=solver, rtol=tol, atol=tol,
                max_steps=4096,
            )  # fmt: skip

        grads, info = jax.vmap(one)(x, y)
        grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        return grad, _steps(info, free)

    return lcp_grad


def make_lcp_objective(controller, solver, tol=RTOL, free=False):
    # jax.grad of the mean least-control objective with the vmap inside: one weight
    # product for the batch, like the implicit side.
    @eqx.filter_jit
    def lcp_grad(theta, x, y):
        def batch(theta):
            def one(x, y):
                return lcp.least_control_objective(
                    f, loss, theta, jnp.zeros(N), (x, y),
                    controller=controller, solver=solver, rtol=tol, atol=tol,
                    max_steps=4096,
                )  # fmt: skip

            values, info = jax.vmap(one)(x, y)
            return jnp.mean(values), info

        grad, info = jax.grad(batch, has_aux=True)(theta)
        return grad, _steps(info, free)

    return lcp_grad


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def interleaved_ratio(fn, peer, *args, repeats):
    """Median over repeats of time(fn) / time(peer), each pair timed back to back:
    robust to the machine's load drifting over the run, which moves millisecond
    timings by 10-20%."""
    ratios = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        t_fn = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(peer(*args))
        ratios.append(t_fn / (time.perf_counter() - t))
    return statistics.median(ratios)


def cosine(a, b):
    va, vb = jfu.ravel_pytree(a)[0], jfu.ravel_pytree(b)[0]
    return float(va @ vb / (jnp.linalg.norm(va) * jnp.linalg.norm(vb)))


def rel_error(a, b):
    va, vb = jfu.ravel_pytree(a)[0], jfu.ravel_pytree(b)[0]
    return float(jnp.linalg.norm(va - vb) / jnp.linalg.norm(vb))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--quick", action="store_true", help="skip the slow explicit-solver rows"
    )
    opts = parser.parse_args()
    theta, x, y = make_problem(jax.random.key(0))
    print(f"device: {jax.devices()[0].device_kind}, float32, {N} units, batch {BATCH}")
    # Warm up the process (allocator, thread pool) so the first row is not penalised.
    timed(implicit_grad, theta, x, y, repeats=opts.repeats)
    t_imp, (g_imp, steps_imp) = timed(implicit_grad, theta, x, y, repeats=opts.repeats)
    rows = [("implicit (RBP, dense adjoint solve)", t_imp, steps_imp, "LU", 1.0, None)]
    gmres = lx.GMRES(rtol=RTOL, atol=ATOL, restart=50, max_steps=200)
    t_kr, (g_kr, _) = timed(
        lambda *a: implicit_grad(*a, linear_solver=gmres), theta, x, y,
        repeats=opts.repeats,
    )  # fmt: skip
    rows.append(("implicit (RBP, GMRES adjoint solve)", t_kr, steps_imp, "GMRES",
                 cosine(g_kr, g_imp), None))  # fmt: skip
    # Recurrent backprop proper: linearise once at the equilibrium and iterate the
    # adjoint fixed point (what the paper's RBP baseline does).
    neumann = NeumannIteration(rtol=RTOL, atol=ATOL)
    rbp = eqx.filter_jit(lambda *a: implicit_grad(*a, linear_solver=neumann))
    t_rbp, (g_rbp, _) = timed(rbp, theta, x, y, repeats=opts.repeats)
    g_tight, _ = implicit_grad(theta, x, y, linear_solver=_DENSE, tol=TIGHT)
    errors = {"implicit": rel_error(g_rbp, g_tight)}
    rows.append(("implicit (RBP, adjoint fixed-point iteration)", t_rbp, steps_imp,
                 "iteration", cosine(g_rbp, g_imp), 1.0))  # fmt: skip
    di = lcp.DynamicInversion
    imex = lcp.IMEX()
    explicit = lcp.DiscreteTime(step_size=0.5, solver=anderson)
    grad_, obj = make_lcp_grad, make_lcp_objective
    lcp_rows = [
        ("LCP-DI alpha=0.1, default solver, least_control_grad", di(0.1), None,
         grad_),
        ("LCP-DI alpha=0.1, default solver, least_control_objective", di(0.1), None,
         obj),
        ("LCP-DI alpha=0, default solver, least_control_objective", di(0.0), None,
         obj),
        ("LCP-DI alpha=0.1, IMEX, least_control_grad", di(0.1), imex, grad_),
        ("LCP-DI alpha=0.1, IMEX, least_control_objective", di(0.1), imex, obj),
        ("LCP-DI alpha=0.1 (traced alpha: integral u iterated), IMEX, "
         "least_control_grad", di(jnp.asarray(0.1)), imex, grad_),
        ("LCP-DI alpha=0.01, IMEX, least_control_grad", di(0.01), imex, grad_),
        ("LCP-DI alpha=1, IMEX, least_control_grad", di(1.0), imex, grad_),
        ("LCP-DI alpha=0, IMEX, least_control_grad", di(0.0), imex, grad_),
        ("LCP-DI alpha=0, IMEX, least_control_objective", di(0.0), imex, obj),
        # Gradient flow on ½‖f‖² + L/alpha: DI alpha=0.1's equilibrium, with the
        # state as the only unknown. Its explicit part is a gradient step on ½‖f‖²,
        # stable only below step 2/‖∂f‖².
        ("LCP-EBD beta=10, IMEX(step_size=0.5), least_control_grad",
         lcp.EnergyBased(beta=10.0), lcp.IMEX(step_size=0.5), grad_),
        ("LCP-DI alpha=0.1, explicit + Anderson, least_control_grad", di(0.1),
         explicit, grad_),
        ("LCP-DI alpha=0, explicit + Anderson, least_control_grad", di(0.0),
         explicit, grad_),
    ]  # fmt: skip
    for name, controller, solver, make in lcp_rows:
        if opts.quick and "explicit" in name:
            continue
        fn = make(controller, solver)
        t, (g, (s_ctl, result)) = timed(fn, theta, x, y, repeats=opts.repeats)
        ratio = interleaved_ratio(fn, rbp, theta, x, y, repeats=opts.repeats)
        ok = bool(jnp.all(result == lcp.RESULTS.successful))
        s_free = make(controller, solver, free=True)(theta, x, y)[1]
        # The reference: the default solver (IMEX with Anderson acceleration) at a
        # tight tolerance. Plain IMEX at alpha = 0 from zero missed 4096 steps on 3
        # of the 64 samples at that tolerance in float32.
        g_ref = make(controller, None, tol=TIGHT)(theta, x, y)[0]
        errors[name] = rel_error(g, g_ref)
        rows.append((name + ("" if ok else " [FAILED]"), t, s_free, s_ctl,
                     cosine(g, g_imp), ratio))  # fmt: skip
    print()
    print(
        "| method | time (ms, median) | x RBP (interleaved) | steps free (mean / max) "
        "| steps controlled (mean / max) | cos(update, dense implicit) |"
    )
    print("|---|---|---|---|---|---|")

    def steps(s):
        # Mean over the batch / max (a vmapped loop runs until its slowest sample).
        return s if isinstance(s, str) else f"{float(s[0]):.1f} / {int(s[1])}"

    for name, t, s_free, s_ctl, cos, ratio in rows:
        # The slow rows' ratio is plain division (interleaving them costs minutes).
        ratio = t / t_rbp if ratio is None else ratio
        print(f"| {name} | {1e3 * t:.1f} | {ratio:.2f} | {steps(s_free)} | "
              f"{steps(s_ctl)} | {cos:.4f} |")  # fmt: skip
    print()
    print("Relative error of each update against its own solve at tolerance "
          f"{TIGHT:g} (both sides at {RTOL:g}):")  # fmt: skip
    for name, err in errors.items():
        print(f"- {name}: {err:.1e}")


if __name__ == "__main__":
    main()
