"""torchdiv: per-sample divergence, Jacobians, their diagonals and Laplacians of batched functions,
exact or estimated."""

import torchdiv._core.versions  # noqa: F401  # first: an old PyTorch refused by name
from torchdiv import distributed, flows
from torchdiv._api.graph import graph_divergence, graph_jacobian, graph_laplacian
from torchdiv._api.independence import check_batch_independence
from torchdiv._api.laplacian import laplacian
from torchdiv._api.operators import divergence, estimate_divergence, jacobian, jacobian_diagonal
from torchdiv._api.second_order import (
    ValueGradLaplacian,
    biharmonic,
    value_grad_laplacian,
    weighted_laplacian,
)
from torchdiv._core.mixing.errors import BatchInteractionError, allow_batch_interaction
from torchdiv._estimators.probes import draw_probes
from torchdiv._estimators.result import Estimate
from torchdiv._estimators.trace import estimate_trace

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
    # exact divergences and Laplacians of one batch shared out across ranks (submodule)
    "distributed",
]


def _show_public_module() -> None:
    """Public classes name ``torchdiv`` as their module (in reprs, tracebacks, pickles), not
    the private module that defines them."""
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type):
            obj.__module__ = __name__


_show_public_module()
