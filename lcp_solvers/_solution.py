import optimistix as optx


# Extends `optx.RESULTS` so that solves run through optimistix and our own failure
# modes share one enumeration (`RESULTS.promote` converts optimistix's items).
class RESULTS(optx.RESULTS):  # pyright: ignore
    control_max_steps_reached = (
        "The least-control solve (the controlled equilibrium of the backward pass or "
        "of `least_control_grad`) did not converge within `max_steps`. Lower "
        "`strength` (weaker control is better conditioned), raise `max_steps`, or use "
        "an accelerated solver such as `lcp.AndersonAcceleration` or `optx.Newton`."
    )
    control_divergence = (
        "The controlled dynamics diverged (non-finite or exploding state or control). "
        "The controller is too strong for the solver or the free dynamics are "
        "unstable: lower `strength`, shrink the solver's step size, or use "
        "`optx.Newton` for the controlled equilibrium."
    )
    nonfinite_cotangent = (
        "The cotangent reaching `LeastControlAdjoint` contains inf or NaN. The loss "
        "downstream of the implicit layer is not finite; check it before the solve."
    )
    nonfinite_state = (
        "The equilibrium handed to the backward pass contains inf or NaN, so there is "
        "nothing to control. The forward solve failed: run it with `throw=True`, or "
        "raise its `max_steps`."
    )
    free_equilibrium_failed = (
        "`least_control_grad` could not find the free equilibrium f(phi, theta) = 0 "
        "that it warm-starts the controlled solve from. Check that the free dynamics "
        "are stable at this theta, raise `max_steps`, or pass a better `phi0`."
    )
    least_control_max_steps_reached = (
        "`least_control_grad` did not reach the controlled equilibrium within "
        "`max_steps`. Raise `max_steps`, weaken the control (raise the controller's "
        "`alpha`), or use a faster solver: the default `optx.Newton`, or "
        "`lcp.DiscreteTime(step_size, lcp.AndersonAcceleration(rtol, atol))` in place "
        "of plain Euler iteration."
    )
