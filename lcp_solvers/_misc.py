import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def tree_allfinite(tree: PyTree[Array]) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return jnp.array(True) if not leaves else jnp.stack(leaves).all()


def tree_rms(tree: PyTree[Array]) -> Array:
    """The root-mean-square of a pytree's entries (real, in the leaves' real dtype).

    Computed as `m·rms(x/m)` with `m = max|x|`, so that it neither overflows (a
    float32 cotangent of order 1e20 squares past the largest float32) nor
    underflows."""
    leaves = [jnp.abs(x).reshape(-1) for x in jtu.tree_leaves(tree)]
    if not leaves:
        return jnp.array(0.0)
    size = sum(x.size for x in leaves)
    dtype = jnp.result_type(*leaves)
    leaves = [x.astype(dtype) for x in leaves]
    m = jnp.max(jnp.stack([jnp.max(x) for x in leaves]))
    safe_m = jnp.where(m > 0, m, 1)
    sq = sum(jnp.sum(jnp.square(x / safe_m)) for x in leaves)
    return jnp.where(m > 0, safe_m * jnp.sqrt(sq / size), m)


def theta_vjp(f_of_theta, theta: PyTree, cotangent: PyTree[Array]) -> PyTree:
    """`(∂_θ f)ᵀ cotangent` with the structure of `theta`: the local learning rule
    `-(∂_θ f)ᵀψ` for `cotangent = -ψ`. `None` where `theta` has no inexact array."""
    diff_theta, static_theta = eqx.partition(theta, eqx.is_inexact_array)
    _, vjp = jax.vjp(lambda d: f_of_theta(eqx.combine(d, static_theta)), diff_theta)
    (theta_bar,) = vjp(cotangent)
    return eqx.combine(theta_bar, jtu.tree_map(lambda _: None, static_theta))


def tree_scale(tree: PyTree[Array], s) -> PyTree[Array]:
    """Multiplies every leaf by the scalar `s`."""
    # Cast first: under strict dtype promotion a real factor may not meet a complex
    # (or lower-precision) leaf.
    return jtu.tree_map(lambda x: jnp.asarray(s).astype(x.dtype) * x, tree)


def tree_error_if(tree: PyTree, pred, index, messages: list[str]) -> PyTree:
    """`eqx.branched_error_if(tree, pred, index, messages)`, with the check carried by
    a scalar that is added (as zero) to every inexact leaf of `tree`.

    The check is a conditional whose error branch is a host callback, which XLA's
    SPMD partitioner places on one device: a sharded `tree` passed through it would be
    gathered onto that device at every call. A scalar costs nothing to move, and the
    data dependency keeps the check from being optimised away."""
    inexact = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    if not inexact:
        return eqx.branched_error_if(tree, pred, index, messages)
    token = eqx.branched_error_if(
        jnp.zeros((), inexact[0].dtype), pred, index, messages
    )
    return jtu.tree_map(
        lambda x: x + token.astype(x.dtype) if eqx.is_inexact_array(x) else x, tree
    )


def tree_sub(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.subtract, a, b)


def structure_of(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jax.eval_shape(lambda: tree)


def is_none(x) -> bool:
    return x is None


def tree_float_dtype(tree: PyTree) -> jnp.dtype:
    """The promoted dtype of a pytree's inexact arrays (the default float if none)."""
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


# Argument checks shared by the entry points, so that one bad value gets one message
# everywhere. Python numbers only: arrays are checked where they are used (under jit).


def check_count(
    value, where: str, name: str, *, minimum: int = 1, none_means: str | None = None
):
    """An int argument (a number of steps, samples, ...) of at least `minimum`;
    `None` is accepted when `none_means` says what it means."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int of at least {minimum}"
        none = f" or None ({none_means})" if none_means is not None else ""
        raise ValueError(f"`{where}({name}=...)` must be {kind}{none}, got {value!r}.")


def check_max_steps(max_steps, where: str, *, allow_none: bool = False):
    check_count(
        max_steps, where, "max_steps", none_means="no limit" if allow_none else None
    )


def check_tolerances(rtol, atol, where: str):
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None or not isinstance(value, (int, float)):
            continue
        if isinstance(value, bool) or not (value >= 0 and math.isfinite(value)):
            raise ValueError(
                f"`{where}({name}=...)` must be a non-negative finite number (or "
                f"None for the default), got {value!r}."
            )
    if isinstance(rtol, (int, float)) and isinstance(atol, (int, float)):
        if rtol == 0 and atol == 0:
            raise ValueError(
                f"`{where}`: `rtol` and `atol` are both 0, a test no solve can pass; "
                "give at least one a positive value."
            )


def check_positive(value, where: str, name: str):
    if isinstance(value, (int, float)) and not (
        not isinstance(value, bool) and value > 0 and math.isfinite(value)
    ):
        raise ValueError(
            f"`{where}({name}=...)` must be positive and finite, got {value!r}."
        )
