"""The convolutional networks of Table 2 of Meulemans et al. (NeurIPS 2022): a
layered convolutional network and a convolutional deep equilibrium model."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray

import lcp_solvers as lcp

from ._layered import AbstractLayeredNetwork
from ._model import AbstractEquilibriumModel


def _check_image_shape(in_shape, name):
    if len(in_shape) != 3 or any(int(s) < 1 for s in in_shape):
        raise ValueError(
            f"`{name}(in_shape=...)` is one image's `(channels, height, width)`, "
            f"got {in_shape}."
        )


def _check_sizes(sizes, what, name):
    if len(sizes) < 1 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(
            f"`{name}({what}=...)` must be a non-empty tuple of positive ints, "
            f"got {sizes}."
        )


def _conv_stack(convs, pool, x):
    # The convolutional blocks' output for one image (to size the first dense block);
    # the activation does not change shapes.
    h = pool(convs[0](x))
    for conv in convs[1:]:
        h = conv(h)
    return h


def _like(weight, key):
    # A fresh draw from equinox's default initialisation of a weight of this shape
    # (uniform in ±1/√fan_in).
    fan_in = weight[0].size
    bound = 1 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, weight.shape, weight.dtype, -bound, bound)


class ConvFeedforward(AbstractLayeredNetwork):
    r"""A layered convolutional network written as an equilibrium network: the
    convolutional feedforward model of Table 2 of Meulemans et al. (NeurIPS 2022).

    The state holds every block's pre-activation and the output units,
    `φ = (h_1, …, h_L, y)`, with `ḣ_l = -h_l + F_l(σ(h_{l-1}))` (`h_0 = x`, no
    activation on the input) and `ẏ = -y + R σ(h_L) + c`. The blocks are

    1. an encoder: a `kernel_size` convolution (stride 1, same padding) followed by a
       2x2 max-pool, `channels[0]` channels;
    2. one `kernel_size` convolution of stride 2 per further entry of `channels`;
    3. one dense layer per entry of `dense` (the first flattens its input);

    then the linear readout. Its free equilibrium is the forward pass, computed
    block by block (no solver, no dense matrices), so backprop through it is plain
    backprop. The least-control update `-(∂_θ f)ᵀψ` of block `l` is that block's
    own weight gradient with `ψ_l` as the output error: local to the block.

    **Arguments:**

    - `in_shape`: one image's `(channels, height, width)`, e.g. `(3, 32, 32)`.
    - `num_classes`: the number of output units.
    - `channels`: output channels of the encoder and of each stride-2 convolution.
    - `dense`: widths of the dense blocks.
    - `kernel_size`: of every convolution (odd; the paper's is 5).
    - `key`: a JAX PRNG key.
    - `activation`: `σ`. The default is GELU, not the paper's ReLU: the controlled
        dynamics of dynamic inversion carry `σ'(h)`, which for ReLU jumps as a unit
        crosses zero under control, and the controlled solve then cycles instead
        of converging (at initialisation on digits, 23% of examples converged within
        512 steps with ReLU, 100% within 8 with GELU; docs/results.md).
    - `feedback`: if `True`, also create Kolen–Pollack feedback weights, one per
        block after the encoder with its forward weight's shape, for
        `LeastControl(variant="kp")`: the error reaches each block through a
        transposed convolution (or transposed matrix) with the feedback weight.
    - `dtype`: the parameters' floating dtype (`None`: JAX's default).
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    pool: eqx.nn.MaxPool2d
    denses: tuple[eqx.nn.Linear, ...]
    readout: eqx.nn.Linear
    feedback: tuple[Array, ...] | None
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, ...] = (32, 64),
        dense: tuple[int, ...] = (256, 256),
        kernel_size: int = 5,
        *,
        key: PRNGKeyArray,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        feedback: bool = False,
        dtype=None,
    ):
        _check_image_shape(in_shape, "ConvFeedforward")
        _check_sizes(tuple(channels), "channels", "ConvFeedforward")
        _check_sizes(tuple(dense), "dense", "ConvFeedforward")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"`ConvFeedforward(kernel_size=...)` must be odd, got {kernel_size}."
            )
        self.activation = activation
        c, height, width = in_shape
        if height < 2 or width < 2:
            raise ValueError(
                "`ConvFeedforward` max-pools its input 2x2: images must be at least "
                f"2x2, got in_shape={in_shape}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        keys = iter(jax.random.split(key, 2 * (len(channels) + len(dense)) + 1))
        pad = kernel_size // 2
        convs = []
        for i, out in enumerate(channels):
            convs.append(
                eqx.nn.Conv2d(
                    c,
                    out,
                    kernel_size,
                    stride=1 if i == 0 else 2,
                    padding=pad,
                    key=next(keys),
                    dtype=dtype,
                )
            )
            c = out
        self.convs = tuple(convs)
        self.pool = eqx.nn.MaxPool2d(2, stride=2)
        flat = jax.eval_shape(
            lambda x: _conv_stack(self.convs, self.pool, x),
            jax.ShapeDtypeStruct(tuple(in_shape), dtype),
        )
        size = flat.size
        denses = []
        for out in dense:
            denses.append(eqx.nn.Linear(size, out, key=next(keys), dtype=dtype))
            size = out
        self.denses = tuple(denses)
        self.readout = eqx.nn.Linear(size, num_classes, key=next(keys), dtype=dtype)
        if feedback:
            # One feedback weight per block that reads the state (all but the
            # encoder), of its forward weight's shape and initial distribution.
            self.feedback = tuple(
                _like(layer.weight, next(keys)) for layer in self._layers()[1:]
            )
        else:
            self.feedback = None

    def _layers(self):
        return (*self.convs, *self.denses, self.readout)

    def _apply(self, i, layer, a):
        if i == 0:
            return self.pool(layer(a))
        if i < len(self.convs):
            return layer(a)
        return layer(jnp.ravel(a))


class ConvDEQCell(eqx.Module):
    r"""The residual convolutional cell of the convolutional DEQ,

    $$z \mapsto \mathrm{GN}(σ(z + \mathrm{GN}(x + \mathrm{conv}_2(
    \mathrm{GN}(σ(\mathrm{conv}_1 z))))))$$

    with group normalisation `GN` (Bai, Koltun & Kolter, "Multiscale deep equilibrium
    models", 2020; the conv DEQ of Meulemans et al., 2022, with `σ = ReLU`). `z` and
    the injected input `x` have `channels` channels; `conv₁` expands to `hidden`
    channels, both convolutions `kernel_size` with same padding. `σ` defaults to
    GELU, for the reason given at [`lcp_solvers.experiments.ConvFeedforward`][].
    """

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    norm2: eqx.nn.GroupNorm
    norm3: eqx.nn.GroupNorm
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        hidden: int,
        groups: int,
        kernel_size: int = 3,
        *,
        key: PRNGKeyArray,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        dtype=None,
    ):
        self.activation = activation
        k1, k2 = jax.random.split(key)
        pad = kernel_size // 2
        self.conv1 = eqx.nn.Conv2d(
            channels, hidden, kernel_size, padding=pad, key=k1, dtype=dtype
        )
        self.conv2 = eqx.nn.Conv2d(
            hidden, channels, kernel_size, padding=pad, key=k2, dtype=dtype
        )
        self.norm1 = eqx.nn.GroupNorm(groups, hidden, dtype=dtype)
        self.norm2 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)
        self.norm3 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)

    def __call__(self, z, x):
        inner = self.norm1(self.activation(self.conv1(z)))
        return self.norm3(self.activation(z + self.norm2(x + self.conv2(inner))))


class ConvDEQ(AbstractEquilibriumModel):
    r"""A convolutional deep equilibrium classifier: the convolutional equilibrium
    model of Table 2 of Meulemans et al. (NeurIPS 2022).

    An encoder `x̃ = GN(conv(x))` injects the image into the
    [`lcp_solvers.experiments.ConvDEQCell`][]; the state is `φ = (z, y)` with

    $$\dot z = \mathrm{cell}(z, x̃) - z,\qquad
    \dot y = R\,\mathrm{pool}(z) + c - y,$$

    a linear readout of the equilibrium average-pooled to a small grid
    (`lcp.with_readout`'s form). The free equilibrium solves `z = cell(z, x̃)` per
    image with [`lcp_solvers.DEQ`][] (Anderson acceleration), whose backward pass is the
    `adjoint` it is given: `optx.ImplicitAdjoint` (recurrent backprop) or
    [`lcp_solvers.LeastControlAdjoint`][] (the drop-in). The full principle trains
    the encoder, the cell and the readout from `vector_field`.

    **Arguments:**

    - `in_shape`: one image's `(channels, height, width)`.
    - `num_classes`: the number of output units.
    - `channels`: channels of the state `z` (and of the injected input).
    - `hidden`: channels inside the cell (after `conv₁`).
    - `groups`: groups of every group normalisation (must divide `channels` and
        `hidden`).
    - `kernel_size`: of every convolution (odd).
    - `key`: a JAX PRNG key.
    - `activation`: `σ` of the cell (default GELU; see the cell).
    - `readout_grid`: the readout sees `z` average-pooled to this many cells per
        side (it must divide the height and width): 4 keeps 16 values per channel
        (one global average, `1`, leaves 8x8 digits too little to classify).
    - `jacobian_penalty`: `γ` of the Jacobian regularisation of Bai, Koltun &
        Kolter (ICML 2021): every update rule adds the gradient of
        `γ‖∂cell/∂z‖_F² / size(z)` at the free equilibrium (a one-probe Hutchinson
        estimate, [`lcp_solvers.DEQ.jacobian_penalty`][]) to its update (divided
        by `alpha` for [`lcp_solvers.experiments.LeastControl`][], whose update is
        about the gradient divided by `alpha`), which keeps the cell contracting
        while it trains. `0` (default) adds nothing.
    - `cell_init_scale`: the cell's convolution weights start at this multiple of
        equinox's default initialisation. Small, as multiscale DEQs initialise their
        cells, so that the cell starts as a contraction: on digits with 8 channels
        the estimated `‖∂cell/∂z‖₂` at the equilibrium is 0.82 (median) at 0.1 and
        1.19 at 1, and Anderson needs 14 steps instead of 57 (some samples hit 256).
    - `dtype`: the parameters' floating dtype (`None`: JAX's default).
    """

    encoder: eqx.nn.Conv2d
    encoder_norm: eqx.nn.GroupNorm
    cell: ConvDEQCell
    readout: eqx.nn.Linear
    readout_grid: int = eqx.field(static=True)
    jacobian_penalty: float = eqx.field(static=True)

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: int = 48,
        hidden: int = 64,
        groups: int = 8,
        kernel_size: int = 3,
        *,
        key: PRNGKeyArray,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        cell_init_scale: float = 0.1,
        readout_grid: int = 4,
        jacobian_penalty: float = 0.0,
        dtype=None,
    ):
        _check_image_shape(in_shape, "ConvDEQ")
        if readout_grid < 1 or in_shape[1] % readout_grid or in_shape[2] % readout_grid:
            raise ValueError(
                f"`ConvDEQ(readout_grid={readout_grid})` must divide the image's "
                f"height and width, got in_shape={in_shape}."
            )
        self.readout_grid = readout_grid
        if not jacobian_penalty >= 0:
            raise ValueError(
                "`ConvDEQ(jacobian_penalty=...)` must be non-negative, got "
                f"{jacobian_penalty}."
            )
        self.jacobian_penalty = jacobian_penalty
        _check_sizes((channels, hidden, groups), "channels/hidden/groups", "ConvDEQ")
        if channels % groups or hidden % groups:
            raise ValueError(
                f"`ConvDEQ(groups={groups})` must divide `channels` ({channels}) and "
                f"`hidden` ({hidden})."
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"`ConvDEQ(kernel_size=...)` must be odd, got {kernel_size}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        k_enc, k_cell, k_out = jax.random.split(key, 3)
        self.encoder = eqx.nn.Conv2d(
            in_shape[0],
            channels,
            kernel_size,
            padding=kernel_size // 2,
            key=k_enc,
            dtype=dtype,
        )
        self.encoder_norm = eqx.nn.GroupNorm(groups, channels, dtype=dtype)
        cell = ConvDEQCell(
            channels,
            hidden,
            groups,
            kernel_size,
            key=k_cell,
            activation=activation,
            dtype=dtype,
        )
        self.cell = eqx.tree_at(
            lambda c: (c.conv1.weight, c.conv2.weight),
            cell,
            replace_fn=lambda w: cell_init_scale * w,
        )
        self.readout = eqx.nn.Linear(
            channels * readout_grid**2, num_classes, key=k_out, dtype=dtype
        )

    def inject(self, x: Float[Array, "c h w"]) -> Float[Array, "channels h w"]:
        """The encoded input `x̃` the cell receives."""
        return self.encoder_norm(self.encoder(x))

    def head(self, z: Float[Array, "channels h w"]) -> Float[Array, " classes"]:
        """The readout `R pool(z) + c`, `pool` averaging `z` down to a
        `readout_grid x readout_grid` map per channel."""
        c, height, width = z.shape
        g = self.readout_grid
        pooled = z.reshape(c, g, height // g, g, width // g).mean(axis=(2, 4))
        return self.readout(jnp.ravel(pooled))

    def vector_field(self, phi, x):
        z, y = phi
        return self.cell(z, self.inject(x)) - z, self.head(z) - y

    def deq(self, adjoint: optx.AbstractAdjoint, *, rtol, atol, max_steps):
        """The layer `z* = cell(z*, x̃)` as an [`lcp_solvers.DEQ`][] with this
        backward pass (zero initial state, Anderson acceleration)."""
        return lcp.DEQ(
            self.cell,
            z0=jnp.zeros_like,
            solver=lcp.AndersonAcceleration(rtol=rtol, atol=atol),
            adjoint=adjoint,
            max_steps=max_steps,
            throw=False,
        )

    def free_equilibrium(self, x, *, rtol, atol, max_steps, adjoint):
        deq = self.deq(adjoint, rtol=rtol, atol=atol, max_steps=max_steps)
        z, stats = jax.vmap(deq.solve)(jax.vmap(self.inject)(x))
        return (z, jax.vmap(self.head)(z)), jnp.mean(stats.num_steps)

    def output(self, phi):
        return phi[1]

    def regulariser(self, phi, x, key):
        if self.jacobian_penalty == 0:
            return None
        z, _ = phi
        deq = lcp.DEQ(self.cell, z0=jnp.zeros_like)
        penalty = deq.jacobian_penalty(z, self.inject(x), key)
        return self.jacobian_penalty * penalty / z.size
