"""Derivatives of torchdiv's results beyond the first parameter gradient, as training code takes
them: the ``x``-gradient of an operator with ``create_graph=True`` (Stein operators, gradient
penalties, gradient-enhanced PINNs, a CNF's score), then a backward pass to the parameters and
to ``x`` again. References: per-sample loops of ``torch.autograd.grad`` with ``create_graph``
(float64, a few hundred flops deep: 1e-10), independent of every engine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchdiv
from tests.conftest import assert_close, central_difference, shifted

f64 = torch.float64


def _rows(f, x: torch.Tensor) -> list[torch.Tensor]:
    """Row ``i`` of every sample's Jacobian, ``(B, n)`` each, with a graph (``x`` requires grad)."""
    y = f(x).reshape(len(x), -1)
    return [
        torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0].reshape(len(x), -1)
        for i in range(y.shape[1])
    ]


def _divergence(f, x: torch.Tensor) -> torch.Tensor:
    return sum(row[:, i] for i, row in enumerate(_rows(f, x)))  # type: ignore[return-value]


def _diagonal(f, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([row[:, i] for i, row in enumerate(_rows(f, x))], 1).reshape(x.shape)


def _laplacian(u, x: torch.Tensor) -> torch.Tensor:
    """The grad-of-grad loop: the trace of the Jacobian of ``∇u``, ``(B, n)`` ``x``."""
    (g,) = torch.autograd.grad(u(x).sum(), x, create_graph=True)
    return _divergence(lambda z: g, x)


def _net(d_out: int, activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), activation, nn.Linear(8, d_out)).double()


CALLS = [
    pytest.param(
        lambda f, x, m=m: torchdiv.divergence(f, x, method=m), _divergence, id=f"divergence-{m}"
    )
    for m in ("auto", "structured", "forward", "reverse")
] + [
    pytest.param(
        lambda f, x, m=m: torchdiv.jacobian_diagonal(f, x, method=m), _diagonal, id=f"diagonal-{m}"
    )
    for m in ("structured", "forward")
]
LAPLACIANS = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]


@pytest.mark.parametrize(("call", "reference"), CALLS)
def test_x_gradient_of_a_divergence_then_the_parameters(call, reference) -> None:
    """``∇_x (w · div f)`` with a graph, then the gradients of ``|∇_x|² + x · ∇_x`` with respect
    to the parameters and to ``x`` (third derivatives of ``f``)."""
    net = _net(3, nn.Tanh())
    x0 = torch.randn(4, 3, dtype=f64)
    params = list(net.parameters())
    out = []
    for run in (call, reference):
        x = x0.clone().requires_grad_()
        value = run(net, x)
        weights = torch.linspace(0.5, 1.5, value.numel(), dtype=f64).reshape(value.shape)
        (gx,) = torch.autograd.grad((weights * value).sum(), x, create_graph=True)
        loss = gx.square().sum() + (gx * x).sum()
        out.append([value, gx, *torch.autograd.grad(loss, [x, *params], materialize_grads=True)])
    for got, want in zip(*out, strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("method", LAPLACIANS)
def test_x_gradient_of_a_laplacian_then_the_parameters(method: str) -> None:
    """A gradient-enhanced PINN's residual ``Δu - s`` and its ``x``-gradient in one loss."""
    net = _net(1, nn.Tanh())
    x0 = torch.randn(4, 3, dtype=f64)
    params = list(net.parameters())

    def u(z: torch.Tensor) -> torch.Tensor:
        return net(z).squeeze(-1) * torch.sin(z[:, 0])

    out = []
    for run in (lambda z: torchdiv.laplacian(u, z, method=method), lambda z: _laplacian(u, z)):
        x = x0.clone().requires_grad_()
        residual = run(x) - torch.cos(x[:, 1])
        (gx,) = torch.autograd.grad(residual.sum(), x, create_graph=True)
        loss = residual.square().mean() + gx.square().mean()
        out.append([residual, gx, *torch.autograd.grad(loss, [x, *params])])
    for got, want in zip(*out, strict=True):
        assert_close(got, want)


def _relu_calls():
    """What the recording engines compute for a ReLU network, whose derivatives they carry as
    constants times masks: ``(name, call)`` of a frozen ``(B, 3) -> (B, 3)`` network."""

    def u(f):
        return lambda z: f(z).square().sum(-1)

    return [
        ("divergence structured", lambda f, x: torchdiv.divergence(f, x, method="structured")),
        ("diagonal structured", lambda f, x: torchdiv.jacobian_diagonal(f, x, method="structured")),
        ("laplacian auto", lambda f, x: torchdiv.laplacian(u(f), x)),
        ("laplacian taylor", lambda f, x: torchdiv.laplacian(u(f), x, method="taylor")),
        (
            "laplacian hutchinson",
            lambda f, x: torchdiv.laplacian(u(f), x, method="hutchinson", num_probes=2),
        ),
        (
            "laplacian coordinates",
            lambda f, x: torchdiv.laplacian(u(f), x, method="taylor", coordinates=[0, 2]),
        ),
        (
            "weighted_laplacian",
            lambda f, x: torchdiv.weighted_laplacian(
                u(f), x, diffusion=2 * torch.eye(3, dtype=f64), method="taylor"
            ),
        ),
        ("biharmonic", lambda f, x: torchdiv.biharmonic(u(f), x, method="taylor")),
        (
            "value_grad_laplacian",
            lambda f, x: torchdiv.value_grad_laplacian(u(f), x, method="taylor").laplacian,
        ),
    ]


@pytest.mark.parametrize(("name", "call"), _relu_calls(), ids=[n for n, _ in _relu_calls()])
def test_a_piecewise_linear_f_keeps_the_result_on_the_graph_of_x(name: str, call) -> None:
    """The structured and Taylor engines carry a ReLU's derivatives as masks: their result had
    no path to ``x`` (``autograd.grad`` w.r.t. ``x`` raised "appears to not have been used in
    the graph") and, with frozen parameters, did not require grad at all, where plain
    autograd, reverse and forward mode give it a graph to ``x`` with zero gradients (the
    derivative of a piecewise-constant operator, almost everywhere). Now tied to ``x`` at
    every order; the values are the reverse-mode ones."""
    net = _net(3, nn.ReLU()).requires_grad_(False)
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    got = call(net, x)
    assert got.requires_grad
    (gx,) = torch.autograd.grad(got.sum(), x, create_graph=True)
    assert_close(gx, torch.zeros_like(x))
    (gxx,) = torch.autograd.grad(gx.square().sum() + gx.sum(), x)
    assert_close(gxx, torch.zeros_like(x))
    got.add_(1)  # the result is the caller's to write to
    if name.startswith("divergence"):
        assert_close(got.detach() - 1, torchdiv.divergence(net, x, method="reverse").detach())


_DUAL_CALLS = [c for c in _relu_calls() if c[0] != "biharmonic"]  # (no Taylor rules for duals)


@pytest.mark.parametrize(("name", "call"), _DUAL_CALLS, ids=[n for n, _ in _DUAL_CALLS])
def test_the_tie_passes_the_tangents_of_dual_parameters(name: str, call) -> None:
    """Inside the caller's ``forward_ad.dual_level()`` with dual parameters (a JVP in
    parameter space) and an ``x`` that requires grad, the result's tangent is its parameter
    derivative along the tangents, as central differences give; the tie had no forward-mode
    rule (``NotImplementedError``: "You must implement the jvp function")."""
    import torch.autograd.forward_ad as fwad

    net = _net(3, nn.ReLU()).requires_grad_(False)
    params = {k: p.detach() for k, p in net.named_parameters()}
    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)

    def at(values: dict[str, torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(0)  # (the same Hutchinson probes in every call)
        return call(lambda z: torch.func.functional_call(net, values, z), x)

    want = central_difference(
        lambda t: at({k: p + t * tangents[k] for k, p in params.items()}).detach()
    )
    with fwad.dual_level():
        got = at({k: fwad.make_dual(p, tangents[k]) for k, p in params.items()})
        tangent = fwad.unpack_dual(got).tangent
    assert_close(torch.zeros_like(want) if tangent is None else tangent, want)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
@pytest.mark.parametrize("penalty", ["x-gradient", "parameter gradient"])
def test_third_derivatives_through_a_layer_norm(method: str, penalty: str) -> None:
    """The parameter gradient of ``|∇_x div|²`` or of ``|∇_θ div²|²`` (a gradient-norm penalty,
    a Hessian-vector product, MAML) is a third derivative of ``f``. Fused ``layer_norm``'s
    third derivative by PyTorch's backward is wrong (pytorch#175754): by reverse mode and by
    ``"auto"``'s plain autograd on a small problem these were 100% and 28% off. Reference:
    central differences of the penalty (second derivatives of ``f``, which the per-sample
    ``autograd.grad`` loop gets right) along a random direction of the parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4)).double()
    params = list(net.parameters())
    x0 = torch.randn(3, 4, dtype=f64)
    directions = [torch.randn_like(p) for p in params]

    def value(div) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        d = div(x)
        if penalty == "x-gradient":
            return torch.autograd.grad(d.sum(), x, create_graph=True)[0].square().sum()
        grads = torch.autograd.grad(d.square().sum(), params, create_graph=True, allow_unused=True)
        return sum(g.square().sum() for g in grads if g is not None)  # type: ignore[return-value]

    got = torch.autograd.grad(
        value(lambda x: torchdiv.divergence(net, x, method=method)), params, allow_unused=True
    )
    slope = sum((g * v).sum() for g, v in zip(got, directions, strict=True) if g is not None)
    want = central_difference(lambda t: _shifted_value(net, directions, t, value))
    torch.testing.assert_close(slope, want, rtol=1e-7, atol=1e-9)


def _shifted_value(net: nn.Module, directions: list[torch.Tensor], t: float, value) -> torch.Tensor:
    with shifted(list(net.parameters()), directions, t):
        return value(lambda x: _divergence(net, x)).detach()


class _InstanceNormNet(nn.Module):
    """4 -> 6 -> an instance norm over 2 channels of 3 -> tanh -> 4; ``batch_norm``: a
    train-mode batch norm (running statistics) before it."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(6) if batch_norm else nn.Identity()
        self.norm = nn.InstanceNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.bn(self.a(x)).reshape(-1, 2, 3)).reshape(-1, 6)
        return self.b(torch.tanh(h))


def test_third_derivatives_through_an_instance_norm_on_the_plain_path() -> None:
    """A tiny problem's ``"auto"`` goes by plain autograd from its second call at a site; its
    search for the ops ``SafeDerivatives`` replaces left out instance norm's node (a batch
    norm's, shared with real batch norms), so ``|∇_x div|²``'s parameter gradient kept
    PyTorch's wrong third derivative: -4.35 against 9.81. Reference: central differences of
    the penalty along a random parameter direction (``_shifted_value``)."""
    torch.manual_seed(0)
    net = _InstanceNormNet().double()
    params = list(net.parameters())
    x0 = torch.randn(3, 4, dtype=f64)
    directions = [torch.randn_like(p) for p in params]

    def value(div) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        return torch.autograd.grad(div(x).sum(), x, create_graph=True)[0].square().sum()

    def penalty() -> torch.Tensor:  # one site: its later calls take the plain path
        return value(lambda x: torchdiv.divergence(net, x, method="auto"))

    penalty()
    got = torch.autograd.grad(penalty(), params, allow_unused=True)
    slope = sum((g * v).sum() for g, v in zip(got, directions, strict=True) if g is not None)
    want = central_difference(lambda t: _shifted_value(net, directions, t, value))
    torch.testing.assert_close(slope, want, rtol=1e-7, atol=1e-9)


def test_an_instance_norm_beside_a_train_mode_batch_norm_moves_its_statistics_once() -> None:
    """The plain path evaluates ``f`` again under ``SafeDerivatives`` for an instance norm
    and a train-mode batch norm, putting back what that evaluation writes: the running
    statistics (and the count of batches) equal one PyTorch forward's per call."""
    torch.manual_seed(0)
    net, twin = _InstanceNormNet(batch_norm=True), _InstanceNormNet(batch_norm=True)
    twin.load_state_dict(net.state_dict())
    x = torch.randn(8, 4)
    with torchdiv.allow_batch_interaction():
        for _ in range(2):  # (the second call at this site: plain autograd)
            torchdiv.divergence(net, x)
            twin(x)
    for name, buffer in twin.bn.named_buffers():
        torch.testing.assert_close(getattr(net.bn, name), buffer, rtol=0, atol=0)


_ZERO_LAPLACIANS = {
    "laplacian taylor": lambda f, x: torchdiv.laplacian(f, x, method="taylor"),
    "laplacian auto": lambda f, x: torchdiv.laplacian(f, x),
    "value_grad_laplacian taylor": lambda f, x: (
        torchdiv.value_grad_laplacian(f, x, method="taylor").laplacian
    ),
    "weighted_laplacian taylor": lambda f, x: torchdiv.weighted_laplacian(
        f, x, diffusion=2 * torch.eye(3, dtype=f64), method="taylor"
    ),
}


@pytest.mark.parametrize("name", list(_ZERO_LAPLACIANS))
def test_a_zero_laplacian_of_a_trained_relu_network_has_parameter_gradients(name: str) -> None:
    """The Laplacian of a ReLU network is 0 whatever its weights; with ``x`` not requiring grad
    (a PINN's collocation points) the Taylor engine's had no graph at all, so
    ``loss.backward()`` raised ("element 0 of tensors does not require grad") where the
    methods of backward passes give zero parameter gradients (reference: grad-of-grad).
    Now tied to the tensors ``f`` read."""
    net = _net(3, nn.ReLU())
    x = torch.randn(4, 3, dtype=f64)
    got = _ZERO_LAPLACIANS[name](net, x)
    want = torchdiv.laplacian(net, x, method="grad-of-grad")
    assert got.requires_grad and want.requires_grad
    assert_close(got.detach(), torch.zeros_like(got))
    params, options = list(net.parameters()), {"allow_unused": True, "materialize_grads": True}
    grads = torch.autograd.grad((got.square() + got).sum(), params, **options)
    expected = torch.autograd.grad((want.square() + want).sum(), params, **options)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e)
    got.add_(1)  # the result is the caller's to write to


class _BatchNormNet(nn.Module):
    """4 -> 6 -> a batch norm by its input's statistics -> tanh -> 4, for ``batch_dims=0``
    (the rows of ``x`` are one sample's: no sample mixing); ``running``: a train-mode
    ``nn.BatchNorm1d`` that keeps running statistics, else one that keeps none
    (``track_running_stats=False``, as MAML codes build theirs)."""

    def __init__(self, running: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(6, track_running_stats=running)
        with torch.no_grad():  # (not the identity: the affine parameters count)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.bn(self.a(x))))

    def composite(self, x: torch.Tensor) -> torch.Tensor:
        """The same function with the batch norm written in primitives (for references that
        take its third derivative)."""
        h = self.a(x)
        var, mean = torch.var_mean(h, 0, correction=0)
        h = (h - mean) / torch.sqrt(var + self.bn.eps) * self.bn.weight + self.bn.bias
        return self.b(torch.tanh(h))


def _whole_divergence(f, x: torch.Tensor) -> torch.Tensor:
    """The trace of the Jacobian of ``f`` over all of ``x`` (one sample), by one
    ``autograd.grad`` per output element with a graph."""
    y = f(x).reshape(-1)
    rows = [torch.autograd.grad(y[i], x, create_graph=True)[0].reshape(-1) for i in range(len(y))]
    return sum(row[i] for i, row in enumerate(rows))  # type: ignore[return-value]


def _squares(f):
    return lambda z: f(z).square().sum()


_PROBES = torch.randn(2, 3, 4, dtype=f64, generator=torch.Generator().manual_seed(1))
_BN_CALLS = {  # name: (the operator by torchdiv, its reference, whether it keeps statistics)
    "divergence-auto": (lambda f, x: torchdiv.divergence(f, x, batch_dims=0), True),
    "divergence-reverse": (
        lambda f, x: torchdiv.divergence(f, x, batch_dims=0, method="reverse"),
        False,
    ),
    "divergence-forward": (
        lambda f, x: torchdiv.divergence(f, x, batch_dims=0, method="forward"),
        False,
    ),
    "divergence-hutchinson": (
        lambda f, x: torchdiv.divergence(f, x, batch_dims=0, method="hutchinson", probes=_PROBES),
        True,
    ),
    **{
        f"laplacian-{m}": (
            lambda f, x, m=m: torchdiv.laplacian(_squares(f), x, batch_dims=0, method=m),
            m == "grad-of-grad",
        )
        for m in ("forward-over-reverse", "hessian", "grad-of-grad")
    },
}


def _bn_reference(name: str):
    if name.startswith("laplacian"):
        return lambda f, x: _whole_divergence(
            lambda z: torch.autograd.grad(_squares(f)(z), z, create_graph=True)[0], x
        )
    if name == "divergence-hutchinson":  # v^T J v averaged over the probes
        return lambda f, x: (
            sum(
                (torch.autograd.grad((f(x) * v).sum(), x, create_graph=True)[0] * v).sum()
                for v in _PROBES
            )
            / len(_PROBES)
        )
    return _whole_divergence


@pytest.mark.parametrize("running", [False, True], ids=["stateless", "running-statistics"])
@pytest.mark.parametrize("name", list(_BN_CALLS))
def test_third_derivatives_through_a_batch_norm_by_its_input_statistics(
    name: str, running: bool
) -> None:
    """``F.batch_norm`` normalising by its input's statistics (train mode, or no running
    statistics) has PyTorch's wrong higher derivatives, as ``instance_norm`` (a batch norm
    over a reshaped input): the parameter gradient of ``|∇_x div|²`` (a third derivative of
    ``f``) was 350% off by reverse mode and ``"auto"``'s plain autograd, with or without
    running statistics, 41% by the forward engine and Hutchinson's products; that of
    ``|∇_x Δu|²`` (a fourth) 7% by forward over reverse and the Hessian, 19% by the
    grad-of-grad loop. Now run as its composite; the statistics move once per call
    (``test_an_instance_norm_beside_a_train_mode_batch_norm_moves_its_statistics_once``).
    Reference: central differences of the penalty by ``autograd.grad`` loops through the net
    with its batch norm written in primitives (``_BatchNormNet.composite``)."""
    call, keeps = _BN_CALLS[name]
    if running and not keeps:
        pytest.skip("torch.func's transforms refuse a write of running statistics (loudly)")
    torch.manual_seed(0)
    net = _BatchNormNet(running).double()
    params = list(net.parameters())
    x0 = torch.randn(3, 4, dtype=f64)
    directions = [torch.randn_like(p) for p in params]
    reference = _bn_reference(name)

    def value(op) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        return torch.autograd.grad(op(net, x).sum(), x, create_graph=True)[0].square().sum()

    def shifted_value(t: float) -> torch.Tensor:
        with shifted(params, directions, t):
            return value(lambda f, x: reference(net.composite, x)).detach()

    for _ in range(2):  # ("auto": the second call at a site goes by plain autograd)
        got = torch.autograd.grad(value(call), params, materialize_grads=True)
    slope = sum((g * v).sum() for g, v in zip(got, directions, strict=True))
    torch.testing.assert_close(slope, central_difference(shifted_value), rtol=1e-7, atol=1e-9)


_STATEFUL_CALLS = {  # name: the call, its reference's probes (None: the exact divergence)
    "divergence auto": (lambda f, x: torchdiv.divergence(f, x, batch_dims=0), None),
    "jacobian_diagonal auto": (
        lambda f, x: torchdiv.jacobian_diagonal(f, x, batch_dims=0).sum(),
        None,
    ),
    "hutchinson one probe": (
        lambda f, x: torchdiv.divergence(
            f, x, batch_dims=0, method="hutchinson", probes=_PROBES[:1]
        ),
        _PROBES[:1],
    ),
    "hutchinson two probes": (
        lambda f, x: torchdiv.divergence(f, x, batch_dims=0, method="hutchinson", probes=_PROBES),
        _PROBES,
    ),
}


@pytest.mark.parametrize("running", [False, True], ids=["stateless", "running-statistics"])
@pytest.mark.parametrize("name", list(_STATEFUL_CALLS))
def test_a_spectral_norm_before_a_train_mode_batch_norm_reads_its_state_once(
    name: str, running: bool
) -> None:
    """A spectral norm (train mode: one power iteration per forward, written in place and read
    at once) before a train-mode batch norm. The plain path made ``f`` again after an
    evaluation that moved the statistics, from the state that evaluation left: the result
    was ``f``'s one power iteration further (2e-6 off in float64 for ``"auto"``'s second
    call and the one-probe estimate's first); two-probe estimates' later calls, by
    ``torch.func`` unwatched, failed at the batch norm after the power iteration, which
    nothing put back: the state moved twice per call. A batch norm without running
    statistics (``stateless``) had every plain evaluation made again without a put-back (the
    power iteration ran twice per such call), and ``"auto"``'s second call was plain after a
    first by ``torch.func`` under the replacements. Reference: a copy of the net, one forward
    per call, ``autograd.grad`` loops (float64)."""
    call, probes = _STATEFUL_CALLS[name]
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(4, 6)),
        nn.BatchNorm1d(6, track_running_stats=running),
        nn.Tanh(),
        nn.Linear(6, 4),
    ).double()
    twin = copy.deepcopy(net)
    x = torch.randn(3, 4, dtype=f64)
    for _ in range(3):  # (the first call at a site is watched, later ones are not)
        got = call(net, x)
        z = x.clone().requires_grad_()
        if probes is None:
            want = _whole_divergence(twin, z)
        else:
            y = twin(z)
            grads = [torch.autograd.grad(y, z, v, retain_graph=True)[0] for v in probes]
            want = sum((g * v).sum() for g, v in zip(grads, probes, strict=True)) / len(probes)
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
        for key, expected in twin.state_dict().items():
            torch.testing.assert_close(net.state_dict()[key], expected, rtol=0, atol=0, msg=key)


_GATES = {  # name: (activation, it written by hand, the width its first layer feeds it)
    "hardsigmoid": (nn.Hardsigmoid(), lambda a: torch.clamp(a + 3, 0, 6) / 6, 8),
    "glu": (nn.GLU(), lambda a: a[:, :8] * torch.sigmoid(a[:, 8:]), 16),
}
_GATE_CALLS = {
    **{
        f"divergence-{m}": lambda f, x, m=m: torchdiv.divergence(f, x, method=m)
        for m in ("auto", "reverse", "forward")
    },
    **{
        f"laplacian-{m}": lambda f, x, m=m: torchdiv.laplacian(
            lambda z: f(z).square().sum(-1), x, method=m
        )
        for m in ("auto", "forward-over-reverse", "hessian", "grad-of-grad")
    },
}


@pytest.mark.parametrize("call", list(_GATE_CALLS))
@pytest.mark.parametrize("gate", list(_GATES))
def test_parameter_gradients_through_hardsigmoid_and_glu(gate: str, call: str) -> None:
    """``hardsigmoid_backward`` has no derivative in PyTorch and ``glu``'s forward-mode
    formula (``glu_jvp``) none either: the parameter gradient of a divergence through
    ``nn.Hardsigmoid`` raised with every method (``"auto"`` too), of a Laplacian by the nested
    methods, and of a forward-mode divergence through ``nn.GLU``. Both now run as their
    composites where such derivatives are taken. Reference: central differences, along a
    random parameter direction, of the result's sum by ``autograd.grad`` loops through the net
    with the activation written by hand (float64: ~1e-10 relative, ``central_difference``)."""
    activation, by_hand, width = _GATES[gate]
    torch.manual_seed(0)
    first, last = nn.Linear(3, width).double(), nn.Linear(8, 3).double()
    net = nn.Sequential(first, activation, last)
    params = list(net.parameters())
    directions = [torch.randn_like(p) for p in params]
    x = torch.randn(5, 3, dtype=f64)
    op = _GATE_CALLS[call]

    def twin(z: torch.Tensor) -> torch.Tensor:
        return last(by_hand(first(z)))

    def total(t: float) -> torch.Tensor:
        z = x.clone().requires_grad_()
        with shifted(params, directions, t):
            if call.startswith("laplacian"):
                return _laplacian(lambda w: twin(w).square().sum(-1), z).sum().detach()
            return _divergence(twin, z).sum().detach()

    for _ in range(2):  # ("auto": the second call at a site goes by plain autograd)
        got = torch.autograd.grad(op(net, x).sum(), params, materialize_grads=True)
    slope = sum((g * v).sum() for g, v in zip(got, directions, strict=True))
    torch.testing.assert_close(slope, central_difference(total), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("call", list(_GATE_CALLS))
def test_glu_of_an_odd_size_still_raises(call: str) -> None:
    """``F.glu`` refuses a dimension of odd size; its composite (``a.chunk(2, dim)``) would
    split 3 into 2 and 1 and broadcast, a result of the wrong shape and value where it ran (the
    forward engine, forward-over-reverse and Hessian Laplacians): PyTorch's error stays."""
    x = torch.randn(3, 2, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.glu(torch.cat([z, z[:, :1]], -1))

    with pytest.raises(RuntimeError, match="Halving dimension must be even"):
        _GATE_CALLS[call](f, x)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "hessian", "grad-of-grad"])
@pytest.mark.parametrize("given", ["weight", "bias"])
def test_batch_norm_by_input_statistics_keeps_pytorchs_size_check(method: str, given: str) -> None:
    """``F.batch_norm`` refuses a weight or bias that is not one per channel; its composite
    (``_core.modes._batch_norm``) reshaped a one-element one and broadcast it over the
    channels, where the nested Laplacians ran it: PyTorch's error stays."""
    x = torch.randn(4, 3, dtype=f64)
    one = torch.ones(1, dtype=f64, requires_grad=True)
    kwargs = {given: one}

    def f(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(z, None, None, training=True, **kwargs).pow(3).sum(-1)

    error = f"{given} should contain 3 elements not 1"
    with torchdiv.allow_batch_interaction(), pytest.raises(RuntimeError, match=error):
        torchdiv.laplacian(f, x, method=method)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "hessian", "grad-of-grad"])
@pytest.mark.parametrize("given", ["weight", "bias"])
def test_instance_norm_keeps_pytorchs_size_check(method: str, given: str) -> None:
    """As for the batch norm: ``_core.modes._instance_norm`` broadcast a one-element weight
    or bias over the channels where PyTorch raises (its check is on the repeated parameter:
    4 samples of 3 channels, 12 elements, not 4)."""
    x = torch.randn(4, 3, 5, dtype=f64)
    kwargs = {given: torch.ones(1, dtype=f64, requires_grad=True)}

    def f(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.instance_norm(z, **kwargs).pow(3).sum((-1, -2))

    with pytest.raises(RuntimeError, match=f"{given} should contain 12 elements not 4"):
        torchdiv.laplacian(f, x, method=method)


_NORM_CALLS = {
    **{
        f"divergence {m}": lambda f, x, m=m: torchdiv.divergence(f, x, batch_dims=0, method=m)
        for m in ("reverse", "forward")
    },
    **{
        f"laplacian {m}": lambda f, x, m=m: torchdiv.laplacian(
            lambda z: f(z).sum(), x, batch_dims=0, method=m
        )
        for m in ("forward-over-reverse", "grad-of-grad")
    },
}


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 1)], ids=["no positions", "one position"])
@pytest.mark.parametrize("call", list(_NORM_CALLS))
def test_instance_norm_keeps_pytorchs_check_of_its_positions(call: str, shape) -> None:
    """``F.instance_norm`` refuses an input with one position per ``(sample, channel)`` (a
    ``(N, C)`` or ``(N, C, 1)`` one), but only after ``SafeDerivatives`` took the call: the
    composite normalised a ``(N, C)`` input over all of it (samples mixed) and a
    ``(N, C, 1)`` one to 0, where the parameters require grad (a trained layer before it).
    PyTorch's error stays."""
    lin = nn.Linear(1, 1).double()
    x = torch.randn(*shape, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.instance_norm(lin(z[..., None])[..., 0]).tanh()

    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        _NORM_CALLS[call](f, x)


@pytest.mark.parametrize("call", list(_NORM_CALLS))
def test_group_norm_keeps_pytorchs_check_of_one_value(call: str) -> None:
    """``F.group_norm`` refuses an input of one value in all (``(1, C, 1)`` in ``C``
    groups), but only after ``SafeDerivatives`` (which replaces it in forward mode, run on a
    contiguous copy) took the call: ``torch.group_norm`` normalised it to 0 (the forward
    engine, forward over reverse). PyTorch's error stays."""
    x = torch.randn(1, 2, 1, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.group_norm(z, 2).tanh()

    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _NORM_CALLS[call](f, x)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "hessian", "grad-of-grad"])
@pytest.mark.parametrize("wrong", ["normalized_shape", "weight", "bias"])
def test_layer_norm_keeps_pytorchs_shape_checks(method: str, wrong: str) -> None:
    """``_core.modes._layer_norm`` normalised over the last ``len(normalized_shape)``
    dimensions whatever their sizes, and broadcast a weight or bias of another shape, a
    Laplacian where PyTorch raises (``normalized_shape=(3,)`` of a ``(2, 3, 4)`` input): the
    nested Laplacians ran it. PyTorch's error stays."""
    x = torch.randn(2, 3, 4, dtype=f64)
    one = torch.ones(1, dtype=f64, requires_grad=True)
    shape, kwargs = ((3,), {}) if wrong == "normalized_shape" else ((4,), {wrong: one})

    def f(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(z, shape, **kwargs).pow(3).sum((-1, -2))

    with pytest.raises(RuntimeError, match="normalized_shape"):
        torchdiv.laplacian(f, x, method=method)


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse", "grad-of-grad"])
@pytest.mark.parametrize("wrong", ["columns", "negative p"])
def test_cdist_keeps_pytorchs_checks(method: str, wrong: str) -> None:
    """``_core.modes._cdist`` (differences) broadcast a one-column ``x2`` against three
    columns and took a negative ``p``, a Laplacian where ``torch.cdist`` raises: PyTorch's
    error stays."""
    x = torch.randn(4, 3, dtype=f64)
    c = torch.randn(5, 1 if wrong == "columns" else 3, dtype=f64)
    p = 2.0 if wrong == "columns" else -1.0

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.cdist(z, c, p=p).sum(-1)

    with pytest.raises(RuntimeError, match=r"same number of columns|non-negative p|_cdist_forward"):
        torchdiv.laplacian(f, x, method=method)
