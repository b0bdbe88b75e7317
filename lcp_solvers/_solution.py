import optimistix as optx


# Extends `optx.RESULTS` so that solves run through optimistix and our own failure
# modes share one enumeration (`RESULTS.promote` converts optimistix's items). Each
# message says what to change.
class RESULTS(optx.RESULTS):  # pyright: ignore
    control_max_steps_reached = (
        "The controlled equilibrium (the least-control solve of "
        "`LeastControlAdjoint`, the jaxopt decorators, `DEQ`, `least_control_grad` "
        "or `least_control_objective`) was not reached within `max_steps`. Raise "
        "`max_steps`, weaken the control (lower `strength`, raise `alpha`), or use a "
        "faster inner solver: `lcp.AndersonAcceleration(rtol, atol)` for "
        "fixed-point iterations, `lcp.IMEX()` for dynamic inversion, or "
        "`optx.Newton`."
    )
    control_divergence = (
        "The controlled dynamics diverged (non-finite or exploding state or "
        "control). The free dynamics are unstable or the control is too strong for "
        "the solver: weaken the control (lower `strength`, raise `alpha`), lower the "
        "solver's step size, or use `optx.Newton` for the controlled equilibrium."
    )
    nonfinite_cotangent = (
        "The cotangent reaching the least-control backward pass contains inf or "
        "NaN, at a finite equilibrium: the loss downstream of the implicit layer is "
        "not finite. Check it before the solve."
    )
    nonfinite_start = (
        "The equilibrium that the least-control solve starts from contains inf or "
        "NaN, so there is nothing to control: the forward (free) solve failed (or, "
        "for `least_control_grad`/`least_control_objective`, `phi0` is not "
        "finite). Run it with `throw=True` to see why, raise its `max_steps`, or "
        "check its inputs."
    )
    free_equilibrium_failed = (
        "`least_control_grad`/`least_control_objective` could not find the free "
        "equilibrium f(phi, theta) = 0 reported in `info.phi_free` (the update "
        "does not depend on it). Check that the free dynamics are stable at this "
        "theta, raise `max_steps`, or pass a better `phi0`."
    )
