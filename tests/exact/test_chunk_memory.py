"""``chunk_size`` bounds the memory of exact divergences and Jacobian diagonals.

Peak tensor memory of one call is read from the profiler's allocation events
(``torchdiv._bench.memory.peak_memory_mb``: exact byte counts, deterministic on the CPU). The
whole per-sample Jacobian of ``f`` is ``N n²`` elements; with ``chunk_size=k`` at most ``k``
products are in flight, ``k N max(n, h)`` elements a block, so the peak must stay well below
``N n²``. A diagonal that kept a view into each chunk's ``(k, N, n)`` block held every block
until the end: ``N n²`` elements, the whole Jacobian.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
from torchdiv._bench.memory import peak_memory_mb

N, D, H, CHUNK = 8, 128, 16, 8


@pytest.mark.parametrize("method", ["forward", "reverse"])
@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_chunk_size_bounds_the_peak_memory(op, method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, D))
    net = net.double().requires_grad_(False)
    x = torch.randn(N, D, dtype=torch.float64)
    call = getattr(torchdiv, op)
    peak = peak_memory_mb(lambda: call(net, x, method=method, chunk_size=CHUNK))
    whole = N * D * D * 8 / 2**20  # every sample's Jacobian: 1 MiB, 16 chunks' blocks
    block = CHUNK * N * D * 8 / 2**20  # one chunk's products: 1/16 MiB
    assert peak < 8 * block, (peak, whole)  # measured: 5.6 blocks forward, 3.4 reverse


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_chunked_jacobian_peaks_near_its_own_size(method):
    """The Jacobian's blocks were kept in a list and concatenated at the end: two copies of
    the whole ``(N, m, n)`` Jacobian at once whatever ``chunk_size`` (measured 2.0-2.2x its
    size, image events and flat ones). Written into the result block by block, the peak is
    the result plus one chunk's working set."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, D))
    net = net.double().requires_grad_(False)
    x = torch.randn(N, D, dtype=torch.float64)
    peak = peak_memory_mb(lambda: torchdiv.jacobian(net, x, method=method, chunk_size=CHUNK))
    whole = N * D * D * 8 / 2**20  # the result: 1 MiB
    block = CHUNK * N * D * 8 / 2**20  # one chunk's products: 1/16 MiB
    assert peak < whole + 8 * block, (peak, whole)  # measured: whole + 0.5-1 block


def test_chunked_graph_jacobian_peaks_near_its_own_size():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, D))
    net = net.double().requires_grad_(False)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    y = net(x)
    peak = peak_memory_mb(lambda: torchdiv.graph_jacobian(y, x, chunk_size=CHUNK))
    whole, block = N * D * D * 8 / 2**20, CHUNK * N * D * 8 / 2**20
    assert peak < whole + 8 * block, (peak, whole)


@pytest.mark.parametrize("chunk", [1, CHUNK])
@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_chunked_hutchinson_keeps_its_probes_not_every_product(op, chunk):
    """Hutchinson's terms ``v^T A v`` (and Bekas's ``v * A v``) were formed after every
    product had been computed and concatenated: three tensors of all ``m`` probes' size at once
    (probes, products, their elementwise product) whatever ``chunk_size``. Formed chunk by chunk,
    the peak is the probes plus one chunk's products."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, D))
    net = net.double().requires_grad_(False)
    x = torch.randn(N, D, dtype=torch.float64)
    probes = 64
    call = getattr(torchdiv, op)

    def estimate():
        return call(net, x, method="hutchinson", num_probes=probes, chunk_size=chunk)

    peak = peak_memory_mb(estimate)
    drawn = probes * N * D * 8 / 2**20  # every probe: 1/2 MiB; the products as much again
    assert peak < 1.5 * drawn, (peak, drawn)  # measured: 3.0x before, 1.15-1.3x after


@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_chunked_hutchinson_values_and_parameter_gradients(op, chunk):
    """The terms formed chunk by chunk are the unchunked estimator's: with given probes ``V``,
    ``mean_k v_k^T J v_k`` (divergence) and ``mean_k v_k * J^T v_k`` (diagonal; ``J^T v`` the
    reverse-mode form ``"auto"`` takes here) per sample, ``J`` by a row-by-row
    ``autograd.grad`` loop with ``create_graph``; values and the parameter gradient of a loss
    on them, float64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))
    net = net.double()
    x = torch.randn(4, 5, dtype=torch.float64)
    v = torch.randint(0, 2, (6, 4, 5), dtype=torch.float64) * 2 - 1
    z = x.clone().requires_grad_(True)
    y = net(z)
    rows = [torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0] for i in range(5)]
    jac = torch.stack(rows, 1)  # (N, out, in)
    if op == "divergence":
        want = torch.einsum("kbi,bij,kbj->b", v, jac, v) / 6
    else:
        want = (v * torch.einsum("kbi,bij->kbj", v, jac)).mean(0)
    got = getattr(torchdiv, op)(net, x, method="hutchinson", probes=v, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [net[0].weight, net[0].bias, net[2].weight]  # (the last bias: no part of J)
    weights = torch.randn_like(want)
    expected = torch.autograd.grad((want * weights).sum(), params)
    for g, e in zip(torch.autograd.grad((got * weights).sum(), params), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_a_diagonal_holds_no_more_than_its_own_elements(method):
    """A diagonal computed in one chunk was a view of that chunk's ``(n, N, n)`` block of
    products: the result kept all of it alive (and ``torch.save`` wrote it), ``n = 128``
    times its own size. Its storage is now its own."""
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, D))
    net = net.double().requires_grad_(False)
    x = torch.randn(N, D, dtype=torch.float64)
    diag = torchdiv.jacobian_diagonal(net, x, method=method)
    assert diag.untyped_storage().nbytes() == diag.numel() * diag.element_size()
