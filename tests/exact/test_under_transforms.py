"""torchdiv called inside the caller's own ``torch.func`` transforms: an ensemble of models
(``vmap`` over stacked parameters with ``functional_call``) or of inputs. Forward mode's
batched pushes return ``f(x)`` unbatched at their own level but batched at the caller's, which
``vmap``'s ``out_dims=None`` check refused (forward mode, and ``"auto"`` on conv nets, raised).
References: a per-sample ``autograd.grad`` loop (conftest), its parameter gradients by
grad-of-grad, and each member of the model ensemble computed on its own by reverse mode."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import torchdiv
from tests.conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal


def _conv() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3, padding=1)
    ).double()


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_divergence_of_an_ensemble_of_inputs(method: str) -> None:
    torch.manual_seed(0)
    net = _conv()
    xs = torch.randn(2, 3, 2, 5, 5, dtype=torch.float64)
    got = vmap(lambda xb: torchdiv.divergence(net, xb, method=method))(xs)
    want = torch.stack([loop_diagonal(net, xb, create_graph=True).flatten(1).sum(-1) for xb in xs])
    assert_close(got, want.detach())
    weight = net[0].weight  # parameter gradients: against grad-of-grad of the loop's trace
    (grad,) = torch.autograd.grad(got.square().sum(), weight)
    assert_close(grad, torch.autograd.grad(want.square().sum(), weight)[0])


@pytest.mark.parametrize("method", ["auto", "forward"])
def test_divergence_of_an_ensemble_of_models(method: str) -> None:
    torch.manual_seed(0)
    members = [_conv() for _ in range(3)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)

    def one(p: dict, b: dict) -> torch.Tensor:
        return torchdiv.divergence(
            lambda z: functional_call(members[0], (p, b), (z,)), x, method=method
        )

    got = vmap(one)(params, buffers)
    for i, m in enumerate(members):
        assert_close(got[i], torchdiv.divergence(m, x, method="reverse"))


def _pinn(d: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Flatten(0)
    ).double()


@pytest.mark.parametrize("d", [1, 3])
def test_laplacian_auto_of_an_ensemble_of_models_and_under_grad(d: int) -> None:
    """``"auto"`` looped over backward passes for events up to 10 elements, whose
    ``requires_grad_`` PyTorch refuses inside a transform: an ensemble of PINNs (``vmap`` with
    ``functional_call``) and ``torch.func.grad`` of a loss in the parameters raised."""
    torch.manual_seed(0)
    members = [_pinn(d) for _ in range(2)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(4, d, dtype=torch.float64)

    def one(p: dict, b: dict) -> torch.Tensor:
        return torchdiv.laplacian(lambda z: functional_call(members[0], (p, b), (z,)), x)

    got = vmap(one)(params, buffers)
    for i, m in enumerate(members):
        assert_close(got[i], laplacian_by_grad_of_grad(m, x))
    net = members[0]
    named = {k: v.detach() for k, v in net.named_parameters()}
    loss = grad(
        lambda p: torchdiv.laplacian(lambda z: functional_call(net, p, (z,)), x).square().sum()
    )
    got_grads = loss(named)
    want = torch.autograd.grad(
        laplacian_by_grad_of_grad(net, x).square().sum(), list(net.parameters()), allow_unused=True
    )
    for (name, _), w in zip(net.named_parameters(), want, strict=True):
        assert_close(got_grads[name], torch.zeros_like(named[name]) if w is None else w)


def test_one_probe_hutchinson_of_an_ensemble_of_models_and_under_grad() -> None:
    """One-probe Hutchinson's plain-autograd product makes a leaf of ``x``, whose
    ``requires_grad_`` PyTorch refuses inside a transform: it raised under the caller's
    ``vmap`` and ``torch.func.grad``. Reference: each member's estimate from the same probe,
    computed on its own, and its parameter gradients by autograd."""
    torch.manual_seed(0)
    members = [_conv() for _ in range(2)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    probe = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(1))

    def estimate(f) -> torch.Tensor:
        return torchdiv.divergence(f, x, method="hutchinson", probes=probe)

    got = vmap(lambda p, b: estimate(lambda z: functional_call(members[0], (p, b), (z,))))(
        params, buffers
    )
    for i, m in enumerate(members):
        assert_close(got[i], estimate(m))
    net = members[0]
    named = {k: v.detach() for k, v in net.named_parameters()}
    grads = grad(lambda p: estimate(lambda z: functional_call(net, p, (z,))).square().sum())(named)
    want = torch.autograd.grad(  # (the last bias: unused, zero)
        estimate(net).square().sum(), list(net.parameters()), materialize_grads=True
    )
    for (name, _), w in zip(net.named_parameters(), want, strict=True):
        assert_close(grads[name], w)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("laplacian", lambda f, z: torchdiv.laplacian(f, z, method="grad-of-grad")),
        (
            "weighted_laplacian",
            lambda f, z: torchdiv.weighted_laplacian(
                f, z, diffusion=torch.eye(3, dtype=z.dtype), method="grad-of-grad"
            ),
        ),
        ("check_batch_independence", lambda f, z: torchdiv.check_batch_independence(f, z)),
    ],
)
def test_backward_pass_methods_under_the_callers_vmap_say_so(name: str, call) -> None:
    """They differentiate ``f`` by backward passes on a leaf copy of ``x``, which PyTorch
    refuses inside a transform with a message that names neither the call nor a way out."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    net, xs = net.double(), torch.randn(4, 5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"^{name}: .*torch.func transform.*; (use|call)"):
        vmap(lambda z: call(net, z) or z.sum())(xs)


@pytest.mark.parametrize(
    "call",
    [
        lambda f, z: torchdiv.divergence(f, z, method="structured"),
        lambda f, z: torchdiv.jacobian_diagonal(f, z, method="structured"),
        lambda f, z: torchdiv.laplacian(lambda v: f(v).sum(-1), z, method="taylor"),
    ],
)
def test_recording_methods_under_the_callers_vmap_name_the_transform(call) -> None:
    """Nothing is recorded inside the caller's transform (the limitations page says so):
    ``"structured"`` and ``"taylor"`` name it, ``"auto"`` runs the generic engines."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net, xs = net.double(), torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"torch\.func transform around the call"):
        vmap(lambda z: call(net, z))(xs)


def _tanh_net(d_in: int, d_out: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, 6), torch.nn.Tanh(), torch.nn.Linear(6, d_out))
    return net.double()


_DUAL_CALLS = {  # name -> (d_in, d_out, call)
    "divergence": (3, 3, lambda f, x, m: torchdiv.divergence(f, x, method=m)),
    "jacobian": (2, 9, lambda f, x, m: torchdiv.jacobian(f, x, method=m)),
    "laplacian": (12, 1, lambda f, x, m: torchdiv.laplacian(lambda z: f(z)[:, 0], x, method=m)),
}


@pytest.mark.parametrize(
    ("name", "method"),
    [("divergence", "auto"), ("jacobian", "auto"), ("laplacian", "auto")],
)
def test_forward_ad_over_the_parameters_of_auto(name: str, method: str) -> None:
    """Parameters made dual by the caller (``torch.autograd.forward_ad``, as
    ``torch.autograd.functional.jacobian(strategy="forward-mode")`` does): a ``torch.func.jvp``
    cannot open its level inside the caller's, so ``"auto"`` takes backward passes only. The
    Laplacian's ``"auto"`` at more than ten inputs fell back to forward over reverse there
    ("Nested forward mode AD is not supported"). Reference: float64 central differences of
    the call in the parameters' direction (truncation ~h² ~ 1e-10)."""
    d_in, d_out, call = _DUAL_CALLS[name]
    net = _tanh_net(d_in, d_out)
    x = torch.randn(3, d_in, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def at(p: dict) -> torch.Tensor:
        return call(lambda z: functional_call(net, p, (z,)), x, method)

    h = 1e-5
    want = (
        at({k: v + h * tangents[k] for k, v in params.items()})
        - at({k: v - h * tangents[k] for k, v in params.items()})
    ) / (2 * h)
    with torch.autograd.forward_ad.dual_level():
        dual = {k: torch.autograd.forward_ad.make_dual(v, tangents[k]) for k, v in params.items()}
        got = torch.autograd.forward_ad.unpack_dual(at(dual)).tangent
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("divergence", "forward"),
        ("jacobian", "forward"),
        ("laplacian", "forward-over-reverse"),
        ("laplacian", "hessian"),
    ],
)
def test_forward_mode_methods_inside_the_callers_dual_level_name_the_way(
    name: str, method: str
) -> None:
    """PyTorch's own error named neither the call nor a way out."""
    d_in, d_out, call = _DUAL_CALLS[name]
    net = _tanh_net(d_in, d_out)
    x = torch.randn(3, d_in, dtype=torch.float64)
    with (
        torch.autograd.forward_ad.dual_level(),
        pytest.raises(
            NotImplementedError, match=rf"^{name}: forward-mode products .*dual_level.*func\.jvp"
        ),
    ):
        call(net, x, method)
