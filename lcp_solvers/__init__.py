"""lcp_solvers: the least-control principle for implicit layers in JAX."""

import importlib.metadata

from ._adjoint import LeastControlAdjoint as LeastControlAdjoint
from ._anderson import AndersonAcceleration as AndersonAcceleration
from ._solution import RESULTS as RESULTS


__version__ = importlib.metadata.version("lcp_solvers")
