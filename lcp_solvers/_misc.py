import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, PyTree


def tree_allfinite(tree: PyTree[Array]) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return jnp.array(True) if not leaves else jnp.stack(leaves).all()


def tree_rms(tree: PyTree[Array], per_sample: bool = False) -> Array:
    """`optx.rms_norm` of a pytree; with `per_sample=True`, one value per index of
    every leaf's leading axis."""
    if not per_sample:
        return optx.rms_norm(tree)
    leaves = jtu.tree_leaves(tree)
    size = sum(x[0].size for x in leaves)
    sq = sum(
        jnp.sum(jnp.square(jnp.abs(x)).reshape(x.shape[0], -1), axis=1) for x in leaves
    )
    return jnp.sqrt(sq / size)


def theta_vjp(f_of_theta, theta: PyTree, cotangent: PyTree[Array]) -> PyTree:
    """`(∂_θ f)ᵀ cotangent` with the structure of `theta`: the local learning rule
    `-(∂_θ f)ᵀψ` for `cotangent = -ψ`. `None` where `theta` has no inexact array."""
    diff_theta, static_theta = eqx.partition(theta, eqx.is_inexact_array)
    _, vjp = jax.vjp(lambda d: f_of_theta(eqx.combine(d, static_theta)), diff_theta)
    (theta_bar,) = vjp(cotangent)
    return eqx.combine(theta_bar, jtu.tree_map(lambda _: None, static_theta))


def tree_scale(tree: PyTree[Array], s) -> PyTree[Array]:
    """Multiplies every leaf by `s`: a scalar, or one value per index of the leading
    axis."""

    def scale(x):
        factor = jnp.reshape(s, jnp.shape(s) + (1,) * (x.ndim - jnp.ndim(s)))
        return (factor * x).astype(x.dtype)

    return jtu.tree_map(scale, tree)


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
