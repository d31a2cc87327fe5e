"""rev-merges22a: adversarial review of lapcall22's forward Laplacian along a chain graph
(``_laplacian.chain``), which ``"auto"``'s remembered loop runs instead of its backward passes:
graphs it must refuse (the loop then runs) and chains it must get right, against float64
grad-of-grad loops."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, laplacians_by_grad_of_grad

import torchdiv

f64 = torch.float64


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_first_weight_is_left_to_the_loop(laplacian_chained, layout):
    """``torch.mm(x, S)`` with a sparse ``S`` (a sparse input projection): the chain's first
    rows would be ``S``'s, sparse, which no activation's rule takes (``tanh_backward`` raised
    NotImplementedError on COO, CSR "no is_contiguous"; the loop runs it)."""
    torch.manual_seed(0)
    dense = torch.randn(2, 8, dtype=f64)
    dense[0, :3] = 0
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    head = torch.randn(8, 1, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.mm(z, sparse)) @ head

    x = torch.randn(6, 2, dtype=f64)
    want = laplacians_by_grad_of_grad(lambda z: torch.tanh(z @ dense) @ head, x)
    for _ in range(3):  # decided (the Taylor engine from its recording), then remembered
        assert_close(torchdiv.laplacian(f, x), want)
    assert laplacian_chained == [False, False]


class _InPlace(torch.nn.Module):
    """An MLP whose activations run in place (``nn.ReLU(inplace=True)``'s way), the same
    ``Linear`` twice (tied weights) and a LeakyReLU of slope above 1."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 2, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inner(z).tanh_()
        h = torch.nn.functional.leaky_relu(self.inner(h), 2.5).sigmoid_()
        return self.head(h)


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
def test_in_place_activations_and_tied_weights_take_the_chain(laplacian_chained, train):
    """In-place tanh_/sigmoid_ (nodes saving their result), one ``Linear`` used twice and a
    LeakyReLU slope of 2.5: the chain, with the loop's values and parameter gradients."""
    torch.manual_seed(0)
    net = _InPlace().to(f64).requires_grad_(train)
    x = torch.randn(5, 3, dtype=f64)
    torchdiv.laplacian(net, x)  # the deciding call (the Taylor engine)
    got = torchdiv.laplacian(net, x)
    assert laplacian_chained == [True]
    want = laplacians_by_grad_of_grad(net, x)
    assert_close(got, want)
    if train:
        params = list(net.parameters())
        weights = torch.randn_like(want)
        ours = torch.autograd.grad((got * weights).sum(), params)
        theirs = torch.autograd.grad((want * weights).sum(), params)
        for a, b in zip(ours, theirs, strict=True):
            assert_close(a, b)


@pytest.mark.parametrize(
    "activation", [torch.nn.ReLU, lambda: torch.nn.LeakyReLU(0.1)], ids=["relu", "leaky-relu"]
)
def test_a_piecewise_linear_chain_is_told_before_its_block_is_computed(
    laplacian_chained, monkeypatch, activation
):
    """A ReLU (LeakyReLU) MLP: Laplacian 0, its graph the loop's, so the chain gives way; it
    computed the whole ``(n + 1, N, h)`` block first and threw it away (~70 us a call at
    D = 2, 2-64-64-1, batch 256: 10% of the loop's call)."""
    from torchdiv._laplacian import chain

    blocks: list[int] = []
    forward_laplacian = chain._forward_laplacian

    def spy(*args):
        blocks.append(1)
        return forward_laplacian(*args)

    monkeypatch.setattr(chain, "_forward_laplacian", spy)
    torch.manual_seed(0)
    act = activation()
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 8), act, torch.nn.Linear(8, 8), act, torch.nn.Linear(8, 1)
    ).to(f64)
    x = torch.randn(6, 2, dtype=f64)
    torchdiv.laplacian(net, x)  # the deciding call (the Taylor engine)
    got = torchdiv.laplacian(net, x)
    assert laplacian_chained == [False]
    assert not blocks
    assert_close(got, laplacians_by_grad_of_grad(net, x))
