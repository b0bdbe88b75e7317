"""lcp_solvers: the least-control principle for implicit layers in JAX."""

import importlib.metadata

from ._adjoint import LeastControlAdjoint as LeastControlAdjoint
from ._anderson import AndersonAcceleration as AndersonAcceleration
from ._controller import (
    AbstractController as AbstractController,
    AbstractImexController as AbstractImexController,
    DynamicInversion as DynamicInversion,
    EnergyBased as EnergyBased,
    LinearFeedback as LinearFeedback,
)
from ._deq import DEQ as DEQ, DEQStats as DEQStats
from ._feedback_learning import linear_feedback_update as linear_feedback_update
from ._inner_solver import (
    AbstractInnerSolver as AbstractInnerSolver,
    ContinuousTime as ContinuousTime,
    DiscreteTime as DiscreteTime,
    IMEX as IMEX,
    SteadyStateProblem as SteadyStateProblem,
)
from ._jaxopt import (
    custom_fixed_point as custom_fixed_point,
    custom_root as custom_root,
)
from ._least_control import (
    least_control_grad as least_control_grad,
    least_control_objective as least_control_objective,
    LeastControlInfo as LeastControlInfo,
)
from ._readout import with_readout as with_readout
from ._solution import RESULTS as RESULTS
from ._system import ControlledSystem as ControlledSystem


__version__ = importlib.metadata.version("lcp_solvers")
