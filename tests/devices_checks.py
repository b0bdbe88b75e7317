"""Data-parallel checks on several simulated CPU devices, run by `test_devices.py` in
a process of their own (the device count is fixed when JAX starts, and the rest of
the suite runs on one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/devices_checks.py

For every check it compiles one step twice on a mesh of all devices, with the batch
split over them, at a global batch of `B` and of `2B`, and prints one JSON line:
the largest relative difference between the sharded result and the same jitted
function on one device, and the collectives of both compiled programs
(`lcp_solvers.experiments.find_collectives`). `test_devices.py` asserts on them.
"""

import json
import os
import sys

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optimistix as optx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import lcp_solvers as lcp  # noqa: E402
from lcp_solvers import experiments as ex  # noqa: E402


H = 12  # hidden units
D = 6  # input size
B = 8 * 4  # global batch of the first compile (4 per device on 8 devices)


def rel_diff(a, b) -> float:
    la = [np.asarray(x) for x in jtu.tree_leaves(a)]
    lb = [np.asarray(x) for x in jtu.tree_leaves(b)]
    num = max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb))
    den = max(float(np.max(np.abs(y))) for y in lb)
    return num / den


def on_one_device(tree):
    device = jax.devices()[0]
    return jtu.tree_map(
        lambda x: jax.device_put(x, device) if eqx.is_array(x) else x, tree
    )


def deq_params(key):
    kw, ku = jax.random.split(key)
    w = jax.random.normal(kw, (H, H))
    w = 0.7 * w / jnp.linalg.norm(w, ord=2)
    u = jax.random.normal(ku, (H, D)) / jnp.sqrt(D)
    return w, u, jnp.zeros(H)


def cell(z, args):
    (w, u, b), x = args
    return jnp.tanh(w @ z + u @ x + b)


def dropin_step(adjoint):
    def loss(params, x, target):
        def layer(xi):
            solver = optx.FixedPointIteration(rtol=1e-10, atol=1e-10)
            z0 = jnp.zeros(H, xi.dtype)
            return optx.fixed_point(
                cell, solver, z0, (params, xi), adjoint=adjoint, max_steps=1000
            ).value

        return 0.5 * jnp.sum((jax.vmap(layer)(x) - target) ** 2)

    return jax.jit(jax.grad(loss))


def objective_step(solver):
    def f(phi, theta, args):
        return cell(phi, (theta, args[0])) - phi

    def loss(phi, args):
        return 0.5 * jnp.sum((phi[:2] - args[1]) ** 2)

    def total(params, x, target):
        def one(xi, ti):
            value, _ = lcp.least_control_objective(
                f,
                loss,
                params,
                jnp.zeros(H, xi.dtype),
                (xi, ti),
                controller=lcp.DynamicInversion(alpha=1.0),
                solver=solver,
            )
            return value

        return jnp.sum(jax.vmap(one)(x, target))

    return jax.jit(jax.grad(total))


def train_step(rule):
    optim = optax.adam(1e-3)

    def step(model, opt_state, x, labels, key):
        params = eqx.filter(model, eqx.is_inexact_array)
        grads, _, stats = rule(model, rule.init(model, key), x, labels, key)
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, stats["loss"]

    return eqx.filter_jit(step), optim


def collectives(compiled_text):
    return [list(c) for c in ex.find_collectives(compiled_text)]


def report(name, fn, make_args, mesh, out_filter=lambda out: out):
    """Compile `fn` at batch B and 2B on `mesh`; compare with one device at B."""
    record = {"check": name}
    texts = {}
    for batch in (B, 2 * B):
        args = make_args(batch)
        sharded = [
            ex.shard_batch(a, mesh) if kind == "batch" else ex.replicate(a, mesh)
            for kind, a in args
        ]
        lowered = fn.lower(*sharded)
        # `eqx.filter_jit`'s lowering wraps JAX's.
        lowered = getattr(lowered, "lowered", lowered)
        texts[batch] = lowered.compile().as_text()
        if batch == B:
            out_sharded = out_filter(fn(*sharded))
            out_single = out_filter(fn(*[on_one_device(a) for _, a in args]))
            record["rel_diff"] = rel_diff(out_sharded, out_single)
            record["scale"] = max(
                float(jnp.max(jnp.abs(x))) for x in jtu.tree_leaves(out_single)
            )
    record["collectives"] = {str(b): collectives(t) for b, t in texts.items()}
    print(json.dumps(record), flush=True)


def main():
    devices = jax.devices()
    if len(devices) < 2:
        sys.exit(
            "devices_checks.py needs several devices: run it with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    mesh = Mesh(np.array(devices), ("data",))
    key = jax.random.key(0)
    params = deq_params(key)

    def deq_args(batch):
        kx, kt = jax.random.split(jax.random.key(batch))
        x = np.asarray(jax.random.normal(kx, (batch, D)))
        target = np.asarray(0.5 * jax.random.normal(kt, (batch, H)))
        return [("replicated", params), ("batch", x), ("batch", target)]

    def objective_args(batch):
        kx, kt = jax.random.split(jax.random.key(batch))
        x = np.asarray(jax.random.normal(kx, (batch, D)))
        target = np.asarray(0.5 * jax.random.normal(kt, (batch, 2)))
        return [("replicated", params), ("batch", x), ("batch", target)]

    # The detector's control: sorting along the batch must move the batch.
    report(
        "control_sort_over_batch",
        jax.jit(lambda x: jnp.sort(x, axis=0)),
        lambda batch: [("batch", np.arange(batch * H, dtype=float).reshape(batch, H))],
        mesh,
    )
    report(
        "dropin_implicit_adjoint",
        dropin_step(optx.ImplicitAdjoint(linear_solver=lx.GMRES(1e-10, 1e-10))),
        deq_args,
        mesh,
    )
    report(
        "dropin_least_control_adjoint",
        dropin_step(lcp.LeastControlAdjoint(strength=1e-3)),
        deq_args,
        mesh,
    )
    for solver_name, solver in [("imex", lcp.IMEX()), ("default", None)]:
        report(
            f"objective_{solver_name}",
            objective_step(solver),
            objective_args,
            mesh,
        )

    dataset = ex.load_digits(max_train=64, max_test=32)

    def model_args(batch):
        model = ex.EquilibriumNetwork(
            dataset.x_train.shape[1],
            dataset.num_classes,
            16,
            key=jax.random.key(1),
            dtype=jnp.float64,
        )
        xb = np.resize(dataset.x_train, (batch, dataset.x_train.shape[1])).astype(float)
        yb = np.resize(dataset.y_train, (batch,))
        return model, xb, yb

    for rule_name, rule in [
        ("train_step_least_control", ex.LeastControl(variant="di", alpha=10.0)),
        ("train_step_recurrent_backprop", ex.RecurrentBackprop()),
    ]:
        step, optim = train_step(rule)

        def step_args(batch, step_optim=optim):
            model, xb, yb = model_args(batch)
            opt_state = step_optim.init(eqx.filter(model, eqx.is_inexact_array))
            return [
                ("replicated", model),
                ("replicated", opt_state),
                ("batch", xb),
                ("batch", yb),
                ("replicated", jax.random.key(2)),
            ]

        report(
            rule_name,
            step,
            step_args,
            mesh,
            out_filter=lambda out: eqx.filter((out[0], out[2]), eqx.is_inexact_array),
        )

    errors = {}
    try:
        ex.shard_batch(np.zeros((12, 3)), mesh)
    except ValueError as e:
        errors["shard_batch"] = str(e)
    try:
        model, _, _ = model_args(B)
        ex.train_classifier(
            model,
            ex.RecurrentBackprop(),
            dataset,
            epochs=1,
            batch_size=12,
            key=jax.random.key(0),
            mesh=mesh,
        )
    except ValueError as e:
        errors["train_classifier"] = str(e)
    try:
        # 12 training examples: one batch of 12, which does not split over 8.
        model, _, _ = model_args(B)
        ex.train_classifier(
            model,
            ex.RecurrentBackprop(),
            ex.load_digits(max_train=12, max_test=8),
            epochs=1,
            batch_size=B,
            key=jax.random.key(0),
            mesh=mesh,
        )
    except ValueError as e:
        errors["train_classifier_small_set"] = str(e)
    keys = jax.random.split(jax.random.key(0), 16)
    sharded_keys = ex.shard_batch(keys, mesh)
    errors["keys_split_over"] = len(sharded_keys.sharding.device_set)
    errors["keys_equal"] = bool(
        np.array_equal(
            np.asarray(jax.random.key_data(sharded_keys)),
            np.asarray(jax.random.key_data(keys)),
        )
    )
    print(json.dumps({"check": "errors", **errors}), flush=True)

    # The whole training loop: one epoch on the mesh against one device.
    histories = {}
    models = {}
    for where in ("mesh", "one device"):
        model, _, _ = model_args(B)
        models[where], histories[where] = ex.train_classifier(
            model,
            ex.LeastControl(variant="di", alpha=10.0),
            dataset,
            epochs=1,
            batch_size=B,
            key=jax.random.key(3),
            mesh=mesh if where == "mesh" else None,
        )
    print(
        json.dumps(
            {
                "check": "train_classifier",
                "rel_diff": rel_diff(
                    eqx.filter(models["mesh"], eqx.is_inexact_array),
                    eqx.filter(models["one device"], eqx.is_inexact_array),
                ),
                "accuracy": [histories[w]["test_accuracy"] for w in histories],
                "replicated": bool(models["mesh"].W.sharding.is_fully_replicated),
                "devices": len(models["mesh"].W.sharding.device_set),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
