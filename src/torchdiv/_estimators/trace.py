"""Stochastic trace (and diagonal) estimates of any batched square operator given by products.

The public entry point ``estimate_trace`` takes ``matmat(V) -> A V`` for ``k`` probe vectors
``V`` of shape ``(k,) + like.shape`` (each a full batched tensor: sample ``b`` of vector ``j``
is that sample's own probe) and estimates every sample's ``tr(A_b)``. Jacobians
(``divergence``), Hessians (Laplacians) and dense matrices all come through here. Internally
vectors are ``(k, N, n)`` (see ``torchdiv._estimators.sketch``), in at least float32.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import torch

from torchdiv._core.basis import chunks
from torchdiv._core.checks import (
    check_chunk_size,
    check_generator,
    check_input,
    check_method,
    check_not_dtensor,
    check_num_probes,
    check_probe,
    check_probes,
    check_products,
    check_tolerance,
    event_numel,
)
from torchdiv._core.modes import cache_read_only
from torchdiv._estimators import bekas as _bekas
from torchdiv._estimators.probes import PROBES, draw
from torchdiv._estimators.registry import ESTIMATORS, STOCHASTIC_METHODS, Matmat, num_vectors
from torchdiv._estimators.result import Estimate
from torchdiv._estimators.sketch import Operator, Reduce, standard_error
from torchdiv._exact.attributes import PlainAttributes
from torchdiv._exact.state import Once
from torchdiv._taylor.propagate import autocast_off, autocast_on

MAX_PROBES = 1000


@dataclass(frozen=True)
class Sampling:
    """Checked options of one stochastic estimate (see ``sampling``)."""

    fn: str
    method: str
    num_probes: int  # products per sample of one estimate; of one block in the tolerance mode
    probe: str
    probes: torch.Tensor | None
    generator: torch.Generator | None
    rtol: float | None = None
    atol: float | None = None
    max_probes: int = MAX_PROBES

    @property
    def adaptive(self) -> bool:
        return self.rtol is not None or self.atol is not None


def sampling(
    fn: str,
    like: torch.Tensor,
    batch_dims: int,
    method: str,
    num_probes: int | None,
    probe: str | None,
    probes: torch.Tensor | None,
    generator: torch.Generator | None,
    rtol: float | None = None,
    atol: float | None = None,
    max_probes: int = MAX_PROBES,
    methods: tuple[str, ...] = STOCHASTIC_METHODS,
    name: str = "x",
    template: bool = False,
) -> Sampling:
    """Check the stochastic options of ``fn`` together; fill in the defaults. ``template``:
    ``like`` only gives the probes' shape, dtype and device (``estimate_trace``'s, whose
    ``matmat`` may take plain probes), a DTensor too; else it is the ``x`` that ``f`` and the
    probes meet, which cannot be one."""
    check_method(fn, method, methods)
    check_generator(fn, generator)
    if not template:
        check_not_dtensor(fn, like, f"method={method!r}", name)
    spec = ESTIMATORS[method]
    adaptive = rtol is not None or atol is not None
    if probes is not None:
        for option, value in (("probe", probe), ("generator", generator)):
            if value is not None:
                raise ValueError(
                    f"{fn}: {option} is not used with probes= (the probes are already drawn); "
                    f"pass one of {option}= and probes="
                )
        if adaptive:
            raise ValueError(
                f"{fn}: probes= fixes the number of products, but rtol/atol ask for fresh blocks "
                "of probes until the target is met; pass one of the two"
            )
        num_probes = check_probes(fn, probes, like, method, num_probes, spec, name)
    else:
        probe = "rademacher" if probe is None else probe
        check_probe(fn, probe, PROBES)
        num_probes = spec.block if adaptive and num_probes is None else num_probes
        num_probes = check_num_probes(fn, method, num_probes, spec)
    check_tolerance(fn, rtol, atol, max_probes, num_probes if adaptive else 1)
    if adaptive and max_probes < spec.min_blocks * num_probes:
        raise ValueError(
            f"{fn}: method={method!r} averages at least {spec.min_blocks} blocks of "
            f"num_probes={num_probes} products (its own error estimate can run low), so "
            f"max_probes must be at least {spec.min_blocks * num_probes}, got {max_probes}"
        )
    if adaptive and num_probes < 2 * spec.products:
        raise ValueError(
            f"{fn}: with rtol/atol every block must measure its own spread, so method="
            f"{method!r} needs num_probes >= {2 * spec.products} per block, got {num_probes}"
        )
    n = event_numel(like, batch_dims)
    if method == "xtrace" and num_vectors(method, num_probes) > n:
        raise ValueError(
            f"{fn}: method='xtrace' sketches with num_probes/2 = "
            f"{num_vectors(method, num_probes)} vectors, more than the {n} elements of each "
            "sample's event; use fewer probes, or an exact method (n products)"
        )
    return Sampling(fn, method, num_probes, probe or "", probes, generator, rtol, atol, max_probes)


def flat_operator(
    fn: str, matmat: Matmat, like: torch.Tensor, batch_dims: int, chunk_size: int | None
) -> Operator:
    """``matmat`` on ``(k,) + like.shape`` -> on ``(k, N, n)``, ``chunk_size`` vectors at a time
    (each chunk's products reduced as they come where the caller passes ``reduce``, and the
    reductions added where it passes ``add``)."""

    def apply(v: torch.Tensor, reduce: Reduce | None = None, add: bool = False) -> torch.Tensor:
        if not len(v):  # no vectors (Hutch++'s sketch of an empty event): no products
            return v.new_zeros(v.shape) if reduce is None else reduce(v, v.new_zeros(v.shape))
        parts: list[torch.Tensor] = []
        for start, stop in chunks(len(v), chunk_size or max(len(v), 1)):
            block = v[start:stop].reshape(stop - start, *like.shape).to(like.dtype)
            out = matmat(block)
            check_products(fn, out, block)
            product = out.reshape(v[start:stop].shape).to(v.dtype)
            part = product if reduce is None else reduce(v[start:stop], product)
            if add and parts:
                parts[0] = parts[0] + part
            else:
                parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return apply


def terms(s: Sampling, op: Operator, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """The per-sample terms of one estimate of ``s`` (not adaptive), flat ``(m, N)`` in the
    working dtype: ``summary`` gives the estimate and its standard error.

    The estimator's own algebra (Hutch++'s and XTrace's Gram matrices ``Q^T A Q``, their
    combinations ``A Q p_i``: ``einsum``, a ``bmm`` on autocast's list) runs with the
    caller's ``torch.autocast`` off, in the working dtype, and only the products ``op`` under
    it: under ``autocast(bfloat16)`` that algebra alone was 2-4e-3 off the float64 estimate
    on exact products (float32: 1e-7), XTrace 5-11x the error of the same estimator on a
    plain autograd loop's products in that autocast (precision34)."""
    run = ESTIMATORS[s.method].terms
    devices = autocast_on()
    if not devices:
        return run(op, vectors(s, like, batch_dims))
    dtypes = [torch.get_autocast_dtype(d) for d in devices]
    cache = torch.is_autocast_cache_enabled()

    def products(v: torch.Tensor, reduce: Reduce | None = None, add: bool = False) -> torch.Tensor:
        return _autocast_again(devices, dtypes, cache, lambda: op(v, reduce, add))

    return autocast_off(devices, lambda: run(products, vectors(s, like, batch_dims)))


def _autocast_again(
    devices: list[str], dtypes: list[torch.dtype], cache: bool, run: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``run()`` under the caller's ``torch.autocast`` (on ``devices``, in ``dtypes``) again,
    inside ``autocast_off``: nested ``with`` statements, as ``autocast_off``'s."""
    if not devices:
        return run()
    with torch.autocast(devices[0], dtype=dtypes[0], cache_enabled=cache):
        return _autocast_again(devices[1:], dtypes[1:], cache, run)


def summary(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m,) + batch`` terms -> the estimate (their mean) and its standard error, ``batch``."""
    if len(terms) == 1:  # one product: no spread (and no mean to take)
        return terms[0], torch.full_like(terms[0].detach(), math.nan)
    return terms.mean(0), standard_error(terms.detach())


def run(s: Sampling, op: Operator, like: torch.Tensor, batch_dims: int) -> Estimate:
    """The estimate of ``s`` with the flat operator ``op``, reshaped like ``like``'s batch."""
    if not s.adaptive:
        value, stderr = summary(terms(s, op, like, batch_dims))
        used = s.num_probes
    else:
        value, stderr, used = _until_accurate(s, op, like, batch_dims)
    batch = like.shape[:batch_dims]
    stderr = stderr.detach().reshape(batch).to(like.dtype)  # an error bar, not differentiated
    return Estimate(value.reshape(batch).to(like.dtype), stderr, used)


def diagonal(s: Sampling, op: Operator, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Bekas et al.'s estimate of every sample's diagonal, shaped like ``like``."""
    return _bekas.estimate(op, vectors(s, like, batch_dims)).reshape(like.shape).to(like.dtype)


def vectors(s: Sampling, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """The random vectors of one estimate, flat ``(r, N, n)``, in the working dtype."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    r, n = num_vectors(s.method, s.num_probes), event_numel(like, batch_dims)
    if s.probes is None:  # rounded to x's precision, as draw_probes gives them
        v = draw(s.probe, r, like, batch_dims, s.generator, dtype, s.fn).to(like.dtype)
    else:
        v = s.probes
    return v.reshape(r, like.shape[:batch_dims].numel(), n).to(dtype)


def _until_accurate(
    s: Sampling, op: Operator, like: torch.Tensor, batch_dims: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Average independent blocks of ``s.num_probes`` products until every sample's standard
    error is at most ``max(atol, rtol |estimate|)`` or ``max_probes`` would be exceeded;
    samples with a non-finite estimate are not waited for.

    Blocks are independent estimates with the same number of products, so the mean of ``R``
    blocks has standard error ``sqrt(sum_j stderr_j^2) / R`` from the blocks' own errors, and,
    independently of any estimator's error formula, ``std(block values) / sqrt(R)``: the
    larger of the two is used (the spread between blocks catches XTrace's low per-block
    estimate), after at least the estimator's ``min_blocks`` blocks.
    """
    spec = ESTIMATORS[s.method]
    values, variances = [], []
    while True:
        value, stderr = summary(terms(s, op, like, batch_dims))
        values.append(value)
        variances.append(stderr.detach() ** 2)
        stacked = torch.stack(values)
        mean = stacked.mean(0)
        se = torch.stack(variances).sum(0).sqrt() / len(values)
        if len(values) > 1:  # the spread between the blocks: std / sqrt(R)
            se = torch.maximum(se, standard_error(stacked.detach()))
        target = torch.clamp(mean.detach().abs() * (s.rtol or 0.0), min=s.atol or 0.0)
        # a sample whose estimate is not finite (nan or inf in its x or f(x)) never meets a
        # target: it is not waited for, or one diverged sample cost every sample max_probes
        above = ~(se <= target) & mean.detach().isfinite()
        used = len(values) * s.num_probes
        if len(values) >= spec.min_blocks and not above.any():
            return mean, se, used
        if used + s.num_probes > s.max_probes:
            ratio = (se / target)[above].max().item()
            warnings.warn(
                f"{s.fn}: stopped at max_probes={s.max_probes} ({used} products per sample, "
                f"{len(values)} blocks of {s.num_probes}); {int(above.sum())} of {above.numel()} "
                f"samples still have stderr above max(atol, rtol*|estimate|) (worst: "
                f"{ratio:.3g} times its target). Raise max_probes, loosen rtol/atol, or use an "
                "exact method",
                stacklevel=_callers_level(),
            )
            return mean, se, used


def _callers_level() -> int:
    """``stacklevel`` of the first frame outside torchdiv: a warning points at the user's call,
    whichever public function (and wrappers) led here."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # torchdiv/
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def estimate_trace(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "hutchinson",
    num_probes: int | None = None,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_probes: int = MAX_PROBES,
) -> Estimate:
    r"""Unbiased per-sample trace estimates of a batched square linear operator (with a fixed
    number of products; see the tolerance mode below).

    The operator is given only by its products: ``matmat(V)`` takes ``k`` probe vectors
    ``V`` of shape ``(k,) + like.shape`` and returns ``A V`` of the same shape, where sample
    ``b`` of ``(A V)[j]`` is ``A_b`` times sample ``b`` of ``V[j]`` (flattened events). Nothing
    else is assumed: ``A_b`` can be a Jacobian (JVPs give ``A V``; VJPs give ``A^T V``, whose
    trace is the same), a Hessian (Hessian-vector products), or a dense batch of matrices.
    Every sample gets its own independent probes, and all samples are estimated in one pass.

    Methods (``num_probes`` = products per sample; standard errors as computed):

    * ``"hutchinson"`` (Hutchinson 1989): ``(1/m) sum_j v_j^T A v_j``. Standard error: the
      sample standard deviation of the ``m`` terms over ``sqrt(m)`` (``nan`` for ``m = 1``).
    * ``"hutch++"`` (Meyer et al. 2021), ``m`` a multiple of 3: exact trace on
      ``range(A S)`` for a sketch of ``m/3`` vectors plus Hutchinson with ``m/3`` probes on
      the rest. Standard error: the Hutchinson part's, from its ``m/3`` terms; the sketched
      part is fixed given the sketch and the conditional mean is ``tr(A)`` for every sketch,
      so this estimates the total variance without bias (``torchdiv._estimators.hutchpp``).
    * ``"xtrace"`` (Epperly, Tropp and Webber 2024), ``m`` even: Hutch++ with every one of
      the ``m/2`` sketch vectors left out in turn as the probe, averaged. Standard error: the
      spread of the ``m/2`` left-out estimates over ``sqrt(m/2)`` (the paper's; a heuristic,
      as they share the sketch). Needs ``m/2 <= n``.

    Hutch++ and XTrace beat Hutchinson when the eigenvalues decay (they are exact when the
    rank is at most ``m/3``, resp. below ``m/2``, almost surely for Gaussian or sphere
    probes; Rademacher probes of a tiny event can coincide and lose rank); on flat spectra
    (typical network Jacobians) Hutchinson's variance is lower, because it spends every
    product on probes.

    With ``rtol`` and/or ``atol``, independent blocks of ``num_probes`` products (default: 16
    for Hutchinson and XTrace, 24 for Hutch++) are averaged until every sample's standard
    error is at most ``max(atol, rtol |estimate|)``, or until another block would exceed
    ``max_probes`` (then a warning says how far from the target it stopped); a sample whose
    estimate is not finite (a nan or inf in its operator) is not waited for. That standard
    error is the larger of the blocks' own and the spread between blocks, and Hutch++ and
    XTrace, whose own rests on few terms (Hutch++'s residual) or can run low, always average at
    least 3 blocks. When to stop depends on the blocks drawn, so the tolerance mode's estimate
    is not exactly unbiased: a high running estimate meets ``rtol |estimate|`` sooner (on a
    6 x 6 matrix at ``rtol=0.1``, +1.4% of the trace over 1500 calls, a seventh of the
    target error). Give ``num_probes`` alone where unbiasedness matters (a training loss).

    ``matmat`` is called once per chunk of vectors, twice or more by Hutch++ and XTrace (the
    sketch, then the residual probes) and once per block in the tolerance mode. Where it
    evaluates something that changes state (an i-ResNet's power series
    ``sum_k c_k (J_g^T)^k V`` by VJPs through ``g``, whose train-mode spectral norm updates its
    buffers ``u``, ``v`` at every forward; a power iteration on a plain tensor; a dropout),
    every call starts from the state the first found, as ``f``'s evaluations do in
    ``divergence``: each sees one operator (the same power iteration, the same dropout mask),
    and the call leaves the tensors ``matmat`` writes, the random generators and the plain
    values of the modules it reaches (through its closure, default arguments or globals) as
    one evaluation did (a count of products kept on such a module, ``self.calls += 1``, moves
    once per estimate; each call ran ``g``'s power iteration once more until optim27, and
    until rev-optim27 where ``matmat`` reached no module: chunks of one estimate saw
    different operators, 2-14% off). A ``matmat`` over a graph kept outside it changes
    nothing; its first call is watched all the same (~1 ms of Python an estimate).

    Args:
        matmat: ``V -> A V`` on ``(k,) + like.shape`` tensors (``k`` at most ``chunk_size``).
        like: a tensor with the batch and event shape, dtype and device of the probes.
        batch_dims: number of leading batch dimensions of ``like`` (0: one operator).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        num_probes: products per sample (per block with ``rtol``/``atol``).
        probe: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"`` (``_estimators.probes``).
        probes: random vectors drawn beforehand by ``draw_probes`` (shape ``(r,) + like.shape``),
            instead of ``probe``/``generator``; same probes, same operator -> same estimate.
        generator: ``torch.Generator`` for the probes (same state -> same estimate).
        chunk_size: at most this many vectors per ``matmat`` call; ``None``: all at once.
        rtol: target standard error, relative to ``|estimate|``.
        atol: target standard error, absolute.
        max_probes: the most products per sample the tolerance mode may spend.

    Returns:
        ``Estimate`` with ``value`` and ``stderr`` of shape ``like.shape[:batch_dims]`` (dtype of
        ``like``) and ``num_probes``, the products per sample spent. ``value`` is
        differentiable through ``matmat``'s products (Hutch++ and XTrace hold the sketch
        basis constant: unbiased gradients, finite for rank-deficient sketches); ``stderr``
        is not.

    Raises:
        TypeError, ValueError: unknown ``method``/``probe``; ``num_probes`` not a positive
            multiple of 3 (``"hutch++"``) or 2 (``"xtrace"``); ``probes`` of the wrong shape;
            ``probes`` with ``probe``, ``generator`` or ``rtol``/``atol``; ``matmat(V)`` not
            shaped like ``V``.

    Examples:
        >>> A = torch.randn(4, 6, 3, dtype=torch.float64) @ torch.randn(4, 3, 6).double()
        >>> matmat = lambda V: torch.einsum("bij,kbj->kbi", A, V)  # 4 matrices of rank 3
        >>> like = torch.zeros(4, 6, dtype=torch.float64)
        >>> est = estimate_trace(matmat, like, method="xtrace", num_probes=8, probe="gaussian")
        >>> torch.allclose(est.value, A.diagonal(dim1=1, dim2=2).sum(-1))  # exact: rank < 8/2
        True
        >>> est.num_probes, est.stderr.shape
        (8, torch.Size([4]))
    """
    fn = "estimate_trace"
    if not callable(matmat):
        raise TypeError(f"{fn}: matmat must be callable, got {type(matmat).__name__}")
    check_input(fn, like, batch_dims, name="like")
    check_chunk_size(fn, chunk_size)
    s = sampling(
        fn,
        like,
        batch_dims,
        method,
        num_probes,
        probe,
        probes,
        generator,
        rtol,
        atol,
        max_probes,
        name="like",
        template=True,
    )
    # each call of matmat (a chunk, Hutch++'s and XTrace's two passes, a tolerance block)
    # from the state the first found: a matmat that evaluates a module itself (an i-ResNet's
    # power series of VJPs through a train-mode spectral norm, whose power iteration moves its
    # buffers at every forward) estimated a different operator per call, silently. Watched
    # whatever it reaches, as divergence watches f: gated on a module found in its closure
    # (optim27), a power iteration on a plain tensor, a functional dropout or a module three
    # objects down ran once per chunk (0.36 off at 6 probes in chunks of 2); a matmat over a
    # graph kept outside it pays for the watch of its first call (~1 ms, rev-optim27)
    calls = PlainAttributes(matmat)  # (the plain values of the modules matmat reaches too)
    several = _several(s, like, batch_dims, chunk_size)
    once = Once(like, several=several)
    try:
        op = flat_operator(fn, once(matmat), like, batch_dims, chunk_size)
        with cache_read_only() if several else contextlib.nullcontext():
            return once.undoing(lambda: run(s, op, like, batch_dims))
    finally:
        calls.close()


def _several(s: Sampling, like: torch.Tensor, batch_dims: int, chunk_size: int | None) -> bool:
    """Whether ``estimate_trace`` of ``s`` may call ``matmat`` more than once: in chunks, in
    Hutch++'s and XTrace's passes, in the tolerance mode's blocks."""
    if s.adaptive or s.method != "hutchinson":
        return True
    r = num_vectors(s.method, s.num_probes)
    return chunk_size is not None and chunk_size < r and event_numel(like, batch_dims) > 0
