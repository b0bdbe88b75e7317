"""Few-shot sinusoid regression with complex synapses: LCP vs iMAML, FOMAML, Reptile."""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray

import lcp_solvers as lcp

from ._train import mean_of_successful


_IMPLICIT = optx.ImplicitAdjoint()


class SinusoidTasks(NamedTuple):
    """A batch of sinusoid regression tasks `y = A sin(x + b)`.

    **Fields:** `x_support`, `y_support` of shape `(tasks, shots, 1)`, `x_query`,
    `y_query` of shape `(tasks, queries, 1)`.
    """

    x_support: Float[Array, "t k 1"]
    y_support: Float[Array, "t k 1"]
    x_query: Float[Array, "t q 1"]
    y_query: Float[Array, "t q 1"]


def sample_sinusoid_tasks(
    key: PRNGKeyArray, num_tasks: int, shots: int = 10, queries: int = 10, dtype=None
) -> SinusoidTasks:
    """Sample tasks as in MAML (Finn et al., 2017): amplitude in `[0.1, 5]`, phase in
    `[0, π]`, inputs uniform in `[-5, 5]`; `shots` support and `queries` query points
    per task, of shape `(num_tasks, shots, 1)` and `(num_tasks, queries, 1)`, in
    `dtype` (`None`: JAX's default float)."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    ka, kb, ks, kq = jax.random.split(key, 4)
    amp = jax.random.uniform(ka, (num_tasks, 1, 1), dtype, 0.1, 5.0)
    phase = jax.random.uniform(kb, (num_tasks, 1, 1), dtype, 0.0, jnp.pi)
    xs = jax.random.uniform(ks, (num_tasks, shots, 1), dtype, -5.0, 5.0)
    xq = jax.random.uniform(kq, (num_tasks, queries, 1), dtype, -5.0, 5.0)
    return SinusoidTasks(xs, amp * jnp.sin(xs + phase), xq, amp * jnp.sin(xq + phase))


class ComplexSynapseLearner(eqx.Module):
    r"""The inner learner of the meta-learning experiment: an MLP whose fast weights
    `φ` (a flat vector) are tied to slow weights `ω` by a quadratic "complex synapse":

    $$φ^*(ω) = \arg\min_φ\; L_{learn}(φ) + \frac{λ}{2}‖φ - ω‖^2,$$

    i.e. the equilibrium of `φ̇ = f(φ, ω) = -∇L_learn(φ) - λ(φ - ω)`, found with
    `optx.minimise` (BFGS) from `φ = ω`.

    **Arguments:**

    - `unravel`: turns the flat weight vector into the MLP (from `init_mlp`).
    - `lam`: the strength `λ` of the synapse.
    - `rtol`, `atol`, `max_steps`: of the inner solve.
    """

    unravel: Callable = eqx.field(static=True)
    lam: float = 1.0
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = eqx.field(static=True, default=256)

    def predict(self, phi, x):
        return jax.vmap(self.unravel(phi))(x)

    def mse(self, phi, x, y):
        return jnp.mean((self.predict(phi, x) - y) ** 2)

    def vector_field(self, phi, omega, data):
        # `data` starts with the support set; anything after it is ignored.
        g = jax.grad(self.mse)(phi, data[0], data[1])
        return -g - self.lam * (phi - omega)

    def solve(
        self, omega, x, y, adjoint: optx.AbstractAdjoint = _IMPLICIT
    ) -> optx.Solution:
        """The inner solve for one task's support set: `sol.value` is `φ*(ω)`, and
        `sol.result` says whether BFGS converged within `max_steps`."""

        def objective(phi, args):
            om, xx, yy = args
            return self.mse(phi, xx, yy) + 0.5 * self.lam * jnp.sum((phi - om) ** 2)

        return optx.minimise(
            objective,
            optx.BFGS(rtol=self.rtol, atol=self.atol),
            omega,
            args=(omega, x, y),
            max_steps=self.max_steps,
            adjoint=adjoint,
            throw=False,
        )

    def adapt(self, omega, x, y, adjoint: optx.AbstractAdjoint = _IMPLICIT):
        """`φ*(ω)` for one task's support set (see `solve` for whether it converged)."""
        return self.solve(omega, x, y, adjoint).value


def init_mlp(key: PRNGKeyArray, width: int = 20, depth: int = 2, dtype=None):
    """A 1 → width → … → 1 tanh MLP (`depth` hidden layers) as `(flat_weights,
    unravel)`, in `dtype` (`None`: JAX's default float)."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    mlp = eqx.nn.MLP(1, 1, width, depth, activation=jnp.tanh, key=key, dtype=dtype)
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    flat, unravel_params = jfu.ravel_pytree(params)

    def unravel(phi):
        m = eqx.combine(unravel_params(phi), static)
        return m

    return flat, unravel


def descend(
    learner: ComplexSynapseLearner,
    omega: Float[Array, " p"],
    x: Float[Array, "k 1"],
    y: Float[Array, "k 1"],
    steps: int,
    learning_rate: float,
) -> Float[Array, " p"]:
    """The standard inner loop of MAML, FOMAML and Reptile: `steps` steps of gradient
    descent on the support MSE from `φ = ω`, without the synapse's `λ` term."""

    def step(_, phi):
        return phi - learning_rate * jax.grad(learner.mse)(phi, x, y)

    return jax.lax.fori_loop(0, steps, step, omega)


MetaMethod = Literal["lcp", "imaml", "fomaml", "reptile", "fomaml-prox", "reptile-prox"]
META_METHOD_NAMES = {
    "lcp": "LCP",
    "imaml": "iMAML",
    "fomaml": "FOMAML",
    "reptile": "Reptile",
    "fomaml-prox": "FOMAML (prox)",
    "reptile-prox": "Reptile (prox)",
}
# Methods whose inner learner is `descend`, not the complex synapse's `φ*(ω)`.
GD_METHODS = ("fomaml", "reptile")


def _adapt(method, learner, omega, x, y, inner_steps, inner_lr):
    """The inner learner `method` is meta-trained and tested with, and whether it
    converged: `descend` for `GD_METHODS` (a fixed number of steps, always counted
    as converged), the complex synapse's `φ*(ω)` otherwise."""
    if method in GD_METHODS:
        return descend(learner, omega, x, y, inner_steps, inner_lr), jnp.array(True)
    sol = learner.solve(omega, x, y)
    return sol.value, sol.result == optx.RESULTS.successful


def _proportional_u(system, phi, alpha):
    # u = -∇L/α on the outputs (`output_mask` is 1 there, 0 elsewhere): the
    # proportional controller, and the leaky output controller's steady state.
    return jax.tree_util.tree_map(
        lambda g, m: -m * g / alpha, system.loss_grad(phi), system.output_mask
    )


class _WarmStartedFeedback(lcp.AbstractController):
    """`lcp.LinearFeedback(Q=I, alpha)` for the complex synapse, its controlled solve
    warm-started near its root.

    With `Q = I` and `alpha > 0` the steady states of the linear-feedback dynamics
    `φ̇ = f + u`, `u̇ = -∇L_eval - αu` are the points with `u = -∇L_eval(φ)/α` and
    `∇E(φ) = 0`, for the energy `E = L_learn + λ/2‖φ - ω‖² + L_eval/α`; they are
    also the steady states of proportional control (`u` eliminated). The controlled
    solve therefore starts at a minimiser of `E`, found by the learner's own BFGS from
    the free equilibrium, with `u = -∇L_eval/α` there; the root finder then solves the
    linear-feedback steady-state equations themselves (about two Newton steps). From
    `(φ*, 0)` instead, Newton has no globalisation on this non-convex problem and the
    Euler/Anderson iteration often does not settle: on some tasks the equilibrium is
    unstable for the integral controller's dynamics (an eigenvalue of their Jacobian
    with positive real part), on others they converge very slowly.
    """

    feedback: lcp.LinearFeedback
    energy: Callable = eqx.field(static=True)
    energy_args: Any
    rtol: float
    atol: float
    max_steps: int = eqx.field(static=True)

    def init(self, system, phi):
        alpha = self.feedback.alpha
        sol = optx.minimise(
            self.energy,
            optx.BFGS(rtol=self.rtol, atol=self.atol),
            phi,
            args=self.energy_args,
            max_steps=self.max_steps,
            throw=False,
        )
        phi_c = sol.value
        return phi_c, _proportional_u(system, phi_c, alpha)

    # Everything else is the wrapped `lcp.LinearFeedback`'s.
    def velocity(self, system, state):
        return self.feedback.velocity(system, state)

    def residual(self, system, state):
        return self.feedback.residual(system, state)

    def unpack(self, system, state):
        return self.feedback.unpack(system, state)

    def loss_weight(self):
        return self.feedback.loss_weight()


def _dtype_tolerance(tree) -> float:
    # `1e-8` if every floating leaf of `tree` is float64, else `1e-5`.
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    double = bool(leaves) and all(jnp.finfo(x.dtype).bits >= 64 for x in leaves)
    return 1e-8 if double else 1e-5


def _default_meta_solver(omega):
    # Started next to the root, Newton's iteration with the Jacobian of the start
    # (a dense LU of the (φ, u) system, 2p x 2p) converges in about two steps and
    # needs one Jacobian instead of one per step.
    tol = _dtype_tolerance(omega)
    return optx.Chord(rtol=tol, atol=tol)


def meta_gradient(
    method: MetaMethod,
    learner: ComplexSynapseLearner,
    omega: Float[Array, " p"],
    tasks: SinusoidTasks,
    *,
    alpha: float = 1.0,
    solver=None,
    max_steps: int = 32,
    inner_steps: int = 1000,
    inner_lr: float = 0.003,
) -> tuple[Float[Array, " p"], dict[str, Array]]:
    r"""The meta-update direction (to be descended) for one batch of tasks.

    **Arguments:**

    - `method`: one of the methods below.
    - `learner`: the inner learner (its synapse `λ`, tolerances and network).
    - `omega`: the slow weights, flattened (`p` parameters).
    - `tasks`: a batch of tasks (`SinusoidTasks`, leading axis the tasks).
    - `alpha`, `solver`, `max_steps`: the LCP controller's leak and the solver of its
        controlled equilibrium (`"lcp"` only, see below).
    - `inner_steps`, `inner_lr`: the gradient-descent inner loop of `"fomaml"` and
        `"reptile"`.

    **Methods:**

    - `"lcp"`: [`lcp_solvers.least_control_grad`][] on `f(φ, ω)` with linear feedback
        `Q = I`, so the controlled dynamics are `φ̇ = f + u`, `u̇ = -∇L_eval(φ) - αu`
        and the gradient is `-(∂_ω f)ᵀψ = -λu*`: the update `Δω = λu*` needs no
        Hessian and no second phase. `L_eval` is the query-set MSE. At the steady
        state `u* = -∇L_eval(φ_c)/α` with `φ_c` a stationary point of
        `L_learn + λ/2‖φ - ω‖² + L_eval/α`, so the update is the query gradient at
        a state nudged towards the query set: for weak control (large `α`) it tends
        to `λ/α` times FOMAML's, not to the implicit gradient. (That is the limit of
        [`lcp_solvers.DynamicInversion`][], whose steady state has
        `-(∂_φ f)ᵀf = ∇L_eval/α` where linear feedback has `f = ∇L_eval/α`; with
        `-∂_φ f = ∇²L_learn + λI` the two agree only if that is the identity, so
        `Q = I` is not DI's optimal controller here.) The controlled solve starts at
        a minimiser of that energy and the root finder `solver` (`None`:
        `optx.Chord`, Newton's iteration with the Jacobian of the start, to `1e-8`
        in float64) then solves the linear-feedback steady-state equations (at most
        `max_steps` steps); `alpha` must be positive.
    - `"imaml"`: the exact implicit meta-gradient `∇_ω L_eval(φ*(ω))` through the
        inner `optx.minimise` with `optx.ImplicitAdjoint` (a Hessian solve).
    - `"fomaml"`, `"reptile"`: the standard algorithms (Finn et al., 2017; Nichol
        et al., 2018), as in the baselines the paper quotes: the inner learner is
        `inner_steps` steps of gradient descent with step `inner_lr` on the support
        MSE from `ω` ([`lcp_solvers.experiments.descend`][], no synapse), ending at
        `φ_K`; FOMAML's direction is `∇_φ L_eval(φ_K)`, Reptile's `ω - φ_K`. The
        defaults, 1000 steps of 0.003, were Reptile's best on the sinusoid task
        (docs/results.md).
    - `"fomaml-prox"`, `"reptile-prox"`: the same two directions at the complex
        synapse's `φ*` instead of `φ_K`: `∇_φ L_eval(φ*)` and `ω - φ*`. Reptile's is
        then `1/λ` times the gradient of the support loss's Moreau envelope.

    **Returns:**

    `(grad, stats)`, `grad` averaged over the tasks (for `"lcp"`, over the tasks whose
    controlled solve succeeded; `stats["ok"]` is that fraction). `stats["inner_ok"]`
    is the fraction of the tasks' inner solves (`learner.solve`) that converged (1
    for the gradient-descent inner loop, which runs a fixed number of steps).
    """

    def one(xs, ys, xq, yq):
        zero = jnp.zeros((), omega.dtype)
        unit = jnp.ones((), omega.dtype)
        if method == "imaml":

            def outer(om):
                sol = learner.solve(om, xs, ys)
                ok = sol.result == optx.RESULTS.successful
                return learner.mse(sol.value, xq, yq), ok.astype(omega.dtype)

            (loss, inner_ok), g = jax.value_and_grad(outer, has_aux=True)(omega)
            return g, dict(query_mse=loss, steps=zero, ok=unit, inner_ok=inner_ok)
        phi, inner_ok = _adapt(method, learner, omega, xs, ys, inner_steps, inner_lr)
        phi = jax.lax.stop_gradient(phi)
        inner_ok = inner_ok.astype(omega.dtype)
        if method in ("fomaml", "fomaml-prox"):
            loss, g = jax.value_and_grad(learner.mse)(phi, xq, yq)
            return g, dict(query_mse=loss, steps=zero, ok=unit, inner_ok=inner_ok)
        if method in ("reptile", "reptile-prox"):
            return omega - phi, dict(
                query_mse=learner.mse(phi, xq, yq),
                steps=zero,
                ok=unit,
                inner_ok=inner_ok,
            )

        def energy(p, data):
            xs, ys, xq, yq = data
            value = learner.mse(p, xs, ys) + learner.mse(p, xq, yq) / alpha
            return value + 0.5 * learner.lam * jnp.sum((p - omega) ** 2)

        data = (xs, ys, xq, yq)
        controller = _WarmStartedFeedback(
            lcp.LinearFeedback(Q=jnp.eye(omega.size, dtype=omega.dtype), alpha=alpha),
            energy,
            data,
            learner.rtol,
            learner.atol,
            learner.max_steps,
        )
        g, info = lcp.least_control_grad(
            learner.vector_field,
            lambda p, data: learner.mse(p, data[2], data[3]),
            omega,
            phi,
            data,
            controller=controller,
            solver=_default_meta_solver(omega) if solver is None else solver,
            max_steps=max_steps,
            throw=False,
        )
        ok = (info.result == lcp.RESULTS.successful).astype(g.dtype)
        # The same post-adaptation query MSE (at the learner's φ*) as the others.
        return g, dict(
            query_mse=learner.mse(phi, xq, yq),
            steps=info.num_steps.astype(g.dtype),
            ok=ok,
            inner_ok=inner_ok,
        )

    if method not in META_METHOD_NAMES:
        raise ValueError(
            f"Unknown meta-learning method {method!r}; choose one of "
            f"{sorted(META_METHOD_NAMES)}."
        )
    if method == "lcp" and isinstance(alpha, (int, float)) and not alpha > 0:
        raise ValueError(f"LCP meta-learning needs a leak `alpha > 0`, got {alpha}.")
    data = (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)
    grads, stats = jax.vmap(lambda *d: one(*d))(*data)
    # Tasks whose controlled solve failed return an arbitrary update; leave them out.
    grad = mean_of_successful(stats["ok"] > 0, grads)
    return grad, {k: jnp.mean(v) for k, v in stats.items()}


def meta_train(
    method: MetaMethod,
    *,
    key: PRNGKeyArray,
    meta_steps: int = 1000,
    meta_batch: int = 10,
    shots: int = 10,
    queries: int = 10,
    lam: float = 1.0,
    alpha: float = 1.0,
    width: int = 20,
    learning_rate: float = 1e-3,
    inner_steps: int = 1000,
    inner_lr: float = 0.003,
    test_tasks: int = 200,
    test_queries: int = 100,
    progress: Callable | None = None,
    dtype=None,
) -> dict[str, Any]:
    """Meta-train the slow weights `ω` with Adam and one of the meta-gradients of
    [`lcp_solvers.experiments.meta_gradient`][], then report the post-adaptation
    query MSE on `test_tasks` fresh tasks (the same held-out tasks for every method
    with the same `key`). Each method is tested with the inner learner it was
    meta-trained for: `descend` (`inner_steps`, `inner_lr`) for `"fomaml"` and
    `"reptile"`, the complex synapse's `φ*(ω)` (`lam`) for the others.

    **Returns:**

    A dict with `test_mse` (mean), `test_mse_sem` (standard error over tasks),
    `curve` (mean meta-batch query MSE every step), `seconds`, and for LCP the
    fraction of successful controlled solves `solve_success` and their mean
    `solve_steps`. `inner_success` and `test_inner_success` are the fractions of
    inner solves (BFGS, `max_steps`) that converged in training and on the test
    tasks: an unconverged one still counts, at the point where BFGS stopped.

    `dtype` is the floating dtype of the weights and tasks (`None`: JAX's default).
    """
    import time

    import optax

    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    k_init, k_train, k_test = jax.random.split(key, 3)
    omega, unravel = init_mlp(k_init, width, dtype=dtype)
    learner = ComplexSynapseLearner(unravel, lam=lam)
    optim = optax.adam(learning_rate)
    opt_state = optim.init(omega)

    @eqx.filter_jit
    def step(omega, opt_state, k):
        tasks = sample_sinusoid_tasks(k, meta_batch, shots, queries, dtype)
        g, stats = meta_gradient(
            method,
            learner,
            omega,
            tasks,
            alpha=alpha,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
        )
        updates, opt_state = optim.update(g, opt_state, omega)
        return optax.apply_updates(omega, updates), opt_state, stats

    @eqx.filter_jit
    def test_mse(omega, tasks):
        def one(xs, ys, xq, yq):
            phi, ok = _adapt(method, learner, omega, xs, ys, inner_steps, inner_lr)
            return learner.mse(phi, xq, yq), ok

        return jax.vmap(one)(*tasks)

    curve, success, steps, inner = [], [], [], []
    keys = list(jax.random.split(k_train, meta_steps)) if meta_steps else []
    start = time.perf_counter()
    for k in keys if progress is None else progress(keys):
        omega, opt_state, stats = step(omega, opt_state, k)
        curve.append(float(stats["query_mse"]))
        success.append(float(stats["ok"]))
        steps.append(float(stats["steps"]))
        inner.append(float(stats["inner_ok"]))
    seconds = time.perf_counter() - start
    test = sample_sinusoid_tasks(k_test, test_tasks, shots, test_queries, dtype)
    mses, test_ok = map(np.asarray, test_mse(omega, test))
    return dict(
        test_mse=float(mses.mean()),
        test_mse_sem=float(mses.std() / np.sqrt(len(mses))),
        curve=curve,
        seconds=seconds,
        solve_success=float(np.mean(success)) if success else 1.0,
        inner_success=float(np.mean(inner)) if inner else 1.0,
        test_inner_success=float(np.mean(test_ok)),
        solve_steps=float(np.mean(steps)) if steps else 0.0,
    )
