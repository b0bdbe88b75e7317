"""What the training loop and the update rules need from a network."""

import abc

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, PyTree


class AbstractEquilibriumModel(eqx.Module):
    """A classifier whose prediction is read off an equilibrium of its dynamics
    `φ̇ = f(φ, θ; x)`: what [`lcp_solvers.experiments.train_classifier`][] and the
    update rules ([`lcp_solvers.experiments.RecurrentBackprop`][],
    [`lcp_solvers.experiments.LeastControl`][]) work with.

    A subclass provides the velocity field of one example, the free equilibrium of a
    batch (by a solver, or by an explicit forward pass where the network is layered)
    and the logits at a state. The least-control update of every parameter is then
    `-(∂_θ f)ᵀψ*`, taken from `vector_field` by one vector-Jacobian product.
    """

    @abc.abstractmethod
    def vector_field(self, phi: PyTree[Array], x: Array) -> PyTree[Array]:
        """The free velocity `f(φ, θ; x)` for one example (no batch axis)."""

    @abc.abstractmethod
    def free_equilibrium(
        self,
        x: Array,
        *,
        rtol: float,
        atol: float,
        max_steps: int,
        adjoint: optx.AbstractAdjoint,
    ) -> tuple[PyTree[Array], Array]:
        """The free equilibrium of a batch `x` (leading batch axis) and the number of
        solver steps it took. Differentiating through it uses `adjoint` where it is
        solved for; a layered network computes it by its forward pass (steps 0),
        which backprop differentiates exactly."""

    @abc.abstractmethod
    def output(self, phi: PyTree[Array]) -> Float[Array, " c"]:
        """The logits at the state `phi` of one example: a fixed function of the
        state, without parameters (a readout belongs in the dynamics, where the
        least-control principle trains it)."""

    @property
    def dtype(self):
        """The parameters' floating dtype (inputs are cast to it)."""
        return jtu.tree_leaves(eqx.filter(self, eqx.is_inexact_array))[0].dtype

    def regulariser(self, phi: PyTree[Array], x: Array, key: Array) -> Array | None:
        """A penalty on the parameters at the free equilibrium `phi` of one example,
        added to the training objective by every update rule (its gradient in the
        parameters at fixed `phi`), or `None` for none (the default)."""
        del phi, x, key
        return None

    def unit_slopes(self, phi: PyTree[Array]) -> PyTree[Array]:
        """The slope `σ'(h)` of every unit's activation at the state `phi` of one
        example, `1` for linear (output) units, shaped like `phi`: the local factor
        by which `LeastControl(variant="lf", modulate=True)` scales each unit's
        learning signal."""
        raise ValueError(
            f"{type(self).__name__} does not define `unit_slopes`, which "
            "`LeastControl(variant='lf')` needs; use variant 'di', 'kp' or 'ebd'."
        )

    @property
    def has_feedback(self) -> bool:
        """Whether the network has learned feedback weights for Kolen–Pollack
        dynamic inversion (`kp_feedback`, `kp_grads`)."""
        return False

    def kp_feedback(self, phi: PyTree[Array], psi: PyTree[Array]) -> PyTree[Array]:
        """`(∂_φ f)ᵀψ` for one example with every forward weight replaced by its
        learned feedback weight: the feedback pathway of
        `LeastControl(variant="kp")`."""
        raise ValueError(
            f"{type(self).__name__} has no Kolen-Pollack feedback weights; build it "
            "with `feedback=True` where the network supports it."
        )

    def kp_grads(
        self, grads: PyTree, phi: PyTree[Array], psi: PyTree[Array], decay: float
    ) -> PyTree:
        """The Kolen–Pollack update from the batch's least-control update `grads`
        at the controlled equilibria `phi`, `psi` (leading batch axis): every
        feedback weight follows its forward weight's local (Hebbian) term, and both
        decay by `decay`, so that the feedback comes to match the forward weights
        whatever either started at."""
        raise ValueError(
            f"{type(self).__name__} has no Kolen-Pollack feedback weights."
        )

    def limit_recurrent_norm(self, max_norm: float) -> "AbstractEquilibriumModel":
        """The model with its recurrent weights rescaled to spectral norm at most
        `max_norm` (see `train_classifier(max_recurrent_norm=...)`); unchanged for a
        network without such a constraint."""
        del max_norm
        return self


def lecun_normal(key, shape: tuple[int, int], dtype, fan_in: int | None = None):
    """A weight matrix `(fan_out, fan_in)` with entries `N(0, 1/fan_in)` of `dtype`:
    the initialisation of the paper's dense networks (`fan_in` given for a feedback
    matrix, which has its forward weight's transposed shape). The scale is a `dtype`
    scalar, so that a float32 network stays float32 with x64 enabled."""
    fan_in = shape[1] if fan_in is None else fan_in
    scale = np.sqrt(np.asarray(fan_in, np.dtype(dtype)))
    return jax.random.normal(key, shape, dtype) / scale
