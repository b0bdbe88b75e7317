import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar


def tree_allfinite(tree: PyTree[Array]) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return jnp.array(True) if not leaves else jnp.stack(leaves).all()


def tree_rms(tree: PyTree[Array]) -> Scalar:
    """Root-mean-square over every element of a pytree (0 for an empty tree)."""
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        return jnp.array(0.0)
    size = sum(x.size for x in leaves)
    sq = sum(jnp.sum(jnp.square(jnp.abs(x))) for x in leaves)
    # `jnp.sqrt` has an infinite derivative at 0; nothing differentiates this, but keep
    # the value exact for the all-zero cotangent that `LeastControlAdjoint` short-cuts.
    return jnp.sqrt(sq / size)


def tree_scale(tree: PyTree[Array], s) -> PyTree[Array]:
    return jtu.tree_map(lambda x: (s * x).astype(x.dtype), tree)


def tree_add(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.add, a, b)


def tree_sub(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.subtract, a, b)


def structure_of(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jax.eval_shape(lambda: tree)
