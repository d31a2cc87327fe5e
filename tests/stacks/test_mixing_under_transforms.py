"""The sample-mixing check under the caller's own ``torch.func`` transform
(``torchdiv._core.mixing.transformed``): an ensemble's ``vmap`` over stacked parameters
(``functional_call``), a ``vmap`` over batches of inputs, ``torch.func.grad`` in the parameters
(a MAML step) and ``jacrev`` in ``x``. The watch (a dispatch mode) sees physical tensors there;
a model centring its features over the batch gave the diagonal blocks of the cross-batch
Jacobian as per-sample derivatives, silently, while it is refused outside. References for the
independent models: each sample alone in float64 by plain autograd (grad of grad)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import torchdiv
from tests.conftest import CentredMLP, assert_close

Op = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


# drawn once, outside any vmap (whose randomness="error" refuses draws)
_PROBES = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _probes(x: torch.Tensor) -> torch.Tensor:
    return _PROBES[:, : x.shape[0]].to(x.dtype)


def _first(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: f(z)[:, 0]


_OPS: dict[str, Op] = {  # every path that watches f outside a transform
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "divergence hutchinson": lambda f, x: torchdiv.divergence(
        f, x, method="hutchinson", probes=_probes(x)
    ),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    "jacobian": lambda f, x: torchdiv.jacobian(f, x),
    "estimate_divergence xtrace": lambda f, x: (
        torchdiv.estimate_divergence(f, x, method="xtrace", probes=_probes(x)).value
    ),
    "laplacian": lambda f, x: torchdiv.laplacian(_first(f), x),
    "laplacian hutchinson": lambda f, x: torchdiv.laplacian(
        _first(f), x, method="hutchinson", probes=_probes(x)
    ),
    "value_grad_laplacian": lambda f, x: torchdiv.value_grad_laplacian(_first(f), x).laplacian,
    "weighted_laplacian": lambda f, x: torchdiv.weighted_laplacian(
        _first(f), x, diffusion=torch.eye(3, dtype=x.dtype)
    ),
}


class _Normed(torch.nn.Module):
    """Each sample's features normalised over the features, as a layer norm (written out:
    the references differentiate it three times, where PyTorch's ``native_layer_norm``
    double backward has no right derivative of its own)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        centred = h - h.mean(-1, keepdim=True)
        return centred / (centred.square().mean(-1, keepdim=True) + 1e-5).sqrt()


def _independent() -> torch.nn.Module:
    """Per-sample layers only (a normalisation over each sample's features)."""
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.SiLU(), _Normed(), torch.nn.Linear(8, 3)
    ).double()


def _under(ensemble: str, op: Op, members: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``op`` on the first member (or every member) inside the caller's transform."""
    if ensemble == "models":
        params, buffers = stack_module_state(members)  # type: ignore[arg-type]
        return vmap(lambda p, b: op(lambda z: functional_call(members[0], (p, b), (z,)), x))(
            params, buffers
        )
    if ensemble == "inputs":
        return vmap(lambda xb: op(members[0], xb))(torch.stack([x, 2 * x]))
    if ensemble == "grad":  # torch.func.grad of a loss in the parameters (a MAML inner step)
        params = {k: v.detach() for k, v in members[0].named_parameters()}
        grads = grad(
            lambda p: op(lambda z: functional_call(members[0], p, (z,)), x).square().sum()
        )(params)
        return torch.cat([g.flatten() for g in grads.values()])
    return jacrev(lambda z: op(members[0], z))(x)  # in x


@pytest.mark.parametrize("ensemble", ["models", "inputs", "grad", "jacrev"])
@pytest.mark.parametrize("name", sorted(_OPS))
def test_sample_mixing_is_refused_under_the_callers_transform(name: str, ensemble: str) -> None:
    """Refused outside a transform, and now inside one too (it returned the diagonal blocks
    of the cross-batch Jacobian, silently, under every ensemble)."""
    torch.manual_seed(0)
    members = [CentredMLP().double() for _ in range(2)]
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(torchdiv.BatchInteractionError, match=name.split()[0]):
        _OPS[name](members[0], x)
    with pytest.raises(torchdiv.BatchInteractionError, match=rf"^{name.split()[0]}: .*torch\.func"):
        _under(ensemble, _OPS[name], members, x)


def test_allowed_interaction_is_computed_under_the_callers_transform() -> None:
    """The error's way out: ``allow_batch_interaction()`` turns the check off as the watch."""
    torch.manual_seed(0)
    members = [CentredMLP().double() for _ in range(2)]
    x = torch.randn(5, 3, dtype=torch.float64)
    with torchdiv.allow_batch_interaction():
        got = _under("models", _OPS["divergence"], members, x)
        want = torch.stack([torchdiv.divergence(m, x) for m in members])
    assert_close(got, want)


def _divergence_of(m: torch.nn.Module, xb: torch.Tensor) -> torch.Tensor:
    """Sample ``xb`` (shape ``(3,)``) alone: the trace of its Jacobian, by grad of grad."""
    z = xb[None].detach().requires_grad_(True)
    y = m(z)[0]
    return sum(torch.autograd.grad(y[i], z, create_graph=True)[0][0, i] for i in range(3))


def _laplacian_of(m: torch.nn.Module, xb: torch.Tensor) -> torch.Tensor:
    """Sample ``xb`` alone: the Laplacian of the first output, by grad of grad."""
    z = xb[None].detach().requires_grad_(True)
    (g,) = torch.autograd.grad(m(z)[0, 0], z, create_graph=True)
    return sum(torch.autograd.grad(g[0, i], z, create_graph=True)[0][0, i] for i in range(3))


_REFERENCES = {
    "divergence": _divergence_of,
    "divergence hutchinson": None,  # (the probes' estimate: against the call outside)
    "laplacian": _laplacian_of,
    "value_grad_laplacian": _laplacian_of,
}


@pytest.mark.parametrize("name", sorted(_REFERENCES))
def test_independent_members_are_not_refused(name: str) -> None:
    """No false refusal of a per-sample model: each member's values and the per-member
    parameter gradients of a loss on them, against each sample alone in float64 (grad of
    grad; the estimate against the same probes outside the transform)."""
    torch.manual_seed(0)
    members = [_independent() for _ in range(3)]
    x = torch.randn(6, 3, dtype=torch.float64)
    op, reference = _OPS[name], _REFERENCES[name]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]

    def loss(p: dict, b: dict) -> torch.Tensor:
        return op(lambda z: functional_call(members[0], (p, b), (z,)), x).square().sum()

    got = vmap(lambda p, b: op(lambda z: functional_call(members[0], (p, b), (z,)), x))(
        params, buffers
    )
    grads = vmap(grad(loss))(params, buffers)
    for i, m in enumerate(members):
        want = (
            op(m, x)
            if reference is None
            else torch.stack([reference(m, x[b]) for b in range(len(x))])
        )
        assert_close(got[i], want.detach())
        want_grads = torch.autograd.grad(
            want.square().sum(), list(m.parameters()), materialize_grads=True
        )
        for (key, _), w in zip(m.named_parameters(), want_grads, strict=True):
            assert_close(grads[key][i], w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_ensembles_match_float64_and_are_not_refused(dtype: torch.dtype) -> None:
    """Round-off in the check's two VJPs (at most ``1e-6`` of the largest element in float32)
    stays under its tolerance (``sqrt(eps)``): a deeper MLP over 64 samples runs, its
    divergences within float32 round-off of float64's."""
    torch.manual_seed(0)
    members = [torch.nn.Sequential(*_deep()).double() for _ in range(2)]
    x = torch.randn(64, 3, dtype=torch.float64)
    want = _under("models", _OPS["divergence"], members, x)
    got = _under("models", _OPS["divergence"], [m.to(dtype) for m in members], x.to(dtype))
    assert_close(got, want.to(dtype))


def _deep() -> list[torch.nn.Module]:
    layers: list[torch.nn.Module] = [torch.nn.Linear(3, 32)]
    for _ in range(5):
        layers += [torch.nn.Tanh(), torch.nn.Linear(32, 32)]
    return [*layers, torch.nn.Tanh(), torch.nn.Linear(32, 3)]


def test_one_sample_per_batch_is_not_checked() -> None:
    """Opacus's functorch mode, ``vmap(grad(loss))`` over samples, each a batch of one: the
    centring of a batch of one is per sample (nothing to check, nothing refused); per-sample
    gradients against each sample's loss alone."""
    torch.manual_seed(0)
    net = CentredMLP().double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss(p: dict, xb: torch.Tensor) -> torch.Tensor:
        return torchdiv.divergence(lambda z: functional_call(net, p, (z,)), xb).square().sum()

    per_sample = vmap(grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
    for b in range(len(x)):
        want = torch.autograd.grad(
            _divergence_of(net, x[b]).square(), list(net.parameters()), materialize_grads=True
        )
        for (key, _), w in zip(net.named_parameters(), want, strict=True):
            assert_close(per_sample[key][b], w)


def test_the_check_leaves_the_members_draws_alone() -> None:
    """A dropout ensemble under ``vmap(randomness="different")``: the check evaluates ``f``
    once more, with the generators put back after, so the call computes what it computed
    without the check (the same masks; with the check off, ``allow_batch_interaction()``)."""
    members = [
        torch.nn.Sequential(
            torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(16, 3)
        ).double()
        for _ in range(2)
    ]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(5, 3, dtype=torch.float64)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        out = vmap(
            lambda p, b: _OPS["divergence"](lambda z: functional_call(members[0], (p, b), (z,)), x),
            randomness="different",
        )(params, buffers)
        return out, torch.rand(3)  # the draws after it

    checked = call()
    with torchdiv.allow_batch_interaction():
        unchecked = call()
    assert_close(checked[0], unchecked[0])
    assert_close(checked[1], unchecked[1])


@pytest.mark.parametrize("name", ["divergence", "laplacian"])
def test_the_check_leaves_the_buffers_f_writes_alone(name: str) -> None:
    """A spectral norm in train mode under a ``vmap`` over batches of inputs runs one power
    iteration per evaluation, writing its ``_u``/``_v`` buffers (plain weights: the write is
    allowed there). The check's evaluation ran one more: the buffers moved twice per call and
    the call's values differed (``_u`` 7e-9 off after one call). Now put back after the check:
    state and values as with the check off."""

    def call(check: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(3, 3)), torch.nn.Tanh()
        ).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        with contextlib.nullcontext() if check else torchdiv.allow_batch_interaction():
            out = vmap(lambda xb: _OPS[name](net, xb))(torch.stack([x, 2 * x]))
        return out, {k: v.clone() for k, v in net.state_dict().items()}

    (checked, state), (unchecked, want) = call(True), call(False)
    assert torch.equal(checked, unchecked)
    for key, value in want.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("ensemble", ["models", "inputs", "grad", "jacrev"])
def test_biharmonic_sample_mixing_is_refused_under_the_callers_transform(ensemble: str) -> None:
    """``biharmonic``'s ``"auto"`` records (and watches) ``f`` outside a transform; inside one
    it took nested forward over reverse, unwatched: the diagonal blocks, silently."""
    torch.manual_seed(0)
    members = [CentredMLP().double() for _ in range(2)]
    x = torch.randn(5, 3, dtype=torch.float64)

    def op(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        return torchdiv.biharmonic(_first(f), z)

    with pytest.raises(torchdiv.BatchInteractionError, match="biharmonic"):
        op(members[0], x)
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^biharmonic: .*torch\.func"):
        _under(ensemble, op, members, x)
