"""Regression tests for failure kinds, one section per kind (a-k).

Each test asserts the correct behaviour against an independent reference:
`optx.ImplicitAdjoint`, jaxopt's own implicit differentiation, central finite
differences in float64, or a closed form. Tests that fail on the code of the day are
marked `xfail(strict=True)` with the kind in the reason; the fix removes the mark.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import jaxopt
import numpy as np
import optimistix as optx
import pytest

import lcp_solvers as lcp

from .helpers import assert_tree_close


# A fixed, generic contraction (spectral norm about 0.6) and inputs.
W3 = jnp.array([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3], [-0.2, 0.1, 0.2]])
X3 = jnp.array([0.5, -0.3, 0.8])
T3 = jnp.array([0.2, 0.1, -0.4])
K3 = jnp.array([1.0, 2.0, 3.0])


def _cell(z, theta):
    w, x = theta
    return jnp.tanh(w @ z + x)


def _readout(y):
    # A nonlinear loss of the state, so that the cotangent depends on it.
    return jnp.sum(jnp.sin(y) * K3.astype(y.dtype)) + 0.5 * jnp.sum(y**2)


def _f(phi, theta, args):
    # least_control_grad's signature: f(phi, theta, args).
    return jnp.tanh(theta @ phi + args[0]) - phi


def _sq_loss(phi, args):
    return 0.5 * jnp.sum((phi - args[1]) ** 2)


def _is_zero(tree):
    return all(bool(jnp.all(x == 0)) for x in jtu.tree_leaves(tree))


def _message(error: BaseException) -> str:
    """The error's own message, without the traceback text that a runtime error
    raised from a callback under `jax.jit` carries (that text names functions and
    files such as `forward_solver` or `theta_vjp`, which must not satisfy a
    check on the message)."""
    text = str(error)
    found = re.findall(
        r"EquinoxRuntimeError: (?!Above is the stack)(.*?)(?:\n\s*\n|\n-{5,}|$)",
        text,
        re.S,
    )
    return "\n".join(found) if found else text


# ---------------------------------------------------------------------------------
# a. A failed forward solve masked out of the loss: a zero cotangent has a zero
#    update (as with optx.ImplicitAdjoint), whatever `throw`.
# ---------------------------------------------------------------------------------

_NEWTON = optx.Newton(rtol=1e-8, atol=1e-8)


def _masked_root_loss(adjoint, form):
    # y**2 - b has no real root at b = -1: Newton fails (throw=False), the loss masks
    # the failed value out, so the cotangent reaching the layer is exactly zero.
    def loss(b):
        if form == "root_find":
            sol = optx.root_find(
                lambda y, b: y**2 - b, _NEWTON, jnp.array(1.0), b,
                throw=False, max_steps=50, adjoint=adjoint,
            )  # fmt: skip
        else:
            sol = optx.fixed_point(
                lambda y, b: y - (y**2 - b), _NEWTON, jnp.array(1.0), b,
                throw=False, max_steps=50, adjoint=adjoint,
            )  # fmt: skip
        return jnp.where(sol.result == optx.RESULTS.successful, sol.value, 0.0)

    return loss


@pytest.mark.parametrize("throw", [False, True])
@pytest.mark.parametrize("form", ["root_find", "fixed_point"])
@pytest.mark.slow
def test_a_masked_failed_solve_adjoint(form, throw):
    b = jnp.array(-1.0)
    reference = jax.grad(_masked_root_loss(optx.ImplicitAdjoint(), form))(b)
    assert reference == 0
    grad = jax.grad(_masked_root_loss(lcp.LeastControlAdjoint(throw=throw), form))(b)
    assert grad == 0, grad


def _failing_solver(form):
    # A jaxopt-style solver function that reports its own success as aux.
    def solver(init, b):
        if form == "root":
            sol = optx.root_find(
                lambda y, b: y**2 - b, _NEWTON, init, b, throw=False, max_steps=50
            )
        else:
            sol = optx.fixed_point(
                lambda y, b: y - (y**2 - b), _NEWTON, init, b, throw=False,
                max_steps=50,
            )  # fmt: skip
        return sol.value, sol.result == optx.RESULTS.successful

    return solver


@pytest.mark.parametrize("throw", [False, True])
@pytest.mark.parametrize("form", ["root", "fixed_point"])
@pytest.mark.slow
def test_a_masked_failed_solve_decorators(form, throw):
    if form == "root":
        decorator = lcp.custom_root(lambda y, b: y**2 - b, has_aux=True, throw=throw)
    else:
        decorator = lcp.custom_fixed_point(
            lambda y, b: y - (y**2 - b), has_aux=True, throw=throw
        )
    solve = decorator(_failing_solver(form))

    def loss(b):
        y, ok = solve(jnp.array(1.0), b)
        return jnp.where(ok, y, 0.0)

    grad = jax.grad(loss)(jnp.array(-1.0))
    assert grad == 0, grad


@pytest.mark.parametrize("throw", [False, True])
@pytest.mark.parametrize("solver", ["newton", "anderson"])
@pytest.mark.slow
def test_a_masked_failed_solve_deq(solver, throw):
    # z = z**2 + x has no real fixed point at x = 1.
    forward = {
        "newton": optx.Newton(rtol=1e-8, atol=1e-8),
        "anderson": lcp.AndersonAcceleration(rtol=1e-8, atol=1e-8),
    }[solver]

    def loss(x, adjoint):
        deq = lcp.DEQ(
            lambda z, x: z**2 + x, jnp.array(0.0), solver=forward, adjoint=adjoint,
            throw=False, max_steps=50,
        )  # fmt: skip
        z, stats = deq.solve(x)
        return jnp.where(stats.result == lcp.RESULTS.successful, z, 0.0)

    x = jnp.array(1.0)
    assert jax.grad(loss)(x, optx.ImplicitAdjoint()) == 0
    grad = jax.grad(loss)(x, lcp.LeastControlAdjoint(throw=throw))
    assert grad == 0, grad


_zero_loss_cases = {
    # (controller, solver)
    "di-default": (lcp.DynamicInversion(alpha=0.1), None),
    "di_perfect-default": (lcp.DynamicInversion(alpha=0.0), None),
    "ebd-default": (lcp.EnergyBased(beta=10.0), None),
    "lf-default": (lcp.LinearFeedback(Q=jnp.eye(3), alpha=0.1), None),
    "di-imex": (lcp.DynamicInversion(alpha=0.1), lcp.IMEX()),
    "di-discrete": (
        lcp.DynamicInversion(alpha=0.1),
        lcp.DiscreteTime(0.5, lcp.AndersonAcceleration(rtol=1e-10, atol=1e-10)),
    ),
}


@pytest.mark.parametrize("case", list(_zero_loss_cases))
@pytest.mark.parametrize("entry", ["grad", "objective"])
@pytest.mark.slow
def test_a_identically_zero_loss(entry, case):
    controller, solver = _zero_loss_cases[case]
    zero_loss = lambda phi, args: 0.0 * jnp.sum(phi)
    kwargs = dict(controller=controller, solver=solver)
    if entry == "grad":
        grad, info = lcp.least_control_grad(
            _f, zero_loss, W3, jnp.zeros(3), (X3, T3), **kwargs
        )
        assert info.result == lcp.RESULTS.successful
    else:
        grad = jax.grad(
            lambda w: lcp.least_control_objective(
                _f, zero_loss, w, jnp.zeros(3), (X3, T3), **kwargs
            )[0]
        )(W3)
    if isinstance(controller, lcp.EnergyBased):
        # EBD's control is implicit, psi = -f(phi), so a zero loss leaves the free
        # solve's residual (of order its tolerance) in the update: zero up to it.
        assert float(jnp.max(jnp.abs(grad))) < 1e-10, grad
    else:
        assert _is_zero(grad), grad


# ---------------------------------------------------------------------------------
# b. Invariance to the loss's scale: a cotangent of order 1e20 (or 1e-20) in float32,
#    1e200 (or 1e-200) in float64, must neither overflow nor underflow.
# ---------------------------------------------------------------------------------

# custom_root and DEQ share these code paths with custom_fixed_point and fixed_point.
_scale_cases = [
    pytest.param(dtype, entry, scale, id=f"{dtype.__name__}-{entry}-{scale:g}")
    for dtype, entries, scales in [
        (
            jnp.float32,
            ("fixed_point", "root_find", "custom_fixed_point"),
            (1e20, 1e-20),
        ),
        (jnp.float64, ("fixed_point",), (1e200, 1e-200)),
    ]
    for entry in entries
    for scale in scales
]


def _scaled_loss(entry, dtype):
    tol = 1e-6 if dtype == jnp.float32 else 1e-12
    w0, x = W3.astype(dtype), X3.astype(dtype)
    z0 = jnp.zeros(3, dtype)
    T = lambda z, w: jnp.tanh(w @ z + x)
    F = lambda z, w: T(z, w) - z
    if entry == "fixed_point":
        solve = lambda w: optx.fixed_point(
            T, lcp.AndersonAcceleration(rtol=tol, atol=tol), z0, w,
            adjoint=lcp.LeastControlAdjoint(),
        ).value  # fmt: skip
    elif entry == "root_find":
        solve = lambda w: optx.root_find(
            F, optx.Newton(rtol=tol, atol=tol), z0, w,
            adjoint=lcp.LeastControlAdjoint(),
        ).value  # fmt: skip
    elif entry in ("custom_fixed_point", "custom_root"):
        inner = lambda init, w: (
            optx.fixed_point(
                T, lcp.AndersonAcceleration(rtol=tol, atol=tol), init, w
            ).value
        )
        if entry == "custom_fixed_point":
            decorated = lcp.custom_fixed_point(T, rtol=tol, atol=tol)(inner)
        else:
            decorated = lcp.custom_root(F, rtol=tol, atol=tol)(inner)
        solve = lambda w: decorated(z0, w)
    else:
        solve = lambda w: lcp.DEQ(
            lambda z, w: T(z, w),
            z0,
            solver=lcp.AndersonAcceleration(rtol=tol, atol=tol),
        )(w)

    def loss(w, c):
        return c * _readout(solve(w))

    return loss, w0


@pytest.mark.parametrize("dtype,entry,scale", _scale_cases)
@pytest.mark.slow
def test_b_adjoint_scale_invariance(dtype, entry, scale):
    loss, w = _scaled_loss(entry, dtype)
    grad = jax.grad(loss)(w, 1.0)
    grad_scaled = jax.grad(loss)(w, scale)
    assert grad_scaled.dtype == dtype
    assert_tree_close(grad_scaled / scale, grad, 1e-4 if dtype == jnp.float32 else 1e-9)


@pytest.mark.parametrize(
    "controller,scale",
    [
        ("di", 1e20),
        ("di", 1e-20),
        ("ebd", 1e20),
        ("ebd", 1e-20),
    ],
)
@pytest.mark.parametrize("entry", ["grad", "objective"])
@pytest.mark.slow
def test_b_least_control_scale_invariance(entry, controller, scale):
    # Multiplying the loss by c and alpha by c (beta by 1/c) leaves the stationary
    # point of ½‖f‖² + L/α, the control psi and the update unchanged.
    f32 = jnp.float32
    w, phi0 = W3.astype(f32), jnp.zeros(3, f32)
    args = (X3.astype(f32), T3.astype(f32))

    def run(c):
        loss = lambda phi, args: c * _sq_loss(phi, args)
        ctrl = (
            lcp.DynamicInversion(alpha=0.1 * c)
            if controller == "di"
            else lcp.EnergyBased(beta=10.0 / c)
        )
        if entry == "grad":
            grad, info = lcp.least_control_grad(
                _f, loss, w, phi0, args, controller=ctrl
            )
            return grad
        return jax.grad(
            lambda w: lcp.least_control_objective(
                _f, loss, w, phi0, args, controller=ctrl
            )[0]
        )(w)

    reference = run(1.0)
    assert bool(jnp.all(reference != 0))
    assert_tree_close(run(scale), reference, 1e-4)


# ---------------------------------------------------------------------------------
# c. Second derivatives: an error that says so, or correct values (central
#    differences of the exact first derivative, in float64).
# ---------------------------------------------------------------------------------

W2 = W3[:2, :2]
X2, T2 = X3[:2], T3[:2]


def _objective_fn(w):
    return lcp.least_control_objective(
        _f, _sq_loss, w, jnp.zeros(2), (X2, T2),
        controller=lcp.DynamicInversion(alpha=0.1), rtol=1e-13, atol=1e-13,
    )[0]  # fmt: skip


def _fd_jacobian(g, w, eps=1e-5):
    g = jax.jit(g)
    cols = []
    flat = np.asarray(w).ravel()
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = eps
        plus = g(jnp.asarray((flat + e).reshape(w.shape)))
        minus = g(jnp.asarray((flat - e).reshape(w.shape)))
        cols.append((np.asarray(plus) - np.asarray(minus)).ravel() / (2 * eps))
    # h[i, j] = d g_i / d w_j, shaped as jax.hessian's output.
    return np.stack(cols, axis=-1).reshape(w.shape + w.shape)


def _second_order_ok(second, fun, w, rtol=1e-5):
    try:
        h = second(fun)(w)
    except Exception as e:  # an error is fine if it says what is unsupported
        message = _message(e)
        assert re.search(r"second|higher.order|forward.mode", message, re.I), message
        return
    assert_tree_close(h, _fd_jacobian(jax.grad(fun), w), rtol)


@pytest.mark.slow
def test_c_objective_first_order_matches_finite_differences():
    # The objective is min over phi of ½‖f‖² + L/α (Theorem 1): its gradient is the
    # update, checked against central differences of the objective's value.
    grad = jax.grad(_objective_fn)(W2)
    value = jax.jit(_objective_fn)
    fd = np.zeros(4)
    flat = np.asarray(W2).ravel()
    eps = 1e-5
    for i in range(4):
        e = np.zeros(4)
        e[i] = eps
        fd[i] = (
            value(jnp.asarray((flat + e).reshape(2, 2)))
            - value(jnp.asarray((flat - e).reshape(2, 2)))
        ) / (2 * eps)
    assert_tree_close(grad, jnp.asarray(fd.reshape(2, 2)), 1e-6)
    grad_lcg, _ = lcp.least_control_grad(
        _f, _sq_loss, W2, jnp.zeros(2), (X2, T2), rtol=1e-13, atol=1e-13
    )
    assert_tree_close(grad, grad_lcg, 1e-9)


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(jax.hessian, id="hessian"),
        pytest.param(lambda g: jax.jacrev(jax.grad(g)), id="jacrev_grad"),
        pytest.param(lambda g: jax.jacfwd(jax.grad(g)), id="jacfwd_grad"),
    ],
)
def test_c_objective_second_order(second):
    _second_order_ok(second, _objective_fn, W2)


def _adjoint_loss(entry):
    tol = 1e-12
    T = lambda z, w: jnp.tanh(w @ z + X2)
    if entry == "fixed_point":
        return lambda w: _readout3(optx.fixed_point(
            T, lcp.AndersonAcceleration(rtol=tol, atol=tol), jnp.zeros(2), w,
            adjoint=lcp.LeastControlAdjoint(strength=1e-2),
        ).value)  # fmt: skip
    if entry == "root_find":
        return lambda w: _readout3(optx.root_find(
            lambda z, w: T(z, w) - z, optx.Newton(rtol=tol, atol=tol),
            jnp.zeros(2), w, adjoint=lcp.LeastControlAdjoint(strength=1e-2),
        ).value)  # fmt: skip
    decorated = lcp.custom_fixed_point(T, strength=1e-2, rtol=tol, atol=tol)(
        lambda init, w: (
            optx.fixed_point(
                T, lcp.AndersonAcceleration(rtol=tol, atol=tol), init, w
            ).value
        )
    )
    return lambda w: _readout3(decorated(jnp.zeros(2), w))


def _readout3(y):
    return jnp.sum(jnp.sin(y) * jnp.arange(1.0, y.size + 1)) + 0.5 * jnp.sum(y**2)


# (root_find shares the backward pass of fixed_point.)
@pytest.mark.parametrize(
    "entry",
    ["fixed_point", "custom_fixed_point"],
)
@pytest.mark.slow
def test_c_adjoint_hessian(entry):
    # The derivative of the least-control update (a function of w): an error that
    # says second order is unsupported, or its value.
    _second_order_ok(jax.hessian, _adjoint_loss(entry), W2, rtol=1e-4)


# ---------------------------------------------------------------------------------
# d. Reverse-over-reverse (jacrev of jacrev) of a vector output when the parameter
#    enters additively: equals jacrev(grad) of each component, and ImplicitAdjoint's
#    at weak control.
# ---------------------------------------------------------------------------------


def _additive_out(entry, adjoint):
    tol = 1e-12
    T = lambda z, a: jnp.tanh(W3 @ z) + a
    z0 = jnp.zeros(3)
    if entry == "fixed_point":
        return lambda a: (
            optx.fixed_point(
                T, lcp.AndersonAcceleration(rtol=tol, atol=tol), z0, a, adjoint=adjoint
            ).value
        )
    if entry == "fixed_point_iteration":
        return lambda a: (
            optx.fixed_point(
                T, optx.FixedPointIteration(rtol=tol, atol=tol), z0, a, adjoint=adjoint
            ).value
        )
    if entry == "root_find":
        return lambda a: optx.root_find(
            lambda z, a: T(z, a) - z, optx.Newton(rtol=tol, atol=tol), z0, a,
            adjoint=adjoint,
        ).value  # fmt: skip
    if entry == "deq":
        deq = lcp.DEQ(
            T, z0, solver=lcp.AndersonAcceleration(rtol=tol, atol=tol), adjoint=adjoint
        )
        return deq
    raise ValueError(entry)


@pytest.mark.slow
def test_d_jacrev_jacrev_matches_jacrev_grad():
    # Row i of jacrev(jacrev(out)) is jacrev(grad) of output i: both differentiate
    # the least-control VJP for the cotangent e_i in a.
    a = jnp.array([0.1, -0.2, 0.3])
    out = _additive_out("fixed_point", lcp.LeastControlAdjoint(strength=1e-2))
    second = jax.jacrev(jax.jacrev(out))(a)
    per_component = jnp.stack(
        [jax.jacrev(jax.grad(lambda a, i=i: out(a)[i]))(a) for i in range(3)]
    )
    assert_tree_close(second, per_component, 1e-8)


# FixedPointIteration forward: the same backward path as AndersonAcceleration's.
@pytest.mark.parametrize("entry", ["fixed_point", "root_find", "deq"])
@pytest.mark.slow
def test_d_jacrev_jacrev_additive_weak_control(entry):
    # At weak control the least-control VJP is the implicit one, as a function of a.
    a = jnp.array([0.1, -0.2, 0.3])
    out = _additive_out(entry, lcp.LeastControlAdjoint(strength=1e-8))
    reference = jax.jacrev(jax.jacrev(_additive_out(entry, optx.ImplicitAdjoint())))(a)
    assert_tree_close(jax.jacrev(jax.jacrev(out))(a), reference, 1e-5)


@pytest.mark.slow
def test_d_jacrev_jacrev_custom_fixed_point():
    a = jnp.array([0.1, -0.2, 0.3])
    T = lambda z, a: jnp.tanh(W3 @ z) + a
    inner = lambda init, a: (
        optx.fixed_point(
            T, lcp.AndersonAcceleration(rtol=1e-12, atol=1e-12), init, a
        ).value
    )
    out = lambda a: lcp.custom_fixed_point(T, strength=1e-8, rtol=1e-12, atol=1e-12)(
        inner
    )(jnp.zeros(3), a)
    reference = jax.jacrev(
        jax.jacrev(_additive_out("fixed_point", optx.ImplicitAdjoint()))
    )(a)
    assert_tree_close(jax.jacrev(jax.jacrev(out))(a), reference, 1e-5)


# ---------------------------------------------------------------------------------
# e. Complex states with a real loss: as optimistix does, in both dtype-promotion
#    modes.
# ---------------------------------------------------------------------------------

_WC = (W3 + 0.5j * W3.T).astype(jnp.complex128)
_C = jnp.asarray(1.0 + 0.5j, jnp.complex128)


def _complex_T(z, theta):
    a, b = theta  # a real, b complex
    return 0.5 * jnp.tanh(_WC @ z) + a.astype(jnp.complex128) * _C + b


def _complex_loss(z):
    return jnp.sum(jnp.real(z * jnp.conj(z))) + jnp.sum(jnp.real(z) * K3)


_complex_solvers = {
    "fixed_point_iteration": optx.FixedPointIteration(rtol=1e-12, atol=1e-12),
    "anderson": lcp.AndersonAcceleration(rtol=1e-12, atol=1e-12),
}


def _complex_grad(entry, adjoint, theta):
    z0 = jnp.zeros(3, jnp.complex128)
    if entry == "root_find":
        solve = lambda th: optx.root_find(
            lambda z, th: _complex_T(z, th) - z, optx.Newton(rtol=1e-12, atol=1e-12),
            z0, th, adjoint=adjoint,
        ).value  # fmt: skip
    elif entry == "deq":
        solve = lambda th: lcp.DEQ(
            _complex_T, z0, solver=_complex_solvers["anderson"], adjoint=adjoint
        )(th)
    else:
        solve = lambda th: (
            optx.fixed_point(
                _complex_T, _complex_solvers[entry], z0, th, adjoint=adjoint
            ).value
        )
    return jax.grad(lambda th: _complex_loss(solve(th)))(theta)


@pytest.mark.parametrize("promotion", ["standard", "strict"])
@pytest.mark.parametrize(
    "entry", ["fixed_point_iteration", "anderson", "root_find", "deq"]
)
@pytest.mark.slow
def test_e_complex_state(entry, promotion):
    theta = (jnp.array([0.1, -0.2, 0.3]), jnp.array([0.2j, 0.1, -0.1 + 0.1j]))
    with jax.numpy_dtype_promotion(promotion):
        reference = _complex_grad(entry, optx.ImplicitAdjoint(), theta)
        grad = _complex_grad(entry, lcp.LeastControlAdjoint(strength=1e-8), theta)
    assert grad[0].dtype == jnp.float64 and grad[1].dtype == jnp.complex128
    assert_tree_close(grad, reference, 1e-6)


@pytest.mark.slow
def test_e_complex_custom_fixed_point():
    theta = (jnp.array([0.1, -0.2, 0.3]), jnp.array([0.2j, 0.1, -0.1 + 0.1j]))
    inner = lambda init, th: (
        optx.fixed_point(
            _complex_T, _complex_solvers["fixed_point_iteration"], init, th
        ).value
    )
    solve = lcp.custom_fixed_point(_complex_T, strength=1e-8, rtol=1e-12, atol=1e-12)(
        inner
    )
    grad = jax.grad(lambda th: _complex_loss(solve(jnp.zeros(3, jnp.complex128), th)))(
        theta
    )
    reference = _complex_grad("fixed_point_iteration", optx.ImplicitAdjoint(), theta)
    assert_tree_close(grad, reference, 1e-6)


@pytest.mark.parametrize("promotion", ["standard", "strict"])
def test_e_anderson_complex_fixed_point(promotion):
    # z = A z + b, closed form (I - A)^{-1} b.
    a = 0.5 * _WC
    b = jnp.array([1.0 + 1.0j, -0.5j, 0.25], jnp.complex128)
    with jax.numpy_dtype_promotion(promotion):
        sol = optx.fixed_point(
            lambda z, _: a @ z + b,
            lcp.AndersonAcceleration(rtol=1e-12, atol=1e-12),
            jnp.zeros(3, jnp.complex128),
        )
    exact = jnp.linalg.solve(jnp.eye(3) - a, b)
    assert sol.value.dtype == jnp.complex128
    assert_tree_close(sol.value, exact, 1e-10)


# ---------------------------------------------------------------------------------
# f. jaxopt's calling conventions, so that custom_fixed_point/custom_root are drop-in
#    replacements of jaxopt.implicit_diff's (reference: jaxopt's implicit gradient
#    with an exact LU solve; ours at strength 1e-8).
# ---------------------------------------------------------------------------------


def _jT(x, w, b):
    return jnp.tanh(w @ x + b)


def _jF(x, w, b):
    return _jT(x, w, b) - x


def _iterate_solver(init_params, w, b):
    # Ignores init_params (jaxopt allows None for such a solver); a contraction of
    # norm about 0.6, so 120 steps reach float64 precision.
    del init_params
    return jax.lax.fori_loop(0, 120, lambda i, x: _jT(x, w, b), jnp.zeros(3))


def _decorators(form):
    if form == "fixed_point":
        ours = lcp.custom_fixed_point(_jT, strength=1e-8, rtol=1e-12, atol=1e-12)
        theirs = jaxopt.implicit_diff.custom_fixed_point(
            _jT, solve=jaxopt.linear_solve.solve_lu
        )
    else:
        ours = lcp.custom_root(_jF, strength=1e-8, rtol=1e-12, atol=1e-12)
        theirs = jaxopt.implicit_diff.custom_root(
            _jF, solve=jaxopt.linear_solve.solve_lu
        )
    return ours(_iterate_solver), theirs(_iterate_solver)


@pytest.mark.parametrize("form", ["fixed_point", "root"])
def test_f_init_params_none(form):
    ours, theirs = _decorators(form)
    grads = [
        jax.grad(lambda w, b, s=solve: _readout(s(None, w, b)), argnums=(0, 1))(W3, X3)
        for solve in (ours, theirs)
    ]
    assert_tree_close(grads[0], grads[1], 1e-6)


def _scalar_decorators(form):
    # T(x, w, s) with a scalar s passed as the solver's own argument.
    T = lambda x, w, s: jnp.tanh(w @ x + s * X3)
    F = lambda x, w, s: T(x, w, s) - x
    solver = lambda init, w, s: jax.lax.fori_loop(
        0, 120, lambda i, x: T(x, w, s), jnp.zeros(3)
    )
    if form == "fixed_point":
        ours = lcp.custom_fixed_point(T, strength=1e-8, rtol=1e-12, atol=1e-12)
        theirs = jaxopt.implicit_diff.custom_fixed_point(
            T, solve=jaxopt.linear_solve.solve_lu
        )
    else:
        ours = lcp.custom_root(F, strength=1e-8, rtol=1e-12, atol=1e-12)
        theirs = jaxopt.implicit_diff.custom_root(F, solve=jaxopt.linear_solve.solve_lu)
    return ours(solver), theirs(solver)


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("form", ["fixed_point", "root"])
@pytest.mark.slow
def test_f_grad_wrt_python_float(form, keyword):
    # jax.grad(loss)(1.0) where the Python float itself is the solver's argument.
    def make(solve):
        if keyword:
            return lambda s: _readout(solve(jnp.zeros(3), W3, s=s))
        return lambda s: _readout(solve(jnp.zeros(3), W3, s))

    ours, theirs = _scalar_decorators(form)
    assert_tree_close(jax.grad(make(ours))(1.0), jax.grad(make(theirs))(1.0), 1e-6)


def test_f_grad_wrt_array_built_from_python_float():
    # b = s * X3: works today; kept as a guard.
    def make(solve):
        return lambda s: _readout(solve(jnp.zeros(3), W3, s * X3))

    ours, theirs = _decorators("fixed_point")
    assert_tree_close(jax.grad(make(ours))(1.0), jax.grad(make(theirs))(1.0), 1e-6)


def test_f_python_float_argument_not_differentiated():
    T = lambda x, w, s: jnp.tanh(w @ x + s * X3)
    solver = lambda init, w, s: jax.lax.fori_loop(
        0, 120, lambda i, x: T(x, w, s), jnp.zeros(3)
    )
    ours = lcp.custom_fixed_point(T, strength=1e-8, rtol=1e-12, atol=1e-12)(solver)
    theirs = jaxopt.implicit_diff.custom_fixed_point(
        T, solve=jaxopt.linear_solve.solve_lu
    )(solver)
    grads = [
        jax.grad(lambda w, s=solve: _readout(s(jnp.zeros(3), w, 0.7)))(W3)
        for solve in (ours, theirs)
    ]
    assert_tree_close(grads[0], grads[1], 1e-6)


_calls = {
    "keywords": lambda solve, w, b: solve(jnp.zeros(3), w=w, b=b),
    "keywords_reordered": lambda solve, w, b: solve(jnp.zeros(3), b=b, w=w),
    "mixed": lambda solve, w, b: solve(jnp.zeros(3), w, b=b),
}


@pytest.mark.parametrize(
    "form,call",
    [
        ("fixed_point", "keywords"),
        ("fixed_point", "keywords_reordered"),
        ("fixed_point", "mixed"),
        ("root", "mixed"),
    ],
)
@pytest.mark.slow
def test_f_keyword_arguments(form, call):
    ours, theirs = _decorators(form)
    grads = [
        jax.grad(lambda w, b, s=solve: _readout(_calls[call](s, w, b)), argnums=(0, 1))(
            W3, X3
        )
        for solve in (ours, theirs)
    ]
    assert_tree_close(grads[0], grads[1], 1e-6)


def _jT_positional(x, w, b, /):
    return jnp.tanh(w @ x + b)


def _iterate_solver_named(init, w, b):
    del init
    return jax.lax.fori_loop(0, 120, lambda i, x: _jT(x, w, b), jnp.zeros(3))


@pytest.mark.parametrize(
    "case",
    [
        "positional_only_function",
        "init_by_keyword",
    ],
)
def test_f_keywords_bound_to_signature(case):
    # jaxopt binds the solver's arguments to the reference signature (that of
    # fixed_point_fun) and calls fixed_point_fun positionally; it also calls the
    # solver with the user's own keywords, whatever its first parameter's name.
    if case == "positional_only_function":
        T, solver = _jT_positional, _iterate_solver
        call = lambda solve, w, b: solve(jnp.zeros(3), w, b=b)
    else:
        T, solver = _jT, _iterate_solver_named
        call = lambda solve, w, b: solve(init=jnp.zeros(3), w=w, b=b)
    ours = lcp.custom_fixed_point(T, strength=1e-8, rtol=1e-12, atol=1e-12)(solver)
    theirs = jaxopt.implicit_diff.custom_fixed_point(
        T, solve=jaxopt.linear_solve.solve_lu
    )(solver)
    grads = [
        jax.grad(lambda w, b, s=solve: _readout(call(s, w, b)), argnums=(0, 1))(W3, X3)
        for solve in (ours, theirs)
    ]
    assert_tree_close(grads[0], grads[1], 1e-6)


@pytest.mark.parametrize("form", ["fixed_point", "root"])
def test_f_function_returning_aux_is_refused(form):
    fun = (
        (lambda x, w, b: (_jT(x, w, b), None))
        if form == "fixed_point"
        else (lambda x, w, b: (_jF(x, w, b), jnp.sum(x)))
    )
    decorate = lcp.custom_fixed_point if form == "fixed_point" else lcp.custom_root
    name = "fixed_point_fun" if form == "fixed_point" else "optimality_fun"
    with pytest.raises(ValueError, match=name):
        solve = decorate(fun)(_iterate_solver)
        jax.grad(lambda w: _readout(solve(jnp.zeros(3), w, X3)))(W3)


# ---------------------------------------------------------------------------------
# g. Integer leaves in theta (or in the arguments) are not differentiated and do not
#    break differentiation of the float leaves.
# ---------------------------------------------------------------------------------


def _f_n(phi, theta, args):
    return jnp.tanh(theta["W"] @ phi * (theta["n"] / 3) + args[0]) - phi


def _f_3(phi, theta, args):
    return jnp.tanh(theta["W"] @ phi + args[0]) - phi


@pytest.mark.parametrize(
    "n", [pytest.param(3, id="python_int"), pytest.param(jnp.array(3), id="int_array")]
)
@pytest.mark.parametrize("entry", ["objective", "grad"])
@pytest.mark.slow
def test_g_integer_leaf_in_theta(entry, n):
    theta = {"W": W3, "n": n}
    args, phi0 = (X3, T3), jnp.zeros(3)
    if entry == "objective":
        grad = eqx.filter_grad(
            lambda th: lcp.least_control_objective(_f_n, _sq_loss, th, phi0, args)[0]
        )(theta)
        reference = jax.grad(
            lambda th: lcp.least_control_objective(_f_3, _sq_loss, th, phi0, args)[0]
        )({"W": W3})
    else:
        grad, _ = lcp.least_control_grad(_f_n, _sq_loss, theta, phi0, args)
        reference, _ = lcp.least_control_grad(_f_3, _sq_loss, {"W": W3}, phi0, args)
    assert_tree_close(grad["W"], reference["W"], 1e-12)


@pytest.mark.parametrize("entry", ["fixed_point", "custom_fixed_point", "deq"])
@pytest.mark.slow
def test_g_integer_leaf_in_layer_arguments(entry):
    T = lambda z, th: jnp.tanh(th["W"] @ z * (th["n"] / 3) + X3)
    T_ref = lambda z, th: jnp.tanh(th["W"] @ z + X3)
    solver = lcp.AndersonAcceleration(rtol=1e-12, atol=1e-12)

    def out(th, fn):
        if entry == "fixed_point":
            return optx.fixed_point(
                fn, solver, jnp.zeros(3), th, adjoint=lcp.LeastControlAdjoint()
            ).value
        if entry == "custom_fixed_point":
            inner = lambda init, th: optx.fixed_point(fn, solver, init, th).value
            return lcp.custom_fixed_point(fn, rtol=1e-12, atol=1e-12)(inner)(
                jnp.zeros(3), th
            )
        return lcp.DEQ(fn, jnp.zeros(3), solver=solver)(th)

    grad = eqx.filter_grad(lambda th: _readout(out(th, T)))(
        {"W": W3, "n": jnp.array(3)}
    )
    reference = jax.grad(lambda th: _readout(out(th, T_ref)))({"W": W3})
    assert_tree_close(grad["W"], reference["W"], 1e-10)


# ---------------------------------------------------------------------------------
# h. Errors blame the right thing: a non-finite input is named (theta, phi0, args);
#    a forward solve that failed is reported as such, not as a bad loss or an
#    unstable f.
# ---------------------------------------------------------------------------------


def _assert_blames(excinfo, must, must_not):
    message = _message(excinfo.value)
    assert re.search(must, message, re.I), message[-2000:]
    assert not re.search(must_not, message, re.I), message[-2000:]


_WRONG_FORWARD_BLAME = r"loss downstream|downstream of the implicit layer"
_WRONG_INPUT_BLAME = r"is unstable|raise (the controller's )?`?alpha"


def _nan_forward(entry):
    # sqrt of a negative state: the forward solve is NaN from its first step.
    T = lambda z, a: jnp.sqrt(z - 1.0) + a
    solver = optx.FixedPointIteration(rtol=1e-8, atol=1e-8)
    z0 = jnp.zeros(3)
    if entry == "fixed_point":
        return lambda a: optx.fixed_point(
            T, solver, z0, a, throw=False, max_steps=5,
            adjoint=lcp.LeastControlAdjoint(rtol=1e-8, atol=1e-8),
        ).value  # fmt: skip
    if entry == "root_find":
        return lambda a: optx.root_find(
            lambda z, a: T(z, a) - z, optx.Newton(rtol=1e-8, atol=1e-8), z0, a,
            throw=False, max_steps=5, adjoint=lcp.LeastControlAdjoint(),
        ).value  # fmt: skip
    if entry == "custom_fixed_point":
        inner = lambda init, a: (
            optx.fixed_point(T, solver, init, a, throw=False, max_steps=5).value
        )
        return lambda a: lcp.custom_fixed_point(T)(inner)(z0, a)
    return lambda a: lcp.DEQ(T, z0, solver=solver, throw=False, max_steps=5)(a)


@pytest.mark.parametrize(
    "entry", ["fixed_point", "root_find", "custom_fixed_point", "deq"]
)
@pytest.mark.slow
def test_h_nan_forward_solve_blamed_on_forward(entry):
    out = _nan_forward(entry)
    assert not bool(jnp.all(jnp.isfinite(out(X3))))
    with pytest.raises(Exception) as excinfo:
        jax.block_until_ready(jax.grad(lambda a: jnp.sum(out(a) ** 2))(X3))
    _assert_blames(excinfo, r"forward", _WRONG_FORWARD_BLAME)


_nan = jnp.array([jnp.nan, 0.0, 0.0])


@pytest.mark.parametrize(
    "where,name",
    [
        ("theta", "theta"),
        ("phi0", "phi0"),
        ("args_input", "args"),
        ("args_target", "args"),
    ],
)
@pytest.mark.parametrize("entry", ["grad", "objective"])
@pytest.mark.slow
def test_h_nan_input_named(entry, where, name):
    theta = W3.at[0, 0].set(jnp.nan) if where == "theta" else W3
    phi0 = _nan if where == "phi0" else jnp.zeros(3)
    x = X3 + _nan if where == "args_input" else X3
    t = T3 + _nan if where == "args_target" else T3
    with pytest.raises(Exception) as excinfo:
        if entry == "grad":
            out = lcp.least_control_grad(_f, _sq_loss, theta, phi0, (x, t))
        else:
            out = jax.grad(
                lambda w: lcp.least_control_objective(_f, _sq_loss, w, phi0, (x, t))[0]
            )(theta)
        jax.block_until_ready(out)
    _assert_blames(excinfo, name, _WRONG_INPUT_BLAME)


# ---------------------------------------------------------------------------------
# i. A float32 state with x64 enabled (as in these tests): IMEX and DiscreteTime
#    work and agree with the float64 result to float32 accuracy.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver",
    [
        pytest.param(lcp.IMEX(), id="imex"),
        pytest.param(lcp.DiscreteTime(step_size=0.5), id="discrete"),
        pytest.param(
            lcp.DiscreteTime(0.5, lcp.AndersonAcceleration(rtol=1e-6, atol=1e-6)),
            id="discrete_anderson",
        ),
    ],
)
@pytest.mark.parametrize("entry", ["grad", "objective"])
@pytest.mark.slow
def test_i_float32_state_under_x64(entry, solver):
    def run(dtype):
        args = (X3.astype(dtype), T3.astype(dtype))
        # Proportional DI at alpha = 1: plain Euler at step 0.5 converges (in about
        # 120 steps in float64), so any failure is the dtype's, not the solver's.
        controller = lcp.DynamicInversion(alpha=1.0, proportional=True)
        kw = dict(controller=controller, solver=solver, max_steps=2000)
        if entry == "grad":
            return lcp.least_control_grad(
                _f, _sq_loss, W3.astype(dtype), jnp.zeros(3, dtype), args, **kw
            )[0]
        return jax.grad(
            lambda w: lcp.least_control_objective(
                _f, _sq_loss, w, jnp.zeros(3, dtype), args, **kw
            )[0]
        )(W3.astype(dtype))

    grad32 = run(jnp.float32)
    assert grad32.dtype == jnp.float32
    assert_tree_close(grad32, run(jnp.float64), 1e-3)


# ---------------------------------------------------------------------------------
# j. Argument checks that hold for arrays too; stability is not checked by root
#    finders (documented), while a dynamics-following solver reports divergence.
# ---------------------------------------------------------------------------------


def _fp_loss(adjoint):
    return lambda w: _readout(
        optx.fixed_point(
            _cell, lcp.AndersonAcceleration(rtol=1e-10, atol=1e-10), jnp.zeros(3),
            (w, X3), adjoint=adjoint,
        ).value
    )  # fmt: skip


@pytest.mark.parametrize(
    "strength",
    [
        pytest.param(jnp.array(-1e-3), id="negative"),
        pytest.param(jnp.array(0.0), id="zero"),
        pytest.param(jnp.array(jnp.nan), id="nan"),
    ],
)
@pytest.mark.parametrize("entry", ["adjoint", "custom_fixed_point", "deq"])
def test_j_array_strength_checked(entry, strength):
    with pytest.raises(Exception) as excinfo:
        if entry == "adjoint":
            loss = _fp_loss(lcp.LeastControlAdjoint(strength=strength))
        elif entry == "custom_fixed_point":
            T = lambda z, w: _cell(z, (w, X3))
            solve = lcp.custom_fixed_point(T, strength=strength)(
                lambda init, w: (
                    optx.fixed_point(
                        T, lcp.AndersonAcceleration(rtol=1e-10, atol=1e-10), init, w
                    ).value
                )
            )
            loss = lambda w: _readout(solve(jnp.zeros(3), w))
        else:
            deq = lcp.DEQ(
                lambda z, w: _cell(z, (w, X3)), jnp.zeros(3),
                adjoint=lcp.LeastControlAdjoint(strength=strength),
            )  # fmt: skip
            loss = lambda w: _readout(deq(w))
        jax.block_until_ready(jax.grad(loss)(W3))
    # Named as the bad argument, not only as advice in a divergence message.
    _assert_blames(excinfo, r"strength", r"diverged|did not converge")


@pytest.mark.parametrize(
    "make,name",
    [
        pytest.param(
            lambda: lcp.DynamicInversion(alpha=jnp.array(-0.1)), "alpha", id="di"
        ),
        pytest.param(lambda: lcp.EnergyBased(beta=jnp.array(-1.0)), "beta", id="ebd"),
        pytest.param(
            lambda: lcp.LinearFeedback(Q=jnp.eye(3), alpha=jnp.array(-0.1)),
            "alpha",
            id="lf",
        ),  # fmt: skip
    ],
)
@pytest.mark.slow
def test_j_array_controller_gain_checked(make, name):
    with pytest.raises(Exception) as excinfo:
        out = lcp.least_control_grad(
            _f, _sq_loss, W3, jnp.zeros(3), (X3, T3), controller=make()
        )
        jax.block_until_ready(out)
    _assert_blames(excinfo, name, r"diverged|did not converge|did not reach")


# An unstable linear f(phi) = A phi - b: A has eigenvalues 0.5 and -1, so the free
# equilibrium A^{-1} b repels along the first eigenvector.
_A_UNSTABLE = jnp.array([[0.5, 0.3], [0.0, -1.0]])
_B = jnp.array([0.4, -0.2])
_TARGET = jnp.array([1.0, 0.5])


def _f_linear(phi, theta, args):
    a, b = theta
    return a @ phi - b


def _loss_linear(phi, args):
    return 0.5 * jnp.sum((phi - _TARGET) ** 2)


@pytest.mark.slow
def test_j_unstable_linear_default_solver_is_stationary_point():
    # Root finders do not check stability: the default solver returns the controlled
    # equilibrium, the unique minimiser of ½‖A phi - b‖² + L/α (closed form).
    alpha = 0.1
    a, b = _A_UNSTABLE, _B
    grad, info = lcp.least_control_grad(
        _f_linear, _loss_linear, (a, b), jnp.zeros(2),
        controller=lcp.DynamicInversion(alpha=alpha),
    )  # fmt: skip
    assert info.result == lcp.RESULTS.successful
    phi = jnp.linalg.solve(a.T @ a + jnp.eye(2) / alpha, a.T @ b + _TARGET / alpha)
    psi = -(a @ phi - b)
    assert_tree_close(info.phi, phi, 1e-10)
    assert_tree_close(info.psi, psi, 1e-10)
    # grad = -(∂θ f)ᵀ psi: d/dA gives -psi phiᵀ, d/db gives +psi.
    assert_tree_close(grad, (-jnp.outer(psi, phi), psi), 1e-10)
    assert_tree_close(info.phi_free, jnp.linalg.solve(a, b), 1e-10)


@pytest.mark.slow
def test_j_unstable_linear_discrete_time_reports_divergence():
    _, info = lcp.least_control_grad(
        _f_linear, _loss_linear, (_A_UNSTABLE, _B), jnp.zeros(2),
        controller=lcp.DynamicInversion(alpha=0.1),
        solver=lcp.DiscreteTime(step_size=0.5), max_steps=500, throw=False,
    )  # fmt: skip
    assert info.result != lcp.RESULTS.successful


# ---------------------------------------------------------------------------------
# k. A bad number given to any entry point is refused at construction or trace time,
#    naming the argument, never accepted to fail later or return a wrong answer
#    (e.g. DiscreteTime(step_size=0) used to report success at the start point).
# ---------------------------------------------------------------------------------


def _entry_with(entry, **kw):
    theta, phi0, args = W3, jnp.zeros(3), (X3, T3)
    if entry == "adjoint":
        return lambda: lcp.LeastControlAdjoint(**kw)
    if entry == "custom_fixed_point":
        return lambda: lcp.custom_fixed_point(_cell, **kw)
    if entry == "grad":
        return lambda: lcp.least_control_grad(_f, _sq_loss, theta, phi0, args, **kw)
    if entry == "objective":
        return lambda: lcp.least_control_objective(
            _f, _sq_loss, theta, phi0, args, **kw
        )
    assert entry == "deq"
    return lambda: lcp.DEQ(_cell, jnp.zeros(3), **kw)


_BAD_NUMBERS = [
    ("max_steps", 0), ("max_steps", -3), ("max_steps", 2.5), ("max_steps", True),
    ("rtol", -1e-6), ("atol", float("nan")), ("rtol", float("inf")),
]  # fmt: skip


@pytest.mark.parametrize(
    "entry, name, value",
    [
        (entry, name, value)
        for entry in ["adjoint", "custom_fixed_point", "grad", "objective", "deq"]
        for name, value in _BAD_NUMBERS
        # DEQ takes its tolerances from its forward solver.
        if entry != "deq" or name == "max_steps"
    ],
)
def test_k_bad_numbers_refused(entry, name, value):
    with pytest.raises(ValueError, match=rf"\({name}=\.\.\.\)`"):
        _entry_with(entry, **{name: value})()


def test_k_zero_tolerances_refused():
    with pytest.raises(ValueError, match="both 0"):
        lcp.LeastControlAdjoint(rtol=0.0, atol=0.0)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: lcp.DiscreteTime(step_size=v), "step_size"),
        (lambda v: lcp.IMEX(step_size=v), "step_size"),
        (lambda v: lcp.AndersonAcceleration(1e-6, 1e-6, mixing=v), "mixing"),
    ],
)
@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_k_bad_step_sizes_refused(make, name, value):
    with pytest.raises(ValueError, match=rf"\({name}=\.\.\.\)` must be positive"):
        make(value)
