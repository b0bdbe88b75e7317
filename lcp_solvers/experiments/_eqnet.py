"""The paper's recurrent equilibrium network `φ̇ = -φ + Wσ(φ) + Ux + b` with output
units."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Int, PRNGKeyArray

import lcp_solvers as lcp

from ._model import AbstractEquilibriumModel, lecun_normal


class EquilibriumNetwork(AbstractEquilibriumModel):
    r"""A fully recurrent equilibrium network whose readout is part of the state: the
    recurrent network of Table 1 of Meulemans et al. (NeurIPS 2022). (Their
    feedforward network is [`lcp_solvers.experiments.Feedforward`][], computed layer
    by layer.)

    The state is `φ = (h, y)`: `h` the hidden units, `y` the output units, with

    $$\dot h = -h + W σ(h) + U x + b,\qquad \dot y = -y + R σ(h) + c,$$

    `σ = tanh`. The free equilibrium solves `h = Wσ(h) + Ux + b`, `y = Rσ(h) + c`.
    The local least-control updates are `ΔW = ψ_h σ(h)ᵀ`, `ΔU = ψ_h xᵀ`,
    `ΔR = ψ_y σ(h)ᵀ` (and `Δb = ψ_h`, `Δc = ψ_y`): exactly `-(∂_θ f)ᵀψ`.

    **Arguments:**

    - `in_size`, `out_size`: input features and classes.
    - `hidden`: the number of recurrent units.
    - `architecture`: `"rnn"`, the only one (kept so that calls written when this
        class also built the feedforward net still work; that net is now
        [`lcp_solvers.experiments.Feedforward`][]).
    - `key`: a JAX PRNG key.
    - `recurrent_scale`: spectral-norm-ish scale of the initial recurrent weights
        (below 1 so the free dynamics start contracting).
    - `feedback`: if `True`, also create Kolen–Pollack feedback weights `S_W`, `S_R`
        (shapes of `Wᵀ`, `Rᵀ`), used by
        [`lcp_solvers.experiments.LeastControl`][] with `"kp"`.
    - `dtype`: the parameters' floating dtype; `None` is JAX's default (float32, or
        float64 with x64 enabled).

    Weights are LeCun-normal (variance `1/fan-in`, `W` then scaled by
    `recurrent_scale`), biases zero.
    """

    W: Float[Array, "n n"]
    U: Float[Array, "n d"]
    b: Float[Array, " n"]
    R: Float[Array, "c n"]
    c: Float[Array, " c"]
    S_W: Float[Array, "n n"] | None
    S_R: Float[Array, "n c"] | None

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden: int,
        architecture: Literal["rnn"] = "rnn",
        *,
        key: PRNGKeyArray,
        recurrent_scale: float = 0.5,
        feedback: bool = False,
        dtype=None,
    ):
        if architecture != "rnn":
            raise ValueError(
                f"`EquilibriumNetwork(architecture=...)` is 'rnn' only, got "
                f"{architecture!r}. The feedforward network is "
                "`Feedforward(in_size, out_size, hidden_sizes, key=...)`, computed "
                "layer by layer."
            )
        if not isinstance(hidden, int):
            raise ValueError(
                "`EquilibriumNetwork(in_size, out_size, hidden)` is the recurrent "
                f"network: `hidden` is one number of units, got {hidden!r}. The "
                "layered network is `Feedforward(in_size, out_size, hidden_sizes, "
                "key=...)`."
            )
        if hidden < 1 or in_size < 1 or out_size < 1:
            raise ValueError(
                f"Sizes must be positive, got in_size={in_size}, hidden={hidden}, "
                f"out_size={out_size}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        n = hidden
        kw, ku, kr, ks1, ks2 = jax.random.split(key, 5)
        # Divided, then scaled: the order of the masked form this replaced, so that
        # a seed gives bit for bit the network of the recorded results.
        self.W = recurrent_scale * lecun_normal(kw, (n, n), dtype)
        self.U = lecun_normal(ku, (n, in_size), dtype)
        self.b = jnp.zeros((n,), dtype)
        self.R = lecun_normal(kr, (out_size, n), dtype)
        self.c = jnp.zeros((out_size,), dtype)
        if feedback:
            # S_W drives the feedback (adjoint-like) dynamics as W drives the free
            # ones: the same scale keeps both contracting.
            self.S_W = recurrent_scale * lecun_normal(ks1, (n, n), dtype)
            self.S_R = lecun_normal(ks2, (n, out_size), dtype, fan_in=n)
        else:
            self.S_W = None
            self.S_R = None

    @property
    def num_hidden(self) -> int:
        return self.W.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.c.shape[0]

    def vector_field(
        self, phi: tuple[Float[Array, " n"], Float[Array, " c"]], x: Float[Array, " d"]
    ) -> tuple[Float[Array, " n"], Float[Array, " c"]]:
        """The free velocity `f(φ, θ)` for one input `x`."""
        h, y = phi
        s = jnp.tanh(h)
        return -h + self.W @ s + self.U @ x + self.b, -y + self.R @ s + self.c

    def unit_slopes(self, phi):
        h, y = phi
        return 1 - jnp.tanh(h) ** 2, jnp.ones_like(y)

    def kp_feedback(
        self, phi: tuple[Float[Array, " n"], Float[Array, " c"]], psi
    ) -> tuple[Float[Array, " n"], Float[Array, " c"]]:
        """`(∂_φ f)ᵀψ` with `Wᵀ`, `Rᵀ` replaced by the learned `S_W`, `S_R`."""
        if self.S_W is None or self.S_R is None:
            raise ValueError(
                "This network has no Kolen-Pollack feedback weights: build it with "
                "`EquilibriumNetwork(..., feedback=True)`."
            )
        h, _ = phi
        psi_h, psi_y = psi
        back = self.S_W @ psi_h + self.S_R @ psi_y
        return -psi_h + (1 - jnp.tanh(h) ** 2) * back, -psi_y

    @property
    def has_feedback(self) -> bool:
        return self.S_W is not None and self.S_R is not None

    def kp_grads(self, grads, phi, psi, decay):
        # ΔS = σ(h)ψᵀ - γS is the transpose of ΔW's Hebbian term: S tracks Wᵀ once
        # the decay has washed out both initialisations.
        assert self.S_W is not None and self.S_R is not None
        h, _ = phi
        psi_h, psi_y = psi
        s = jnp.tanh(h)
        d_sw = jnp.einsum("bi,bj->ij", s, psi_h) / h.shape[0]
        d_sr = jnp.einsum("bi,bj->ij", s, psi_y) / h.shape[0]
        return eqx.tree_at(
            lambda t: (t.W, t.R, t.S_W, t.S_R),
            grads,
            (
                grads.W + decay * self.W,
                grads.R + decay * self.R,
                -d_sw + decay * self.S_W,
                -d_sr + decay * self.S_R,
            ),
        )

    def fixed_point_map(self, h: Float[Array, " n"], x: Float[Array, " d"]):
        return self.W @ jnp.tanh(h) + self.U @ x + self.b

    def readout(self, h: Float[Array, " n"]) -> Float[Array, " c"]:
        return self.R @ jnp.tanh(h) + self.c

    def output(self, phi):
        return phi[1]

    def free_equilibrium(self, x, *, rtol, atol, max_steps, adjoint):
        # The hidden fixed point `h = Wσ(h) + Ux + b` of the whole batch at once (one
        # Anderson solve), then `y* = Rσ(h*) + c`.
        h0 = jnp.zeros((x.shape[0], self.num_hidden), x.dtype)
        sol = optx.fixed_point(
            lambda h, args: jax.vmap(args[0].fixed_point_map)(h, args[1]),
            lcp.AndersonAcceleration(rtol=rtol, atol=atol),
            h0,
            args=(self, x),
            max_steps=max_steps,
            adjoint=adjoint,
            throw=False,
        )
        h = sol.value
        return (h, jax.vmap(self.readout)(h)), sol.stats["num_steps"]

    def limit_recurrent_norm(self, max_norm):
        # With |tanh'| <= 1, recurrent weights in the spectral-norm ball below 1 make
        # the free dynamics contract: a unique, stable equilibrium for every method.
        # The Kolen-Pollack feedback weights S_W drive the feedback dynamics the same
        # way.

        def limit(w):
            norm = jnp.linalg.norm(w, ord=2)
            return w * jnp.minimum(1.0, max_norm / norm).astype(w.dtype)

        model = eqx.tree_at(lambda m: m.W, self, limit(self.W))
        if model.S_W is not None:
            model = eqx.tree_at(lambda m: m.S_W, model, limit(model.S_W))
        return model


def cross_entropy(logits: Float[Array, " c"], label: Int[Array, ""]):
    """Softmax cross-entropy of one example."""
    return -jax.nn.log_softmax(logits)[label]
