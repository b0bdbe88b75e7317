"""Layered networks written as equilibrium networks: the state holds every block's
pre-activation, the free equilibrium is the forward pass (no solver, no masked dense
matrices), and each block is trained by its own local signal."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ._model import AbstractEquilibriumModel, lecun_normal


class AbstractLayeredNetwork(AbstractEquilibriumModel):
    r"""A layered network as an equilibrium network (Meulemans et al., NeurIPS 2022,
    Section 5): the state is every block's pre-activation and the output units,
    `φ = (h_1, …, h_L, y)`, with

    $$\dot h_l = -h_l + F_l(σ(h_{l-1})),\qquad h_0 = x \text{ (no activation)},$$

    the last block being the linear readout `y`. The free equilibrium is the forward
    pass, computed block by block, so backprop through it is plain backprop; the
    least-control update `-(∂_θ f)ᵀψ` of block `l` is that block's own weight gradient
    with `ψ_l` as the output error: local to the block.

    A subclass lists its blocks (`_layers`, each with a `weight`, the readout last)
    and applies one (`_apply`); the forward pass, the velocity field and the
    Kolen–Pollack feedback pathway are written here once.
    """

    feedback: eqx.AbstractVar[tuple[Array, ...] | None]
    activation: eqx.AbstractVar[Callable[[Array], Array]]

    @abc.abstractmethod
    def _layers(self) -> tuple[Any, ...]:
        """The blocks in order, the readout last: equinox layers, each with a
        `weight`."""

    @abc.abstractmethod
    def _apply(self, i: int, layer: Any, a: Array) -> Array:
        """Block `i`'s map `F_i` with the weights of `layer` (the block itself, or
        the block with a feedback weight in place of its own) on its input `a`."""

    def _block(self, i, a, weight=None):
        # With `weight`, that weight in place of the block's own (for products with
        # the input only: the bias stays).
        layer = self._layers()[i]
        if weight is not None:
            layer = eqx.tree_at(lambda m: m.weight, layer, weight)
        return self._apply(i, layer, a)

    def forward(self, x: Array) -> tuple[Array, ...]:
        """The free equilibrium of one example: its forward pass, every block's
        pre-activation and the logits."""
        phi = []
        a = x
        for i in range(len(self._layers())):
            h = self._block(i, a)
            phi.append(h)
            a = self.activation(h)
        return tuple(phi)

    def vector_field(self, phi, x):
        inputs = (x, *(self.activation(h) for h in phi[:-1]))
        return tuple(self._block(i, a) - h for i, (a, h) in enumerate(zip(inputs, phi)))

    def free_equilibrium(self, x, *, rtol, atol, max_steps, adjoint):
        del rtol, atol, max_steps, adjoint
        phi = jax.vmap(self.forward)(x)
        return phi, jnp.zeros((), jnp.int32)

    def output(self, phi):
        return phi[-1]

    def unit_slopes(self, phi):
        # σ'(h) of every hidden unit (σ acts elementwise), 1 for the readout.
        ones = [jnp.ones_like(h) for h in phi]
        slopes = [jax.jvp(self.activation, (h,), (o,))[1] for h, o in zip(phi, ones)]
        return (*slopes[:-1], ones[-1])

    @property
    def has_feedback(self) -> bool:
        return self.feedback is not None

    def kp_feedback(self, phi, psi):
        # Block l's ψ reaches block l-1 through its own transposed map (a transposed
        # matrix or convolution) with the learned feedback weight in place of the
        # forward weight, then σ'(h_{l-1}).
        if self.feedback is None:
            return super().kp_feedback(phi, psi)
        back = [-p for p in psi]
        feedback = self.feedback
        for i in range(1, len(phi)):
            _, vjp = jax.vjp(
                lambda h, i=i: self._block(i, self.activation(h), feedback[i - 1]),
                phi[i - 1],
            )
            (g,) = vjp(psi[i])
            back[i - 1] = back[i - 1] + g
        return tuple(back)

    def kp_grads(self, grads, phi, psi, decay):
        # The feedback weight of block l follows the block's Hebbian term, which is
        # the least-control update of its forward weight (same shape): the feedback
        # pathway tracks the forward one. The first block reads the input, not the
        # state: it has no feedback weight and no decay.
        if self.feedback is None:
            return super().kp_grads(grads, phi, psi, decay)
        layers, grad_layers = self._layers()[1:], grads._layers()[1:]
        forward = tuple(
            g.weight + decay * m.weight for g, m in zip(grad_layers, layers)
        )
        backward = tuple(
            g.weight + decay * s for g, s in zip(grad_layers, self.feedback)
        )
        grads = eqx.tree_at(
            lambda t: tuple(layer.weight for layer in t._layers()[1:]), grads, forward
        )
        return eqx.tree_at(lambda t: t.feedback, grads, backward)


def _lecun_linear(in_size, out_size, key, dtype):
    # LeCun-normal weights (variance 1/fan-in) and zero biases: the initialisation of
    # the paper's equilibrium networks (`EquilibriumNetwork` draws the same).
    layer = eqx.nn.Linear(in_size, out_size, key=key, dtype=dtype)
    weight = lecun_normal(key, (out_size, in_size), dtype)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias), layer, (weight, jnp.zeros((out_size,), dtype))
    )


class Feedforward(AbstractLayeredNetwork):
    r"""A layered dense network written as an equilibrium network: the feedforward
    model of Table 1 of Meulemans et al. (NeurIPS 2022; `hidden = (256, 256)` is
    their 2 × 256 net).

    `φ = (h_1, …, h_L, y)` with `ḣ_1 = -h_1 + W_1 x + b_1`,
    `ḣ_l = -h_l + W_l σ(h_{l-1}) + b_l` and `ẏ = -y + R σ(h_L) + c`, `σ = tanh`.
    Its free equilibrium is the forward pass, computed layer by layer, so recurrent
    backprop on it is plain backprop. The least-control updates are local:
    `ΔW_l = ψ_l σ(h_{l-1})ᵀ`, `ΔW_1 = ψ_1 xᵀ`, `ΔR = ψ_y σ(h_L)ᵀ`, `Δb_l = ψ_l`.

    **Arguments:**

    - `in_size`, `out_size`: input features and classes.
    - `hidden`: widths of the hidden layers (at least one).
    - `key`: a JAX PRNG key.
    - `activation`: `σ`, elementwise (default `tanh`, as the paper's).
    - `feedback`: if `True`, also create Kolen–Pollack feedback weights, one per layer
        after the first (the readout included) with its forward weight's shape and
        initial distribution, for `LeastControl(variant="kp")`: the error reaches
        layer `l-1` through the transposed feedback weight.
    - `dtype`: the parameters' floating dtype (`None`: JAX's default).

    Weights are LeCun-normal (variance `1/fan-in`), biases zero.
    """

    hidden_layers: tuple[eqx.nn.Linear, ...]
    readout: eqx.nn.Linear
    feedback: tuple[Array, ...] | None
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden: int | tuple[int, ...],
        *,
        key: PRNGKeyArray,
        activation: Callable[[Array], Array] = jnp.tanh,
        feedback: bool = False,
        dtype=None,
    ):
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if (
            len(hidden) < 1
            or any(not isinstance(h, int) or h < 1 for h in hidden)
            or in_size < 1
            or out_size < 1
        ):
            raise ValueError(
                "`Feedforward(in_size, out_size, hidden)` needs positive sizes and at "
                f"least one hidden layer, got in_size={in_size}, hidden={hidden}, "
                f"out_size={out_size}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        self.activation = activation
        sizes = (in_size, *hidden, out_size)
        keys = jax.random.split(key, 2 * len(sizes))
        layers = [
            _lecun_linear(a, b, k, dtype)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        ]
        self.hidden_layers = tuple(layers[:-1])
        self.readout = layers[-1]
        if feedback:
            self.feedback = tuple(
                lecun_normal(k, layer.weight.shape, dtype)
                for layer, k in zip(layers[1:], keys[len(sizes) :])
            )
        else:
            self.feedback = None

    def _layers(self):
        return (*self.hidden_layers, self.readout)

    def _apply(self, i, layer, a):
        return layer(a)

    @property
    def num_hidden(self) -> int:
        return sum(layer.weight.shape[0] for layer in self.hidden_layers)

    @property
    def num_outputs(self) -> int:
        return self.readout.weight.shape[0]
