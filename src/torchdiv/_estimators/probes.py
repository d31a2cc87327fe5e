"""Probe distributions, and probes drawn once for reuse (a whole ODE solve sees the same noise).

Every distribution has ``E[v v^T] = I`` per sample, which is all the estimators need:

* ``"rademacher"`` (default): entries +-1 with probability 1/2. Smallest Hutchinson variance
  for symmetric matrices (no diagonal term), and an exact diagonal contribution.
* ``"gaussian"``: standard normal entries.
* ``"sphere"``: uniform on the sphere of radius ``sqrt(n)`` in each sample's flattened event
  (a Gaussian vector normalised): rotation invariant like the Gaussian, with a fixed norm.

Every sample gets its own independent entries: probes have the full shape ``(r,) + x.shape``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch._C._functorch import peek_interpreter_stack

from torchdiv._core.checks import (
    check_generator,
    check_input,
    check_method,
    check_num_probes,
    check_probe,
    event_numel,
)
from torchdiv._core.script import cached
from torchdiv._estimators.registry import ESTIMATORS, STOCHASTIC_METHODS, num_vectors

PROBES = ("rademacher", "gaussian", "sphere")


def draw(
    probe: str,
    count: int,
    like: torch.Tensor,
    batch_dims: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    fn: str = "draw_probes",
) -> torch.Tensor:
    """``count`` probe vectors of the distribution ``probe``, shape ``(count,) + like.shape``.

    Under the caller's ``torch.func.vmap`` with ``randomness="error"`` (its default, and
    ``jacfwd``'s), whose refusal of the draw led ``"auto"`` on to engines that PyTorch refuses
    there for another reason (``requires_grad_``), a ``ValueError`` names ``fn`` and the ways
    out."""
    try:
        return _drawn(probe, count, like, batch_dims, generator, dtype)
    except RuntimeError as exc:
        if peek_interpreter_stack() is None or "randomness error mode" not in str(exc):
            raise
        raise ValueError(
            f"{fn}: the probes are drawn inside the caller's torch.func.vmap (or jacfwd), "
            "whose randomness='error' refuses random draws; pass probes= drawn outside the "
            "transform (torchdiv.draw_probes(x, num_probes)), or vmap(..., "
            "randomness='different') for independent probes per vmapped call ('same': the "
            "same probes)"
        ) from exc


def _drawn(
    probe: str,
    count: int,
    like: torch.Tensor,
    batch_dims: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``draw``'s vectors."""
    shape = (count, *like.shape)
    if probe == "rademacher":
        return _rademacher(shape, generator, dtype, like.device)
    v = torch.randn(shape, generator=generator, dtype=dtype, device=like.device)
    if probe == "sphere":
        n = event_numel(like, batch_dims)
        flat = v.reshape(count, like.shape[:batch_dims].numel(), n)
        v = (flat * (math.sqrt(n) / torch.linalg.vector_norm(flat, dim=-1, keepdim=True))).view(
            shape
        )
    return v


def _rademacher(
    shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """+-1 entries, eight per uniform random byte: each byte picks its row of the table of the
    256 sign patterns (an embedding lookup: a third of the time of one draw per entry, measured
    for a 128 x 256 batch on CPU). Where Dynamo traces the draw, the table is made in the
    graph (``cached``: Dynamo warns at a call of a cached function, and ignores the cache)."""
    numel = math.prod(shape)
    index = torch.randint(0, 256, (-(-numel // 8),), generator=generator, device=device)
    signs = torch.nn.functional.embedding(index, _sign_patterns(dtype, torch.device(device)))
    return signs.flatten()[:numel].view(shape)


@cached()
def _sign_patterns(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Row ``i`` holds the bits of ``i`` as signs: ``(256, 8)``, entries ``2 bit - 1``."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def draw_probes(
    x: torch.Tensor,
    num_probes: int,
    *,
    batch_dims: int = 1,
    method: str = "hutchinson",
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Random vectors for a stochastic estimate, drawn once so that calls can share them.

    Pass the result as ``probes=`` to ``divergence``, ``estimate_divergence``,
    ``graph_divergence``, ``jacobian_diagonal`` or ``estimate_trace`` with the same ``method``:
    every call then sees the same noise and gives the same estimate for the same operator, as
    FFJORD-style training needs (one draw per ODE solve, not one per function evaluation).

    How many vectors a method uses for ``num_probes`` products per sample: Hutchinson one per
    product; Hutch++ ``2 num_probes / 3`` (sketch first, then residual probes); XTrace
    ``num_probes / 2``. Any tensor of that shape works as ``probes=`` (e.g.
    ``torch.randn_like(x)[None]`` for one Gaussian Hutchinson probe).

    Args:
        x: a tensor shaped like the inputs the probes will be used with.
        num_probes: operator products per sample the probes are for (see ``divergence``).
        batch_dims: number of leading batch dimensions of ``x`` (``"sphere"`` normalises each
            sample's flattened event).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        probe: ``"rademacher"``, ``"gaussian"`` or ``"sphere"`` (``PROBES``).
        generator: ``torch.Generator`` for reproducible draws; ``None``: the global one.

    Returns:
        Shape ``(r,) + x.shape`` with ``r`` as above; dtype and device of ``x``; each sample
        has its own independent entries.

    Raises:
        TypeError, ValueError: bad ``x``/``batch_dims``, unknown ``method`` or ``probe``,
            ``num_probes`` not a positive multiple of what ``method`` needs.

    Examples:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> draw_probes(x, 6, method="hutch++").shape  # 2 sketch + 2 residual vectors
        torch.Size([4, 8, 3, 4, 4])
        >>> import torchdiv
        >>> A = torch.randn(5, 5)
        >>> probes = draw_probes(torch.zeros(2, 5), 4)
        >>> a = torchdiv.divergence(lambda x: x @ A.T, torch.randn(2, 5), method="hutchinson",
        ...                         probes=probes)
        >>> b = torchdiv.divergence(lambda x: x @ A.T, torch.randn(2, 5), method="hutchinson",
        ...                         probes=probes)
        >>> torch.equal(a, b)
        True
    """
    fn = "draw_probes"
    check_input(fn, x, batch_dims)
    check_method(fn, method, STOCHASTIC_METHODS)
    check_num_probes(fn, method, num_probes, ESTIMATORS[method])
    check_probe(fn, probe, PROBES)
    check_generator(fn, generator)
    # drawn in the dtype the estimators draw in (at least float32), so that probes= and the
    # same generator give the same noise in half precision too
    dtype = torch.promote_types(x.dtype, torch.float32)
    return draw(probe, num_vectors(method, num_probes), x, batch_dims, generator, dtype).to(x.dtype)
