"""Functions that differentiate inside themselves, as users write them: a score
``-grad E`` by ``autograd.grad`` (``x.requires_grad_()`` inside ``f``), ``torch.func``
transforms inside ``f``. The engines that cannot follow them refuse, naming them, and
``"auto"`` falls back; values and parameter gradients are checked against float64 per-sample
``autograd.grad`` loops (conftest), nothing the caller passed changes."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    Cube,
    LegacyCube,
    Stateful,
    assert_close,
    assert_one_state,
    laplacian_by_grad_of_grad,
    loop_diagonal,
    one_state,
    tanh_mlp,
)
from torch.autograd import forward_ad
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import torchdiv
from torchdiv._taylor import UnsupportedOp

f64 = torch.float64


def _transformed(kind: str, net: torch.nn.Module):
    """``u(z)``, one value per sample, through a ``torch.func`` transform inside: the
    Jacobian of ``net`` by ``jacfwd`` (forward mode makes storage-less zero tensors, which the
    recorder once read the memory of and crashed on), or ``net``'s Hessian."""
    if kind == "jacfwd":
        return lambda z: torch.einsum("bij,bj->b", vmap(jacfwd(net))(z), torch.tanh(z))
    return lambda z: torch.einsum("bij,bj->b", vmap(hessian(lambda p: net(p)[0]))(z), z.sin())


@pytest.mark.parametrize("kind", ["jacfwd", "hessian"])
def test_torch_func_transform_inside_f_falls_back(kind: str) -> None:
    torch.manual_seed(0)
    net = tanh_mlp(3, 5, 3 if kind == "jacfwd" else 1)
    u = _transformed(kind, net)
    x = torch.randn(4, 3, dtype=f64)
    want = laplacian_by_grad_of_grad(u, x)
    got = torchdiv.laplacian(u, x)
    assert_close(got, want)
    weights = list(net.parameters())
    got_grads = torch.autograd.grad(got.square().sum(), weights, materialize_grads=True)
    want_grads = torch.autograd.grad(want.square().sum(), weights, materialize_grads=True)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a, b)
    assert_close(torchdiv.value_grad_laplacian(u, x).laplacian, want)
    with pytest.raises(UnsupportedOp, match="laplacian: method='taylor'"):
        torchdiv.laplacian(u, x, method="taylor")


def test_f_setting_requires_grad_on_its_argument_leaves_the_callers_x() -> None:
    """A score model written for a plain call: ``x.requires_grad_(True)`` on what it is given.
    ``value_grad_laplacian`` evaluated ``f`` on the caller's own ``x`` where the Taylor engine
    cannot run ``f`` (a backward pass inside), so the call turned the caller's ``x`` into one
    that requires grad."""
    torch.manual_seed(0)
    energy = tanh_mlp(3, 5, 1)

    def score(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            return -torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]

    x = torch.randn(4, 3, dtype=f64)
    out = torchdiv.value_grad_laplacian(score, x)
    assert not x.requires_grad
    assert_close(out.value, score(x.clone()))
    # the divergence of the score is minus the Laplacian of the energy
    want = -laplacian_by_grad_of_grad(lambda z: energy(z)[:, 0], x)
    assert_close(out.gradient.diagonal(dim1=1, dim2=2).sum(-1), want)


@pytest.mark.parametrize("fn", ["laplacian", "value_grad_laplacian"])
def test_a_score_given_an_x_without_grad_is_told_how_to_run(fn: str) -> None:
    """``autograd.grad(E(x).sum(), x)`` inside ``f`` fails on an ``x`` that does not require
    grad (as ``f(x)`` itself does), where the recorder evaluates ``f``: the error says so and
    how to write it instead."""
    energy = tanh_mlp(3, 5, 1)

    def score(z: torch.Tensor) -> torch.Tensor:
        return -torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]

    x = torch.randn(4, 3, dtype=f64)
    with pytest.raises(RuntimeError, match=rf"^{fn}: (?s:.*)Hint: f takes a backward pass"):
        getattr(torchdiv, fn)(score, x)
    assert not x.requires_grad


@pytest.mark.parametrize("fn", ["divergence", "jacobian_diagonal"])
def test_a_score_given_an_x_without_grad_runs_where_auto_records(fn: str) -> None:
    """Implicit score matching with an energy model, ``s = -grad E`` by ``autograd.grad``
    inside ``f``, on data that does not require grad, at a size ``"auto"`` records ``f`` for the
    structured engine (24 samples of 48): the recording's alias of ``x`` does not require grad,
    so ``f`` raised there, while ``"reverse"`` and small problems ran. ``"auto"`` now takes the
    generic engines: the per-sample loop's values and parameter gradients, and a later call
    evaluates ``f`` once."""
    energy = tanh_mlp(48, 16, 1)
    calls = []

    def score(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.requires_grad)
        return -torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]

    x = torch.randn(24, 48, dtype=f64)
    got = getattr(torchdiv, fn)(score, x)
    want = loop_diagonal(score, x, create_graph=True)
    want = want.sum(-1) if fn == "divergence" else want
    assert_close(got, want)
    params = list(energy.parameters())[:-1]  # (the last bias does not reach the score)
    grads = torch.autograd.grad(got.square().sum(), params)
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), params), strict=True):
        assert_close(a, b)
    assert not x.requires_grad
    calls.clear()
    assert_close(getattr(torchdiv, fn)(score, x), want)
    assert calls == [True]


def test_a_stateful_score_given_an_x_without_grad_changes_its_state_once() -> None:
    """The recording of the test above fails inside ``f``, after ``f`` wrote its buffer and
    drew its dropout mask; the generic engines then evaluate ``f`` again. What the failed
    recording changed is put back, so the call leaves the state of one evaluation and
    differentiates that evaluation's function (the buffer moved twice before)."""
    net = Stateful(48)
    x = torch.randn(24, 48, dtype=f64)

    def score_of(energy: torch.nn.Module):
        return lambda z: -torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]

    once, state = one_state(net, x, seed=4)
    torch.manual_seed(4)
    got = torchdiv.divergence(score_of(net), x)
    assert_close(got, loop_diagonal(score_of(once), x).sum(-1))
    assert_one_state(net, once, state)


@pytest.mark.parametrize(
    ("fn", "method"),
    [("divergence", "forward"), ("divergence", "reverse"), ("laplacian", "hessian")],
)
def test_requires_grad_inside_a_transform_is_told_the_method_that_runs_it(fn, method) -> None:
    """``x.detach().requires_grad_()`` inside ``f`` (a Langevin step's score) is refused by
    ``torch.func``: the error names the method that runs ``f`` by plain autograd, and that
    method gives the loop's answer (a constant of ``x``: 0)."""
    energy = tanh_mlp(3, 5, 1)

    def score(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            return -torch.autograd.grad(energy(leaf).sum(), leaf, create_graph=True)[0]

    x = torch.randn(4, 3, dtype=f64)
    way = "grad-of-grad" if fn == "laplacian" else "auto"
    with pytest.raises(RuntimeError, match=rf"Hint: f calls requires_grad_\(\)(?s:.*)'{way}'"):
        getattr(torchdiv, fn)(score, x, method=method)
    zero = getattr(torchdiv, fn)(score, x, method=way)
    assert_close(zero, torch.zeros_like(zero))


CALLS_UNDER_NO_GRAD = {
    "laplacian-auto": lambda u, x: torchdiv.laplacian(u, x),
    "laplacian-hutchinson": lambda u, x: torchdiv.laplacian(
        u,
        x,
        method="hutchinson",
        probes=3**0.5 * torch.eye(3, dtype=f64)[:, None].expand(3, *x.shape),
    ),
    "value_grad_laplacian-auto": lambda u, x: torchdiv.value_grad_laplacian(u, x).laplacian,
    "value_grad_laplacian-forward-over-reverse": lambda u, x: (
        torchdiv.value_grad_laplacian(u, x, method="forward-over-reverse").laplacian
    ),
}


@pytest.mark.parametrize("call", CALLS_UNDER_NO_GRAD.values(), ids=CALLS_UNDER_NO_GRAD)
def test_a_score_under_no_grad_with_an_x_that_requires_grad(call) -> None:
    """Under the caller's ``no_grad`` the recorder's alias of an ``x`` that requires grad was
    made under ``no_grad`` too (requiring grad, without a ``grad_fn``), and
    ``value_grad_laplacian`` evaluated ``f(x)`` under it: the score's
    ``autograd.grad(E(z).sum(), z)`` raised. Hutchinson's probes ``sqrt(3) e_k`` make its estimate
    (their mean) the exact Laplacian."""
    torch.manual_seed(0)
    energy = tanh_mlp(3, 5, 1)

    def score_norm(z: torch.Tensor) -> torch.Tensor:  # the score-matching term |grad E|^2 / 2
        (score,) = torch.autograd.grad(energy(z).sum(), z, create_graph=True)
        return 0.5 * score.square().sum(-1)

    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    want = laplacian_by_grad_of_grad(score_norm, x).detach()
    with torch.no_grad():
        got = call(score_norm, x)
    assert_close(got, want)
    assert not got.requires_grad


def _symplectic(d: int) -> torch.Tensor:
    """``J = [[0, I], [-I, 0]]`` as Greydanus et al.'s HNN writes it: ``(dH/dp, -dH/dq)``."""
    eye = torch.eye(d, dtype=f64)
    return torch.cat([eye[d // 2 :], -eye[: d // 2]])


FUNC_FIELDS = {  # torch.func transforms f opens itself (Hamiltonian and gradient fields)
    "hamiltonian vmap(grad)": lambda h, j: lambda z: vmap(grad(lambda p: h(p)[0]))(z) @ j.T,
    "hamiltonian grad of the sum": lambda h, j: lambda z: grad(lambda p: h(p).sum())(z) @ j.T,
    "gradient field vmap(jacrev)": lambda h, j: lambda z: vmap(jacrev(h))(z)[:, 0],
}


def _jacobian_alone(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian, ``f`` of that sample alone, rows by ``autograd.grad``."""
    rows = []
    for xb in x:
        leaf = xb[None].requires_grad_(True)
        y = f(leaf)[0]
        grads = [torch.autograd.grad(y[i], leaf, retain_graph=True)[0][0] for i in range(len(y))]
        rows.append(torch.stack(grads))
    return torch.stack(rows)


@pytest.mark.parametrize("fn", ["jacobian", "jacobian_diagonal", "divergence"])
@pytest.mark.parametrize("make", FUNC_FIELDS.values(), ids=FUNC_FIELDS)
def test_forward_mode_under_no_grad_through_a_transform_inside_f(make, fn: str) -> None:
    """Under the caller's ``no_grad`` the forward engine ran every op of ``f`` under
    ``no_grad`` (no graph, as asked), also those inside ``f``'s own ``torch.func.grad`` /
    ``jacrev``, which then took ``H`` for a constant: ``method="forward"`` gave a Jacobian,
    diagonal and divergence of exactly 0 (the Laplacian of the gradient field's ``H``, 0.14
    for sample 0). Reference: each sample alone, rows by ``autograd.grad``."""
    torch.manual_seed(0)
    energy = tanh_mlp(4, 8, 1)
    f = make(energy, _symplectic(4))
    x = torch.randn(3, 4, dtype=f64)
    jac = _jacobian_alone(f, x)
    want = {
        "jacobian": jac,
        "jacobian_diagonal": jac.diagonal(dim1=1, dim2=2),
        "divergence": jac.diagonal(dim1=1, dim2=2).sum(-1),
    }[fn]
    with torch.no_grad():
        got = getattr(torchdiv, fn)(f, x, method="forward")
    assert_close(got, want)
    assert not got.requires_grad


NO_GRAPH_FIELDS = {  # transforms f opens whose derivatives need no grad mode
    "vmap": lambda h: lambda z: vmap(lambda p: h(p).tanh() * p)(z),
    "vmap(jacfwd)": lambda h: lambda z: vmap(jacfwd(lambda p: h(p)[0]))(z),
}


@pytest.mark.parametrize("make", NO_GRAPH_FIELDS.values(), ids=NO_GRAPH_FIELDS)
def test_forward_mode_under_no_grad_builds_no_graph_through_a_vmap_inside_f(make) -> None:
    """Under the caller's ``no_grad``, ops inside a plain ``vmap`` (or ``jacfwd``) that ``f``
    opens run without a graph, as the caller asked: keeping grad mode for every op inside
    any transform saved the activations for a graph to the parameters for the length of the
    call (peak memory 392 MB instead of 202 MB, a 64-1024-1024-1024-64 MLP at B = 256).
    Reference: each sample alone, rows by ``autograd.grad``."""
    torch.manual_seed(0)
    f = make(tanh_mlp(4, 8, 1))
    x = torch.randn(3, 4, dtype=f64)
    want = _jacobian_alone(f, x).diagonal(dim1=1, dim2=2).sum(-1)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(saved.append, lambda t: t):
        got = torchdiv.divergence(f, x, method="forward")
    assert_close(got, want)
    assert not saved


SEEDS = {  # what a score's backward pass starts from: per-sample energies e, shape (B,)
    "sum": lambda e: e.sum(),
    "mean": lambda e: e.mean(),
    # a batch statistic held constant: the loop's derivatives do not mix samples
    "times a detached mean": lambda e: (e * e.mean().detach()).sum(),
    "times a detached softmax": lambda e: (e * e.softmax(0).detach()).sum(),
    "logsumexp over samples": lambda e: torch.logsumexp(e, 0),  # softmax weights: mixes
    "exp of the sum": lambda e: e.sum().exp(),  # every sample's score scaled by all: mixes
}
MIXING = ("logsumexp over samples", "exp of the sum")
WATCHED = {  # calls whose evaluation of f is watched for sample mixing
    "divergence-auto": lambda f, x: torchdiv.divergence(f, x),
    "divergence-hutchinson-1": lambda f, x: torchdiv.divergence(
        f, x, method="hutchinson", probes=torch.ones(1, *x.shape, dtype=f64)
    ),
    "laplacian-auto": lambda f, x: torchdiv.laplacian(lambda z: f(z).square().sum(-1), x),
}


@pytest.mark.parametrize("call", WATCHED.values(), ids=WATCHED)
@pytest.mark.parametrize("seed", SEEDS.values(), ids=SEEDS)
def test_samples_mixed_only_in_a_backward_pass_inside_f_are_seen(seed, call) -> None:
    """A score's backward pass reads what its seed saved through new tensor objects
    (autograd unpacks a saved result as another object, with the node that made it): the
    one-probe Hutchinson and Laplacian watches lost a seed mixed across samples there
    (logsumexp, exp), and gave the batched function's numbers; a sum or mean seed, or a batch
    statistic made a constant (``detach()``: an alias without that node), stays per
    sample."""
    torch.manual_seed(0)
    energy = tanh_mlp(3, 5, 1)

    def score(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            start = seed(energy(z)[:, 0])
            return -torch.autograd.grad(start, z, create_graph=True)[0]

    x = torch.randn(4, 3, dtype=f64)
    if seed not in [SEEDS[name] for name in MIXING]:
        call(score, x)
    else:
        with pytest.raises(torchdiv.BatchInteractionError, match="f mixes samples"):
            call(score, x)


def _value_grad_laplacian_by_loop(f, x: torch.Tensor):
    """``f(x)``, every sample's Jacobian (gradient) and Laplacian by ``autograd.grad`` loops
    with ``create_graph`` (differentiable in ``f``'s parameters): the reference."""
    z = x.detach().requires_grad_(True)
    y = f(z)
    outputs = y.reshape(len(z), -1)
    rows, laplacians = [], []
    for i in range(outputs.shape[1]):
        (row,) = torch.autograd.grad(outputs[:, i].sum(), z, create_graph=True)
        rows.append(row)
        seconds = [
            torch.autograd.grad(row[:, j].sum(), z, create_graph=True)[0][:, j]
            for j in range(z.shape[1])
        ]
        laplacians.append(torch.stack(seconds).sum(0))
    gradient = torch.stack(rows, 1).reshape(*y.shape, z.shape[1])
    return y, gradient, torch.stack(laplacians, 1).reshape(y.shape)


def _legacy_function(net: torch.nn.Module):
    """Two outputs a sample through an ``autograd.Function`` without ``setup_context``
    (``torch.func`` refuses it, the Taylor engine has no rule for it)."""
    return lambda z: LegacyCube.apply(torch.tanh(net(z)))


def _dual_level(net: torch.nn.Module):
    """A score ``∇E`` (a backward pass, refused by the Taylor engine) times a directional
    derivative taken by forward AD's ``dual_level`` inside ``f`` (PyTorch refuses nested
    forward mode: no forward over reverse)."""

    def u(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            (score,) = torch.autograd.grad(net(z).sum(), z, create_graph=True)
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(z, torch.ones_like(z))
            tangent = forward_ad.unpack_dual(torch.sin(dual) * dual).tangent
        return (score * tangent).sum(-1)

    return u


def _inner_grad_of_grad(net: torch.nn.Module):
    """A torchdiv Laplacian by ``method="grad-of-grad"`` inside ``f`` (refused under
    ``torch.func``'s transforms, a backward pass to the Taylor engine)."""

    def u(z: torch.Tensor) -> torch.Tensor:
        inner = torchdiv.laplacian(lambda p: net(p)[:, 0], z, method="grad-of-grad")
        return torch.sin(z).sum(-1) * inner

    return u


FALLBACKS = {
    "legacy autograd.Function": _legacy_function,
    "forward_ad.dual_level": _dual_level,
    "inner grad-of-grad": _inner_grad_of_grad,
}


@pytest.mark.parametrize("make", FALLBACKS.values(), ids=FALLBACKS)
def test_value_grad_laplacian_loops_where_the_laplacian_loops(make) -> None:
    """Where the Taylor engine cannot run ``f`` and forward over reverse cannot either,
    ``laplacian``'s ``"auto"`` loops over backward passes (at up to ``LOOP_FALLBACK`` inputs);
    ``value_grad_laplacian``'s ``"auto"`` took forward over reverse only, and raised. Values
    and parameter gradients against float64 ``autograd.grad`` loops."""
    torch.manual_seed(0)
    net = tanh_mlp(3, 5, 2)
    u = make(net)
    x = torch.randn(4, 3, dtype=f64)
    got = torchdiv.value_grad_laplacian(u, x)
    want = _value_grad_laplacian_by_loop(u, x)
    weights = list(net.parameters())
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert_close(a, b)
    assert_close(torchdiv.laplacian(u, x), want[2])

    def loss(out):
        return sum(
            (t * torch.linspace(0.5, 1.5, t.numel(), dtype=f64).view_as(t)).sum() for t in out
        )

    got_grads = torch.autograd.grad(loss(got), weights, materialize_grads=True)
    want_grads = torch.autograd.grad(loss(want), weights, materialize_grads=True)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a, b)
    assert not x.requires_grad


@pytest.mark.parametrize("make", FALLBACKS.values(), ids=FALLBACKS)
def test_a_sample_that_is_not_finite_stays_in_the_loop(make) -> None:
    """The loop's Laplacian is not finite where a sample's x has a nan, and ``"auto"`` reran
    the whole batch by forward over reverse (for PyTorch's NaN double backwards), which
    cannot run these ``f``: both functions raised for every sample. Now the loop's result
    stands: nan for that sample, the others' as the reference loop gives them."""
    torch.manual_seed(0)
    net = tanh_mlp(3, 5, 2)
    u = make(net)
    x = torch.randn(4, 3, dtype=f64)
    x[2, 1] = float("nan")
    want = _value_grad_laplacian_by_loop(u, x)
    got = torchdiv.value_grad_laplacian(u, x)
    lap = torchdiv.laplacian(u, x)
    good = [0, 1, 3]
    for a, b in zip((*got, lap), (*want, want[2]), strict=True):
        assert_close(a[good], b[good])
    assert not got.laplacian[2].isfinite().any() and not lap[2].isfinite().any()


def test_value_grad_laplacians_loop_changes_a_stateful_f_once() -> None:
    """The loop ``value_grad_laplacian``'s ``"auto"`` falls back to (a legacy
    ``autograd.Function`` head) evaluates ``f`` after the Taylor engine recorded it: from the
    state the recording found (the same dropout mask and buffer), which the call leaves as one
    evaluation did."""
    net, x = Stateful(3, m=2, head=LegacyCube.apply), torch.randn(5, 3, dtype=f64)
    once, state = one_state(net, x, seed=4)
    torch.manual_seed(4)
    got = torchdiv.value_grad_laplacian(net, x)
    for a, b in zip(got, _value_grad_laplacian_by_loop(once, x), strict=True):
        assert_close(a, b)
    assert_one_state(net, once, state)


def test_value_grad_laplacians_loop_not_finite_changes_a_stateful_f_once() -> None:
    """Where the fallback loop's Laplacian is not finite (``0.0 ** t``, 0 for ``t > 0``, whose
    double backward PyTorch makes NaN) ``value_grad_laplacian`` computes the three separately
    (forward over reverse): every evaluation from the state the loop's found, so one
    function (the same mask and buffer), and the state as one evaluation leaves it."""
    head = lambda y: Cube.apply(y) + torch.pow(0.0, y.square() + 1)  # noqa: E731
    net, x = Stateful(3, m=2, head=head), torch.randn(5, 3, dtype=f64)
    once, state = one_state(net, x, seed=4)
    once.head = lambda y: y**3  # the same function, without the zero term the loop gets NaN for
    torch.manual_seed(4)
    got = torchdiv.value_grad_laplacian(net, x)
    for a, b in zip(got, _value_grad_laplacian_by_loop(once, x), strict=True):
        assert_close(a, b)
    assert_one_state(net, once, state)
