"""The ways out that torchdiv's errors name, followed (rev-docs19): a tensor-parallel ``f``
(``ColwiseParallel`` then ``RowwiseParallel`` on a one-rank mesh, in process) in training.

With a plain ``x`` the gradients of Hutchinson's estimate and of the graph form are refused
(``DTensor.from_local``), and that error named "x as a DTensor", which those forms refuse
with a ``TypeError`` whose own way out, a plain tensor, led back to the first refusal: the
messages now name the form that takes a DTensor (the function form's exact methods,
``method="auto"``) and what a plain tensor gives there."""

from __future__ import annotations

import copy

import pytest
import torch

import torchdiv
from torchdiv._exact.autograd import UndifferentiableBackward

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


@pytest.fixture
def megatron(one_process_group):
    """A float64 tanh MLP sharded Colwise then Rowwise (Megatron's pair) on a one-rank mesh,
    a plain copy of its weights, a batch and the mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    plain = plain.double()
    net = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (1,))
    parallelize_module(net, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return net, plain, torch.randn(4, 3, dtype=torch.float64), mesh


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _backward(out: torch.Tensor) -> None:
    _full(out).square().sum().backward()


def test_the_way_out_of_a_plain_x_names_the_form_that_takes_a_dtensor(megatron) -> None:
    from torch.distributed.tensor import Replicate, distribute_tensor

    net, plain, x, mesh = megatron
    with pytest.raises(UndifferentiableBackward, match=r"method='auto'") as refused:
        _backward(torchdiv.divergence(net, x, method="hutchinson", num_probes=2))
    assert "the graph form take plain tensors only" in str(refused.value)
    xd = distribute_tensor(x, mesh, [Replicate()])
    with pytest.raises(TypeError, match="method='hutchinson' cannot take"):
        torchdiv.divergence(net, xd, method="hutchinson", num_probes=2)
    _backward(torchdiv.divergence(net, xd, method="auto"))  # the way out, followed
    _backward(torchdiv.divergence(plain, x, method="reverse"))
    for mine, theirs in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(_full(mine.grad), theirs.grad)


def test_a_plain_tensor_for_a_stochastic_method_says_its_gradients_are_refused(megatron) -> None:
    from torch.distributed.tensor import Replicate, distribute_tensor

    net, _, x, mesh = megatron
    xd = distribute_tensor(x, mesh, [Replicate()])
    with pytest.raises(TypeError, match=r"full_tensor\(\).*gradients are refused") as named:
        torchdiv.divergence(net, xd, method="hutchinson", num_probes=2)
    assert "ColwiseParallel" in str(named.value)
    with pytest.raises(UndifferentiableBackward, match=r"DTensor\.from_local"):
        _backward(torchdiv.divergence(net, xd.full_tensor(), method="hutchinson", num_probes=2))


@pytest.mark.parametrize("plain_x", [False, True])
def test_the_recording_methods_name_no_plain_x_for_a_dtensor(megatron, plain_x) -> None:
    """``"structured"`` and ``"taylor"`` refuse the DTensors that tensor-parallel modules
    make from any ``x``: their error named ``x.as_subclass(torch.Tensor)``, which refuses the
    same; ``method='auto'``, which it names too, runs."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    net, plain, x, mesh = megatron
    x_in = x if plain_x else distribute_tensor(x, mesh, [Replicate()])
    for call in (
        lambda z: torchdiv.divergence(net, z, method="structured"),
        lambda z: torchdiv.laplacian(net, z, method="taylor"),
    ):
        with pytest.raises(NotImplementedError, match="subclass DTensor") as refused:
            call(x_in)
        assert "as_subclass" not in str(refused.value)
        assert "method='auto'" in str(refused.value)
    want = torchdiv.divergence(plain, x, method="reverse")
    torch.testing.assert_close(_full(torchdiv.divergence(net, x_in, method="auto")), want)
