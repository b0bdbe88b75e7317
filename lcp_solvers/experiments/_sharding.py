"""Data parallelism on a `jax.sharding.Mesh`: a batch split over the mesh's devices,
everything else replicated, and a check of a compiled step for communication that
grows with the batch (docs/devices.md)."""

import math
import re
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import ArrayLike, PyTree


def check_jax_version(where: str) -> None:
    """Raises `RuntimeError` below jax 0.10, where a sharded `jit` through any
    optimistix adjoint fails at trace time (docs/devices.md)."""
    version = tuple(int(p) for p in jax.__version__.split(".")[:2])
    if version < (0, 10):
        raise RuntimeError(
            f"`{where}`: data parallelism needs jax >= 0.10 (found {jax.__version__}): "
            "older versions reject sharded batches through optimistix's adjoints. "
            "Upgrade jax, or pass `mesh=None`."
        )


def check_batch_size(mesh: Mesh, batch_size: int, where: str) -> None:
    """Raises `ValueError` unless `batch_size` splits evenly over `mesh`."""
    if batch_size % mesh.size:
        raise ValueError(
            f"`{where}`: a batch of {batch_size} examples does not split evenly "
            f"over the {mesh.size} devices of `mesh`. Use a `batch_size` (and a "
            f"training set of at least one batch) that is a multiple of {mesh.size}."
        )


def shard_batch(batch: PyTree[ArrayLike], mesh: Mesh) -> PyTree[jax.Array]:
    """Places a batch on `mesh` split along its leading (example) axis over all of the
    mesh's axes (`PartitionSpec(mesh.axis_names)`).

    Every leaf's leading axis must be a multiple of `mesh.size`. With several
    processes (`jax.distributed.initialize`) every process passes the same global
    batch (e.g. drawn with the same key) and keeps only the rows of its own devices.

    **Raises:** `ValueError` if a leading axis does not split evenly over the mesh.
    """
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))

    def put(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            # Typed keys (`jax.random.key`) have no NumPy form: move their data.
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % mesh.size:
            raise ValueError(
                f"`shard_batch`: an array of shape {x.shape} cannot be split along its "
                f"first axis over the {mesh.size} devices of `mesh`; give every leaf "
                f"a leading (batch) axis that is a multiple of {mesh.size}."
            )
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every array of `tree` (a model, an optimiser state) on every device of
    `mesh`; non-array leaves are left as they are."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    arrays = jax.device_put(arrays, NamedSharding(mesh, PartitionSpec()))
    return eqx.combine(arrays, static)


class Collective(NamedTuple):
    """One cross-device operation of a compiled program: its HLO opcode (e.g.
    `"all-gather"`), the shapes of its result(s) on one device, and their total
    number of elements."""

    op: str
    shape: str
    size: int


_OPS = "all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter"
_INSTRUCTION = re.compile(rf"%\S+\s*=\s*(.*?)\s({_OPS})(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def find_collectives(hlo_text: str) -> list[Collective]:
    """The collectives of a compiled program's HLO text, e.g.
    `jax.jit(step).lower(*args).compile().as_text()`, in program order.

    Shapes are per device (the program is already partitioned). To find the
    communication that grows with the batch, compile the step at two batch sizes and
    compare: a data-parallel step has the same collectives at both, all-reduces of
    parameter-sized or scalar arrays. For an asynchronous pair (`all-gather-start` /
    `-done`) the start is reported.
    """
    out = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if match is None:
            continue
        types, op = match.groups()
        arrays = _ARRAY.findall(types)
        sizes = [math.prod(int(d) for d in dims.split(",") if d) for _, dims in arrays]
        shape = ", ".join(f"{dtype}[{dims}]" for dtype, dims in arrays)
        out.append(Collective(op, shape, sum(sizes)))
    return out
