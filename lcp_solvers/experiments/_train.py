"""Update rules for the equilibrium network and a minimal optax training loop."""

import abc
import functools
import time
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

import lcp_solvers as lcp

from ._eqnet import cross_entropy, EquilibriumNetwork
from ._layered import Feedforward
from ._model import AbstractEquilibriumModel
from ._sharding import check_batch_size, check_jax_version, replicate, shard_batch


_IMPLICIT = optx.ImplicitAdjoint()


def free_equilibrium(
    model: AbstractEquilibriumModel,
    x: Float[Array, "batch ..."],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 256,
    adjoint: optx.AbstractAdjoint = _IMPLICIT,
) -> tuple[PyTree[Array], Array]:
    """The free equilibrium `φ*` of a batch (leading axis) and the solver's step
    count: `model.free_equilibrium(x, ...)` with these defaults.

    For an [`lcp_solvers.experiments.EquilibriumNetwork`][], `φ* = (h*, y*)`: the
    hidden fixed point `h = Wσ(h) + Ux + b` solved for the whole batch at once with
    [`lcp_solvers.AndersonAcceleration`][], and `y* = Rσ(h*) + c`. Differentiating
    through it uses `adjoint` (by default the implicit function theorem, i.e.
    recurrent backprop at convergence); a layered network
    ([`lcp_solvers.experiments.ConvFeedforward`][]) computes it by its forward pass.
    """
    return model.free_equilibrium(
        x, rtol=rtol, atol=atol, max_steps=max_steps, adjoint=adjoint
    )


def predict(
    model: AbstractEquilibriumModel, x: Float[Array, "batch ..."]
) -> Int[Array, " batch"]:
    """Class predictions (argmax of the logits at the free equilibrium)."""
    phi, _ = free_equilibrium(model, x)
    return jnp.argmax(jax.vmap(model.output)(phi), axis=-1)


def mean_of_successful(ok: Array, tree: PyTree[Array]) -> PyTree[Array]:
    """The mean over the leading (example) axis of every leaf of `tree`, over the
    examples where `ok` is true (zero if none is). A failed solve returns an arbitrary
    value, possibly NaN, so it is masked out with `where`, not weighted by zero."""
    dtype = jtu.tree_leaves(tree)[0].dtype
    keep = ok.astype(dtype)
    denom = jnp.maximum(jnp.sum(keep), 1)

    # A contraction with the weights, not a sum over the masked stack: XLA fuses it
    # with the per-example outer products ψσᵀ into one matrix product instead of
    # materialising them (3x faster per epoch at 2 x 256 units).
    return jtu.tree_map(
        lambda g: jnp.tensordot(keep, g, axes=1) / denom, _kept_rows(ok, tree)
    )


class AbstractUpdateRule(eqx.Module):
    """How a batch turns into parameter updates for an
    [`lcp_solvers.experiments.AbstractEquilibriumModel`][] (e.g. an
    [`EquilibriumNetwork`][lcp_solvers.experiments.EquilibriumNetwork]).

    `__call__` returns `(grads, state, stats)`: `grads` has the structure of
    `eqx.filter(model, eqx.is_inexact_array)` and is to be *descended* (pass it to an
    optax optimiser as the gradient); `state` is the rule's own learned state (e.g. the
    linear-feedback matrix `Q`), `stats` a dict of scalars for logging.
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The method's name in tables."""

    def init(self, model: AbstractEquilibriumModel, key: PRNGKeyArray) -> PyTree:
        return None

    @abc.abstractmethod
    def __call__(
        self,
        model: AbstractEquilibriumModel,
        state: PyTree,
        x: Float[Array, "batch d"],
        labels: Int[Array, " batch"],
        key: PRNGKeyArray,
    ) -> tuple[PyTree, PyTree, dict[str, Array]]: ...


def _with_regulariser(model, grads, phi, x, key, scale=1.0):
    # Adds `scale` times the gradient in the parameters of the model's regulariser
    # at the free equilibrium `phi` (held fixed), the same term for every rule.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    keys = jax.random.split(key, x.shape[0])
    phi = jax.lax.stop_gradient(phi)

    def penalty(p):
        m = eqx.combine(p, static)
        return jnp.mean(jax.vmap(m.regulariser)(phi, x, keys))

    if (
        eqx.filter_eval_shape(
            lambda: model.regulariser(jtu.tree_map(lambda a: a[0], phi), x[0], keys[0])
        )
        is None
    ):
        return grads
    return jtu.tree_map(lambda g, r: g + scale * r, grads, jax.grad(penalty)(params))


def _gradient_through_equilibrium(model, x, labels, adjoint, rtol, atol, key):
    # The gradient of the batch-mean cross-entropy at the free equilibrium, with the
    # backward pass of `adjoint` wherever the model solves for its equilibrium.
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(p):
        m = eqx.combine(p, static)
        phi, steps = free_equilibrium(m, x, rtol=rtol, atol=atol, adjoint=adjoint)
        logits = jax.vmap(m.output)(phi)
        return jnp.mean(jax.vmap(cross_entropy)(logits, labels)), (steps, phi)

    (loss, (steps, phi)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = _with_regulariser(model, grads, phi, x, key)
    stats = dict(loss=loss, H=jnp.nan, steps=steps.astype(loss.dtype), ok=1.0)
    return grads, stats


class RecurrentBackprop(AbstractUpdateRule):
    """The baseline: the gradient of the mean cross-entropy at the free equilibrium,
    by implicit differentiation (`optx.ImplicitAdjoint`, the converged limit of
    recurrent backprop). For a layered network
    ([`lcp_solvers.experiments.Feedforward`][],
    [`lcp_solvers.experiments.ConvFeedforward`][]) it is plain backprop through the
    explicit forward pass.

    **Arguments:**

    - `rtol`, `atol`: tolerances of the forward solve and of the GMRES solve of the
        adjoint linear system.
    - `restart`: GMRES's restart length. Each cycle costs about `restart` products
        whether or not it converges sooner: on Table 1's networks 10 gives the same
        gradient as 40 (to 1e-6 relative) at a third of the time per step.
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    restart: int = eqx.field(static=True, default=10)

    @property
    def name(self) -> str:
        return "BP/RBP"

    def __call__(self, model, state, x, labels, key):
        adjoint = optx.ImplicitAdjoint(
            linear_solver=lx.GMRES(rtol=self.rtol, atol=self.atol, restart=self.restart)
        )
        grads, stats = _gradient_through_equilibrium(
            model, x, labels, adjoint, self.rtol, self.atol, key
        )
        return grads, state, stats


class LeastControlDropIn(AbstractUpdateRule):
    """Recurrent backprop's training step with its backward pass replaced by the
    drop-in [`lcp_solvers.LeastControlAdjoint`][]: the same forward solve, the
    least-control update in place of the implicit gradient (the "LCP-DI (drop-in)"
    rows). On a layered network, which has no solve to replace, it is backprop.

    **Arguments:**

    - `adjoint`: the [`lcp_solvers.LeastControlAdjoint`][] (default settings).
    - `rtol`, `atol`: tolerances of the forward solve.
    """

    adjoint: lcp.LeastControlAdjoint = lcp.LeastControlAdjoint()
    rtol: float = 1e-5
    atol: float = 1e-5

    @property
    def name(self) -> str:
        return "LCP-DI (drop-in)"

    def __call__(self, model, state, x, labels, key):
        grads, stats = _gradient_through_equilibrium(
            model, x, labels, self.adjoint, self.rtol, self.atol, key
        )
        return grads, state, stats


Variant = Literal["di", "kp", "lf", "ebd"]


class LeastControl(AbstractUpdateRule):
    r"""Least-control updates through [`lcp_solvers.least_control_grad`][], one
    controlled equilibrium per example (vmapped), warm-started at the free equilibrium:
    the LCP rows of Tables 1 and 2 of Meulemans et al. (NeurIPS 2022).

    The update of every parameter is `-(∂_θ f)ᵀψ*`, averaged over the batch
    (returned negated, as a gradient) and taken as one vector-Jacobian product of
    the batched `f`, so no per-example weight update is formed. For the
    [`lcp_solvers.experiments.EquilibriumNetwork`][] it is `ΔW = ψ_h σ(h)ᵀ`,
    `ΔU = ψ_h xᵀ`, `ΔR = ψ_y σ(h)ᵀ`; for a convolution, the weight gradient of the
    convolution with `ψ` as its output error.

    **Arguments:**

    - `variant`:
        - `"di"`: dynamic inversion with the exact `(∂_φ f)ᵀψ`;
        - `"kp"`: dynamic inversion with `Wᵀ, Rᵀ` replaced by learned feedback weights
            `S_W, S_R` (Kolen–Pollack: `ΔS = σψᵀ - γS`, `ΔW = ψσᵀ - γW`; on a
            layered network, one feedback weight per layer, used transposed, and on
            [`lcp_solvers.experiments.ConvFeedforward`][] transposed convolutions
            with learned kernels); the model must be built with `feedback=True`;
        - `"lf"`: linear feedback `ψ = Q u` with `Q` learned by the noise-driven rule
            of [`lcp_solvers.linear_feedback_update`][] (see `modulate`;
            `EquilibriumNetwork` and `Feedforward` only);
        - `"ebd"`: energy-based dynamics at `β = 1/α`.
    - `alpha`: leak of the output controller, for the per-example loss (the paper's
        0.1 is for a batch-mean loss: at batch `B` it is `alpha = 0.1·B` here).
    - `solver`: solver of the controlled equilibrium (see `least_control_grad`).
        `None` picks per variant, all Anderson-accelerated
        (`lcp.AndersonAcceleration(rtol, atol, history_length)`: on the feedforward
        net the plain iteration oscillates): `lcp.IMEX` for `"di"` and `"kp"`,
        `lcp.IMEX(step_size=0.5)` for `"ebd"` (its explicit part is a gradient step
        on `½‖f‖²`), and `lcp.DiscreteTime(step_size)` for `"lf"`, which IMEX does
        not support.
    - `step_size`, `history_length`: of those default solvers (`step_size` for
        `"lf"` only).
    - `rtol`, `atol`: tolerances of the controlled solve. `None` (default) means
        `min(1e-4, 1e-3/alpha)`: `ψ*` is of order `1/alpha` (the output error
        divided by the leak), so a fixed tolerance would make the update's relative
        error grow with `alpha`.
    - `max_steps`: the controlled solve's step budget (default 256).
    - `weight_decay`: `γ` of Kolen–Pollack (applied to `W`, `R`, `S_W`, `S_R`).
    - `q_lr`, `q_decay`, `q_steps`, `q_samples`: learning rate, decay, number of
        Euler–Maruyama steps per batch and number of examples per batch of the
        noise-driven rule that learns `Q` (`lcp.linear_feedback_update`), run online
        before each batch's update. `Q` starts at zero.
    - `drop_failed`: leave examples whose controlled solve failed (see
        `stats["ok"]`, the fraction that succeeded) out of the batch average.
    - `modulate`: for `"lf"` only, scale each hidden unit's learning signal by its
        own `σ'(h)`: `ψ_h = σ'(h) ⊙ (Qu)_h` (the control applied to the dynamics is
        still `Qu`), as the paper's code does. With `D = diag σ'(h)`, the optimal
        feedback `-(∂_φ f)^{-T}[0, I]ᵀ = [D(I - WᵀD)^{-1}Rᵀ; I]` carries every
        unit's `σ'(h_i)` as a left factor, which changes from example to example and
        which one `Q` shared by all examples cannot follow, but which the unit has
        locally. `False` gives the plain `-(∂_θ f)ᵀQu`, a feedback-alignment-like
        signal that learns far less (docs/results.md).
    """

    variant: Variant = eqx.field(static=True, default="di")
    alpha: float = 0.1
    solver: Any = None
    step_size: float = 0.5
    history_length: int = eqx.field(static=True, default=8)
    rtol: float | None = None
    atol: float | None = None
    max_steps: int = eqx.field(static=True, default=256)
    weight_decay: float = 1e-4
    q_lr: float = 1e-2
    q_decay: float = 0.0
    q_steps: int = eqx.field(static=True, default=400)
    drop_failed: bool = eqx.field(static=True, default=True)
    q_samples: int = eqx.field(static=True, default=4)
    modulate: bool = eqx.field(static=True, default=True)

    @property
    def name(self) -> str:
        return {
            "di": "LCP-DI",
            "kp": "LCP-DI (KP)",
            "lf": "LCP-LF",
            "ebd": "LCP-EBD",
        }[self.variant]

    def __check_init__(self):
        if self.variant not in ("di", "kp", "lf", "ebd"):
            raise ValueError(
                "`LeastControl(variant=...)` must be one of 'di', 'kp', 'lf', 'ebd', "
                f"got {self.variant!r}."
            )

    def init(self, model, key):
        if self.variant in ("di", "ebd"):
            return None
        if self.variant == "kp":
            if not model.has_feedback:
                raise ValueError(
                    "`LeastControl(variant='kp')` needs Kolen-Pollack feedback "
                    f"weights: build the {type(model).__name__} with `feedback=True` "
                    "(EquilibriumNetwork, Feedforward, ConvFeedforward)."
                )
            return None
        # LF's matrix Q maps the output control to every unit of the state.
        if not isinstance(model, (EquilibriumNetwork, Feedforward)):
            raise ValueError(
                "`LeastControl(variant='lf')` is implemented for `EquilibriumNetwork` "
                f"and `Feedforward`, got a {type(model).__name__}; use variant 'di', "
                "'kp' or 'ebd'."
            )
        n, c = model.num_hidden, model.num_outputs
        # `linear_feedback_update` advises a zero start: a random Q can destabilise
        # the feedback loop.
        return jnp.zeros((n + c, c), model.dtype)

    def _tolerances(self):
        alpha = self.alpha
        known = isinstance(alpha, (int, float)) and alpha > 0
        default = min(1e-4, 1e-3 / alpha) if known else 1e-4
        rtol = default if self.rtol is None else self.rtol
        atol = default if self.atol is None else self.atol
        return rtol, atol

    def _controller(self, static, q):
        if self.variant == "di":
            return lcp.DynamicInversion(alpha=self.alpha)
        if self.variant == "ebd":
            return lcp.EnergyBased(beta=1 / self.alpha)
        if self.variant == "lf":
            return lcp.LinearFeedback(Q=q, alpha=self.alpha, output=static.output)

        def feedback(phi, theta, args, psi):
            return eqx.combine(theta, static).kp_feedback(phi, psi)

        return lcp.DynamicInversion(alpha=self.alpha, feedback=feedback)

    def __call__(self, model, state, x, labels, key):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        phi_free, _ = free_equilibrium(model, x)
        if self.variant == "lf":
            state = self._lf_update(model, state, x, key, phi_free)
        controller = self._controller(static, state)

        def f(phi, theta, args):
            return eqx.combine(theta, static).vector_field(phi, args[0])

        def loss(phi, args):
            return cross_entropy(model.output(phi), args[1])

        solver = self.solver
        rtol, atol = self._tolerances()
        anderson = lcp.AndersonAcceleration(
            rtol=rtol, atol=atol, history_length=self.history_length
        )
        if solver is None and self.variant in ("di", "kp"):
            solver = lcp.IMEX(solver=anderson)
        elif solver is None and self.variant == "ebd":
            solver = lcp.IMEX(step_size=0.5, solver=anderson)
        elif solver is None:
            solver = lcp.DiscreteTime(step_size=self.step_size, solver=anderson)

        def one(phi0, xi, li):
            # Only `info` is used: its per-example weight update is dead code that
            # jit removes, and the batch's update is one product below.
            _, info = lcp.least_control_grad(
                f,
                loss,
                params,
                phi0,
                (xi, li),
                controller=controller,
                solver=solver,
                rtol=rtol,
                atol=atol,
                max_steps=self.max_steps,
                throw=False,
            )
            return info

        info = jax.vmap(one)(phi_free, x, labels)
        ok = info.result == lcp.RESULTS.successful
        if self.variant == "lf" and self.modulate:
            # The hidden units' learning signal σ'(h)⊙(Qu)_h: the optimal feedback
            # (∂_φ f)^{-T} has every unit's own σ'(h_i) as a left factor, which the
            # unit can apply locally; one Q shared by all examples cannot.
            slopes = jax.vmap(model.unit_slopes)(info.phi)
            psi = jtu.tree_map(jnp.multiply, slopes, info.psi)
        else:
            psi = info.psi
        # A solve that hit `max_steps` or diverged returns an arbitrary ψ (NaN after
        # divergence): with `drop_failed` those examples are left out of the batch
        # average (masked with `where`, not weighted by zero) rather than followed.
        keep = ok if self.drop_failed else jnp.ones_like(ok)
        grads = _batch_update(f, params, info.phi, psi, (x, labels), keep)
        # A weak-control update is about the gradient divided by alpha (β = 1/α for
        # EBD): the regulariser is weighed the same, as it is against the gradient
        # in BP/RBP.
        known = isinstance(self.alpha, (int, float)) and self.alpha > 0
        scale = 1 / self.alpha if known else 1.0
        grads = _with_regulariser(model, grads, phi_free, x, key, scale)
        stats = dict(
            loss=jnp.mean(
                jax.vmap(cross_entropy)(jax.vmap(model.output)(phi_free), labels)
            ),
            # A failed solve's control is arbitrary (NaN after divergence).
            H=mean_of_successful(ok, info.control),
            steps=jnp.mean(info.num_steps),
            ok=jnp.mean(ok),
        )
        if self.variant == "kp":
            phi_kept, psi_kept = _kept_rows(keep, info.phi), _kept_rows(keep, info.psi)
            grads = model.kp_grads(grads, phi_kept, psi_kept, self.weight_decay)
        return grads, state, stats

    def _lf_update(self, model, q, x, key, phi_free):
        # The noise rule is run online, a short stretch per batch on a few examples'
        # free equilibria (averaged), so `Q` tracks the network as it learns.
        params, static = eqx.partition(model, eqx.is_inexact_array)
        phi = jtu.tree_map(lambda p: p[: self.q_samples], phi_free)

        def f(phi, theta, xi):
            return eqx.combine(theta, static).vector_field(phi, xi)

        def one(phi_i, xi, k):
            return lcp.linear_feedback_update(
                f,
                params,
                phi_i,
                q,
                xi,
                key=k,
                output=model.output,
                num_steps=self.q_steps,
                learning_rate=self.q_lr,
                decay=self.q_decay,
            )

        x = x[: self.q_samples]
        keys = jax.random.split(key, x.shape[0])
        return jnp.mean(jax.vmap(one)(phi, x, keys), axis=0)


def _batch_update(f, params, phi, psi, args, keep):
    """`-(∂_θ f)ᵀψ` averaged over the examples where `keep` is true: one
    vector-Jacobian product of the batched `f`, so no per-example weight update is
    formed (for a dense layer it is the single matrix product `ψᵀσ(h)/B`; for a
    convolution, one weight-gradient convolution over the batch)."""
    dtype = jtu.tree_leaves(psi)[0].dtype
    count = jnp.maximum(jnp.sum(keep.astype(dtype)), 1)

    # A dropped example's state and input are masked too: after a diverged solve
    # (or from a NaN input) they are NaN, and a zero cotangent times NaN activations
    # (ψσ(h)ᵀ) is NaN, not zero.
    phi, psi, args = (_kept_rows(keep, t) for t in (phi, psi, args))

    diff, static = eqx.partition(params, eqx.is_inexact_array)
    _, vjp = jax.vjp(
        lambda d: jax.vmap(lambda p, a: f(p, eqx.combine(d, static), a))(phi, args),
        diff,
    )
    (theta_bar,) = vjp(jtu.tree_map(lambda p: -p / count, psi))
    return theta_bar


def _kept_rows(keep: Array, tree: PyTree[Array]) -> PyTree[Array]:
    """`tree` with the rows (leading axis) of the examples not kept set to zero, by
    `where`: a failed solve's value is arbitrary, NaN after divergence."""
    return jtu.tree_map(
        lambda p: jnp.where(keep.reshape((-1,) + (1,) * (p.ndim - 1)), p, 0), tree
    )


@functools.cache
def _adam(learning_rate: float, cosine_steps: int | None = None):
    import optax

    # Cached so that repeated runs (seeds, methods) hit the same compiled step.
    if cosine_steps is None:
        return optax.adam(learning_rate)
    # As the paper's code's cosine option: down to a tenth of the rate at the end.
    schedule = optax.cosine_decay_schedule(learning_rate, cosine_steps, alpha=0.1)
    return optax.adam(schedule)


@eqx.filter_jit
def _train_step(
    model, opt_state, rule_state, xb, yb, key, rule, optim, max_recurrent_norm
):
    grads, rule_state, stats = rule(model, rule_state, xb, yb, key)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optim.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    if max_recurrent_norm is not None:
        model = model.limit_recurrent_norm(max_recurrent_norm)
    return model, opt_state, rule_state, stats


_predict = eqx.filter_jit(predict)


def evaluate(
    model: AbstractEquilibriumModel,
    x,
    labels,
    batch_size: int = 512,
    mesh: Mesh | None = None,
) -> float:
    """Test accuracy (fraction correct) at the free equilibrium, `batch_size`
    examples at a time; with a `mesh`, every chunk is split over its devices (the
    last one padded) and `model` should be replicated on it (see
    [`lcp_solvers.experiments.replicate`][])."""
    x = np.asarray(x)
    labels = np.asarray(labels)
    if len(x) == 0:
        raise ValueError("`evaluate`: the test set `x` is empty.")
    if mesh is not None:
        batch_size = -(-batch_size // mesh.size) * mesh.size
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], labels[i : i + batch_size]
        if mesh is None:
            pred = np.asarray(_predict(model, jnp.asarray(xb)))
        else:
            # Pad to a multiple of the device count with copies of the first row;
            # their predictions are dropped.
            pad = -len(xb) % mesh.size
            padded = np.concatenate([xb, np.repeat(xb[:1], pad, axis=0)])
            pred = np.asarray(_predict(model, shard_batch(padded, mesh)))[: len(xb)]
        correct += int(np.sum(pred == yb))
    return correct / len(x)


def train_classifier(
    model: AbstractEquilibriumModel,
    rule: AbstractUpdateRule,
    dataset,
    *,
    epochs: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    key: PRNGKeyArray,
    progress: Callable | None = None,
    max_recurrent_norm: float | None = None,
    lr_schedule: Literal["constant", "cosine"] = "constant",
    mesh: Mesh | None = None,
) -> tuple[AbstractEquilibriumModel, dict[str, list[float]]]:
    """Train `model` with `rule` and Adam on `dataset`; evaluate after every epoch.

    **Arguments:**

    - `model`: the initial network, an
        [`lcp_solvers.experiments.AbstractEquilibriumModel`][] such as
        [`lcp_solvers.experiments.EquilibriumNetwork`][],
        [`lcp_solvers.experiments.ConvFeedforward`][] or
        [`lcp_solvers.experiments.ConvDEQ`][].
    - `rule`: an update rule ([`lcp_solvers.experiments.RecurrentBackprop`][] or
        [`lcp_solvers.experiments.LeastControl`][]).
    - `dataset`: a [`lcp_solvers.experiments.Dataset`][].
    - `epochs`, `batch_size`, `learning_rate`: the paper uses 30, 64 and 1e-3.
    - `key`: PRNG key for shuffling (and the noise of linear feedback).
    - `progress`: optional wrapper of the batch iterator, e.g. `tqdm.tqdm`.
    - `max_recurrent_norm`: if given, after every update the `"rnn"` architecture's
        recurrent weights are rescaled to spectral norm at most this (below 1, the
        free dynamics contract: a unique, stable equilibrium for every method), by
        `model.limit_recurrent_norm`; other networks are left as they are.
    - `lr_schedule`: `"constant"`, or `"cosine"` to anneal the step size along a
        cosine from `learning_rate` at the first update to a tenth of it at the
        end of the run (the paper's code's cosine option).
    - `mesh`: a `jax.sharding.Mesh` to train data-parallel on: every batch split over
        its devices ([`lcp_solvers.experiments.shard_batch`][]), the model, optimiser
        and rule state replicated, one jitted step; evaluation is split the same way.
        `None` runs on the default device. With several processes
        (`jax.distributed.initialize`) every process makes the same call (same
        dataset, same `key`). See docs/devices.md.

    **Returns:**

    `(model, history)` with per-epoch lists `test_accuracy`, `train_loss`, `H`,
    `steps`, `seconds` and `solve_success`.

    **Raises:** `RuntimeError` for a `mesh` below jax 0.10; `ValueError` if
    `batch_size` (or, for a training set smaller than
    one batch, its size) is not a multiple of `mesh.size`, or for an unknown
    `lr_schedule`.
    """
    n = len(dataset.x_train)
    if mesh is not None:
        check_jax_version("train_classifier")
        # A training set smaller than one batch is trained on as one batch of `n`.
        check_batch_size(mesh, min(batch_size, n), "train_classifier")
    num_batches = max(n // batch_size, 1)
    if lr_schedule == "constant":
        optim = _adam(learning_rate)
    elif lr_schedule == "cosine":
        optim = _adam(learning_rate, epochs * num_batches)
    else:
        raise ValueError(
            f"`lr_schedule` must be 'constant' or 'cosine', got {lr_schedule!r}."
        )
    dtype = model.dtype
    x_train = np.asarray(dataset.x_train, dtype)
    y_train = np.asarray(dataset.y_train)
    x_test = np.asarray(dataset.x_test, dtype)
    y_test = np.asarray(dataset.y_test)
    key, init_key = jax.random.split(key)
    rule_state = rule.init(model, init_key)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    if mesh is None:
        put_batch = jnp.asarray
    else:
        put_batch = functools.partial(shard_batch, mesh=mesh)
        model, opt_state, rule_state, key = replicate(
            (model, opt_state, rule_state, key), mesh
        )

    history: dict[str, list[float]] = {
        k: [] for k in ("test_accuracy", "train_loss", "H", "steps", "seconds")
    }
    history["solve_success"] = []
    for _ in range(epochs):
        key, perm_key = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(perm_key, n))
        batches = range(num_batches)
        if progress is not None:
            batches = progress(batches)
        sums: dict[str, float] = {}
        start = time.perf_counter()
        for i in batches:
            idx = perm[i * batch_size : (i + 1) * batch_size]
            key, sub = jax.random.split(key)
            model, opt_state, rule_state, stats = _train_step(
                model,
                opt_state,
                rule_state,
                put_batch(x_train[idx]),
                put_batch(y_train[idx]),
                sub,
                rule,
                optim,
                max_recurrent_norm,
            )
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        history["seconds"].append(time.perf_counter() - start)
        history["train_loss"].append(sums["loss"] / num_batches)
        history["H"].append(sums["H"] / num_batches)
        history["steps"].append(sums["steps"] / num_batches)
        history["solve_success"].append(sums["ok"] / num_batches)
        history["test_accuracy"].append(evaluate(model, x_test, y_test, mesh=mesh))
    return model, history
