"""Shared problems and tolerance helpers for the tests, and the registry of problems,
controllers and inner solvers of `test_reference.py` with its references computed
without lcp_solvers (numpy/scipy, float64)."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import scipy.optimize


def tree_rel_error(a, b) -> float:
    """max |a - b| / max |b| over all leaves (b is the reference)."""
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    assert len(la) == len(lb), "pytrees differ in structure"
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / max(den, 1e-300)


def assert_tree_close(a, b, rtol: float):
    err = tree_rel_error(a, b)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def tree_cosine(a, b) -> float:
    va = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(a)])
    vb = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(b)])
    return float(va @ vb / (jnp.linalg.norm(va) * jnp.linalg.norm(vb)))


def contraction_weights(key, n: int, rho: float = 0.6, dtype=jnp.float64):
    """A random n x n matrix with spectral norm rho, so tanh(W z + b) contracts."""
    w = jax.random.normal(key, (n, n), dtype)
    return rho * w / jnp.linalg.norm(w, ord=2)


def central_difference(fun, theta, eps: float = 1e-6):
    """Gradient of a scalar function of a flat numpy vector by central differences."""
    theta = np.asarray(theta, dtype=np.float64)
    grad = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = eps
        grad[i] = (fun(theta + e) - fun(theta - e)) / (2 * eps)
    return grad


# ============================================================================
# The registry of `test_reference.py`. Everything below the problem definitions is
# computed WITHOUT lcp_solvers and without JAX autodiff: numpy/scipy in float64,
# Jacobians by complex-step differentiation of the numpy dynamics (exact to
# rounding), minima by scipy.
# ============================================================================

# ----------------------------------------------------------------- pytree <-> numpy


def np_flatten(tree) -> np.ndarray:
    """All leaves of a pytree (JAX or numpy arrays) as one flat numpy vector, in
    `jax.tree_util` leaf order; keeps a complex dtype."""
    leaves = [np.ravel(np.asarray(x)) for x in jtu.tree_leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


class _Layout:
    """Splits a flat numpy vector back into a pytree shaped like `like` (numpy
    leaves of the vector's dtype, so complex numbers pass through)."""

    def __init__(self, like):
        leaves, self.treedef = jtu.tree_flatten(like)
        self.shapes = [np.shape(x) for x in leaves]
        self.bounds = np.cumsum([0] + [int(np.size(x)) for x in leaves])
        self.size = int(self.bounds[-1])

    def unflatten(self, vec):
        assert vec.shape == (self.size,), vec.shape
        leaves = [
            vec[a:b].reshape(shape)
            for a, b, shape in zip(self.bounds[:-1], self.bounds[1:], self.shapes)
        ]
        return jtu.tree_unflatten(self.treedef, leaves)


def complex_step_jacobian(fun, x, h: float = 1e-30) -> np.ndarray:
    """d fun / d x (one column per component of x) by the complex step
    Im(fun(x + ih e_i)) / h: no subtractive cancellation, exact to rounding for an
    analytic `fun`."""
    x = np.asarray(x, dtype=np.float64)
    cols = []
    for i in range(x.size):
        e = np.zeros(x.size, dtype=np.complex128)
        e[i] = 1j * h
        cols.append(np.imag(fun(x + e)) / h)
    return np.stack(cols, axis=1)


def minimise(fun, grad, x0, gtol: float = 1e-12):
    """argmin of a smooth function: scipy's BFGS (gtol 1e-12) from x0, then Newton
    steps on the gradient (Hessian by central differences of `grad`) while they
    reduce it, so the gradient ends at rounding level (BFGS's line search alone often
    stops near 1e-10)."""
    res = scipy.optimize.minimize(
        fun, x0, jac=grad, method="BFGS", options={"gtol": gtol, "maxiter": 20000}
    )
    x = res.x
    best = np.max(np.abs(grad(x)))
    eps = 1e-6
    for _ in range(10):
        hess = np.stack(
            [
                (grad(x + eps * e) - grad(x - eps * e)) / (2 * eps)
                for e in np.eye(x.size)
            ],
            axis=1,
        )
        x_new = x - np.linalg.solve(0.5 * (hess + hess.T), grad(x))
        new = np.max(np.abs(grad(x_new)))
        if not new < best:
            break
        x, best = x_new, new
    assert best < gtol, f"reference minimiser stalled at |grad| = {best:.1e}"
    return x


# ------------------------------------------------------------------------- problems


@dataclasses.dataclass(eq=False)
class Problem:
    """A free dynamics `f(phi, theta, args)` with the squared-error loss
    `L = ½‖output(phi) - y‖²` on output components, usable by lcp_solvers (JAX) and
    by the numpy references, which evaluate the same formula with numpy.

    `f_xp(xp, phi, theta, args)` is written once against an array module `xp`
    (`jax.numpy` or `numpy`; complex-safe, for the complex-step Jacobians).
    `fixed_point_ok`: `y + f(y)` contracts, so the layer can also be solved as the
    fixed point of `fn = f + y` (else only as a root problem).
    """

    id: str
    f_xp: Callable
    output: Callable  # phi -> output array; works on numpy and JAX pytrees
    theta: Any
    args: dict
    phi0: Any
    fixed_point_ok: bool = True

    def __post_init__(self):
        # Each function is created once: lcp_solvers' jit caches key on identity.
        self.f = functools.partial(self.f_xp, jnp)

        def loss(phi, args, _out=self.output):
            return 0.5 * jnp.sum((_out(phi) - args["y"]) ** 2)

        self.loss = loss
        f, a = self.f, self.args
        # The drop-in layers: a fixed-point map `fn(y, theta) = y + f` and a root
        # function `fn(y, theta) = f`, both with `theta` as optimistix's `args`.
        self.fixed_point_fn = lambda y, th: jtu.tree_map(jnp.add, f(y, th, a), y)
        self.root_fn = lambda y, th: f(y, th, a)
        self.phi_layout = _Layout(self.phi0)
        self.theta_layout = _Layout(self.theta)
        self.n, self.p = self.phi_layout.size, self.theta_layout.size
        # The output components of the flat state: read off an index-valued state.
        probe = self.phi_layout.unflatten(np.arange(self.n, dtype=np.float64))
        self.out_idx = np.ravel(np.asarray(self.output(probe))).astype(int)
        self.hid_idx = np.setdiff1d(np.arange(self.n), self.out_idx)
        self.y = np.asarray(self.args["y"], dtype=np.float64)
        self.np_args = jtu.tree_map(np.asarray, self.args)
        self.theta_flat = np_flatten(self.theta).astype(np.float64)

    def __repr__(self):
        return f"Problem({self.id!r})"

    # numpy on flat vectors (complex-safe); `t=None` is the problem's theta.
    def np_f(self, z, t=None):
        t = self.theta_flat if t is None else t
        phi = self.phi_layout.unflatten(z)
        theta = self.theta_layout.unflatten(t)
        return np_flatten(self.f_xp(np, phi, theta, self.np_args))

    def np_jz(self, z, t=None):
        return complex_step_jacobian(lambda zz: self.np_f(zz, t), z)

    def np_jt(self, z, t=None):
        t = self.theta_flat if t is None else t
        return complex_step_jacobian(lambda tt: self.np_f(z, tt), t)

    def np_free_equilibrium(self, t=None):
        """f(φ, t) = 0 by scipy's hybrid Powell method from zero."""
        sol = scipy.optimize.root(
            lambda z: self.np_f(z, t),
            np.zeros(self.n),
            jac=lambda z: self.np_jz(z, t),
            method="hybr",
            tol=1e-15,
        )
        assert np.max(np.abs(self.np_f(sol.x, t))) < 1e-13, sol.message
        return sol.x

    def theta_tree(self, t):
        """A flat numpy theta as a pytree like `self.theta` (numpy leaves)."""
        return self.theta_layout.unflatten(np.asarray(t))


def _tanh_f(xp, phi, theta, args):
    return xp.tanh(theta["W"] @ phi + theta["U"] @ args["x"] + theta["b"]) - phi


def _linear_f(xp, phi, theta, args):
    return theta["A"] @ phi + theta["b"]


def _pytree_f(xp, phi, theta, args):
    h, o = phi["h"], phi["o"]
    return {
        "h": xp.tanh(theta["W"] @ h + theta["K"] @ o + args["x"]) - h,
        "o": theta["V"] @ xp.tanh(h) + theta["c"] - o,
    }


def _gradient_f(xp, phi, theta, args):
    # f = -∇g for the strongly convex g = ½φᵀφ + Σ log cosh(Wφ) - bᵀφ + 0.05 Σ φ⁴:
    # a root problem ∇g = 0, not a fixed-point form (y + f(y) does not contract).
    w = theta["W"]
    return -phi - w.T @ xp.tanh(w @ phi) + theta["b"] - 0.2 * phi**3


def gradient_potential(y, theta):
    """g(y, θ) of the `gradient` problem (JAX): its gradient is -f."""
    w = theta["W"]
    return (
        0.5 * jnp.sum(y**2)
        + jnp.sum(jnp.log(jnp.cosh(w @ y)))
        - theta["b"] @ y
        + 0.05 * jnp.sum(y**4)
    )


def _last2(phi):
    return phi[-2:]


def _o(phi):
    return phi["o"]


def _make_problems():
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("the reference problems need float64 (tests/conftest.py)")
    ks = jax.random.split(jax.random.key(2024), 12)

    def nrm(k, shape, s=1.0):
        return s * jax.random.normal(k, shape, jnp.float64)

    problems = [
        # An equilibrium layer with 5 units, the loss on the last 2.
        Problem(
            "tanh",
            _tanh_f,
            _last2,
            theta={
                "W": contraction_weights(ks[0], 5, rho=0.6),
                "U": nrm(ks[1], (5, 3), 0.5),
                "b": nrm(ks[2], (5,), 0.3),
            },
            args={"x": nrm(ks[3], (3,)), "y": jnp.array([0.4, -0.3])},
            phi0=jnp.zeros(5),
        ),
        # f = Aφ + b: closed forms (`linear_closed_form`). ∂_b f does not depend on
        # the state; ∂_A f does.
        Problem(
            "linear",
            _linear_f,
            _last2,
            theta={
                "A": -jnp.eye(4) + contraction_weights(ks[4], 4, rho=0.5),
                "b": nrm(ks[5], (4,)),
            },
            args={"y": jnp.array([0.5, -1.0])},
            phi0=jnp.zeros(4),
        ),
        # A state that is a dict of two arrays, the loss on one of them.
        Problem(
            "pytree",
            _pytree_f,
            _o,
            theta={
                "W": contraction_weights(ks[6], 3, rho=0.5),
                "K": nrm(ks[7], (3, 2), 0.3),
                "V": nrm(ks[8], (2, 3), 0.6),
                "c": nrm(ks[9], (2,), 0.3),
            },
            args={"x": nrm(ks[10], (3,), 0.7), "y": jnp.array([0.3, -0.6])},
            phi0={"h": jnp.zeros(3), "o": jnp.zeros(2)},
        ),
        Problem(
            "gradient",
            _gradient_f,
            _last2,
            theta={
                "W": nrm(ks[11], (4, 4), 0.5),
                "b": jnp.array([0.5, -0.4, 0.8, 0.2]),
            },
            args={"y": jnp.array([-0.2, 0.6])},
            phi0=jnp.zeros(4),
            fixed_point_ok=False,
        ),
    ]
    return {p.id: p for p in problems}


PROBLEMS = _make_problems()


# ----------------------------------------------------- least-control references


@dataclasses.dataclass
class LeastControlReference:
    """The optimally controlled equilibrium and the update, from numpy/scipy."""

    alpha: float
    phi: np.ndarray  # controlled equilibrium φ_c (flat)
    phi_free: np.ndarray  # free equilibrium (flat)
    value: float  # V = min ½‖f‖² + L/α (α > 0), or H = min ½‖f‖² s.t. Pφ = y
    control: float  # ½‖f(φ_c)‖² = ½‖ψ⋆‖²
    grad: np.ndarray  # (∂θ f(φ_c))ᵀ f(φ_c), flat theta (envelope theorem)


def _least_control_value(problem, alpha, t, start):
    """min over the state of the least-control objective at the flat parameters `t`,
    by scipy from the flat state `start`; returns (value, minimiser).

    α > 0: E(φ) = ½‖f(φ, t)‖² + ½‖Pφ - y‖²/α over the whole state.
    α = 0: E(z) = ½‖f(φ(z), t)‖² over the hidden components z, outputs pinned at
    the loss minimum φ_out = y."""
    out, hid, y = problem.out_idx, problem.hid_idx, problem.y

    if alpha == 0:

        def embed(z):
            phi = np.zeros(problem.n)
            phi[hid], phi[out] = z, y
            return phi

        def value(z):
            r = problem.np_f(embed(z), t)
            return 0.5 * r @ r

        def grad(z):
            phi = embed(z)
            return (problem.np_jz(phi, t).T @ problem.np_f(phi, t))[hid]

        z = minimise(value, grad, start[hid])
        return value(z), embed(z)

    def value(z):
        r = problem.np_f(z, t)
        return 0.5 * r @ r + 0.5 * np.sum((z[out] - y) ** 2) / alpha

    def grad(z):
        g = problem.np_jz(z, t).T @ problem.np_f(z, t)
        g[out] += (z[out] - y) / alpha
        return g

    z = minimise(value, grad, start)
    return value(z), z


@functools.cache
def least_control_reference(problem_id: str, alpha: float) -> LeastControlReference:
    """V(θ) = min_φ ½‖f(φ,θ)‖² + L(φ)/α (α > 0), or H(θ) = min ½‖f‖² over φ with
    Pφ = y (α = 0), minimised by scipy from the free equilibrium, and its θ-gradient
    by the envelope theorem: (∂θ f)ᵀ f at scipy's minimiser, complex-step Jacobian.
    (`least_control_fd_gradient` checks it against finite differences of V.)"""
    problem = PROBLEMS[problem_id]
    phi_free = problem.np_free_equilibrium()
    value, phi = _least_control_value(problem, alpha, problem.theta_flat, phi_free)
    r = problem.np_f(phi)
    grad = problem.np_jt(phi).T @ r
    return LeastControlReference(
        alpha, phi, phi_free, float(value), float(0.5 * r @ r), grad
    )


def least_control_directional_fd(problem_id, alpha, directions, eps: float = 1e-5):
    """Directional derivatives ∇V·d by central differences of scipy's minimum value
    (warm-started at the reference minimiser): independent of Theorem 1, and a few
    minimisations instead of 2·size(θ)."""
    problem = PROBLEMS[problem_id]
    ref = least_control_reference(problem_id, alpha)
    t = problem.theta_flat
    v = lambda tt: _least_control_value(problem, alpha, tt, ref.phi)[0]
    return np.array([(v(t + eps * d) - v(t - eps * d)) / (2 * eps) for d in directions])


@functools.cache
def least_control_fd_gradient(problem_id: str, alpha: float, eps: float = 1e-5):
    """∇θ V (or H) by central differences of scipy's minimum value in every
    parameter."""
    problem = PROBLEMS[problem_id]
    ref = least_control_reference(problem_id, alpha)
    return central_difference(
        lambda t: _least_control_value(problem, alpha, t, ref.phi)[0],
        problem.theta_flat,
        eps,
    )


def linear_closed_form(alpha: float):
    """The `linear` problem (f = Aφ + b, ½‖φ_out - y‖²) in closed form: returns
    (φ_c, value, grad as a numpy dict {A, b})."""
    problem = PROBLEMS["linear"]
    a = np.asarray(problem.theta["A"])
    b = np.asarray(problem.theta["b"])
    n, out, hid, y = problem.n, problem.out_idx, problem.hid_idx, problem.y
    p = np.eye(n)[out]
    if alpha == 0:
        # φ = (z, y): least squares in z of ‖A_hid z + A_out y + b‖.
        z = np.linalg.lstsq(a[:, hid], -(a[:, out] @ y + b), rcond=None)[0]
        phi = np.zeros(n)
        phi[hid], phi[out] = z, y
        r = a @ phi + b
        value = 0.5 * r @ r
    else:
        # Normal equations of ½‖Aφ + b‖² + ½‖Pφ - y‖²/α.
        phi = np.linalg.solve(a.T @ a + p.T @ p / alpha, -a.T @ b + p.T @ y / alpha)
        r = a @ phi + b
        value = 0.5 * r @ r + 0.5 * np.sum((phi[out] - y) ** 2) / alpha
    return phi, float(value), {"A": np.outer(r, phi), "b": r}


def optimal_feedback_matrix(problem_id: str, alpha: float) -> np.ndarray:
    """Q = -(∂φ f)^{-T} Pᵀ at the reference controlled equilibrium (numpy):
    Theorem 2's column space, scaled so that LF's steady state is DI's."""
    problem = PROBLEMS[problem_id]
    ref = least_control_reference(problem_id, alpha)
    p = np.eye(problem.n)[problem.out_idx]
    return -np.linalg.solve(problem.np_jz(ref.phi).T, p.T)


# --------------------------------------------------------------- drop-in references


def downstream_loss_xp(xp, y_flat):
    """The loss downstream of a drop-in layer: nonlinear in the equilibrium, so that
    the cotangent depends on it."""
    c = xp.linspace(1.0, -1.5, y_flat.shape[0])
    return xp.sum(c * xp.sin(2 * y_flat)) + 0.5 * xp.sum(y_flat**2)


def downstream_grad_np(y_flat):
    c = np.linspace(1.0, -1.5, y_flat.shape[0])
    return 2 * c * np.cos(2 * y_flat) + y_flat


def downstream_loss(y_tree):
    """`downstream_loss_xp` of a JAX equilibrium pytree, flattened in leaf order."""
    flat = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(y_tree)])
    return downstream_loss_xp(jnp, flat)


@dataclasses.dataclass
class DropInReference:
    strength: float
    y_star: np.ndarray  # free equilibrium (flat)
    cotangent: np.ndarray  # ḡ = ∇ℓ(y*)
    beta: float  # strength / rms(ḡ)
    y_c: np.ndarray  # argmin ½‖f(y)‖² + β ḡᵀy
    theta_bar: np.ndarray  # (∂θ f(y_c))ᵀ f(y_c) / β (flat theta)
    implicit: np.ndarray  # -(∂y f⁻¹ ∂θ f)ᵀ ḡ at y*: the implicit gradient


def _drop_in_objective(problem, g, beta, t):
    def value(y):
        r = problem.np_f(y, t)
        return 0.5 * r @ r + beta * g @ y

    def grad(y):
        return problem.np_jz(y, t).T @ problem.np_f(y, t) + beta * g

    return value, grad


@functools.cache
def drop_in_reference(problem_id: str, strength: float) -> DropInReference:
    """`LeastControlAdjoint(strength)`'s definition in numpy: ḡ = ∇ℓ(y*),
    β = strength / rms(ḡ), y_c = argmin ½‖f(y, θ)‖² + β ḡᵀy (scipy, from y*),
    θ̄ = (∂θ f(y_c))ᵀ f(y_c) / β; and the implicit gradient at y* by a numpy solve."""
    problem = PROBLEMS[problem_id]
    y_star = problem.np_free_equilibrium()
    g = downstream_grad_np(y_star)
    beta = float(strength / np.sqrt(np.mean(g**2)))
    value, grad = _drop_in_objective(problem, g, beta, problem.theta_flat)
    y_c = minimise(value, grad, y_star)
    theta_bar = problem.np_jt(y_c).T @ problem.np_f(y_c) / beta
    implicit = -np.linalg.solve(problem.np_jz(y_star), problem.np_jt(y_star)).T @ g
    return DropInReference(strength, y_star, g, beta, y_c, theta_bar, implicit)


def drop_in_directional_fd(problem_id, strength, directions, eps: float = 1e-5):
    """θ̄·d by central differences of min_y ½‖f(y, θ)‖² + β ḡᵀy over β along the
    directions d (ḡ and β held at their values at θ): independent of the envelope
    formula of `drop_in_reference`."""
    problem = PROBLEMS[problem_id]
    ref = drop_in_reference(problem_id, strength)

    def min_value(t):
        value, grad = _drop_in_objective(problem, ref.cotangent, ref.beta, t)
        return value(minimise(value, grad, ref.y_c))

    t = problem.theta_flat
    fd = [
        (min_value(t + eps * d) - min_value(t - eps * d)) / (2 * eps)
        for d in directions
    ]
    return np.array(fd) / ref.beta


@functools.cache
def downstream_fd_gradient(problem_id: str, eps: float = 1e-6):
    """d ℓ(y*(θ)) / dθ by central differences through scipy's root solve: the true
    gradient of the layer, no implicit differentiation at all."""
    problem = PROBLEMS[problem_id]
    return central_difference(
        lambda t: downstream_loss_xp(np, problem.np_free_equilibrium(t)),
        problem.theta_flat,
        eps,
    )


def flat_rel_error(got_tree, ref_flat) -> float:
    """max |got - ref| / max |ref|, `got_tree` a pytree flattened in leaf order."""
    got = np_flatten(got_tree).astype(np.float64)
    ref = np.asarray(ref_flat, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-300))


# ---------------------------------------------------------------------- controllers


LEAKY_ALPHA = 0.1


def _lcp():
    # Imported on use, so that this module does not pin the library at import.
    import lcp_solvers

    return lcp_solvers


def _di(problem, alpha):
    # A traced alpha: one compilation serves every alpha.
    return _lcp().DynamicInversion(alpha=jnp.asarray(alpha))


def _di_proportional(problem, alpha):
    if alpha == 0:  # a Python zero, which the constructor must refuse
        return _lcp().DynamicInversion(alpha=0.0, proportional=True)
    return _lcp().DynamicInversion(alpha=jnp.asarray(alpha), proportional=True)


def _ebd(problem, alpha):
    return _lcp().EnergyBased(beta=jnp.asarray(1.0 / alpha))


def _lf(problem, alpha):
    q = jnp.asarray(optimal_feedback_matrix(problem.id, alpha))
    return _lcp().LinearFeedback(q, alpha=jnp.asarray(alpha), output=problem.output)


@dataclasses.dataclass(frozen=True)
class ControllerCase:
    """How to build a controller at leak `alpha` for a problem. At alpha = 0 the
    library may refuse it (`perfect="ValueError"`) or it may not exist
    (`perfect="none: reason"`; the tests generate no such cell)."""

    id: str
    make: Callable  # (problem, alpha) -> controller
    imex: bool = True  # supported by lcp.IMEX (else a ValueError)
    perfect: str = "ok"


CONTROLLERS = {
    c.id: c
    for c in [
        ControllerCase("DI", _di),
        ControllerCase("DI-proportional", _di_proportional, perfect="ValueError"),
        ControllerCase(
            "EBD",
            _ebd,
            perfect="none: EnergyBased(beta=1/alpha) has no alpha = 0 form "
            "(beta = inf); perfect control is DynamicInversion(alpha=0)",
        ),
        # Q: Theorem 2's optimal feedback from the numpy reference.
        ControllerCase("LF", _lf, imex=False),
    ]
}


# -------------------------------------------------------------------- inner solvers


@dataclasses.dataclass(frozen=True)
class SolverCase:
    """An inner solver of `least_control_grad` with the tolerance (`rtol = atol`)
    and `max_steps` it runs at; `test_reference.py` sets the error allowed."""

    id: str
    make: Callable  # () -> solver
    tol: float  # rtol = atol passed to least_control_grad
    max_steps: int


SOLVERS = {
    s.id: s
    for s in [
        SolverCase("newton", lambda: None, 1e-12, 256),
        # The default beyond small states (`lcp_solvers._inner_solver.default_solver`).
        SolverCase("imex-anderson", lambda: _imex_anderson(1e-12), 1e-12, 4096),
        SolverCase("imex", lambda: _lcp().IMEX(), 1e-12, 4096),
        SolverCase(
            "anderson",
            lambda: _lcp().DiscreteTime(
                0.5, _lcp().AndersonAcceleration(rtol=1e-12, atol=1e-12)
            ),
            1e-12,
            4096,
        ),
        SolverCase("continuous", lambda: _lcp().ContinuousTime(), 1e-9, 8192),
    ]
}


def _imex_anderson(tol):
    lcp = _lcp()
    return lcp.IMEX(solver=lcp.AndersonAcceleration(tol, tol, history_length=3))


def _jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:2])


# Data parallelism needs a JAX whose custom JVPs accept sharded batches: at the floor
# (jax 0.6.1) every optimistix adjoint under a sharded `jit` (`optx.ImplicitAdjoint`
# exactly as `LeastControlAdjoint`) fails at trace time with "Custom JVP rule must
# produce primal and tangent outputs with corresponding shapes and dtypes". Verified
# working on 0.10.2; versions in between were not tried (docs/devices.md).
requires_sharding_jax = pytest.mark.skipif(
    _jax_version() < (0, 10),
    reason="data parallelism needs jax >= 0.10 (fails in jax 0.6.1 for every "
    "optimistix adjoint; docs/devices.md)",
)
