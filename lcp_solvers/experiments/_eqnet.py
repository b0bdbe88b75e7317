"""The paper's equilibrium network `φ̇ = -φ + Wσ(φ) + Ux + b` with output units."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, Int, PRNGKeyArray

import lcp_solvers as lcp

from ._model import AbstractEquilibriumModel


class EquilibriumNetwork(AbstractEquilibriumModel):
    r"""An equilibrium network whose readout is part of the state: the feedforward
    and recurrent networks of Table 1 of Meulemans et al. (NeurIPS 2022).

    The state is `φ = (h, y)`: `h` the hidden units, `y` the output units, with

    $$\dot h = -h + (W ⊙ M_W)\,σ(h) + (U ⊙ M_U)\,x + b,\qquad
    \dot y = -y + (R ⊙ M_R)\,σ(h) + c,$$

    `σ = tanh`. The masks `M` give the architecture:

    - `"rnn"`: one fully recurrent population of `hidden[0]` units; every unit sees the
        input and feeds the readout.
    - `"ff"`: a feedforward stack (`hidden = (256, 256)` is the paper's 2 × 256 net),
        written as a block-lower-triangular `W`: layer `l+1` reads `σ(layer l)`, only
        the first layer sees `x` and only the last feeds the readout. Its equilibrium
        is the forward pass.

    The free equilibrium solves `h = (W⊙M_W)σ(h) + (U⊙M_U)x + b`, `y = (R⊙M_R)σ(h) + c`.
    The local least-control updates are `ΔW = ψ_h σ(h)ᵀ`, `ΔU = ψ_h xᵀ`,
    `ΔR = ψ_y σ(h)ᵀ` (and `Δb = ψ_h`, `Δc = ψ_y`): exactly `-(∂_θ f)ᵀψ`.

    **Arguments:**

    - `in_size`, `out_size`: input features and classes.
    - `hidden`: sizes of the hidden layers (`"ff"`) or a single size (`"rnn"`).
    - `architecture`: `"ff"` or `"rnn"`.
    - `key`: a JAX PRNG key.
    - `recurrent_scale`: spectral-norm-ish scale of the initial recurrent weights of
        the `"rnn"` variant (below 1 so the free dynamics start contracting).
    - `feedback`: if `True`, also create Kolen–Pollack feedback weights `S_W`, `S_R`
        (shapes of `Wᵀ`, `Rᵀ`), used by
        [`lcp_solvers.experiments.LeastControl`][] with `"kp"`.
    - `dtype`: the parameters' floating dtype; `None` is JAX's default (float32, or
        float64 with x64 enabled).
    """

    W: Float[Array, "n n"]
    U: Float[Array, "n d"]
    b: Float[Array, " n"]
    R: Float[Array, "c n"]
    c: Float[Array, " c"]
    S_W: Float[Array, "n n"] | None
    S_R: Float[Array, "n c"] | None
    hidden: tuple[int, ...] = eqx.field(static=True)
    architecture: Literal["ff", "rnn"] = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden: int | tuple[int, ...],
        architecture: Literal["ff", "rnn"],
        *,
        key: PRNGKeyArray,
        recurrent_scale: float = 0.5,
        feedback: bool = False,
        dtype=None,
    ):
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if architecture not in ("ff", "rnn"):
            raise ValueError(
                f"`architecture` must be 'ff' or 'rnn', got {architecture!r}."
            )
        if architecture == "rnn" and len(hidden) != 1:
            raise ValueError(
                "The 'rnn' architecture has one recurrent population: pass a single "
                f"hidden size, got {hidden}."
            )
        if any(h < 1 for h in hidden) or in_size < 1 or out_size < 1:
            raise ValueError(
                f"Sizes must be positive, got in_size={in_size}, hidden={hidden}, "
                f"out_size={out_size}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        self.hidden = hidden
        self.architecture = architecture
        n = sum(hidden)
        kw, ku, kr, ks1, ks2 = jax.random.split(key, 5)
        m_w, m_u, m_r = self.masks(in_size, out_size, dtype)
        # LeCun-normal fan-in scaling over the connections that actually exist.
        fan_w = np.maximum(m_w.sum(axis=1, keepdims=True), 1)
        fan_u = np.maximum(m_u.sum(axis=1, keepdims=True), 1)
        fan_r = np.maximum(m_r.sum(axis=1, keepdims=True), 1)
        w = jax.random.normal(kw, (n, n), dtype) / np.sqrt(fan_w)
        if architecture == "rnn":
            w = recurrent_scale * w
        self.W = w * m_w
        self.U = jax.random.normal(ku, (n, in_size), dtype) / np.sqrt(fan_u) * m_u
        self.b = jnp.zeros((n,), dtype)
        self.R = jax.random.normal(kr, (out_size, n), dtype) / np.sqrt(fan_r) * m_r
        self.c = jnp.zeros((out_size,), dtype)
        if feedback:
            s_w = jax.random.normal(ks1, (n, n), dtype) / np.sqrt(fan_w).T
            if architecture == "rnn":
                # S_W drives the feedback (adjoint-like) dynamics as W drives the
                # free ones: the same scale keeps both contracting.
                s_w = recurrent_scale * s_w
            self.S_W = s_w * m_w.T
            s_r = jax.random.normal(ks2, (n, out_size), dtype) / np.sqrt(fan_r).T
            self.S_R = s_r * m_r.T
        else:
            self.S_W = None
            self.S_R = None

    def masks(self, in_size: int, out_size: int, dtype=None):
        """The connectivity masks `(M_W, M_U, M_R)` as numpy arrays (of `dtype`,
        default the weights' dtype, so that masking never promotes float32)."""
        dtype = np.dtype(self.W.dtype if dtype is None else dtype)
        n = sum(self.hidden)
        if self.architecture == "rnn":
            return (
                np.ones((n, n), dtype),
                np.ones((n, in_size), dtype),
                np.ones((out_size, n), dtype),
            )
        edges = np.cumsum((0,) + self.hidden)
        m_w = np.zeros((n, n))
        for lo_in, hi_in, hi_out in zip(
            edges[:-2], edges[1:-1], edges[2:], strict=True
        ):
            m_w[hi_in:hi_out, lo_in:hi_in] = 1
        m_u = np.zeros((n, in_size))
        m_u[: edges[1]] = 1
        m_r = np.zeros((out_size, n))
        m_r[:, edges[-2] :] = 1
        return m_w.astype(dtype), m_u.astype(dtype), m_r.astype(dtype)

    def _masked(self):
        m_w, m_u, m_r = self.masks(self.U.shape[1], self.R.shape[0])
        return self.W * m_w, self.U * m_u, self.R * m_r

    @property
    def num_hidden(self) -> int:
        return sum(self.hidden)

    @property
    def num_outputs(self) -> int:
        return self.c.shape[0]

    def vector_field(
        self, phi: tuple[Float[Array, " n"], Float[Array, " c"]], x: Float[Array, " d"]
    ) -> tuple[Float[Array, " n"], Float[Array, " c"]]:
        """The free velocity `f(φ, θ)` for one input `x`."""
        h, y = phi
        w, u, r = self._masked()
        s = jnp.tanh(h)
        return -h + w @ s + u @ x + self.b, -y + r @ s + self.c

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
        m_w, _, m_r = self.masks(self.U.shape[1], self.R.shape[0])
        back = (self.S_W * m_w.T) @ psi_h + (self.S_R * m_r.T) @ psi_y
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
        m_w, _, m_r = self.masks(self.U.shape[1], self.R.shape[0])
        d_sw = jnp.einsum("bi,bj->ij", s, psi_h) / h.shape[0] * m_w.T
        d_sr = jnp.einsum("bi,bj->ij", s, psi_y) / h.shape[0] * m_r.T
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
        w, u, _ = self._masked()
        return w @ jnp.tanh(h) + u @ x + self.b

    def readout(self, h: Float[Array, " n"]) -> Float[Array, " c"]:
        _, _, r = self._masked()
        return r @ jnp.tanh(h) + self.c

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
        # way. A feedforward stack has no recurrence to limit.
        if self.architecture != "rnn":
            return self

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
