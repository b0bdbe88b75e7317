import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import lcp_solvers as lcp
from lcp_solvers.experiments import (
    ComplexSynapseLearner,
    cross_entropy,
    EquilibriumNetwork,
    Feedforward,
    free_equilibrium,
    init_mlp,
    LeastControl,
    meta_gradient,
    meta_train,
    RecurrentBackprop,
    sample_sinusoid_tasks,
    train_classifier,
)

from .helpers import assert_tree_close, tree_cosine


def _batch(key, n=5, d=6, c=3):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, c)


def _loss_unrolled(model, x, labels, iters=200):
    # Independent of optimistix: plain fixed-point iteration, differentiated by
    # ordinary backprop through every step.
    h = jnp.zeros((x.shape[0], model.num_hidden))
    for _ in range(iters):
        h = jax.vmap(model.fixed_point_map)(h, x)
    y = jax.vmap(model.readout)(h)
    return jnp.mean(jax.vmap(cross_entropy)(y, labels))


def _masked_dense_velocity(model, phi, x):
    # The layered network written the masked-dense way (one block-lower-triangular
    # W over all hidden units): an independent computation of its velocity field.
    w1, w2, r = (layer.weight for layer in model._layers())
    b1, b2, c = (layer.bias for layer in model._layers())
    n1, n2 = w1.shape[0], w2.shape[0]
    w = jnp.zeros((n1 + n2, n1 + n2)).at[n1:, :n1].set(w2)
    u = jnp.zeros((n1 + n2, x.shape[0])).at[:n1].set(w1)
    r_full = jnp.zeros((r.shape[0], n1 + n2)).at[:, n1:].set(r)
    h = jnp.concatenate(phi[:2])
    s = jnp.tanh(h)
    dh = -h + w @ s + u @ x + jnp.concatenate([b1, b2])
    return dh[:n1], dh[n1:], -phi[2] + r_full @ s + c


def test_feedforward_is_the_masked_dense_network_computed_by_layers():
    model = Feedforward(6, 3, (4, 5), key=jax.random.key(0))
    model = jtu.tree_map(  # nonzero biases, so that they are checked too
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape), model
    )
    x, _ = _batch(jax.random.key(1))
    (h1, h2, y), steps = free_equilibrium(model, x)
    assert int(steps) == 0
    w1, w2, r = (layer.weight for layer in model._layers())
    b1, b2, c = (layer.bias for layer in model._layers())
    np.testing.assert_allclose(h1, x @ w1.T + b1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h2, jnp.tanh(h1) @ w2.T + b2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, jnp.tanh(h2) @ r.T + c, rtol=1e-12, atol=1e-12)
    phi = tuple(
        jax.random.normal(k, (n,))
        for k, n in zip(jax.random.split(jax.random.key(2), 3), (4, 5, 3))
    )
    assert_tree_close(
        model.vector_field(phi, x[0]), _masked_dense_velocity(model, phi, x[0]), 1e-12
    )
    assert model.num_hidden == 9 and model.num_outputs == 3
    assert model.limit_recurrent_norm(0.1) is model


@pytest.mark.slow
def test_rbp_gradient_matches_unrolled_backprop():
    model = EquilibriumNetwork(6, 3, 7, key=jax.random.key(2))
    x, labels = _batch(jax.random.key(3))
    grads, _, stats = RecurrentBackprop(rtol=1e-10, atol=1e-10)(
        model, None, x, labels, jax.random.key(0)
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    expected = jax.grad(lambda p: _loss_unrolled(eqx.combine(p, static), x, labels))(
        params
    )
    assert_tree_close(grads, expected, 1e-6)
    assert stats["ok"] == 1.0


def _assert_hebbian(grads, model, x, phi, psi):
    # The batch mean of the local rule, written out by hand: ΔW = ψ_h σ(h)ᵀ,
    # ΔU = ψ_h xᵀ, ΔR = ψ_y σ(h)ᵀ, Δb = ψ_h, Δc = ψ_y for the recurrent network;
    # ΔW_l = ψ_l a_{l-1}ᵀ, Δb_l = ψ_l with a_0 = x, a_l = σ(h_l) layer by layer.
    n = x.shape[0]
    if isinstance(model, Feedforward):
        inputs = (x, *(jnp.tanh(h) for h in phi[:-1]))
        for layer, a, p in zip(grads._layers(), inputs, psi):
            np.testing.assert_allclose(-layer.weight, p.T @ a / n, atol=1e-8)
            np.testing.assert_allclose(-layer.bias, p.mean(0), atol=1e-8)
        return
    (h, _), (psi_h, psi_y) = phi, psi
    s = jnp.tanh(h)
    np.testing.assert_allclose(-grads.W, psi_h.T @ s / n, atol=1e-8)
    np.testing.assert_allclose(-grads.U, psi_h.T @ x / n, atol=1e-8)
    np.testing.assert_allclose(-grads.R, psi_y.T @ s / n, atol=1e-8)
    np.testing.assert_allclose(-grads.b, psi_h.mean(0), atol=1e-8)
    np.testing.assert_allclose(-grads.c, psi_y.mean(0), atol=1e-8)


def _network(arch, key):
    if arch == "ff":
        return Feedforward(6, 3, (4, 5), key=key)
    return EquilibriumNetwork(6, 3, 6, key=key)


@pytest.mark.parametrize("arch", ["ff", "rnn"])
@pytest.mark.slow
def test_lcp_update_is_the_local_hebbian_rule(arch):
    model = _network(arch, jax.random.key(4))
    x, labels = _batch(jax.random.key(5))
    rule = LeastControl(variant="di", alpha=0.1, rtol=1e-10, atol=1e-10, max_steps=2000)
    grads, _, stats = rule(model, None, x, labels, jax.random.key(0))
    assert stats["ok"] == 1.0

    def f(phi, theta, xi):
        return theta.vector_field(phi, xi[0])

    def loss(phi, args):
        return cross_entropy(phi[-1], args[1])

    phi0, _ = free_equilibrium(model, x)
    _, info = jax.vmap(
        lambda p, xi, li: lcp.least_control_grad(
            f,
            loss,
            model,
            p,
            (xi, li),
            controller=lcp.DynamicInversion(alpha=0.1),
            rtol=1e-10,
            atol=1e-10,
        )
    )(phi0, x, labels)
    # The controlled equilibrium holds: f(φ) + ψ = 0 on the hidden units.
    velocity = jax.vmap(model.vector_field)(info.phi, x)
    for fh, psi_h in zip(velocity[:-1], info.psi[:-1]):
        np.testing.assert_allclose(fh + psi_h, 0, atol=1e-8)
    _assert_hebbian(grads, model, x, info.phi, info.psi)


@pytest.mark.slow
def test_weak_control_recovers_the_implicit_gradient():
    model = EquilibriumNetwork(6, 3, 7, key=jax.random.key(6))
    x, labels = _batch(jax.random.key(7))
    alpha = 1e4
    grads, _, _ = LeastControl(variant="di", alpha=alpha, rtol=1e-12, atol=1e-12)(
        model, None, x, labels, jax.random.key(0)
    )
    rbp, _, _ = RecurrentBackprop(rtol=1e-10, atol=1e-10)(
        model, None, x, labels, jax.random.key(0)
    )
    scaled = jax.tree.map(lambda g: alpha * g, grads)
    # Relative error O(1/alpha): the nudged state is 1e-4 away from the free one.
    assert_tree_close(scaled, rbp, 1e-2)
    ebd, _, _ = LeastControl(variant="ebd", alpha=alpha, rtol=1e-12, atol=1e-12)(
        model, None, x, labels, jax.random.key(0)
    )
    assert_tree_close(ebd, grads, 1e-5)


@pytest.mark.parametrize("variant", ["di", "ebd"])
@pytest.mark.slow
def test_default_tolerance_follows_the_control_strength(variant):
    # ψ* is O(1/alpha): a fixed solver tolerance would let the update's relative
    # error grow with alpha (EBD at alpha = 1000 and tolerance 1e-4: about 50%).
    model = Feedforward(6, 3, (7, 7), key=jax.random.key(6))
    x, labels = _batch(jax.random.key(7))
    alpha = 1000.0
    tight = LeastControl(
        variant=variant, alpha=alpha, rtol=1e-12, atol=1e-12, max_steps=4000
    )
    ref, _, _ = tight(model, None, x, labels, jax.random.key(0))
    got, _, stats = LeastControl(variant=variant, alpha=alpha)(
        model, None, x, labels, jax.random.key(0)
    )
    assert float(stats["ok"]) == 1.0
    assert_tree_close(got, ref, 2e-2)
    assert LeastControl(alpha=1000.0)._tolerances() == (1e-6, 1e-6)
    assert LeastControl(alpha=0.1)._tolerances() == (1e-4, 1e-4)
    assert LeastControl(alpha=1000.0, rtol=1e-3)._tolerances() == (1e-3, 1e-6)


@pytest.mark.slow
def test_kp_feedback_with_transposed_weights_is_the_exact_jacobian():
    model = EquilibriumNetwork(6, 3, 7, key=jax.random.key(8), feedback=True)
    tied = eqx.tree_at(lambda m: (m.S_W, m.S_R), model, (model.W.T, model.R.T))
    phi = (jax.random.normal(jax.random.key(9), (7,)), jnp.ones(3))
    psi = (jax.random.normal(jax.random.key(10), (7,)), jnp.arange(3.0))
    x = jnp.ones(6)
    _, vjp = jax.vjp(lambda p: model.vector_field(p, x), phi)
    assert_tree_close(tied.kp_feedback(phi, psi), vjp(psi)[0], 1e-12)

    x, labels = _batch(jax.random.key(11))
    kp = LeastControl(variant="kp", alpha=0.1, rtol=1e-10, atol=1e-10, weight_decay=0.0)
    di = LeastControl(variant="di", alpha=0.1, rtol=1e-10, atol=1e-10)
    g_kp, _, _ = kp(tied, None, x, labels, jax.random.key(0))
    g_di, _, _ = di(tied, None, x, labels, jax.random.key(0))
    assert_tree_close((g_kp.W, g_kp.U, g_kp.R), (g_di.W, g_di.U, g_di.R), 1e-7)
    # ΔS = σ(h)ψᵀ: the transpose of ΔW (no decay, tied weights: same ψ as DI).
    np.testing.assert_allclose(g_kp.S_W, g_kp.W.T, atol=1e-10)
    np.testing.assert_allclose(g_kp.S_R, g_kp.R.T, atol=1e-10)
    decay = LeastControl(variant="kp", alpha=0.1, rtol=1e-10, atol=1e-10)
    g_dec, _, _ = decay(tied, None, x, labels, jax.random.key(0))
    np.testing.assert_allclose(
        g_dec.S_W - g_kp.S_W, decay.weight_decay * tied.S_W, atol=1e-10
    )
    np.testing.assert_allclose(
        g_dec.W - g_kp.W, decay.weight_decay * tied.W, atol=1e-10
    )
    with pytest.raises(ValueError, match="feedback=True"):
        kp.init(EquilibriumNetwork(6, 3, 7, key=jax.random.key(0)), None)


@pytest.mark.parametrize("arch", ["ff", "rnn"])
@pytest.mark.parametrize("modulate", [True, False])
@pytest.mark.slow
def test_linear_feedback_update_is_the_local_rule(modulate, arch):
    model = _network(arch, jax.random.key(20))
    n = model.num_hidden
    x, labels = _batch(jax.random.key(21))
    q = 0.3 * jax.random.normal(jax.random.key(22), (n + 3, 3)) + jnp.eye(n + 3, 3, -n)
    # q_lr = 0 leaves Q as given, so the update can be rebuilt from one solve.
    rule = LeastControl(
        variant="lf",
        alpha=1.0,
        q_lr=0.0,
        q_steps=1,
        modulate=modulate,
        rtol=1e-11,
        atol=1e-11,
        max_steps=4096,
    )
    grads, q_after, stats = rule(model, q, x, labels, jax.random.key(0))
    assert stats["ok"] == 1.0
    np.testing.assert_array_equal(q_after, q)

    phi0, _ = free_equilibrium(model, x)
    controller = lcp.LinearFeedback(Q=q, alpha=1.0, output=lambda phi: phi[-1])
    _, info = jax.vmap(
        lambda p, xi, li: lcp.least_control_grad(
            lambda phi, theta, a: theta.vector_field(phi, a[0]),
            lambda phi, a: cross_entropy(phi[-1], a[1]),
            model,
            p,
            (xi, li),
            controller=controller,
            solver=lcp.DiscreteTime(step_size=0.5),
            rtol=1e-11,
            atol=1e-11,
            max_steps=4096,
        )
    )(phi0, x, labels)
    qu = info.u[-1] @ q.T  # the control applied to every unit, Qu
    splits = np.cumsum([p.shape[1] for p in info.phi])[:-1]
    psi = jnp.split(qu, splits, axis=1)
    assert_tree_close(info.psi, tuple(psi), 1e-9)
    if modulate:
        psi = [(1 - jnp.tanh(h) ** 2) * p for h, p in zip(info.phi[:-1], psi[:-1])]
        psi.append(qu[:, n:])
    _assert_hebbian(grads, model, x, info.phi, tuple(psi))


@pytest.mark.slow
def test_modulated_linear_feedback_recovers_di_with_the_unit_free_feedback():
    # With D = diag tanh'(h), DI's feedback is [D (I - WᵀD)⁻¹ Rᵀ; I]. A Q equal to
    # the part without the units' own D, [(I - WᵀD)⁻¹ Rᵀ; I], plus the modulation
    # gives DI's update in the weak-control limit; without the modulation it does not.
    model = EquilibriumNetwork(6, 3, 7, key=jax.random.key(23))
    x, labels = _batch(jax.random.key(24), n=1)
    (h0, _), _ = free_equilibrium(model, x, rtol=1e-12, atol=1e-12)
    d = jnp.diag(1 - jnp.tanh(h0[0]) ** 2)
    q_h = jnp.linalg.solve(jnp.eye(7) - model.W.T @ d, model.R.T)
    q = jnp.concatenate([q_h, jnp.eye(3)])
    # Tolerances are relative to the learning signal: 1e-13 is below what LF's
    # Anderson iteration reaches in float64 (the solve stalls, every example fails).
    tight = dict(alpha=1e4, rtol=1e-12, atol=1e-12, max_steps=4096)
    g_di, _, _ = LeastControl(variant="di", **tight)(
        model, None, x, labels, jax.random.key(0)
    )
    cos = {}
    for modulate in (True, False):
        rule = LeastControl(
            variant="lf", q_lr=0.0, q_steps=1, modulate=modulate, **tight
        )
        g_lf, _, stats = rule(model, q, x, labels, jax.random.key(0))
        assert stats["ok"] == 1.0
        cos[modulate] = tree_cosine((g_lf.W, g_lf.U), (g_di.W, g_di.U))
    assert cos[True] > 0.9999 and cos[False] < 0.99, cos


@pytest.mark.slow
def test_failed_solves_are_left_out_of_update_and_stats():
    model = EquilibriumNetwork(6, 3, 7, key=jax.random.key(25))
    x, labels = _batch(jax.random.key(26))
    # Two steps of a strong controller cannot reach 1e-12: every solve fails.
    rule = LeastControl(variant="di", alpha=0.1, rtol=1e-12, atol=1e-12, max_steps=2)
    grads, _, stats = rule(model, None, x, labels, jax.random.key(0))
    assert stats["ok"] == 0.0
    assert stats["H"] == 0.0 and np.isfinite(stats["steps"])
    for g in jax.tree_util.tree_leaves(grads):
        np.testing.assert_array_equal(g, 0)


@pytest.mark.slow
def test_linear_feedback_learns_q_towards_the_di_update():
    model = EquilibriumNetwork(6, 3, 7, key=jax.random.key(12))
    x, labels = _batch(jax.random.key(13), n=8)
    rule = LeastControl(variant="lf", alpha=0.1, q_steps=4000, q_samples=8)
    q = rule.init(model, jax.random.key(0))
    assert q.shape == (10, 3) and not q.any()
    g_di, _, _ = LeastControl(variant="di", alpha=0.1)(
        model, None, x, labels, jax.random.key(0)
    )
    cosines = []
    for i in range(3):
        g_lf, q, stats = rule(model, q, x, labels, jax.random.key(i))
        cosines.append(tree_cosine((g_lf.W, g_lf.U), (g_di.W, g_di.U)))
    assert stats["ok"] == 1.0
    # Learning Q aligns the update with dynamic inversion (Theorem 2) step by step.
    assert cosines[0] < cosines[1] < cosines[2] and cosines[-1] > 0.8, cosines


@pytest.mark.slow
def test_training_with_optax_learns():
    from lcp_solvers.experiments import Dataset

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 2
    y = rng.integers(0, 3, size=120)
    xs = (centres[y] + rng.normal(size=(120, 6))).astype(np.float32)
    ds = Dataset(xs[:90], y[:90], xs[90:], y[90:], 3, "blobs")
    model = EquilibriumNetwork(6, 3, 8, key=jax.random.key(0), dtype=jnp.float32)
    for rule in (RecurrentBackprop(), LeastControl(variant="di")):
        trained, hist = train_classifier(
            model,
            rule,
            ds,
            epochs=5,
            batch_size=16,
            learning_rate=3e-2,
            key=jax.random.key(1),
        )
        assert trained.W.dtype == jnp.float32
        assert hist["train_loss"][-1] < hist["train_loss"][0]
        assert hist["test_accuracy"][-1] > 0.8, hist
    # The spectral-norm limit holds after training, for W and KP's S_W alike; at
    # this learning rate the unconstrained W grows past it.
    kp_model = EquilibriumNetwork(
        6, 3, 8, key=jax.random.key(0), feedback=True, dtype=jnp.float32
    )
    for rule, limit in ((LeastControl(variant="kp"), 0.3), (RecurrentBackprop(), None)):
        trained, _ = train_classifier(
            kp_model, rule, ds, epochs=2, batch_size=16, learning_rate=3e-2,
            key=jax.random.key(1), max_recurrent_norm=limit,
        )  # fmt: skip
        norm = float(jnp.linalg.norm(trained.W, ord=2))
        if limit is None:
            assert norm > 0.3
        else:
            assert norm <= limit * (1 + 1e-5)
            assert float(jnp.linalg.norm(trained.S_W, ord=2)) <= limit * (1 + 1e-5)


@pytest.mark.slow
def test_cosine_step_size_against_a_hand_written_adam():
    # One batch per epoch (the whole training set), so the only difference between
    # the runs is the step size: a hand-written Adam with the closed-form cosine
    # `lr (0.1 + 0.9 (1 + cos(pi k / N)) / 2)` must give train_classifier's weights.
    from lcp_solvers.experiments import Dataset

    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(16, 5)))
    ys = jnp.asarray(rng.integers(0, 3, size=16))
    ds = Dataset(np.asarray(xs), np.asarray(ys), np.asarray(xs), np.asarray(ys), 3, "t")
    model = EquilibriumNetwork(5, 3, 6, key=jax.random.key(0))
    rule, lr, epochs = RecurrentBackprop(), 3e-2, 6
    trained, _ = train_classifier(
        model, rule, ds, epochs=epochs, batch_size=16, learning_rate=lr,
        key=jax.random.key(1), lr_schedule="cosine",
    )  # fmt: skip

    def adam_run(step_size):
        net = model
        params = eqx.filter(net, eqx.is_inexact_array)
        m = jtu.tree_map(jnp.zeros_like, params)
        v = jtu.tree_map(jnp.zeros_like, params)
        for k in range(epochs):
            g, _, _ = grads(net, None, xs, ys, jax.random.key(0))
            m = jtu.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
            v = jtu.tree_map(lambda a, b: 0.999 * a + 0.001 * b**2, v, g)
            c1, c2, step = 1 - 0.9 ** (k + 1), 1 - 0.999 ** (k + 1), step_size(k)
            update = jtu.tree_map(
                lambda a, b, step=step, c1=c1, c2=c2: (
                    -step * (a / c1) / (jnp.sqrt(b / c2) + 1e-8)
                ),
                m,
                v,
            )
            net = eqx.apply_updates(net, update)
        return net

    grads = eqx.filter_jit(rule)
    want = adam_run(lambda k: lr * (0.1 + 0.9 * (1 + np.cos(np.pi * k / epochs)) / 2))
    constant = adam_run(lambda k: lr)
    for name in ("W", "U", "R"):
        np.testing.assert_allclose(
            getattr(trained, name), getattr(want, name), rtol=1e-6, atol=1e-9
        )
        # A constant step size ends elsewhere, so the comparison can tell them apart.
        diff = getattr(constant, name) - getattr(want, name)
        assert float(jnp.max(jnp.abs(diff))) > 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        train_classifier(
            model, rule, ds, epochs=1, key=jax.random.key(1), lr_schedule="linear"
        )


@pytest.mark.slow
def test_meta_gradients_against_independent_formulas():
    omega, unravel = init_mlp(jax.random.key(0), width=3)
    # A strong synapse keeps the inner problems convex near ω, so that the
    # independent BFGS solves find the same stationary points as the dynamics.
    lam = 10.0
    learner = ComplexSynapseLearner(unravel, lam=lam, rtol=1e-10, atol=1e-10)
    tasks = sample_sinusoid_tasks(jax.random.key(1), 2, shots=5, queries=4)
    task0 = jax.tree.map(lambda a: a[:1], tasks)
    xs, ys, xq, yq = (a[0] for a in task0)

    def inner(phi, om, alpha=None):
        value = learner.mse(phi, xs, ys) + 0.5 * lam * jnp.sum((phi - om) ** 2)
        if alpha is not None:
            value = value + learner.mse(phi, xq, yq) / alpha
        return value

    phi_star = optx.minimise(
        lambda p, _: inner(p, omega), optx.BFGS(rtol=1e-12, atol=1e-12), omega
    ).value
    # iMAML: λ (∇²F + ... )⁻¹ ∇L_eval by an explicit Hessian solve.
    hess = jax.hessian(inner)(phi_star, omega)
    g_eval = jax.grad(learner.mse)(phi_star, xq, yq)
    expected = lam * jnp.linalg.solve(hess, g_eval)
    # Relative errors over the whole vector: two independent inner solves (to
    # 1e-10 and by BFGS) agree to about 1e-8 in φ, which is elementwise large for
    # the small components of ω - φ⋆ (measured up to 8.5e-6 at the dependency floors).
    got, _ = meta_gradient("imaml", learner, omega, task0)
    assert_tree_close(got, expected, 1e-6)
    got, _ = meta_gradient("fomaml-prox", learner, omega, task0)
    assert_tree_close(got, g_eval, 1e-6)
    got, _ = meta_gradient("reptile-prox", learner, omega, task0)
    assert_tree_close(got, omega - phi_star, 1e-6)
    # FOMAML and Reptile proper: gradient descent on the support MSE, unrolled here.
    phi = omega
    for _ in range(7):
        phi = phi - 0.05 * jax.grad(learner.mse)(phi, xs, ys)
    kw = dict(inner_steps=7, inner_lr=0.05)
    got, stats = meta_gradient("fomaml", learner, omega, task0, **kw)
    np.testing.assert_allclose(got, jax.grad(learner.mse)(phi, xq, yq), rtol=1e-9)
    assert stats["inner_ok"] == 1.0
    got, _ = meta_gradient("reptile", learner, omega, task0, **kw)
    np.testing.assert_allclose(got, omega - phi, rtol=1e-9, atol=1e-12)
    # The synapse plays no part in their inner loop.
    other = ComplexSynapseLearner(unravel, lam=0.1)
    np.testing.assert_array_equal(
        meta_gradient("reptile", other, omega, task0, **kw)[0], got
    )
    # LCP with Q = I: the controlled state minimises F + L_eval/α and Δω = λu* with
    # u* = -∇L_eval(φ_c)/α.
    alpha = 2.0
    phi_c = optx.minimise(
        lambda p, _: inner(p, omega, alpha),
        optx.BFGS(rtol=1e-12, atol=1e-12),
        phi_star,
    ).value
    expected = lam * jax.grad(learner.mse)(phi_c, xq, yq) / alpha
    got, stats = meta_gradient("lcp", learner, omega, task0, alpha=alpha)
    assert stats["ok"] == 1.0
    assert_tree_close(got, expected, 1e-5)
    with pytest.raises(ValueError, match="Unknown meta-learning method"):
        meta_gradient("maml", learner, omega, task0)  # pyright: ignore


@pytest.mark.slow
def test_meta_lcp_solves_converge_and_weak_control_limit():
    # At λ = 1 the inner problem is barely convex and the query loss is not: the
    # controlled solve from (φ*, 0) (Newton, or Anderson-accelerated Euler) often
    # fails here. Warm-started at a minimiser of the nudged energy it converges.
    omega, unravel = init_mlp(jax.random.key(0), width=10)
    lam = 1.0
    learner = ComplexSynapseLearner(unravel, lam=lam)
    tasks = sample_sinusoid_tasks(jax.random.key(5), 5)
    _, stats = meta_gradient("lcp", learner, omega, tasks, alpha=1.0)
    assert stats["ok"] == 1.0
    assert 1 <= stats["steps"] <= 5
    # Weak control: linear feedback with Q = I tends to λ/α times FOMAML's update
    # (the query gradient at φ*), not to the implicit gradient.
    task0 = jax.tree.map(lambda a: a[:1], tasks)
    alpha = 1e3
    got, stats = meta_gradient("lcp", learner, omega, task0, alpha=alpha)
    assert stats["ok"] == 1.0
    fomaml, _ = meta_gradient("fomaml-prox", learner, omega, task0)
    imaml, _ = meta_gradient("imaml", learner, omega, task0)
    assert_tree_close(got * alpha / lam, fomaml, 1e-2)
    assert tree_cosine(got, imaml) < 0.9
    with pytest.raises(ValueError, match="alpha > 0"):
        meta_gradient("lcp", learner, omega, task0, alpha=0.0)


@pytest.mark.slow
def test_meta_reports_unconverged_inner_solves():
    omega, unravel = init_mlp(jax.random.key(0), width=5)
    tasks = sample_sinusoid_tasks(jax.random.key(5), 3)
    for max_steps, expect_all in ((256, True), (2, False)):
        learner = ComplexSynapseLearner(unravel, lam=1.0, max_steps=max_steps)
        # The two ways the inner solve is called.
        for method in ("imaml", "reptile-prox"):
            _, stats = meta_gradient(method, learner, omega, tasks)  # pyright: ignore
            assert (float(stats["inner_ok"]) == 1.0) == expect_all, method
    out = meta_train(
        "reptile-prox", key=jax.random.key(0), meta_steps=2, meta_batch=2, width=3,
        test_tasks=3,
    )  # fmt: skip
    assert out["inner_success"] == 1.0 and out["test_inner_success"] == 1.0


@pytest.mark.slow
def test_meta_train_tests_each_method_with_its_own_inner_learner():
    # Zero meta-steps: ω is the initialisation, so the test MSE is that of the inner
    # learner alone, computed here independently.
    key = jax.random.key(3)
    kw = dict(key=key, meta_steps=0, width=4, test_tasks=5, test_queries=7)
    gd = dict(inner_steps=3, inner_lr=0.1)
    k_init, _, k_test = jax.random.split(key, 3)
    omega, unravel = init_mlp(k_init, 4)
    learner = ComplexSynapseLearner(unravel, lam=2.0)
    tasks = sample_sinusoid_tasks(k_test, 5, 10, 7)

    def test_mse(adapt):
        mses = []
        for xs, ys, xq, yq in zip(*tasks):
            mses.append(learner.mse(adapt(xs, ys), xq, yq))
        return float(np.mean(mses))

    def gd_adapt(xs, ys):
        phi = omega
        for _ in range(3):
            phi = phi - 0.1 * jax.grad(learner.mse)(phi, xs, ys)
        return phi

    expected = test_mse(gd_adapt)
    assert meta_train("reptile", **kw, **gd)["test_mse"] == pytest.approx(expected)
    expected = test_mse(lambda xs, ys: learner.solve(omega, xs, ys).value)
    out = meta_train("reptile-prox", lam=2.0, **kw, **gd)
    assert out["test_mse"] == pytest.approx(expected)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="Feedforward"):
        EquilibriumNetwork(2, 2, 3, "ff", key=jax.random.key(0))  # pyright: ignore
    EquilibriumNetwork(2, 2, 3, "rnn", key=jax.random.key(0))  # older calls
    with pytest.raises(ValueError, match="Feedforward"):
        EquilibriumNetwork(2, 2, (3, 3), key=jax.random.key(0))  # pyright: ignore
    with pytest.raises(ValueError, match="positive"):
        EquilibriumNetwork(2, 2, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="hidden layer"):
        Feedforward(2, 2, (), key=jax.random.key(0))
    with pytest.raises(ValueError, match="hidden layer"):
        Feedforward(2, 2, (3, 0), key=jax.random.key(0))
    with pytest.raises(ValueError, match="variant"):
        LeastControl(variant="bp")  # pyright: ignore


@pytest.mark.slow
def test_train_classifier_on_a_one_device_mesh():
    # Below jax 0.10 a mesh is refused with the reason (docs/devices.md); from 0.10 a
    # one-device mesh trains as without one.
    from jax.sharding import Mesh

    from lcp_solvers import experiments as ex

    dataset = ex.load_digits(max_train=32, max_test=16)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

    def run(mesh):
        model = ex.EquilibriumNetwork(
            64, 10, 8, key=jax.random.key(0), dtype=jnp.float64
        )
        return ex.train_classifier(
            model,
            ex.LeastControl(variant="di", alpha=10.0),
            dataset,
            epochs=1,
            batch_size=16,
            key=jax.random.key(1),
            mesh=mesh,
        )

    if tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 10):
        with pytest.raises(RuntimeError, match="needs jax >= 0.10"):
            run(mesh)
        return
    (m1, h1), (m2, h2) = run(mesh), run(None)
    assert h1["test_accuracy"] == h2["test_accuracy"]
    assert float(jnp.max(jnp.abs(m1.W - m2.W))) <= 1e-12


def test_feedforward_kp_feedback_with_forward_weights_is_the_exact_jacobian():
    model = Feedforward(6, 3, (4, 5), key=jax.random.key(30), feedback=True)
    assert model.has_feedback and len(model.feedback) == 2
    tied = eqx.tree_at(
        lambda m: m.feedback, model, tuple(b.weight for b in model._layers()[1:])
    )
    keys = jax.random.split(jax.random.key(31), 6)
    phi = tuple(jax.random.normal(k, (n,)) for k, n in zip(keys[:3], (4, 5, 3)))
    psi = tuple(jax.random.normal(k, (n,)) for k, n in zip(keys[3:], (4, 5, 3)))
    _, vjp = jax.vjp(lambda p: model.vector_field(p, jnp.ones(6)), phi)
    assert_tree_close(tied.kp_feedback(phi, psi), vjp(psi)[0], 1e-12)
    # Random feedback weights give another pathway.
    assert tree_cosine(model.kp_feedback(phi, psi), vjp(psi)[0]) < 0.99
    with pytest.raises(ValueError, match="feedback=True"):
        Feedforward(6, 3, (4, 5), key=jax.random.key(0)).kp_feedback(phi, psi)


@pytest.mark.parametrize("variant", ["di", "ebd", "kp"])
def test_a_nan_example_is_left_out_of_the_update(variant):
    # A solve that fails with a NaN state (here: a NaN input, so a NaN free
    # equilibrium) is dropped; its NaN activations must not reach the batch update
    # through ψσ(h)ᵀ with a zero ψ (they did: every parameter became NaN and training
    # stalled at chance). The update is then the one of the other examples alone.
    model = Feedforward(6, 3, (4, 5), key=jax.random.key(40), feedback=True)
    x, labels = _batch(jax.random.key(41))
    x = x.at[0].set(jnp.nan)
    rule = LeastControl(variant=variant, alpha=1.0, rtol=1e-10, atol=1e-10)
    grads, _, stats = rule(model, None, x, labels, jax.random.key(0))
    assert float(stats["ok"]) == pytest.approx(0.8)
    expected, _, _ = rule(model, None, x[1:], labels[1:], jax.random.key(0))
    assert_tree_close(grads, expected, 1e-10)
