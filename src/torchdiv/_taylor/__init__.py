"""Forward propagation of (value, Jacobian, collapsed second-order term) through ATen ops.

``capture`` records what a function computes at a point; ``propagate`` replays it on ``Jet``
inputs with one small rule per op (``RULES``). The Laplacian's ``"taylor"`` method uses it
with the unit vectors of the input as directions, and the Hutchinson Laplacian with probes.
"""

from torchdiv._taylor.capture import Graph, capture
from torchdiv._taylor.jet import Context, Jet, UnsupportedOp
from torchdiv._taylor.propagate import RULES, propagate, values

__all__ = ["RULES", "Context", "Graph", "Jet", "UnsupportedOp", "capture", "propagate", "values"]
