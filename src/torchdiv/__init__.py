"""torchdiv: per-sample divergence, Jacobians, their diagonals and Laplacians of batched functions,
exact or estimated."""

from torchdiv import flows
from torchdiv._api import divergence, estimate_divergence, jacobian, jacobian_diagonal
from torchdiv._graph import graph_divergence, graph_jacobian, graph_laplacian
from torchdiv._independence import BatchInteractionError, check_batch_independence
from torchdiv._laplacian import laplacian
from torchdiv._mixing import allow_batch_interaction
from torchdiv._probes import draw_probes
from torchdiv._result import Estimate
from torchdiv._second_order import (
    ValueGradLaplacian,
    biharmonic,
    value_grad_laplacian,
    weighted_laplacian,
)
from torchdiv._trace import estimate_trace

__version__ = "0.1.0"

__all__ = [
    # exact operators of a function
    "divergence",
    "jacobian",
    "jacobian_diagonal",
    "laplacian",
    # second-order operators beyond the Laplacian
    "weighted_laplacian",
    "biharmonic",
    "value_grad_laplacian",
    "ValueGradLaplacian",
    # the same from an existing autograd graph
    "graph_divergence",
    "graph_jacobian",
    "graph_laplacian",
    # stochastic estimates (trace estimation)
    "estimate_divergence",
    "estimate_trace",
    "draw_probes",
    "Estimate",
    # checking the batch-independence assumption
    "BatchInteractionError",
    "allow_batch_interaction",
    "check_batch_independence",
    # continuous flows: log-likelihoods along an ODE (submodule; needs the `ode` extra)
    "flows",
]
