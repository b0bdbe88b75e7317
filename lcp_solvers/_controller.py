import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


class _System(eqx.Module):
    """The free dynamics and the loss at fixed `theta`/`args`, plus the output mask.

    `mask` is 1 on the output components (where the loss depends on the state) and 0
    elsewhere; see `_output_mask`.
    """

    fn: Callable
    loss_fn: Callable
    theta: PyTree
    args: PyTree
    mask: PyTree[Array]

    def f(self, phi):
        return self.fn(phi, self.theta, self.args)

    def f_and_vjp(self, phi):
        return jax.vjp(self.f, phi)

    def loss(self, phi):
        return self.loss_fn(phi, self.args)

    def grad_loss(self, phi):
        return jax.grad(self.loss)(phi)

    # Names of the public `lcp.ControlledSystem` (being introduced).
    def loss_grad(self, phi):
        return self.grad_loss(phi)

    @property
    def output_mask(self):
        return self.mask


def _output_mask(loss_fn, phi, args):
    """1 where the loss depends on the state, 0 elsewhere, detected at `phi`.

    A component is an output if its loss gradient or a generic Hessian probe is
    nonzero there; components the loss never reads have both identically zero.
    """
    grad = jax.grad(lambda p: loss_fn(p, args))
    # A fixed, generic probe (a low-discrepancy sequence in [0.5, 1.5)): no exact
    # cancellation in the Hessian product, and cheaper than drawing random numbers.
    probe = jtu.tree_map(
        lambda x: (
            (0.5 + jnp.mod(0.1234 + 0.6180339887 * jnp.arange(x.size), 1.0))
            .reshape(x.shape)
            .astype(x.dtype)
        ),
        phi,
    )
    g, hp = jax.jvp(grad, (phi,), (probe,))
    return jtu.tree_map(lambda a, b: ((a != 0) | (b != 0)).astype(a.dtype), g, hp)


def _u_velocity(sys, phi, u, alpha):
    # The output controller is a leaky integral of -∇L on the output components. On
    # the others ∇L vanishes identically and, at alpha = 0, nothing would pin u down
    # in a root formulation; there it relaxes to 0 instead, which is where the
    # dynamics started from zero keep it anyway.
    g = sys.grad_loss(phi)
    return jtu.tree_map(
        lambda gi, ui, m: m * (-gi - alpha * ui) - (1 - m) * ui, g, u, sys.mask
    )


def _proportional_u(sys, phi, alpha):
    # u = -∇L/α on the outputs: the proportional controller, and any leaky output
    # controller's steady state.
    g = sys.grad_loss(phi)
    return jtu.tree_map(lambda gi, m: -m * gi / alpha, g, sys.mask)


def _inverse_or_zero(alpha):
    alpha = jnp.asarray(alpha)
    return jnp.where(alpha > 0, 1 / jnp.where(alpha > 0, alpha, 1), 0.0)


def _add(a, b):
    return jtu.tree_map(jnp.add, a, b)


class AbstractController(eqx.Module):
    """Base class for the controllers of [`lcp_solvers.least_control_grad`][].

    A controller is a dynamical system on an extended state (always starting with
    `phi`) whose steady state is the controlled equilibrium. It defines the
    continuous-time velocity (used by `lcp.ContinuousTime` and, as an Euler map, by
    `lcp.DiscreteTime`), the steady-state residual (used by root finders such as
    `optx.Newton`), and how to read `(phi, psi, u)` off a steady state.
    """

    @abc.abstractmethod
    def init(self, sys: _System, phi: PyTree[Array]) -> PyTree[Array]:
        """The extended state with the control switched off, at state `phi`."""

    @abc.abstractmethod
    def velocity(self, sys: _System, state: PyTree[Array]) -> PyTree[Array]:
        """The time derivative of the extended state."""

    def residual(self, sys: _System, state: PyTree[Array]) -> PyTree[Array]:
        """A function whose root is the controlled equilibrium (default: velocity)."""
        return self.velocity(sys, state)

    @abc.abstractmethod
    def unpack(
        self, sys: _System, state: PyTree[Array]
    ) -> tuple[PyTree[Array], PyTree[Array], PyTree[Array]]:
        """`(phi, psi, u)` at a (steady) state: the state, the control `psi` added to
        the free velocity, and the output controller `u` (zero off the outputs)."""

    def loss_weight(self) -> Array:
        """`w` in the objective `½‖ψ⋆‖² + w·L(φ⋆)` whose gradient is the update: `0`
        for perfect control, `1/α` for a leaky output controller, `β` for
        [`lcp_solvers.EnergyBased`][]."""
        return jnp.asarray(0.0)

    def imex_state(self, sys: _System, state: PyTree[Array]) -> PyTree[Array]:
        """The part of the extended state that `lcp.IMEX` iterates (default: all)."""
        return state

    def imex_full(self, sys: _System, state: PyTree[Array]) -> PyTree[Array]:
        """The extended state back from `imex_state`'s part, at a steady state."""
        return state

    def imex_step(
        self,
        sys: _System,
        state: PyTree[Array],
        step_size: float,
        output_gain: float,
        loss_step: Callable,
    ) -> PyTree[Array]:
        """One step of `lcp.IMEX`: an Euler step of the dynamics with the loss term
        implicit, the output controller's rate multiplied by `output_gain`.
        `loss_step(phi, v, c)` returns `z` with `z = v - c∇L(z)`. Its fixed points
        must be the steady states of `velocity`."""
        raise ValueError(
            f"`lcp.IMEX` does not support the controller {type(self).__name__}: it "
            "needs the loss to enter the state through a symmetric (gradient) "
            "pathway, as in `lcp.DynamicInversion` and `lcp.EnergyBased`. Use "
            "`lcp.DiscreteTime(step_size, lcp.AndersonAcceleration(rtol, atol))` or "
            "the default `optx.Newton` for this controller."
        )


class DynamicInversion(AbstractController):
    r"""Dynamic inversion (DI): the exact general-purpose least-control controller.

    $$\dot φ = f(φ, θ) + ψ,\qquad \dot ψ = (∂_φ f)^\top ψ + u,\qquad
    \dot u = -∇_φ L(φ) - α u.$$

    The `ψ` line is the adjoint (recurrent-backprop) dynamics run jointly with the
    state. At steady state `(∂_φ f)^\top ψ = ∇L / α`: the equilibrium is a stationary
    point of `½‖f‖² + L/α`, and `alpha = 0` is perfect control (the outputs reach a
    minimum of the loss, Theorem 1). `u` is nonzero only on the output components
    (where the loss depends on the state).

    **Arguments:**

    - `alpha`: the leak of the output controller, `>= 0`. `alpha = 1/β` of
        [`lcp_solvers.EnergyBased`][]; small `alpha` is strong control.
    - `proportional`: if `True`, `u = -∇L/α` is applied instantly (a proportional
        controller, needs `alpha > 0`) instead of being integrated. Same steady state.
    - `feedback`: `None` (use autodiff's `(∂_φ f)^\top ψ`) or a callable
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

    def _jt_psi(self, sys, phi, psi):
        if self.feedback is None:
            f_phi, vjp = sys.f_and_vjp(phi)
            (jt,) = vjp(psi)
        else:
            f_phi = sys.f(phi)
            jt = self.feedback(phi, sys.theta, sys.args, psi)
        return f_phi, jt

    def init(self, sys, phi):
        zeros = jtu.tree_map(jnp.zeros_like, phi)
        return phi, zeros, zeros

    def velocity(self, sys, state):
        phi, psi, u = state
        f_phi, jt = self._jt_psi(sys, phi, psi)
        if self.proportional:
            u_p = _proportional_u(sys, phi, self.alpha)
            u_dot = jtu.tree_map(jnp.subtract, u_p, u)
            return _add(f_phi, psi), _add(jt, u_p), u_dot
        u_dot = _u_velocity(sys, phi, u, self.alpha)
        return _add(f_phi, psi), _add(jt, u), u_dot

    # With alpha > 0 the steady state has u = -∇L/α, a function of the state, whether
    # the controller is proportional or integral: IMEX then iterates (φ, ψ) only
    # (fewer operations per step) and recovers u at the end. It keeps the integral u
    # for alpha = 0, or an alpha only known at run time.
    def _imex_eliminates_u(self):
        static_positive = isinstance(self.alpha, (int, float)) and self.alpha > 0
        return self.proportional or static_positive

    def imex_state(self, sys, state):
        return state[:2] if self._imex_eliminates_u() else state

    def imex_full(self, sys, state):
        if not self._imex_eliminates_u():
            return state
        phi, psi = state
        return phi, psi, _proportional_u(sys, phi, self.alpha)

    def imex_step(self, sys, state, step_size, output_gain, loss_step):
        # The Euler step of (φ, ψ, u) with u (hence ∇L) at the new state:
        #   ψ' = ψ + h(Jᵀψ + u'),  φ' = φ + h(f + ψ'),  u' from ∇L(φ'),
        # so φ' = v - c∇L(φ') with v, c below, and ψ' = (φ' - φ - hf)/h. At a fixed
        # point f + ψ = 0, Jᵀψ + u = 0 and the u-equation hold: the DI steady state.
        # The integral controller runs `output_gain` times faster (hu = h·gain), which
        # leaves that steady state unchanged.
        h = step_size
        hu = step_size * output_gain
        phi, psi, *rest = state
        f_phi, jt = self._jt_psi(sys, phi, psi)
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
            lambda ui, m: m * k * ui + (1 - m) * ui / (1 + hu), u, sys.mask
        )
        v = jtu.tree_map(lambda ai, bi, ue: ai + h * bi + h * h * ue, a, b, u_explicit)
        phi_new = loss_step(phi, v, h * h * hu * k)
        psi_new = jtu.tree_map(lambda z, ai: (z - ai) / h, phi_new, a)
        g = sys.grad_loss(phi_new)
        u_new = jtu.tree_map(
            lambda ue, gi, m: ue - m * hu * k * gi, u_explicit, g, sys.mask
        )
        return phi_new, psi_new, u_new

    def unpack(self, sys, state):
        return state


class EnergyBased(AbstractController):
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

    def init(self, sys, phi):
        return phi

    def velocity(self, sys, state):
        f_phi, vjp = sys.f_and_vjp(state)
        (jt_f,) = vjp(f_phi)
        g = sys.grad_loss(state)
        return jtu.tree_map(lambda a, b: -a - self.beta * b, jt_f, g)

    def imex_step(self, sys, state, step_size, output_gain, loss_step):
        del output_gain  # no output controller: u = -β∇L is instantaneous
        # A proximal-gradient step: explicit on ½‖f‖², implicit on βL.
        f_phi, vjp = sys.f_and_vjp(state)
        (jt_f,) = vjp(f_phi)
        v = jtu.tree_map(lambda p, j: p - step_size * j, state, jt_f)
        return loss_step(state, v, step_size * self.beta)

    def unpack(self, sys, state):
        psi = jtu.tree_map(jnp.negative, sys.f(state))
        g = sys.grad_loss(state)
        u = jtu.tree_map(lambda gi, m: -self.beta * m * gi, g, sys.mask)
        return state, psi, u


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
    `col(Q) = col((∂_φ f)^{-\top} Pᵀ)` at the controlled equilibrium, `P` selecting the
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

    def init(self, sys, phi):
        return phi, jtu.tree_map(jnp.zeros_like, phi)

    def velocity(self, sys, state):
        phi, u = state
        psi = _apply_q(self.Q, self.output, u, phi)
        return _add(sys.f(phi), psi), _u_velocity(sys, phi, u, self.alpha)

    def unpack(self, sys, state):
        phi, u = state
        return phi, _apply_q(self.Q, self.output, u, phi), u
