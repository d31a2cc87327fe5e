"""torchdiv inside the stacks that take per-sample parameter gradients or ensembles, as users
write them: ``torch.func.vmap`` over an ensemble (``stack_module_state`` + ``functional_call``)
with estimators that draw their own probes, and PyTorch's ExpandedWeights
(``call_for_per_sample_grads``, Opacus's ``grad_sample_mode="ew"``) against its way out,
``vmap(grad(loss))`` over samples. References: each member's estimate from the same probes
computed on its own, and per-sample float64 grad-of-grad losses by plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

import torchdiv
from tests.conftest import CentredMLP, assert_close


def _mlp(d_out: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, d_out)
    ).double()


_DRAWING = {  # name -> call drawing its own probes
    "divergence": lambda f, x: torchdiv.divergence(f, x, method="hutchinson", num_probes=2),
    "estimate_divergence": lambda f, x: (
        torchdiv.estimate_divergence(f, x, method="xtrace", num_probes=2).value
    ),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(
        f, x, method="hutchinson", num_probes=2
    ),
    "laplacian": lambda f, x: torchdiv.laplacian(
        lambda z: f(z)[:, 0], x, method="hutchinson", num_probes=2
    ),
}


@pytest.mark.parametrize("name", sorted(_DRAWING))
def test_probes_drawn_under_the_callers_vmap_name_its_randomness(name: str) -> None:
    """``vmap``'s default ``randomness="error"`` refuses the draw; ``"auto"`` then went on to
    the engines of plain autograd, and the caller got PyTorch's ``requires_grad_`` error, which
    names neither the draw nor a way out."""
    torch.manual_seed(0)
    members = [_mlp() for _ in range(2)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(4, 3, dtype=torch.float64)

    def one(p: dict, b: dict) -> torch.Tensor:
        return _DRAWING[name](lambda z: functional_call(members[0], (p, b), (z,)), x)

    with pytest.raises(ValueError, match=rf"^{name}: the probes are drawn inside .*vmap.*probes="):
        vmap(one)(params, buffers)


def test_probes_drawn_under_vmap_same_are_each_members_estimate() -> None:
    """The way out the error names: ``randomness="same"`` gives every member the probes one
    draw of the generator gives (reference: each member alone, from a generator seeded alike)."""
    torch.manual_seed(0)
    members = [_mlp() for _ in range(2)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(4, 3, dtype=torch.float64)

    def estimate(f, generator: torch.Generator) -> torch.Tensor:
        return torchdiv.divergence(f, x, method="hutchinson", num_probes=2, generator=generator)

    generator = torch.Generator().manual_seed(1)
    got = vmap(
        lambda p, b: estimate(lambda z: functional_call(members[0], (p, b), (z,)), generator),
        randomness="same",
    )(params, buffers)
    for i, m in enumerate(members):
        assert_close(got[i], estimate(m, torch.Generator().manual_seed(1)))


_LOSSES = {  # name -> (output size, loss of one batch)
    "score matching": (3, lambda f, x: torchdiv.divergence(f, x).square().sum()),
    "one-probe hutchinson": (
        3,
        lambda f, x: (
            torchdiv.divergence(
                f, x, method="hutchinson", probes=torch.ones(1, *x.shape, dtype=x.dtype)
            )
            .square()
            .sum()
        ),
    ),
    "laplacian": (
        1,
        lambda f, x: (
            torchdiv.laplacian(lambda z: f(z)[:, 0], x, method="grad-of-grad").square().sum()
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_expanded_weights_per_sample_gradients_are_refused(name: str) -> None:
    """ExpandedWeights' backward writes every pass's per-sample gradients into ``grad_sample``
    and is not differentiated again for them: torchdiv's own passes filled it, and the loss's
    ``grad_sample`` was 5-300x off the per-sample reference, without an error (plain
    autograd's grad-of-grad is as wrong). Refused before any pass writes ``grad_sample``
    (where an engine cannot evaluate ``f`` with ExpandedWeights at all, its error's hint names
    them and the way out)."""
    torch.manual_seed(0)
    d_out, loss = _LOSSES[name]
    net = _mlp(d_out)
    with pytest.raises(RuntimeError, match=r"(?s)ExpandedWeights .* vmap\(grad\(loss\)"):
        loss(call_for_per_sample_grads(net), torch.randn(4, 3, dtype=torch.float64))
    assert all(getattr(p, "grad_sample", None) is None for p in net.parameters())


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_the_way_out_vmap_of_grad_gives_per_sample_gradients(name: str) -> None:
    """The error's way out, as Opacus's functorch mode takes it: ``vmap(grad(loss))`` over the
    samples, each a batch of one (``"grad-of-grad"``, refused under a transform, as
    ``"auto"``). Reference: each sample's loss alone, differentiated by plain autograd."""
    torch.manual_seed(0)
    d_out, loss = _LOSSES[name]
    net = _mlp(d_out)
    x = torch.randn(4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    auto = (
        (lambda f, z: torchdiv.laplacian(lambda v: f(v)[:, 0], z).square().sum())
        if (name == "laplacian")
        else loss
    )
    per_sample = vmap(
        grad(lambda p, xi: auto(lambda z: functional_call(net, p, (z,)), xi[None])),
        in_dims=(None, 0),
    )(params, x)
    for b in range(len(x)):
        want = torch.autograd.grad(
            loss(net, x[b : b + 1]), list(net.parameters()), materialize_grads=True
        )
        for (key, _), w in zip(net.named_parameters(), want, strict=True):
            assert_close(per_sample[key][b], w)


def test_value_grad_laplacian_auto_per_sample_under_vmap_of_grad() -> None:
    """An ensemble of models (``vmap`` with ``functional_call``) and Opacus's functorch mode on
    a PINN loss of ``value_grad_laplacian`` (each sample a batch of one under
    ``vmap(grad(...))``): ``"auto"`` raised PyTorch's ``requires_grad_`` error,
    and ``"taylor"``'s refusal there names ``"auto"`` as the way out. Reference: each sample's
    loss by plain autograd's grad-of-grad, differentiated in the parameters."""
    torch.manual_seed(0)
    net = _mlp(1)
    x = torch.randn(3, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict, xb: torch.Tensor) -> torch.Tensor:
        out = torchdiv.value_grad_laplacian(lambda z: functional_call(net, p, (z,))[:, 0], xb)
        return (out.laplacian + out.gradient.square().sum(-1) + out.value).square().sum()

    def reference(xb: torch.Tensor) -> torch.Tensor:
        z = xb.detach().requires_grad_(True)
        y = net(z)[:, 0]
        (g,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        lap = sum(
            torch.autograd.grad(g[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(3)
        )
        return (lap + g.square().sum(-1) + y).square().sum()

    members = [net, _mlp(1)]  # an ensemble of models: each member's gradient
    stacked, buffers = stack_module_state(members)  # type: ignore[arg-type]
    got = vmap(
        lambda p, b: (
            torchdiv.value_grad_laplacian(
                lambda z: functional_call(net, (p, b), (z,))[:, 0], x
            ).gradient
        )
    )(stacked, buffers)
    for i, m in enumerate(members):
        z = x.detach().requires_grad_(True)
        assert_close(got[i], torch.autograd.grad(m(z).sum(), z)[0])
    per_sample = vmap(grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
    for b in range(len(x)):
        want = torch.autograd.grad(
            reference(x[b : b + 1]), list(net.parameters()), materialize_grads=True
        )
        for (key, _), w in zip(net.named_parameters(), want, strict=True):
            assert_close(per_sample[key][b], w)


@pytest.mark.parametrize("ensemble", ["models", "inputs", "grad"])
def test_sample_mixing_is_seen_under_the_callers_vmap(ensemble: str) -> None:
    """Outside a transform, ``"auto"`` refuses a model that centres features over the batch
    (``BatchInteractionError``); inside an ensemble's ``vmap`` (of models by
    ``functional_call``, or of batches of inputs), or under ``torch.func.grad`` in the
    parameters, it returned the diagonal blocks of the cross-batch Jacobian as per-sample
    divergences, silently; now checked there by two VJPs (``torchdiv._core.mixing.transformed``;
    every operator: ``tests/stacks/test_mixing_under_transforms.py``)."""
    torch.manual_seed(0)
    members = [CentredMLP().double() for _ in range(2)]
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(members[0], x)
    with pytest.raises(torchdiv.BatchInteractionError):
        if ensemble == "models":
            params, buffers = stack_module_state(members)  # type: ignore[arg-type]
            vmap(
                lambda p, b: torchdiv.divergence(
                    lambda z: functional_call(members[0], (p, b), (z,)), x
                )
            )(params, buffers)
        elif ensemble == "inputs":
            vmap(lambda xb: torchdiv.divergence(members[0], xb))(torch.stack([x, 2 * x]))
        else:  # torch.func.grad of a loss in the parameters (a MAML inner step)
            params = {k: v.detach() for k, v in members[0].named_parameters()}
            grad(
                lambda p: torchdiv.divergence(
                    lambda z: functional_call(members[0], p, (z,)), x
                ).sum()
            )(params)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_a_buffer_written_under_the_callers_vmap_is_named(method: str) -> None:
    """A train-mode batch norm in an ensemble's ``vmap`` updates its stacked running
    statistics from ``x``, which the transforms refuse: ``"forward"``/``"reverse"`` named the
    write, but ``"auto"`` then tried plain autograd, whose leaf copy of ``x`` PyTorch refuses
    under the caller's transform, and raised that ``requires_grad_`` error instead."""
    torch.manual_seed(0)
    members = [
        torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).double()
        for _ in range(2)
    ]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(6, 3, dtype=torch.float64)
    options = {"probes": torch.ones(1, *x.shape, dtype=x.dtype)} if method == "hutchinson" else {}

    def one(p: dict, b: dict) -> torch.Tensor:
        f = lambda z: functional_call(members[0], (p, b), (z,))  # noqa: E731
        return torchdiv.divergence(f, x, method=method, **options)

    with pytest.raises(RuntimeError, match=r"^divergence: .*writes in place .*model\.eval\(\)"):
        vmap(one)(params, buffers)
