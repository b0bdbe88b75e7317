"""The convolutional networks of Table 2 against computations that do not use them:
`jax.lax` convolutions written out, dense implicit-function gradients, per-example
least-control updates."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import lcp_solvers as lcp
from lcp_solvers.experiments import (
    ConvDEQ,
    ConvFeedforward,
    cross_entropy,
    LeastControl,
    LeastControlDropIn,
    RecurrentBackprop,
)

from .helpers import assert_tree_close, tree_rel_error


def _images(key, n=3, shape=(2, 8, 8), c=4):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, *shape)), jax.random.randint(ky, (n,), 0, c)


def _ff(**kw):
    return ConvFeedforward(
        (2, 8, 8), 4, channels=(3, 4), dense=(6, 5), kernel_size=3,
        key=jax.random.key(0), **kw,
    )  # fmt: skip


def _deq(**kw):
    return ConvDEQ(
        (2, 4, 4), 3, channels=4, hidden=4, groups=2, key=jax.random.key(1), **kw
    )


def _conv(x, conv, stride):
    # An equinox Conv2d written out with `jax.lax` (NCHW, OIHW, symmetric padding).
    pad = conv.weight.shape[-1] // 2
    y = jax.lax.conv_general_dilated(
        x[None], conv.weight, (stride, stride), [(pad, pad), (pad, pad)]
    )[0]
    return y + conv.bias


def _ff_logits_by_hand(model, x):
    a = _conv(x, model.convs[0], 1)
    a = jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 2, 2), (1, 2, 2), "VALID")
    for conv in model.convs[1:]:
        a = _conv(jax.nn.gelu(a), conv, 2)
    a = jnp.ravel(a)
    for layer in (*model.denses, model.readout):
        a = layer.weight @ jax.nn.gelu(a) + layer.bias
    return a


def test_conv_ff_free_equilibrium_is_the_forward_pass_and_bp_is_backprop():
    model = _ff()
    x, labels = _images(jax.random.key(2))
    phi, steps = model.free_equilibrium(
        x, rtol=0.0, atol=0.0, max_steps=1, adjoint=None
    )
    assert int(steps) == 0
    velocity = jax.vmap(model.vector_field)(phi, x)
    for v in jtu.tree_leaves(velocity):
        np.testing.assert_allclose(v, 0, atol=1e-14)
    logits = jax.vmap(lambda xi: _ff_logits_by_hand(model, xi))(x)
    np.testing.assert_allclose(jax.vmap(model.output)(phi), logits, rtol=1e-12)

    def loss(m):
        out = jax.vmap(lambda xi: _ff_logits_by_hand(m, xi))(x)
        return jnp.mean(jax.vmap(cross_entropy)(out, labels))

    params, static = eqx.partition(model, eqx.is_inexact_array)
    expected = jax.grad(lambda p: loss(eqx.combine(p, static)))(params)
    grads, _, stats = RecurrentBackprop()(model, None, x, labels, jax.random.key(0))
    assert_tree_close(grads, expected, 1e-12)
    assert float(stats["steps"]) == 0.0


def _per_example_mean(model, x, labels, alpha):
    # The least-control update of each example on its own (lcp.least_control_grad
    # forms it), averaged: what the rule's single batched product must equal.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    phi0, _ = model.free_equilibrium(
        x, rtol=1e-12, atol=1e-12, max_steps=512, adjoint=None
    )

    def one(p0, xi, li):
        grads, info = lcp.least_control_grad(
            lambda phi, t, a: eqx.combine(t, static).vector_field(phi, a),
            lambda phi, a: cross_entropy(model.output(phi), li),
            params,
            p0,
            xi,
            controller=lcp.DynamicInversion(alpha=alpha),
            solver=lcp.IMEX(solver=lcp.AndersonAcceleration(rtol=1e-12, atol=1e-12)),
            max_steps=512,
        )
        return grads

    return jtu.tree_map(lambda g: jnp.mean(g, axis=0), jax.vmap(one)(phi0, x, labels))


@pytest.mark.parametrize("model", [_ff, _deq], ids=["conv-ff", "conv-deq"])
@pytest.mark.slow
def test_batched_update_equals_mean_of_per_example_updates(model):
    model = model()
    shape = (2, 8, 8) if isinstance(model, ConvFeedforward) else (2, 4, 4)
    x, labels = _images(jax.random.key(3), shape=shape, c=3)
    rule = LeastControl(alpha=1.0, rtol=1e-12, atol=1e-12, max_steps=512)
    grads, _, stats = rule(model, None, x, labels, jax.random.key(0))
    assert float(stats["ok"]) == 1.0
    expected = _per_example_mean(model, x, labels, 1.0)
    assert_tree_close(grads, expected, 1e-9)


def _deq_gradient_by_dense_ift(model, x, labels):
    # The implicit-function-theorem gradient with dense Jacobians: z* by Newton on
    # the flattened state, then (I - ∂cell/∂z)ᵀ v = ∂L/∂z, grad = (∂cell/∂θ)ᵀ v plus
    # the readout's own gradient.
    def one(m, xi, li):
        u = m.inject(xi)
        z = jnp.zeros_like(u)
        g = lambda z: m.cell(z, u) - z  # noqa: E731
        for _ in range(40):
            jac = jax.jacobian(g)(z).reshape(z.size, z.size)
            z = z - jnp.linalg.solve(jac, g(z).ravel()).reshape(z.shape)
        z = jax.lax.stop_gradient(z)
        jac = jax.jacobian(g)(z).reshape(z.size, z.size)
        dl_dz = jax.grad(lambda z: cross_entropy(m.head(z), li))(z).ravel()
        v = jnp.linalg.solve(-jac.T, dl_dz).reshape(z.shape)

        def surrogate(p):
            # d/dθ of ⟨v, cell(z*, x̃(θ))⟩ + L(head(z*)) at fixed z*, v.
            mm = eqx.combine(p, rest)
            return jnp.sum(v * mm.cell(z, mm.inject(xi))) + cross_entropy(
                mm.head(z), li
            )

        p, rest = eqx.partition(m, eqx.is_inexact_array)
        return jax.grad(surrogate)(p)

    params, static = eqx.partition(model, eqx.is_inexact_array)
    grads = jax.vmap(
        lambda xi, li: eqx.filter(
            one(eqx.combine(params, static), xi, li), eqx.is_inexact_array
        )
    )(x, labels)
    return jtu.tree_map(lambda g: jnp.mean(g, axis=0), grads)


@pytest.mark.slow
def test_conv_deq_gradients_against_dense_implicit_differentiation():
    model = _deq()
    x, labels = _images(jax.random.key(4), shape=(2, 4, 4), c=3)
    expected = _deq_gradient_by_dense_ift(model, x, labels)
    rbp, _, _ = RecurrentBackprop(rtol=1e-11, atol=1e-11)(
        model, None, x, labels, jax.random.key(0)
    )
    assert_tree_close(rbp, expected, 1e-7)
    # The drop-in differs from the implicit gradient by O(strength) and the full
    # principle by O(1/alpha): first-order in both, measured 1.7e-2 at the default
    # strength 1e-3 and 1.7e-4 at alpha = 1e4.
    errors = []
    for strength in (1e-3, 1e-4):
        dropin, _, _ = LeastControlDropIn(
            adjoint=lcp.LeastControlAdjoint(strength=strength), rtol=1e-11, atol=1e-11
        )(model, None, x, labels, jax.random.key(0))
        errors.append(tree_rel_error(dropin, expected))
    assert errors[1] < 3e-3
    assert 8 < errors[0] / errors[1] < 12
    alpha = 1e4
    full, _, stats = LeastControl(alpha=alpha, rtol=1e-10, atol=1e-10, max_steps=4096)(
        model, None, x, labels, jax.random.key(0)
    )
    assert float(stats["ok"]) == 1.0
    assert_tree_close(jtu.tree_map(lambda g: alpha * g, full), expected, 3e-4)


@pytest.mark.slow
def test_conv_ff_weak_control_recovers_backprop():
    model = _ff()
    x, labels = _images(jax.random.key(5))
    bp, _, _ = RecurrentBackprop()(model, None, x, labels, jax.random.key(0))
    alpha = 1e4
    lcp_grads, _, stats = LeastControl(alpha=alpha, rtol=1e-12, atol=1e-12)(
        model, None, x, labels, jax.random.key(0)
    )
    assert float(stats["ok"]) == 1.0
    assert_tree_close(jtu.tree_map(lambda g: alpha * g, lcp_grads), bp, 1e-3)


def test_jacobian_penalty_is_hutchinson_for_the_frobenius_norm():
    model = _deq(jacobian_penalty=3.0)
    x, _ = _images(jax.random.key(9), n=1, shape=(2, 4, 4))
    z = jax.random.normal(jax.random.key(10), (4, 4, 4))
    phi = (z, jnp.zeros(3))
    u = model.inject(x[0])
    jac = jax.jacobian(lambda z: model.cell(z, u))(z).reshape(z.size, z.size)
    exact = 3.0 * jnp.sum(jac**2) / z.size
    keys = jax.random.split(jax.random.key(11), 4000)
    samples = jax.vmap(lambda k: model.regulariser(phi, x[0], k))(keys)
    # Gaussian probes: the standard error of the mean is about 1.5% here.
    np.testing.assert_allclose(jnp.mean(samples), exact, rtol=0.05)
    assert _deq().regulariser(phi, x[0], keys[0]) is None


@pytest.mark.slow
def test_every_rule_adds_the_same_regulariser_gradient():
    # The difference a penalty makes to each rule's update is the same term,
    # divided by alpha for least control (its update is about gradient / alpha).
    x, labels = _images(jax.random.key(12), shape=(2, 4, 4), c=3)
    key = jax.random.key(13)
    alpha = 2.0
    rules = (
        RecurrentBackprop(rtol=1e-10, atol=1e-10),
        LeastControlDropIn(rtol=1e-10, atol=1e-10),
        LeastControl(alpha=alpha, rtol=1e-10, atol=1e-10),
    )
    differences = []
    for rule in rules:
        plain, _, _ = rule(_deq(), None, x, labels, key)
        with_penalty, _, _ = rule(_deq(jacobian_penalty=5.0), None, x, labels, key)
        # (Leaves only: the penalty is a static field, so the trees differ.)
        differences.append(
            [
                a - b
                for a, b in zip(jtu.tree_leaves(with_penalty), jtu.tree_leaves(plain))
            ]
        )
    assert_tree_close(differences[1], differences[0], 1e-6)
    # LeastControl evaluates it at its free equilibrium, solved to 1e-5 whatever
    # the rule's own tolerance: that is the error here.
    scaled = jtu.tree_map(lambda d: alpha * d, differences[2])
    assert_tree_close(scaled, differences[0], 3e-5)
    # ... and it is not negligible against the update itself.
    plain = jtu.tree_leaves(plain)
    assert tree_rel_error([a + d for a, d in zip(plain, differences[0])], plain) > 0.1


def _with_feedback_equal_to_forward(model):
    forward = tuple(layer.weight for layer in model._layers()[1:])
    return eqx.tree_at(lambda m: m.feedback, model, forward)


def test_kp_feedback_with_the_forward_weights_is_the_exact_transpose():
    model = _with_feedback_equal_to_forward(_ff(feedback=True))
    x, _ = _images(jax.random.key(6))
    phi, _ = model.free_equilibrium(x, rtol=0.0, atol=0.0, max_steps=1, adjoint=None)
    phi = jtu.tree_map(lambda p: p[0] + 0.1, phi)  # off the equilibrium
    psi = jtu.tree_map(
        lambda p: jax.random.normal(jax.random.key(7), p.shape, p.dtype), phi
    )
    _, vjp = jax.vjp(lambda p: model.vector_field(p, x[0]), phi)
    (exact,) = vjp(psi)
    assert_tree_close(model.kp_feedback(phi, psi), exact, 1e-13)
    # Random feedback weights give another pathway.
    other = _ff(feedback=True).kp_feedback(phi, psi)
    assert tree_rel_error(other, exact) > 0.1


@pytest.mark.slow
def test_kp_update_with_aligned_feedback_is_di_and_feedback_tracks_forward():
    model = _with_feedback_equal_to_forward(_ff(feedback=True))
    x, labels = _images(jax.random.key(8))
    kw = dict(alpha=1.0, rtol=1e-12, atol=1e-12)
    di, _, _ = LeastControl(**kw)(model, None, x, labels, jax.random.key(0))
    decay = 0.01
    kp, _, stats = LeastControl(variant="kp", weight_decay=decay, **kw)(
        model, None, x, labels, jax.random.key(0)
    )
    assert float(stats["ok"]) == 1.0
    for i, (layer, g_kp, g_di) in enumerate(
        zip(model._layers(), kp._layers(), di._layers())
    ):
        # The encoder has no feedback weight and no decay.
        expected = g_di.weight + (decay * layer.weight if i > 0 else 0)
        np.testing.assert_allclose(g_kp.weight, expected, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(g_kp.bias, g_di.bias, rtol=1e-9, atol=1e-14)
        if i > 0:
            np.testing.assert_allclose(
                kp.feedback[i - 1], expected, rtol=1e-9, atol=1e-14
            )


def test_bad_conv_model_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="in_shape"):
        ConvFeedforward((8, 8), 3, key=key)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvFeedforward((1, 8, 8), 3, kernel_size=4, key=key)
    with pytest.raises(ValueError, match="channels"):
        ConvFeedforward((1, 8, 8), 3, channels=(), key=key)
    with pytest.raises(ValueError, match="groups"):
        ConvDEQ((1, 8, 8), 3, channels=6, hidden=8, groups=4, key=key)
    with pytest.raises(ValueError, match="for `EquilibriumNetwork` and `Feedforward`"):
        LeastControl(variant="lf").init(_ff(), key)
    with pytest.raises(ValueError, match="feedback=True"):
        LeastControl(variant="kp").init(_ff(), key)
    with pytest.raises(ValueError, match="feedback=True"):
        LeastControl(variant="kp").init(_deq(), key)
