"""torchdiv: per-sample divergence, Jacobians and their diagonals for batched PyTorch functions."""

from torchdiv._api import divergence, jacobian, jacobian_diagonal
from torchdiv._graph import graph_divergence, graph_jacobian
from torchdiv._independence import BatchInteractionError, check_batch_independence
from torchdiv._laplacian import laplacian

__version__ = "0.1.0"

__all__ = [
    # exact operators of a function
    "divergence",
    "jacobian",
    "jacobian_diagonal",
    "laplacian",
    # the same from an existing autograd graph
    "graph_divergence",
    "graph_jacobian",
    # checking the batch-independence assumption
    "BatchInteractionError",
    "check_batch_independence",
]
