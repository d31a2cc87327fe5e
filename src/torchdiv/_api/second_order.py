"""Second-order operators beyond the Laplacian: ``tr(A ∇²f)``, the biharmonic ``Δ²f``, and
value, gradient and Laplacian from one sweep.

- ``weighted_laplacian``: ``Σ_ij A_ij ∂_i ∂_j f = tr(A ∇²f)``. Given a factor ``S`` of
  ``A = S Sᵀ`` it is the Laplacian of ``f(x + S z)`` in ``z`` (``_laplacian.along``), so every
  Laplacian method runs it: the Taylor engine collapsed over the ``k`` columns of ``S``,
  Hessian-vector products, or Hutchinson's probes ``S v``. A symmetric ``A`` is factored by
  its eigenvectors, ``A = S₊S₊ᵀ - S₋S₋ᵀ`` with ``S± = Q sqrt(max(±Λ, 0))``, dropping
  zero eigenvalues of a shared ``A`` (exact zeros: a product ``σσᵀ`` computed in floating point
  has none, give ``sigma`` for a low-rank ``A``). An ``A``
  that requires grad is not factored (the eigenvector derivatives blow up at repeated
  eigenvalues): ``tr(A H) = Σ_j (A e_j)ᵀ H e_j`` by Hessian-vector products, differentiable
  in ``A``.
- ``biharmonic``: ``Δ(Δf)`` as the Laplacian of the Laplacian. With the Taylor engine inside
  the Taylor engine (``"taylor"``, ``"auto"``) the outer sweep propagates through the plain
  tensor operations of the inner one: no derivative formula of PyTorch's beyond first order
  is involved, and parameter gradients take one backward pass.
- ``value_grad_laplacian``: the Taylor engine carries ``D f[e_j]`` for every direction, so
  keeping the output's first-order terms gives the gradient (the Jacobian for vector outputs)
  at no extra sweep.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch._C._functorch import peek_interpreter_stack
from torch._guards import CompileContext

from torchdiv._api.laplacian import METHODS, RECORDING, laplacian
from torchdiv._api.operators import jacobian
from torchdiv._api.reporting import NESTED_LOOP, renamed, reported
from torchdiv._core.basis import accumulated, basis, broadcast_units, chunks
from torchdiv._core.checks import (
    check_callable,
    check_chunk_size,
    check_coordinates,
    check_exact_options,
    check_input,
    check_matrix,
    check_method,
    check_untransformed,
    checked,
    event_numel,
    out_of_memory,
)
from torchdiv._core.mixing.errors import allowed
from torchdiv._core.mixing.transformed import check_transformed
from torchdiv._core.mixing.watch import (
    check_empty_event,
    checks_empty_event,
    verdicts,
    watch_once,
    watched,
)
from torchdiv._core.modes import SafeDerivatives, eager_when, outside_inference_mode
from torchdiv._core.nested import NestedForward
from torchdiv._core.script import faking
from torchdiv._core.tie import detached, tied, trained
from torchdiv._core.walk import GraphTooDeep
from torchdiv._estimators import trace as _trace
from torchdiv._exact.attributes import unwrap_between_evaluations
from torchdiv._exact.autograd import written_once
from torchdiv._exact.state import Once, unchanged
from torchdiv._laplacian import loop as _loop
from torchdiv._laplacian import methods, traced
from torchdiv._laplacian.along import along, unit_columns
from torchdiv._taylor import RULES, Context, Graph, Jet, UnsupportedOp, capture, propagate
from torchdiv._taylor.capture import CUSTOM_OP, argument, way_out
from torchdiv._taylor.sparse import Sparse

Function = Callable[[torch.Tensor], torch.Tensor]
SWEEP_METHODS = ("auto", "taylor", "forward-over-reverse")


@outside_inference_mode
@reported("weighted_laplacian")
def weighted_laplacian(
    f: Function,
    x: torch.Tensor,
    *,
    diffusion: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    probe: str | None = None,
) -> torch.Tensor:
    r"""Per-sample ``tr(A ∇²f) = Σ_ij A_ij ∂²f / ∂x_i ∂x_j`` of every output component.

    The second-order part of a diffusion (Kolmogorov, Fokker-Planck) generator
    ``Σ_ij (S Sᵀ)_ij ∂_i ∂_j`` (without the ``1/2``), an anisotropic or weighted Laplacian.
    Give the matrix ``A`` as ``diffusion`` or a factor ``S`` with ``A = S Sᵀ`` as ``sigma``
    (``k`` columns cost ``k`` directions: a low-rank ``S`` is cheap). Both act on the
    flattened event of each sample; either is shared by all samples or given per sample.

    Args:
        f: ``f(x) -> y``, samples independent (as in ``laplacian``).
        x: floating tensor; its first ``batch_dims`` dimensions index samples.
        diffusion: ``A``, shape ``(n, n)`` or ``x.shape[:batch_dims] + (n, n)``, ``n`` the
            event's number of elements. Only its symmetric part matters. Indefinite is fine:
            one Laplacian per sign of its eigenvalues, each of the function ``f`` computed
            at the first evaluation (a stateful ``f`` changes its state once), subtracted;
            in float32 that costs accuracy relative to ``‖A‖ ‖∇²f‖`` (4.5e-5 relative at
            ``A = [[1, 1000], [1000, 1]]``): float64 for an ill-conditioned indefinite ``A``.
            A per-sample ``A`` with ``nan`` or ``inf`` entries gives those samples ``nan``
            (a shared one raises ``ValueError``).
            One that requires grad (a learned or state-dependent diffusion, computed from an
            ``x`` that requires grad) is not factored: Hessian-vector products whatever
            ``method`` says (``"hutchinson"``: along its probes), ``f`` evaluated once more
            first, watched for sample mixing, under ``"auto"``, ``"taylor"`` and
            ``"hutchinson"`` (their engines watch it); give ``sigma`` for the other engines.
        sigma: ``S``, shape ``(n, k)`` or ``x.shape[:batch_dims] + (n, k)``.
        batch_dims: as in ``laplacian``.
        method: as in ``laplacian``; ``"hutchinson"`` estimates with probes ``S v``.
        chunk_size: as in ``laplacian``; it bounds the directions in flight.
        num_probes: ``"hutchinson"`` only, as in ``laplacian``; an indefinite ``A`` spends
            ``num_probes`` on each sign.
        generator: ``"hutchinson"`` only, as in ``laplacian``.
        probe: ``"hutchinson"`` only, as in ``laplacian``.

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:]``, dtype of ``x``; differentiable
        w.r.t. ``x``, ``sigma``/``diffusion`` and whatever ``f`` closes over.

    Raises:
        TypeError, ValueError: as ``laplacian``; also neither or both of ``diffusion`` and
            ``sigma``, or either of the wrong shape or dtype.

    Examples:
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> u = lambda x: x[:, 0] ** 2 * x[:, 1]      # ∇²u = [[2 x1, 2 x0], [2 x0, 0]]
        >>> a = torch.tensor([[1.0, 0.5], [0.5, 3.0]], dtype=torch.float64)
        >>> expected = 2 * x[:, 1] + 2 * x[:, 0]    # A_00 H_00 + 2 A_01 H_01
        >>> torch.allclose(weighted_laplacian(u, x, diffusion=a), expected)
        True
    """
    fn = "weighted_laplacian"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, METHODS)
    if method == "grad-of-grad":
        check_untransformed(
            fn, "method='grad-of-grad'", "use method='auto' or 'forward-over-reverse' there"
        )
    check_chunk_size(fn, chunk_size)
    if diffusion is not None and sigma is None:
        name, matrix = "diffusion", diffusion
    elif sigma is not None and diffusion is None:
        name, matrix = "sigma", sigma
    else:
        raise ValueError(f"{fn}: give exactly one of diffusion (the matrix A) and sigma (A = S Sᵀ)")
    check_matrix(fn, name, matrix, x, batch_dims, square=name == "diffusion")
    if method != "hutchinson":
        check_exact_options(fn, method, num_probes, generator, probe)
    g = checked(fn, f, x, batch_dims, square=False)
    matrix = matrix.to(x.dtype)
    mixed = name == "diffusion" and matrix.requires_grad and torch.is_grad_enabled()
    factors = [] if mixed else _factors(fn, matrix) if name == "diffusion" else [(1, matrix)]
    # f evaluated by the check of x's empty event (which the shifted function's event hides)
    # or the watch for sample mixing, once per part (a sign of A's eigenvalues) or chunk:
    # every time from the same state (only f's own evaluations watched by ``each`` where they
    # run inside the transforms: forward over reverse's, the learned diffusion's products)
    check = checks_empty_event(x, batch_dims)
    several = check or len(factors) > 1
    # (the check watched f's evaluation; allowed: no evaluation to make, none made)
    watch = mixed and method in WATCHED and not check and not allowed()
    each = Once(x, several or (mixed and (watch or chunk_size is not None)))
    if check:
        each(lambda z: check_empty_event(g, z, batch_dims))(x)
    if mixed:
        options = (num_probes, generator, probe)
        return _mixed(fn, g, x, batch_dims, method, chunk_size, matrix, *options, each, watch)
    total = None
    for sign, factor in factors:
        h, z = along(g, x, batch_dims, factor)
        probes = None
        if method == "hutchinson" and z.numel() > 0:  # drawn outside ``each``: new ones a part
            s = _trace.sampling(fn, z, batch_dims, method, num_probes, probe, None, generator)
            probes = _trace.vectors(s, z, batch_dims).reshape(-1, *z.shape).to(x.dtype)
        try:
            part = _part(h, z, batch_dims, method, chunk_size, probes, each if several else None)
        except UnsupportedOp as exc:  # the engines name the Laplacian they run, not this call
            raise (renamed(fn, exc) or exc) from exc
        total = sign * part if total is None else total + sign * part
    assert total is not None  # _factors always gives the positive part
    # on x's graph (and a module's parameters') where the engines' result is not (f piecewise
    # linear)
    return tied(total, x, trained(f, total))


def _part(
    h: Function,
    z: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    probes: torch.Tensor | None,
    each: Once | None,
) -> torch.Tensor:
    """The Laplacian of ``h`` at ``z`` by ``method`` (``"hutchinson"``: along ``probes``),
    its evaluations of ``h`` from the state ``each`` (``None``: this the call's only part)
    found: ``"forward-over-reverse"``'s own evaluations inside its transforms (not its
    backward and tangent passes, as the Laplacian's), another method's whole computation."""
    if method == "forward-over-reverse" and probes is None and z.numel() > 0:
        return methods.forward_over_reverse(h, z, batch_dims, chunk_size, each=each)

    def run(z: torch.Tensor) -> torch.Tensor:
        if z.numel() == 0:  # a part without columns: h still evaluated (for its shape)
            return methods.zeros_like_output(h, z)
        if probes is not None:
            return methods.hutchinson(h, z, batch_dims, chunk_size, probes)
        return methods.BY_NAME[method](h, z, batch_dims, chunk_size)

    return run(z) if each is None else each(run)(z)


def _factors(fn: str, a: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(±1, S±)]`` with ``sym(A) = S₊S₊ᵀ - S₋S₋ᵀ`` (eigenvectors scaled by ``sqrt|λ|``);
    a shared ``A`` keeps the columns of its nonzero eigenvalues, a per-sample one all ``n``.
    No eigenvalue is dropped for being small next to the largest: with ``H`` not aligned with
    ``A`` its share of ``tr(A H)`` can be all of it (``A = diag(1e5, 1, ...)`` in float32 and
    ``f`` independent of ``x_0``). The part of a sign without eigenvalues is left out (the
    positive one stays, perhaps with no columns, so that the result has a part). Half
    precision is decomposed in float32 (PyTorch has no half ``eigh``)."""
    wide = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    # a per-sample A that is not finite (one diverged sample's) has no eigendecomposition, and
    # LAPACK's error stopped the whole batch: its factor is nan, that sample's result too
    bad = ~wide.isfinite().flatten(-2).all(-1)  # per sample; () for a shared A (raises below)
    if a.dim() > 2:
        wide = wide.masked_fill(bad[..., None, None], 0)
    try:
        eigenvalues, vectors = torch.linalg.eigh((wide + wide.mT) / 2)
    except RuntimeError as error:  # (torch.linalg.LinAlgError)
        raise ValueError(
            f"{fn}: diffusion of shape {tuple(a.shape)} has no eigendecomposition (nan or inf "
            f"entries?): {error}"
        ) from error
    eigenvalues, vectors = eigenvalues.to(a.dtype), vectors.to(a.dtype)
    out = []
    for sign in (1, -1):
        signed = sign * eigenvalues
        if sign == -1 and not bool((signed > 0).any()):
            continue
        if a.dim() == 2:
            keep = signed > 0
            out.append((sign, vectors[:, keep] * signed[keep].sqrt()))
        else:
            factor = vectors * signed.clamp(min=0).sqrt().unsqueeze(-2)
            out.append((sign, factor.masked_fill(bad[..., None, None], math.nan)))
    return out


# the methods whose engines watch f for sample mixing (BatchInteractionError); a diffusion that
# requires grad takes Hessian-vector products instead, which watch nothing: f watched first
# (a mean over the batch ran silently there until a review found it)
WATCHED = ("auto", "taylor", "hutchinson")

# a diffusion that requires grad takes Hessian-vector products whatever the method: where f
# holds an op refused through forward mode, the way out is a factor (any method runs along it)
MIXED_WAY_OUT = (
    "a factor S of A = S Sᵀ (a Cholesky factor) as sigma, differentiable with every method, "
    "and method='taylor' or 'grad-of-grad' (a diffusion that requires grad is computed by "
    "Hessian-vector products whatever the method)"
)


def _mixed(
    fn: str,
    g: Function,
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    a: torch.Tensor,
    num_probes: int | None,
    generator: torch.Generator | None,
    probe: str | None,
    each: Once,
    watch: bool,
) -> torch.Tensor:
    """``Σ_j (A v_j)ᵀ H v_j`` by Hessian-vector products, ``v_j`` the unit vectors (exact) or
    probes (``"hutchinson"``, divided by their number): linear, so differentiable, in ``A``.
    ``each`` wraps every chunk's evaluation of ``g`` (``Once``) inside the transforms; a
    chunk that raises after it (in a backward pass) puts the state back (``Once.undoing``).
    ``watch``: ``g`` evaluated once first, watched for sample mixing
    (``BatchInteractionError``), as the engines of ``"auto"``, ``"taylor"`` and
    ``"hutchinson"`` watch it (the products do not)."""
    n, samples = event_numel(x, batch_dims), x.shape[:batch_dims].numel()
    if x.numel() == 0:
        return methods.zeros_like_output(g, x)
    if method == "hutchinson":
        s = _trace.sampling(fn, x, batch_dims, method, num_probes, probe, None, generator)
        vectors = _trace.vectors(s, x, batch_dims).to(x.dtype)  # (r, N, n)
    else:
        vectors = basis(0, n, x, batch_dims).reshape(n, samples, n)
    if watch:
        each(lambda z: watch_once(g, argument(z), batch_dims))(x)
    a = a.reshape(-1, n, n)  # (1 or N, n, n)
    r = len(vectors)

    def parts() -> Iterator[tuple[torch.Tensor, torch.Size]]:
        for start, stop in chunks(r, chunk_size or r):
            v = vectors[start:stop]
            # g's own evaluation watched, not its backward and tangent passes (as the
            # Laplacian's forward over reverse), a tensor g set as an attribute under this
            # chunk's transforms unwrapped before the next chunk reads it
            along_v = methods.products_along(
                each(g), batch_dims, v.reshape(-1, *x.shape), MIXED_WAY_OUT
            )
            products, y_shape = along_v(x)
            unwrap_between_evaluations()
            partners = torch.einsum("bij,kbj->kbi", a, v)  # A v, (k, N, n)
            yield torch.einsum("kmbi,kbi->mb", products, partners), y_shape

    total, y_shape = each.undoing(lambda: methods.summed(parts()))  # r >= 1 vectors
    scale = r if method == "hutchinson" else 1
    return (total / scale).to(x.dtype).T.reshape(y_shape)


def _biharmonic_replayed(
    f: object, x: object, *args: object, **options: object
) -> torch.Tensor | None:
    """``biharmonic`` replayed in a compiled graph where it records (``_laplacian.traced``:
    the Taylor sweep in the Taylor sweep is plain ATen calls too)."""
    return traced.replayed(biharmonic, f, x, *args, **options)  # type: ignore[no-any-return]


@eager_when(lambda f, x, *, method="auto", **_: method in RECORDING, _biharmonic_replayed)
@outside_inference_mode
@reported("biharmonic")
def biharmonic(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Per-sample biharmonic ``Δ²f = Σ_ij ∂⁴f / ∂x_i² ∂x_j²`` of every output component.

    The Laplacian of the Laplacian (plate equations, fourth-order PDE residuals): with
    ``"taylor"`` (and ``"auto"`` where every op has a rule) the forward Laplacian runs inside
    the forward Laplacian, about ``n²`` forward passes for ``n`` inputs; with
    ``"forward-over-reverse"`` Hessian-vector products of Hessian-vector products.

    Args:
        f: as in ``laplacian``.
        x: as in ``laplacian``.
        batch_dims: as in ``laplacian``.
        method: ``"auto"``, ``"taylor"`` or ``"forward-over-reverse"``, used for both levels
            (``"auto"``: ``"taylor"``, or ``"forward-over-reverse"`` where an op has no Taylor
            rule; Taylor in Taylor measured 2.4-5.3x faster than nested forward-over-reverse
            and 1.3-4.7x faster than nested loops at n = 2-10, ``bench/laplacian_small.py``).
        chunk_size: at most this many directions in flight at each level.

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:]``, differentiable.

    Raises:
        TypeError, ValueError, NotImplementedError: as ``laplacian``.

    Examples:
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> r4 = lambda x: x.square().sum(-1) ** 2   # Δ²|x|⁴ = 8 n (n + 2)
        >>> torch.allclose(biharmonic(r4, x), torch.full((3,), 8.0 * 4 * 6, dtype=x.dtype))
        True
    """
    fn = "biharmonic"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, SWEEP_METHODS)
    check_chunk_size(fn, chunk_size)
    g = checked(fn, f, x, batch_dims, square=False)
    if method == "forward-over-reverse":
        _refuse_faking(fn)
        return _nested_laplacian(g, x, batch_dims, method, chunk_size)
    check_transformed(g, x, batch_dims)  # (the caller's transform: Taylor records nothing)
    try:
        return _nested_laplacian(g, x, batch_dims, "taylor", chunk_size)
    except UnsupportedOp as exc:
        if method == "taylor":
            raise UnsupportedOp(_taylor_refusal(fn, str(exc))) from exc
    _refuse_faking(fn)
    try:
        return _nested_laplacian(g, x, batch_dims, "forward-over-reverse", chunk_size)
    except NestedForward as exc:  # a replacement's jvp in a jvp: the outer one by backward passes
        if peek_interpreter_stack() is not None:  # (which the caller's transform refuses)
            raise NestedForward(
                f"{fn}: f holds torchdiv's replacement of det/slogdet/logdet, solve or a tensor "
                "exponent, which forward over reverse twice gets wrong, and the caller's "
                "torch.func transform (vmap, grad, jvp) around the call refuses the Taylor "
                f"engine and backward passes; call {fn} outside the transform (per model)"
            ) from exc
        return _nested_laplacian(
            g, x, batch_dims, "forward-over-reverse", chunk_size, "grad-of-grad"
        )


def _taylor_refusal(fn: str, refusal: str) -> str:
    """``biharmonic``'s refusal of ``"taylor"``, from its Laplacian's ``refusal``: the way out
    of a custom op (``CUSTOM_OP``), which ``"auto"``'s forward over reverse refuses too, is
    the nested loop of backward passes (``NESTED_LOOP``), not ``"auto"``."""
    text = f"{fn}: {refusal}".replace("laplacian: ", "", 1)
    if CUSTOM_OP in text and "; use method='auto'" in text:
        text = f"{text.rpartition('; use ')[0]}; use {NESTED_LOOP}"
    return text


def _refuse_faking(fn: str) -> None:
    """Refuse forward over reverse twice nested under ``FakeTensorMode``: PyTorch's backward
    there meets a meta tensor that is not fake, and the fake mode's error, formatting a dual
    tensor, left autograd's dispatch keys excluded in the thread (PyTorch 2.13: every later
    ``requires_grad`` result came out without a graph)."""
    if faking():
        raise RuntimeError(
            f"{fn}: method='forward-over-reverse' (and 'auto', the recording refused there) "
            "cannot run under FakeTensorMode (PyTorch's nested forward-over-reverse meets a "
            "tensor that is not fake); trace it on meta tensors: model.to('meta'), x.to('meta')"
        )


def _nested_laplacian(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    outer: str | None = None,
) -> torch.Tensor:
    """``Δ(Δf)``, the inner Laplacian by ``method``, the outer by ``outer`` (``None``: the same)."""

    def inner(z: torch.Tensor) -> torch.Tensor:
        return laplacian(f, z, batch_dims=batch_dims, method=method, chunk_size=chunk_size)

    outer = outer or method
    return laplacian(inner, x, batch_dims=batch_dims, method=outer, chunk_size=chunk_size)


class ValueGradLaplacian(NamedTuple):
    r"""What ``value_grad_laplacian`` returns for ``y = f(x)``, with ``B = x.shape[:batch_dims]``
    and the events ``y_event = y.shape[batch_dims:]``, ``x_event = x.shape[batch_dims:]``.

    Fields:
        value: ``y`` as ``f`` returns it, shape ``y.shape``.
        gradient: every sample's Jacobian ``∂y_{b,i} / ∂x_{b,j}``, shape
            ``B + y_event + x_event`` (``x.shape`` for one scalar per sample).
        laplacian: every sample's Laplacian ``Σ_j ∂²y_{b,i} / ∂x_{b,j}²`` (over
            ``coordinates`` only, where given), shape ``B + y_event``.

    Examples:
        >>> import torch, torchdiv  # (run from torchdiv's namespace: the class's module)
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> value, gradient, laplacian = torchdiv.value_grad_laplacian(lambda x: x.pow(3), x)
        >>> value.shape, gradient.shape, laplacian.shape
        (torch.Size([4, 3]), torch.Size([4, 3, 3]), torch.Size([4, 3]))
        >>> torch.allclose(gradient, torch.diag_embed(3 * x**2)), torch.allclose(laplacian, 6 * x)
        (True, True)
    """

    value: torch.Tensor
    gradient: torch.Tensor
    laplacian: torch.Tensor


def _replayed(f: object, x: object, *args: object, **options: object) -> ValueGradLaplacian | None:
    """``value_grad_laplacian`` replayed in a compiled graph where it records
    (``_laplacian.traced``)."""
    return traced.replayed(value_grad_laplacian, f, x, *args, **options)  # type: ignore[no-any-return]


@eager_when(lambda f, x, *, method="auto", **_: method in RECORDING, _replayed)
@outside_inference_mode
@reported("value_grad_laplacian")
def value_grad_laplacian(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    coordinates: Sequence[int] | torch.Tensor | None = None,
) -> ValueGradLaplacian:
    r"""``f(x)``, every sample's gradient (Jacobian) and Laplacian, from one Taylor sweep.

    The forward Laplacian carries each intermediate's derivatives along every input
    direction; at the output they are the per-sample Jacobian, so the first derivatives that
    an advection term, a score or a kinetic energy needs come with the Laplacian.

    The local energy of variational Monte Carlo, for ``log_psi(x) = log|ψ(x)|`` (shape ``(B,)``)
    and a potential ``V``, is ``E_L = -(Δ log ψ + |∇ log ψ|²) / 2 + V(x)``:

        out = torchdiv.value_grad_laplacian(log_psi, x)
        local_energy = -0.5 * (out.laplacian + out.gradient.square().sum(-1)) + V(x)

    With ``coordinates`` the Laplacian sums over those elements of the event only, as
    ``laplacian``'s, ``(Δ_S f)_{b,i} = Σ_{j ∈ S} ∂²f(x)_{b,i} / ∂x_{b,j}²``, while the gradient
    keeps every coordinate: a space-time residual's ``u``, ``∇u`` with ``u_t`` and ``Δ_x u``
    from one call. The Taylor sweep then carries second-order terms along the chosen unit
    vectors only (the others first order, in chunks of their own; ``"auto"`` takes the
    gradient by ``jacobian`` instead where at least ``SPLIT_OUTSIDE`` inputs per output
    component are left out); the loop takes its
    second-level passes along them; ``"forward-over-reverse"`` takes Hessian-vector products
    along them (``laplacian``'s ``coordinates``).

    Args:
        f: as in ``laplacian``.
        x: as in ``laplacian``.
        batch_dims: as in ``laplacian``.
        method: ``"auto"`` (the Taylor engine; the loop of backward passes at few inputs
            (the chosen ``coordinates``) and little arithmetic per call, at one chosen
            coordinate of several for a scalar ``f`` at any size on one thread (its three
            passes against the sweep's two sweeps), and where an op
            has no Taylor rule at up to ten inputs times outputs or where forward mode
            cannot run ``f``, as ``laplacian``, which keeps that choice per structure;
            otherwise, or where that loop's Laplacian is not finite, ``f(x)`` and
            ``"forward-over-reverse"`` separately (the gradient the Hessian products'
            own: with ``coordinates``, ``jacobian``'s); each evaluation from the state the
            first found: one function, a stateful ``f``'s buffers and random draws changed
            once), ``"taylor"`` or ``"forward-over-reverse"``.
        chunk_size: at most this many directions in flight (``None``: as ``laplacian``).
        coordinates: as in ``laplacian`` (flat event indices, negative from the end, no
            repeats, or a boolean mask of the event's shape; ``None``: all): the Laplacian
            sums over these only; the gradient has every coordinate either way.

    Returns:
        ``ValueGradLaplacian(value, gradient, laplacian)`` with shapes ``y.shape``,
        ``x.shape[:batch_dims] + y_event + x_event`` (``x.shape`` for a scalar per sample) and
        ``x.shape[:batch_dims] + y_event``; all differentiable; ``value`` as ``f`` returns it
        (under ``torch.autocast``, its dtype), the other two in ``x``'s dtype.

    Raises:
        TypeError, ValueError, NotImplementedError: as ``laplacian`` (``coordinates``
            included: the same checks and messages).

    Examples:
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> out = value_grad_laplacian(lambda x: x.square().sum(-1), x)
        >>> torch.allclose(out.gradient, 2 * x), torch.allclose(out.laplacian, 6 + 0 * out.value)
        (True, True)
        >>> u = lambda xyt: torch.sin(xyt[:, 0]) * torch.sin(xyt[:, 1]) * torch.exp(-xyt[:, 2])
        >>> out = value_grad_laplacian(u, x, coordinates=[0, 1])  # Δ_xy u = -2u, ∂_t u = -u
        >>> torch.allclose(out.laplacian, -2 * out.value), out.gradient.shape
        (True, torch.Size([5, 3]))
        >>> torch.allclose(out.gradient[:, 2] - 0.5 * out.laplacian, 0 * out.value)  # u_t = Δu/2
        True
    """
    fn = "value_grad_laplacian"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, SWEEP_METHODS)
    check_chunk_size(fn, chunk_size)
    g = checked(fn, f, x, batch_dims, square=False)
    index = None if coordinates is None else check_coordinates(fn, coordinates, x, batch_dims)
    if index is not None and len(index) == event_numel(x, batch_dims):
        index = None  # every coordinate, in some order: the whole Laplacian
    if method == "auto" and peek_interpreter_stack() is not None:
        # the caller's vmap or grad: nothing is recorded, and the loop's leaf copy of x is
        # refused there (requires_grad_): the three separately, as laplacian's "auto"
        return _separately(g, x, batch_dims, chunk_size, index)
    graph, looped = None, None
    if method == "auto" and x.numel() > 0:
        # (the loop's second-level passes; counted as all inputs while Dynamo traces, which
        # replays the Taylor sweep in its graph and a loop not at all: a graph break)
        traced = _dynamo_traces()
        chosen = None if index is None or traced else len(index)
        # (while Dynamo traces, f recorded: the loop's one-input rule, ``methods.loops``, left
        # a D = 1 call to the loop, which the replay refuses: a graph break)
        plan = (
            capture(g, x, RULES, keep_values=True, batch_dims=batch_dims)
            if traced and methods.loops(x, batch_dims)
            else methods.recorded_or_loop(g, x, batch_dims, chosen=chosen, gradient=True)
        )
        if isinstance(plan, methods.Loop) and plan.refused:
            return _looped_or_separately(g, x, batch_dims, chunk_size, index, plan)
        if isinstance(plan, methods.Nested):  # refused before: f watched, then the three
            watching = dataclasses.replace(plan, watch=True)
            chunk = chunk_size or plan.chunk
            return _separately_or_looped(g, x, batch_dims, chunk, index, watching)
        if isinstance(plan, methods.Loop):
            try:
                looped = _looped(g, x, batch_dims, plan, index)
            except GraphTooDeep:  # (its evaluation unwatched: its writes put back after)
                methods.too_deep(g, x, batch_dims)
                with written_once(x):
                    return _separately(g, x, batch_dims, chunk_size, index, watch=True)
            if _loop.all_finite(looped.laplacian):
                return looped
            # not finite: the Taylor engine, or the three separately, or else the loop's
        else:
            graph = plan
    if method != "forward-over-reverse" and x.numel() > 0:
        if graph is None:
            graph = capture(g, x, RULES, keep_values=True, batch_dims=batch_dims)
        try:
            if graph.unsupported:
                raise UnsupportedOp(", ".join(sorted(set(graph.unsupported))))
            if method == "auto" and index is not None and _split(graph, x, batch_dims, index):
                return _swept_and_jacobian(graph, g, x, batch_dims, chunk_size, index)
            return _sweep(graph, x, batch_dims, chunk_size, index)
        except RuntimeError as exc:  # UnsupportedOp included
            if out_of_memory(exc):  # a memory problem, not an unsupported op
                raise
            graph.undo()  # what recording f changed, put back: f is evaluated again (or not)
            if method == "taylor":
                way = way_out(str(exc), "use method='auto' (computes the three separately)")
                raise UnsupportedOp(
                    f"{fn}: method='taylor' has no propagation rule for {exc}; {way}"
                ) from exc
            n = event_numel(x, batch_dims)
            chunk = chunk_size or graph.chunk(n, methods.CHUNK_ELEMENTS)
            after = methods.at_this_call(methods.fallback(graph, x, batch_dims, chunk))
            # (watched where the recording could not check: a custom Function, ``fallback``)
            if looped is None and isinstance(after, methods.Loop):
                return _looped_or_separately(g, x, batch_dims, chunk_size, index, after)
            if looped is None and isinstance(after, methods.Nested):
                return _separately_or_looped(g, x, batch_dims, chunk_size, index, after)
    if looped is not None:
        return methods.loop_unless_rerun(
            looped, lambda: _separately(g, x, batch_dims, chunk_size, index)
        )
    return _separately(g, x, batch_dims, chunk_size, index)


def _separately_or_looped(
    g: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    index: torch.Tensor | None,
    plan: methods.Nested,
) -> ValueGradLaplacian:
    """Where ``"auto"`` takes forward over reverse (``methods.fallback``: ``Nested``):
    ``_separately``, its first evaluation of ``g`` watched for sample mixing if ``plan.watch``
    (``g`` not recorded at this call: its refusal remembered), or, where forward mode cannot
    run ``g`` (an op without a forward-mode rule), the loop of backward passes from the state
    the first evaluation found (``Once``), remembered, as ``methods.nested``. Where the
    recording refused a custom ``autograd.Function`` (``plan.custom``), an evaluation of its
    own is watched instead, at a tensor that requires grad (``methods.watch_evaluation``: the
    value's, at ``x``'s alias, may have no graph to check the Function's ``backward`` on),
    from the same state."""
    each = Once(x)
    watch = plan.watch
    if watch and plan.custom:
        each(lambda z: methods.watch_evaluation(g, z, batch_dims))(x)
        watch = False
    return methods.loop_where_forward_fails(
        lambda: _separately(g, x, batch_dims, chunk_size, index, each, watch),
        lambda: _looped(each(g), x, batch_dims, methods.Loop(refused=True), index),
        g,
        x,
        batch_dims,
    )


def _looped_or_separately(
    g: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    index: torch.Tensor | None,
    plan: methods.Loop | None = None,
) -> ValueGradLaplacian:
    """Where the Taylor engine cannot run ``g``: the loop of backward passes, as the
    Laplacian's ``"auto"`` takes it (``methods.loops_after``; what recording ``g`` changed is
    put back already, and the recording watched ``g`` for sample mixing; at a structure
    whose recording was refused before, ``g`` is not recorded and ``plan`` says how the
    loop's evaluation is watched), or, where its
    Laplacian is not finite, ``_separately`` from the state the loop's evaluation found
    (``Once``): ``g``'s state changes once; the loop's where forward mode cannot run ``g``
    (``methods.loop_unless_rerun``). Where the loop's walk of ``g``'s graph stops
    (``GraphTooDeep``), ``_separately`` from that state as well, remembered for ``g``'s
    structure (``methods.too_deep``), as the Laplacian's ``"auto"``."""
    each = Once(x)
    try:
        out = _looped(each(g), x, batch_dims, plan or methods.Loop(), index)
    except GraphTooDeep:  # the loop's walk stopped: the three separately, from one state
        methods.too_deep(g, x, batch_dims)
        return _separately(g, x, batch_dims, chunk_size, index, each, watch=True)
    if _loop.all_finite(out.laplacian):
        return out
    return methods.loop_unless_rerun(
        out, lambda: _separately(g, x, batch_dims, chunk_size, index, each)
    )


def _dynamo_traces() -> bool:
    """Whether Dynamo traces the call, also inside torchdiv's own eager recording of it under
    ``torch.compile`` (``_laplacian.traced._eagerly`` holds ``is_compiling`` false there): by
    Dynamo's private ``CompileContext.current_trace_id``; on a PyTorch without it (renamed),
    ``is_compiling`` alone (that recording then counts the chosen coordinates, and the loop
    it may choose breaks the compiled graph: slower, not wrong; was an ``AttributeError``
    from every ``"auto"`` call: rev-merges30)."""
    current = getattr(CompileContext, "current_trace_id", None)
    if current is None:
        return torch.compiler.is_compiling()
    return current() is not None


def _separately(
    g: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    index: torch.Tensor | None,
    each: Once | None = None,
    watch: bool = False,
) -> ValueGradLaplacian:
    """``g(x)``, the gradient and ``"forward-over-reverse"`` (along the flat event indices
    ``index`` only, as ``laplacian``'s ``coordinates``; ``None``: all), the gradient the
    Hessian products' primal (each coordinate's that of the chunk of its second derivative:
    the pullback they differentiate; near a node the ``1 / r²`` errors
    of ``|∇ log ψ|²`` and ``Δ log ψ`` then cancel in a local energy, as the loop's do), with
    ``index``, ``jacobian``'s: evaluations of ``g`` (one a chunk), each from the state the first
    found (``Once``; ``each``: one that watched an evaluation before), so that they are of one
    function (the same dropout mask) and ``g``'s buffers and random draws change once. Without
    ``index`` the value returned is the Hessian products' first chunk's primal, of the draw
    the gradient and Laplacian are of: torch.func's transforms may draw otherwise than a plain
    call from the same generator state (a train-mode transformer layer's dropouts: the value
    0.05-0.2 off its derivatives' draw until rev-b33); the plain evaluation still sets the
    state and makes the checks. With ``index``, the value is the Laplacian's products' (the
    gradient ``jacobian``'s, from the state ``each`` found).
    ``g(x)`` is evaluated on an alias (``g``'s own ``x.requires_grad_()`` leaves the caller's
    ``x``) with grad on, as the others evaluate it (a score's
    ``autograd.grad`` inside), and kept without a graph under the caller's ``no_grad``, under
    ``SafeDerivatives`` as the loop evaluates it: the value's parameter gradients (a VMC loss's)
    were PyTorch's, whose ``celu`` derivative is float32-rounded; with ``watch``, watched for
    sample mixing (``BatchInteractionError``)."""
    each = each or Once(x)
    outer = torch.is_grad_enabled()
    evaluate = (lambda z: watched(g, z, batch_dims)) if watch else g
    with torch.enable_grad(), SafeDerivatives(3, "method='taylor'", forward_mode=False):
        value = each(evaluate)(argument(x))
    value = value if outer else detached(value)
    if index is None and x.numel() > 0 and x.dim() > batch_dims:  # (jacobian: empty events)
        # (jacobian's gradient: a float32 local energy's parameter gradients 5-68000x the
        # loop's error near a node, electrons 0.1-1e-3 apart, qmc27)
        if peek_interpreter_stack() is not None:  # (jacobian's check: no watch there)
            each(lambda z: check_transformed(g, z, batch_dims, lambda: unchanged(g, z)))(x)
        rows: list[torch.Tensor] = []
        values: list[torch.Tensor] = []  # (the value of the draw the derivatives are of)
        laplacian = methods.forward_over_reverse(
            g, x, batch_dims, chunk_size, each=each, gradients=rows, values=values, way_out=WAY_OUT
        )
        value = values[0] if outer else detached(values[0])
        batch, event = x.shape[:batch_dims], x.shape[batch_dims:]  # (rows: flat events)
        gradient = rows[0].reshape(-1, *batch, *event).movedim(0, batch_dims)
        shape = (*batch, *value.shape[batch_dims:], *event)
        # (on x's graph where forward over reverse left none: f piecewise linear, as laplacian)
        laplacian = laplacian if laplacian.requires_grad else tied(laplacian, x)
        return ValueGradLaplacian(value, gradient.reshape(shape).to(x.dtype), laplacian)
    gradient = each(lambda z: jacobian(g, z, batch_dims=batch_dims, chunk_size=chunk_size))(x)
    if x.numel() == 0:
        return ValueGradLaplacian(value, gradient, x.new_zeros(value.shape))
    drawn: list[torch.Tensor] = []  # (the Laplacian's draw, as above)
    laplacian = _forward_over_reverse(g, x, batch_dims, chunk_size, index, each, drawn)
    if drawn:
        value = drawn[0] if outer else detached(drawn[0])
    return ValueGradLaplacian(value, gradient, laplacian)


# what forward over reverse's refusal of an op names (``methods.NESTED_WAY_OUT``'s
# 'grad-of-grad' is no method of value_grad_laplacian's: "unknown method", rev-a34); "auto"
# falls back to the loop of backward passes where forward over reverse refuses
WAY_OUT = "method='taylor' or 'auto'"


def _forward_over_reverse(
    g: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    index: torch.Tensor | None,
    each: Once,
    values: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The Laplacian by Hessian-vector products, over the flat event indices ``index`` as
    ``laplacian``'s ``coordinates`` (``None``: all), every evaluation of ``g`` (inside the
    transforms: not their backward and tangent passes) from the state ``each`` found;
    ``values``: a list to which ``g(x)`` of the products' first evaluation is appended (none
    for an empty ``index``)."""
    if index is None:
        return methods.forward_over_reverse(
            g, x, batch_dims, chunk_size, each=each, values=values, way_out=WAY_OUT
        )
    if len(index) == 0:  # an empty sum
        return each(lambda z: methods.zeros_like_output(g, z))(x)
    h, z = along(g, x, batch_dims, unit_columns(index, x, batch_dims))
    laplacian = methods.forward_over_reverse(
        h, z, batch_dims, chunk_size, each=each, values=values, way_out=WAY_OUT
    )
    return tied(laplacian, x)


def _looped(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    plan: methods.Loop,
    index: torch.Tensor | None,
) -> ValueGradLaplacian:
    """The loop of backward passes (its evaluation of ``f`` checked for sample mixing as
    ``plan`` says), second-level passes along the flat event indices ``index`` only (``None``:
    all); its Laplacian may not be finite (a NaN double backward: see ``laplacian``'s
    ``"auto"``, or a sample that is not finite)."""
    chosen = None if index is None else index.tolist()
    with verdicts() as seen:
        value, jac, lap = _loop.value_grad_laplacian(
            f, x, batch_dims, plan.check, plan.settings, chosen
        )
    plan.passed(seen)
    shape = (*x.shape[:batch_dims], *value.shape[batch_dims:], *x.shape[batch_dims:])
    return ValueGradLaplacian(value, jac.reshape(shape), lap)


def _sweep(
    graph: Graph,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    index: torch.Tensor | None = None,
) -> ValueGradLaplacian:
    """The Taylor engine with the output's first-order terms kept, chunk by chunk; with the
    flat event indices ``index``, their unit vectors first, then the others' with first-order
    terms only (their second-order ones are not computed: a forward-mode sweep)."""
    n = event_numel(x, batch_dims)
    value, columns, lap = _propagated(graph, x, batch_dims, chunk_size, index)
    batch = x.shape[:batch_dims]
    stacked = torch.cat(columns)
    if index is not None:  # the columns in the order of the event's coordinates
        stacked = stacked[_chosen_first(index, n).argsort()]
    # (N, m, n); in x's dtype, as the Laplacian: under autocast the jets are in its dtype
    jac = stacked.to(x.dtype).reshape(n, batch.numel(), -1).permute(1, 2, 0)
    gradient = jac.reshape(*batch, *value.shape[batch_dims:], *x.shape[batch_dims:])
    return ValueGradLaplacian(value, tied(gradient, x), _finished(graph, lap, value, x))


def _propagated(
    graph: Graph,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    index: torch.Tensor | None,
    others: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """``f(x)``, the output's first-order terms ``(k,) + f(x).shape`` of each chunk of
    ``_directions`` (``others``: also those of the unit vectors outside ``index``) and the
    summed second-order terms (``None``: none), by the Taylor engine."""
    n = event_numel(x, batch_dims)
    chunk = chunk_size or graph.chunk(n, methods.CHUNK_ELEMENTS)
    value: torch.Tensor | None = None
    lap: torch.Tensor | None = None
    columns: list[torch.Tensor] = []
    constants: dict[int, list[Any]] = {}
    known: list[list[Any]] | None = None
    for number, (u, second) in enumerate(_directions(x, batch_dims, chunk, index, others)):
        jet, k = methods.input_jet(x, u)
        if number == 0:
            known = methods.reused_values(graph, k)
        out = propagate(graph, jet, Context(k, second, jac=True), constants, known)
        if not isinstance(out, Jet):  # f does not depend on x
            out = Jet(out, None, None)
        value = out.value
        shape = (k, *value.shape)
        jac = out.jac
        columns.append(value.new_zeros(()).expand(shape) if jac is None else jac.expand(shape))
        if second and out.lap is not None:
            lap = accumulated(lap, out.lap)
    assert value is not None  # x.numel() > 0: at least one chunk of directions
    return value, columns, lap


def _finished(
    graph: Graph, lap: torch.Tensor | None, value: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The summed second-order terms ``lap`` as the Laplacian: ``f(x)``'s shape, ``x``'s
    dtype, tied to ``x`` and what ``f`` read where it has no graph (``methods.tensors_read``)."""
    lap = x.new_zeros(value.shape) if lap is None else lap.to(x.dtype).expand(value.shape).clone()
    return tied(lap, x, methods.tensors_read(graph, lap))


# ``"auto"`` with ``coordinates`` takes the gradient by ``jacobian`` (reverse mode: one backward
# pass per output component) instead of the Taylor sweep's first-order terms (one direction
# per input outside the coordinates) where at least this many inputs per output component lie
# outside them (``_split``). Scalar tanh MLPs D-64-64-64-1, float32, one thread, forward and
# backward of a residual loss (2026-12-05, a loaded 2-core machine): the sweep over the
# jacobian + Laplacian pair per round, 4 inputs outside 0.7-1.3, 6: 0.85-1.47, 8: 1.0-1.5
# (batch 256), 1.3-2.0 (batch 2048), 9: 1.05-1.72, 14: 1.1-1.9, 29: 1.2-5.6; 1 outside
# (k = n - 1): the sweep 0.2-1.0x (kept). On a quiet machine (bench/vgl_coordinates.py, the
# sweep over the split, median of 3 rounds): 8 outside, batch 256, 0.95 frozen and 1.12
# training, batch 2048 1.8-2.1; 14 outside 0.96 / 1.31; 29 outside 3.6 / 4.5. (Frozen at batch
# 256, jacobian + laplacian(coordinates=) took 0.75-0.8x either route.)
SPLIT_OUTSIDE = 8


def _split(graph: Graph, x: torch.Tensor, batch_dims: int, index: torch.Tensor) -> bool:
    """Whether ``"auto"`` takes the gradient by ``jacobian`` and the Laplacian by the Taylor
    engine along the ``index`` unit vectors only (``_swept_and_jacobian``): at least
    ``SPLIT_OUTSIDE`` inputs outside ``index`` per output component of ``f`` (recorded as
    ``graph``)."""
    outputs = math.prod(graph.output_shape[batch_dims:])
    return event_numel(x, batch_dims) - len(index) >= SPLIT_OUTSIDE * max(outputs, 1)


def _swept_and_jacobian(
    graph: Graph,
    g: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    index: torch.Tensor,
) -> ValueGradLaplacian:
    """``f(x)`` and its Laplacian over ``index`` by the Taylor engine along those unit vectors
    only (``_propagated`` without the others), the gradient by ``jacobian`` (``"auto"``: a
    backward pass per output component), which evaluates ``g`` once more, from the state the
    recording found (``Graph.undo``: the same function, a stateful ``g``'s buffers and random
    draws changed once)."""
    value, _, lap = _propagated(graph, x, batch_dims, chunk_size, index, others=False)
    graph.undo()
    gradient = jacobian(g, x, batch_dims=batch_dims, chunk_size=chunk_size)
    return ValueGradLaplacian(value, gradient, _finished(graph, lap, value, x))


def _chosen_first(index: torch.Tensor, n: int) -> torch.Tensor:
    """The flat event indices ``0..n-1``, those of ``index`` first (in its order), then the
    others in increasing order."""
    rest = torch.ones(n, dtype=torch.uint8, device=index.device)
    rest[index] = 0
    return torch.cat([index, rest.argsort(stable=True)[len(index) :]])


def _directions(
    x: torch.Tensor, batch_dims: int, chunk: int, index: torch.Tensor | None, others: bool = True
) -> Iterator[tuple[torch.Tensor | Sparse, bool]]:
    """``_sweep``'s chunks of unit directions, each with whether its second-order terms are
    wanted: all of them (``methods.unit_directions``) where ``index`` is ``None``; else those
    of ``index`` with them, then, with ``others``, the others without (``_chosen_first``)."""
    if index is None:
        yield from ((u, True) for u in methods.unit_directions(x, batch_dims, chunk))
        return
    n, k = event_numel(x, batch_dims), len(index)
    order = _chosen_first(index, n)
    rest = chunks(n, chunk, k) if others else ()
    for start, stop in itertools.chain(chunks(k, chunk), rest):
        yield broadcast_units(order[start:stop], x, batch_dims), start < k
