import abc
from collections.abc import Callable

import equinox as eqx
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._misc import tree_error_if
from ._system import ControlledSystem


def _like(a, x):
    # `a` (a mask, a leak) in the dtype of `x`: strict dtype promotion lets no real
    # array meet a complex or lower-precision state implicitly.
    return jnp.asarray(a).astype(x.dtype)


def _u_velocity(system: ControlledSystem, phi, u, alpha):
    # The output controller is a leaky integral of -∇L on the output components. On
    # the others ∇L vanishes identically and, at alpha = 0, nothing would pin u down
    # in a root formulation; there it relaxes to 0 instead, which is where the
    # dynamics started from zero keep it anyway.
    g = system.loss_grad(phi)

    def velocity(gi, ui, m):
        m = _like(m, ui)
        return m * (-gi - _like(alpha, ui) * ui) - (1 - m) * ui

    return jtu.tree_map(velocity, g, u, system.output_mask)


def _u_residual(system: ControlledSystem, phi, u, alpha):
    # The root of `_u_velocity` in units of u: with a leak, u̇/α = -∇L/α - u. The
    # velocity itself is α times larger and, at a strong leak, the difference of two
    # large nearly equal terms: a root finder's test |r| < atol could then not be met
    # in float32 for an α of order 1e9 although u has converged.
    scale = jnp.where(jnp.asarray(alpha) > 0, alpha, 1)
    return jtu.tree_map(
        lambda v: v / _like(scale, v), _u_velocity(system, phi, u, alpha)
    )


def _proportional_u(system: ControlledSystem, phi, alpha):
    # u = -∇L/α on the outputs: the proportional controller, and any leaky output
    # controller's steady state.
    g = system.loss_grad(phi)
    return jtu.tree_map(
        lambda gi, m: -_like(m, gi) * gi / _like(alpha, gi), g, system.output_mask
    )


def _inverse_or_zero(alpha):
    alpha = jnp.asarray(alpha)
    return jnp.where(alpha > 0, 1 / jnp.where(alpha > 0, alpha, 1), 0.0)


def _add(a, b):
    return jtu.tree_map(jnp.add, a, b)


class AbstractController(eqx.Module):
    """Base class for the controllers of [`lcp_solvers.least_control_grad`][] and
    [`lcp_solvers.least_control_objective`][].

    A controller is a dynamical system on an extended state whose steady state is the
    controlled equilibrium (Meulemans et al., 2022, §2–3). The extended state is a tuple
    `(phi, *controls)`: the state `phi` first, then the controller's own variables
    (e.g. `(phi, psi, u)` for integral dynamic inversion). Every entry point solves
    for the steady state with an inner solver, in units where the controls are
    divided by the scale of the learning signal (so tolerances are relative to it).

    A new controller implements `init`, `velocity` and `unpack` (and `loss_weight`
    if its objective weighs the loss); every inner solver that follows the dynamics
    or finds the root of `residual` then works with it. A solver that needs more
    declares it as a capability class, e.g. [`lcp_solvers.IMEX`][] accepts
    controllers that subclass [`lcp_solvers.AbstractImexController`][].

    Every method receives the [`lcp_solvers.ControlledSystem`][] `system`.
    """

    @abc.abstractmethod
    def init(self, system: ControlledSystem, phi: PyTree[Array]) -> tuple:
        """The extended state `(phi, *controls)` with the control switched off."""

    @abc.abstractmethod
    def velocity(self, system: ControlledSystem, state: tuple) -> tuple:
        """The time derivative of the extended state."""

    def residual(self, system: ControlledSystem, state: tuple) -> tuple:
        """A function whose root is the controlled equilibrium (default: velocity),
        used by root finders such as `optx.Newton`."""
        return self.velocity(system, state)

    @abc.abstractmethod
    def unpack(
        self, system: ControlledSystem, state: tuple
    ) -> tuple[PyTree[Array], PyTree[Array], PyTree[Array]]:
        """`(phi, psi, u)` at a (steady) state: the state, the control `psi` added to
        the free velocity, and the output controller `u` (zero off the outputs)."""

    def loss_weight(self) -> Array:
        """`w` in the objective `½‖ψ⋆‖² + w·L(φ⋆)` whose gradient is the update: `0`
        for perfect control, `1/α` for a leaky output controller, `β` for
        [`lcp_solvers.EnergyBased`][]. The controls' scale is `w·rms(∇L)` (or
        `rms(∇L)` when `w = 0`)."""
        return jnp.asarray(0.0)


class AbstractImexController(AbstractController):
    """Capability of a controller whose loss enters the dynamics only through its
    gradient on a symmetric pathway, so that [`lcp_solvers.IMEX`][] can treat the loss
    implicitly. [`lcp_solvers.DynamicInversion`][] and [`lcp_solvers.EnergyBased`][]
    have it; [`lcp_solvers.LinearFeedback`][] does not (`Q` is not symmetric).
    """

    @abc.abstractmethod
    def imex_step(
        self,
        system: ControlledSystem,
        state: tuple,
        step_size: float,
        output_gain: float,
        loss_step: Callable,
    ) -> tuple:
        """One IMEX step: an Euler step of the dynamics with the loss term implicit,
        the output controller's rate multiplied by `output_gain`. `loss_step(phi, v,
        c)` returns `z` with `z = v - c∇L(z)`. Its fixed points must be the steady
        states of `velocity` (on the part of the state `imex_init` keeps)."""

    def imex_init(self, system: ControlledSystem, state: tuple) -> tuple:
        """The part of the extended state that IMEX iterates (default: all)."""
        return state

    def imex_final(self, system: ControlledSystem, state: tuple) -> tuple:
        """The extended state back from `imex_init`'s part, at a steady state."""
        return state


class DynamicInversion(AbstractImexController):
    r"""Dynamic inversion (DI): the exact general-purpose least-control controller.

    $$\dot φ = f(φ, θ) + ψ,\qquad \dot ψ = (∂_φ f)^\top ψ + u,\qquad
    \dot u = -∇_φ L(φ) - α u.$$

    The `ψ` line is the adjoint (recurrent-backprop) dynamics run jointly with the
    state. At steady state `(∂_φ f)ᵀ ψ = ∇L / α`: the equilibrium is a stationary
    point of `½‖f‖² + L/α`, and `alpha = 0` is perfect control (the outputs reach a
    minimum of the loss, Theorem 1). `u` is nonzero only on the output components
    (where the loss depends on the state).

    **Arguments:**

    - `alpha`: the leak of the output controller, `>= 0`. `alpha = 1/β` of
        [`lcp_solvers.EnergyBased`][]; small `alpha` is strong control.
    - `proportional`: if `True`, `u = -∇L/α` is applied instantly (a proportional
        controller, needs `alpha > 0`) instead of being integrated. Same steady state.
    - `feedback`: `None` (use autodiff's `(∂_φ f)ᵀ ψ`) or a callable
        `feedback(phi, theta, args, psi) -> pytree like phi` that replaces it, e.g. a
        product with learned feedback weights `S` in place of `Wᵀ` (Kolen–Pollack).
    """

    alpha: float | Array
    proportional: bool = eqx.field(static=True, default=False)
    feedback: Callable | None = None

    def __check_init__(self):
        if isinstance(self.alpha, (int, float)):
            if self.alpha < 0:
                raise ValueError(
                    f"`DynamicInversion(alpha=...)` must be >= 0, got {self.alpha}."
                )
            if self.proportional and self.alpha == 0:
                raise ValueError(
                    "`DynamicInversion(alpha=0, proportional=True)` has infinite gain; "
                    "use `proportional=False` (integral control) for alpha = 0."
                )

    def loss_weight(self):
        return _inverse_or_zero(self.alpha)

    def _jt_psi(self, system, phi, psi):
        if self.feedback is None:
            f_phi, vjp = system.velocity_and_vjp(phi)
            (jt,) = vjp(psi)
        else:
            f_phi = system.velocity(phi)
            jt = self.feedback(phi, system.theta, system.args, psi)
        return f_phi, jt

    def init(self, system, phi):
        phi = _check_gain(
            phi,
            self.alpha,
            ~(jnp.asarray(self.alpha) >= 0),
            "`DynamicInversion(alpha=...)` must be >= 0 (and not NaN).",
        )
        zeros = jtu.tree_map(jnp.zeros_like, phi)
        # Proportional control needs no memory of its own: u = -∇L/α is a function
        # of the state, so only (φ, ψ) are unknowns.
        if self.proportional:
            return phi, zeros
        return phi, zeros, zeros

    def velocity(self, system, state):
        if self.proportional:
            phi, psi = state
            f_phi, jt = self._jt_psi(system, phi, psi)
            u = _proportional_u(system, phi, self.alpha)
            return _add(f_phi, psi), _add(jt, u)
        phi, psi, u = state
        f_phi, jt = self._jt_psi(system, phi, psi)
        u_dot = _u_velocity(system, phi, u, self.alpha)
        return _add(f_phi, psi), _add(jt, u), u_dot

    def residual(self, system, state):
        if self.proportional:
            return self.velocity(system, state)
        phi, psi, u = state
        f_phi, jt = self._jt_psi(system, phi, psi)
        return _add(f_phi, psi), _add(jt, u), _u_residual(system, phi, u, self.alpha)

    # With alpha > 0 the steady state has u = -∇L/α, a function of the state, whether
    # the controller is proportional or integral: IMEX then iterates (φ, ψ) only
    # (fewer operations per step) and recovers u at the end. It keeps the integral u
    # for alpha = 0, or an alpha only known at run time.
    def _imex_eliminates_u(self):
        static_positive = isinstance(self.alpha, (int, float)) and self.alpha > 0
        return self.proportional or static_positive

    def imex_init(self, system, state):
        return state[:2] if self._imex_eliminates_u() else state

    def imex_final(self, system, state):
        if self.proportional or not self._imex_eliminates_u():
            return state
        phi, psi = state
        return phi, psi, _proportional_u(system, phi, self.alpha)

    def imex_step(self, system, state, step_size, output_gain, loss_step):
        # The Euler step of (φ, ψ, u) with u (hence ∇L) at the new state:
        #   ψ' = ψ + h(Jᵀψ + u'),  φ' = φ + h(f + ψ'),  u' from ∇L(φ'),
        # so φ' = v - c∇L(φ') with v, c below, and ψ' = (φ' - φ - hf)/h. At a fixed
        # point f + ψ = 0, Jᵀψ + u = 0 and the u-equation hold: the DI steady state.
        # The integral controller runs `output_gain` times faster (hu = h·gain), which
        # leaves that steady state unchanged.
        h = step_size
        hu = step_size * output_gain
        phi, psi, *rest = state
        f_phi, jt = self._jt_psi(system, phi, psi)
        a = jtu.tree_map(lambda p, fp: p + h * fp, phi, f_phi)
        b = jtu.tree_map(lambda s, j: s + h * j, psi, jt)
        if self._imex_eliminates_u():
            # u' = -∇L(φ')/α on the outputs, implicit in the loss step below.
            v = jtu.tree_map(lambda ai, bi: ai + h * bi, a, b)
            phi_new = loss_step(phi, v, h * h / self.alpha)
            psi_new = jtu.tree_map(lambda z, ai: (z - ai) / h, phi_new, a)
            return phi_new, psi_new
        # u' = (u - hu∇L(φ'))/(1 + huα) on the outputs; off them u relaxes to 0.
        (u,) = rest
        k = 1 / (1 + hu * self.alpha)
        u_explicit = jtu.tree_map(
            lambda ui, m: _like(m, ui) * k * ui + (1 - _like(m, ui)) * ui / (1 + hu),
            u,
            system.output_mask,
        )
        v = jtu.tree_map(lambda ai, bi, ue: ai + h * bi + h * h * ue, a, b, u_explicit)
        phi_new = loss_step(phi, v, h * h * hu * k)
        psi_new = jtu.tree_map(lambda z, ai: (z - ai) / h, phi_new, a)
        g = system.loss_grad(phi_new)
        u_new = jtu.tree_map(
            lambda ue, gi, m: ue - _like(m, gi) * hu * k * gi,
            u_explicit,
            g,
            system.output_mask,
        )
        return phi_new, psi_new, u_new

    def unpack(self, system, state):
        if self.proportional:
            phi, psi = state
            return phi, psi, _proportional_u(system, phi, self.alpha)
        return state


class EnergyBased(AbstractImexController):
    r"""Energy-based dynamics (EBD): gradient flow on
    $F_β(φ) = ½‖f(φ, θ)‖² + β L(φ)$,

    $$\dot φ = -(∂_φ f)^\top f - β ∇_φ L.$$

    The control is implicit, `ψ = -f(φ)`, and `u = -β∇L`. The steady state is that of
    [`lcp_solvers.DynamicInversion`][] with `alpha = 1/beta`. For a feedforward `f`
    this is the predictive-coding free energy.

    **Arguments:**

    - `beta`: the strength, `> 0` (`beta = 1/alpha` of DI).
    """

    beta: float | Array

    def __check_init__(self):
        if isinstance(self.beta, (int, float)) and not self.beta > 0:
            raise ValueError(
                f"`EnergyBased(beta=...)` must be positive, got {self.beta} (it is "
                "1/alpha of `DynamicInversion`; perfect control needs DI with alpha=0)."
            )

    def loss_weight(self):
        return jnp.asarray(self.beta)

    def init(self, system, phi):
        phi = _check_gain(
            phi,
            self.beta,
            ~(jnp.asarray(self.beta) > 0),
            "`EnergyBased(beta=...)` must be positive (it is 1/alpha of "
            "`DynamicInversion`).",
        )
        return (phi,)

    def velocity(self, system, state):
        (phi,) = state
        f_phi, vjp = system.velocity_and_vjp(phi)
        (jt_f,) = vjp(f_phi)
        g = system.loss_grad(phi)
        return (jtu.tree_map(lambda a, b: -a - _like(self.beta, b) * b, jt_f, g),)

    def imex_step(self, system, state, step_size, output_gain, loss_step):
        del output_gain  # no output controller: u = -β∇L is instantaneous
        # A proximal-gradient step: explicit on ½‖f‖², implicit on βL.
        (phi,) = state
        f_phi, vjp = system.velocity_and_vjp(phi)
        (jt_f,) = vjp(f_phi)
        v = jtu.tree_map(lambda p, j: p - step_size * j, phi, jt_f)
        return (loss_step(phi, v, step_size * self.beta),)

    def unpack(self, system, state):
        (phi,) = state
        psi = jtu.tree_map(jnp.negative, system.velocity(phi))
        g = system.loss_grad(phi)
        u = jtu.tree_map(
            lambda gi, m: -_like(self.beta, gi) * _like(m, gi) * gi,
            g,
            system.output_mask,
        )
        return phi, psi, u


def _apply_q(q, output, u, phi_like):
    """`ψ = Q · vec(output(u))`, unflattened into the structure of the state."""
    y = u if output is None else output(u)
    y_flat, _ = jfu.ravel_pytree(y)
    _, unravel = jfu.ravel_pytree(phi_like)
    return unravel(q @ y_flat)


class LinearFeedback(AbstractController):
    r"""Linear feedback (LF): the control reaches the state through a fixed matrix,

    $$\dot φ = f(φ, θ) + Q\,u,\qquad \dot u = -∇_φ L(φ) - α u,$$

    so no Jacobian-transpose products are needed at all, only evaluations of `f`. It
    is optimal (same update as [`lcp_solvers.DynamicInversion`][]) when
    `col(Q) = col((∂_φ f)⁻ᵀ Pᵀ)` at the controlled equilibrium, `P` selecting the
    outputs (Theorem 2); [`lcp_solvers.linear_feedback_update`][] learns such a `Q`
    with a local noise-driven rule.

    **Shapes.** `u` has the structure of the state and is zero off the outputs.
    `output` is a linear function picking the output components out of a state-shaped
    pytree (e.g. `lambda phi: phi[-10:]` or `lambda phi: phi["y"]`); `Q` is a 2D
    array of shape `(size(phi), size(output(phi)))` acting on the flattened outputs
    (`jax.flatten_util.ravel_pytree` order), its result unflattened into `phi`'s
    structure. With `output=None` the outputs are the whole state and `Q` is
    `(size(phi), size(phi))`.

    **Arguments:**

    - `Q`: the feedback matrix, as above.
    - `alpha`: the leak of the output controller, `>= 0`.
    - `output`: the output selector, or `None`.
    """

    Q: Array
    alpha: float | Array
    output: Callable | None = None

    def __check_init__(self):
        if jnp.ndim(self.Q) != 2:
            raise ValueError(
                "`LinearFeedback(Q=...)` must be a 2D array of shape "
                f"(size(phi), size(output(phi))), got shape {jnp.shape(self.Q)}."
            )
        if isinstance(self.alpha, (int, float)) and self.alpha < 0:
            raise ValueError(
                f"`LinearFeedback(alpha=...)` must be >= 0, got {self.alpha}."
            )

    def loss_weight(self):
        return _inverse_or_zero(self.alpha)

    def init(self, system, phi):
        n = jfu.ravel_pytree(phi)[0].size
        out = phi if self.output is None else self.output(phi)
        m = sum(jnp.size(x) for x in jtu.tree_leaves(out))
        if jnp.shape(self.Q) != (n, m):
            raise ValueError(
                f"`LinearFeedback(Q=...)` must have shape (size(phi), "
                f"size(output(phi))) = ({n}, {m}), got {jnp.shape(self.Q)}."
            )
        phi = _check_gain(
            phi,
            self.alpha,
            ~(jnp.asarray(self.alpha) >= 0),
            "`LinearFeedback(alpha=...)` must be >= 0 (and not NaN).",
        )
        return phi, jtu.tree_map(jnp.zeros_like, phi)

    def velocity(self, system, state):
        phi, u = state
        psi = _apply_q(self.Q, self.output, u, phi)
        return _add(system.velocity(phi), psi), _u_velocity(system, phi, u, self.alpha)

    def residual(self, system, state):
        phi, u = state
        psi = _apply_q(self.Q, self.output, u, phi)
        return _add(system.velocity(phi), psi), _u_residual(system, phi, u, self.alpha)

    def unpack(self, system, state):
        phi, u = state
        return phi, _apply_q(self.Q, self.output, u, phi), u


def _check_gain(phi, gain, bad, message):
    # A gain given as a Python number is checked at construction (`__check_init__`);
    # one given as an array may be traced there, so it is checked here, at the start
    # of every solve, where the check is part of the computation.
    if isinstance(gain, (int, float)):
        return phi
    return tree_error_if(phi, jnp.any(bad), 0, [message])
