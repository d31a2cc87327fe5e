"""Attention as set transformers write it (``nn.MultiheadAttention`` with boolean masks) in
the recording engines, against a per-sample loop of backward passes over plain autograd.

``nn.MultiheadAttention`` turns a boolean ``attn_mask`` or ``key_padding_mask`` into an
additive one by ``torch.zeros_like(mask, dtype=d).masked_fill_(mask, -inf)``. Under the
recorder PyTorch hands ``f`` a ``detach`` of the zeros it recorded, so the write looked like
one to a tensor read before: ``"structured"`` and ``"taylor"`` refused every masked attention
(``"auto"`` fell back to the generic engines). The reference takes ``need_weights=True``,
PyTorch's ``bmm`` and ``softmax`` path, which has no fused kernel.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv

f64 = torch.float64
B, N, D = 3, 4, 4


class _SetBlock(torch.nn.Module):
    """A set transformer's self-attention block (Lee et al.) without layer norms, whose
    third derivatives the reference would take through PyTorch's fused kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(D, 2, batch_first=True)
        self.out = torch.nn.Linear(D, D)

    def forward(
        self, x: torch.Tensor, mask: dict[str, torch.Tensor], weights: bool
    ) -> torch.Tensor:
        h = x + self.attention(x, x, x, need_weights=weights, **mask)[0]
        return h + torch.tanh(self.out(h))


def _masks() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    attn_mask = torch.rand(N, N, generator=generator) < 0.4  # True: not attended
    attn_mask.fill_diagonal_(False)
    padding = torch.zeros(B, N, dtype=torch.bool)
    padding[0, -1] = padding[2, -2:] = True
    return {"attn_mask": attn_mask, "key_padding_mask": padding}


def _per_sample(mask: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    return {k: v[b : b + 1] if k == "key_padding_mask" else v for k, v in mask.items()}


def _loop(g, x: torch.Tensor, order: int) -> torch.Tensor:
    """Per sample ``b``: the divergence (``order=1``) of ``g(z, b)`` or the Laplacian
    (``order=2``) of its sum, by one backward pass per input element and order."""
    out = []
    for b in range(len(x)):
        z = x[b : b + 1].detach().requires_grad_(True)
        y = g(z, b).reshape(-1)
        if order == 2:
            (y,) = torch.autograd.grad(y.sum(), z, create_graph=True)
            y = y.reshape(-1)
        total = 0
        for i in range(y.numel()):
            (row,) = torch.autograd.grad(y[i], z, create_graph=True)
            total = total + row.reshape(-1)[i]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("masks", "order"),
    [
        (("attn_mask",), 1),
        (("key_padding_mask",), 1),
        (("attn_mask", "key_padding_mask"), 1),
        (("attn_mask", "key_padding_mask"), 2),  # (~2.5 s: the loop's third derivatives)
    ],
    ids=["attn_mask", "key_padding_mask", "both", "both-laplacian"],
)
def test_boolean_masks_of_multihead_attention_are_recorded(masks, order):
    """Divergence (``"structured"``) and Laplacian (``"taylor"``) of a masked attention block
    and their parameter gradients (a second and a third derivative) against the loop."""
    torch.manual_seed(0)
    block = _SetBlock().double()
    mask = {k: v for k, v in _masks().items() if k in masks}
    x = torch.randn(B, N, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0.5, -1.0, 2.0], dtype=f64)
    params = list(block.parameters())

    def g(z: torch.Tensor, m: dict[str, torch.Tensor], weights: bool) -> torch.Tensor:
        y = block(z, m, weights)
        return y if order == 1 else y.square().sum((1, 2))

    if order == 1:
        got = torchdiv.divergence(lambda z: g(z, mask, False), x, method="structured")
    else:
        got = torchdiv.laplacian(lambda z: g(z, mask, False), x, method="taylor")
    want = _loop(lambda z, b: g(z, _per_sample(mask, b), True), x, order)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got_grads = torch.autograd.grad((c * got).sum(), params)
    want_grads = torch.autograd.grad((c * want).sum(), params)
    for a, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_constants_written_in_place_inside_f():
    """A constant ``f`` allocates and writes in place is recorded; so is a tensor sharing its
    memory read after the write (refused until rev-leftovers14: a replay gave it its old
    values; now the recording reads a copy of its values there)."""
    x = torch.randn(2, 3, dtype=f64, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([True, False, True])

    def masked(z):  # the pattern of nn.MultiheadAttention's boolean masks
        return z * z + torch.zeros(3, dtype=z.dtype).masked_fill_(keep, -1.0) * z

    def stale(z):  # a.detach() written, a read after: both hold ones
        a = torch.zeros(3, dtype=z.dtype)
        b = a.detach()
        b.add_(1.0)
        return z * z * a + z * b

    want = (2 * x - keep.to(f64)).sum(1)
    for method in ("structured", "auto"):
        torch.testing.assert_close(torchdiv.divergence(masked, x, method=method), want)
    torch.testing.assert_close(
        torchdiv.laplacian(lambda z: masked(z).sum(1), x, method="taylor"),
        torch.full((2,), 6.0, dtype=f64),
    )
    for method in ("auto", "structured"):
        torch.testing.assert_close(torchdiv.divergence(stale, x, method=method), (2 * x + 1).sum(1))
    torch.testing.assert_close(
        torchdiv.laplacian(lambda z: stale(z).sum(1), x, method="taylor"),
        torch.full((2,), 6.0, dtype=f64),
    )


def test_graph_laplacian_through_fused_attention_names_the_way_out():
    """PyTorch's fused CPU kernel (the default backend of ``scaled_dot_product_attention``)
    has no second derivative: ``graph_laplacian`` said the graph "cannot be walked twice";
    it names the kernel and the math backend now, whose graph gives the loop's Laplacian."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    weight = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(4)) / 2
    x = torch.randn(B, N, D, dtype=f64, generator=torch.Generator().manual_seed(5))

    def energy(z, plain=False):
        h = (z @ weight).unsqueeze(1)
        if plain:  # the reference: softmax(h h^T / sqrt(D)) h by plain ops
            a = torch.softmax(h @ h.transpose(-1, -2) / D**0.5, -1) @ h
        else:
            a = torch.nn.functional.scaled_dot_product_attention(h, h, h)
        return a.square().sum((1, 2, 3))

    z = x.clone().requires_grad_(True)
    with pytest.raises(NotImplementedError, match=r"graph_laplacian: .*fused attention.*MATH"):
        torchdiv.graph_laplacian(energy(z), z)
    with sdpa_kernel([SDPBackend.MATH]):
        y = energy(z)
    want = _loop(lambda s, b: energy(s, plain=True), x, 2)
    torch.testing.assert_close(torchdiv.graph_laplacian(y, z), want, rtol=1e-10, atol=1e-10)


def _packed(weight: torch.Tensor, mask: torch.Tensor):
    """All samples' tokens in one sequence (PyG-style batching), attention under ``mask``."""

    def f(z):
        h = (z @ weight).reshape(1, B * N, D)
        y = torch.nn.functional.scaled_dot_product_attention(h, h, h, attn_mask=mask)
        return y.reshape(B, N, D)

    return f


def test_packed_attention_with_a_block_diagonal_mask_is_per_sample():
    """A mask keeping each token within its sample (``batch[:, None] == batch[None, :]``,
    boolean or additive) was refused as a softmax over samples (the watch did not read the
    mask): its weights across samples are exactly 0, which the watch now reads once per
    call; the divergence, the Laplacian and their weight gradients are the per-sample
    attention's (float64), also through ``nn.MultiheadAttention`` over the packed tokens."""
    weight = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(6)) / 2
    weight.requires_grad_(True)
    x = torch.randn(B, N, D, dtype=f64, generator=torch.Generator().manual_seed(7))
    batch = torch.arange(B).repeat_interleave(N)
    block = batch[:, None] == batch[None, :]
    additive = torch.zeros(B * N, B * N, dtype=f64).masked_fill(~block, float("-inf"))

    def plain(z, b):  # one sample's attention by plain ops
        h = z @ weight
        return torch.softmax(h @ h.transpose(-1, -2) / D**0.5, -1) @ h

    want, want_laplacian = _loop(plain, x, 1), _loop(plain, x, 2)
    for mask in (block, additive):
        f = _packed(weight, mask)
        for method in ("auto", "structured"):
            got = torchdiv.divergence(f, x, method=method)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            assert_same_parameter_gradients(weight, got.square().sum(), want.square().sum())
        for method in ("auto", "taylor"):
            got = torchdiv.laplacian(lambda z, f=f: f(z).sum((1, 2)), x, method=method)
            torch.testing.assert_close(got, want_laplacian, rtol=1e-10, atol=1e-10)
            assert_same_parameter_gradients(
                weight, got.square().sum(), want_laplacian.square().sum()
            )
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(D, 2, batch_first=True).double()

    def packed(z):
        tokens = z.reshape(1, B * N, D)
        return attention(tokens, tokens, tokens, attn_mask=~block, need_weights=False)[0]

    alone = _loop(lambda z, b: attention(z, z, z, need_weights=False)[0], x, 1)
    got = torchdiv.divergence(lambda z: packed(z).reshape(B, N, D), x)
    torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)


def assert_same_parameter_gradients(weight, ours, reference) -> None:
    (got,) = torch.autograd.grad(ours, weight, retain_graph=True)
    (want,) = torch.autograd.grad(reference, weight, retain_graph=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["boolean", "additive"])
def test_packed_attention_with_one_cross_sample_entry_is_refused(kind):
    """One entry letting a token of sample 0 attend to one of sample 1 mixes them: refused
    by every watched method, also after the same function over a block-diagonal mask passed
    (the verdict holds for the mask's values: another mask is watched again)."""
    weight = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(6)) / 2
    x = torch.randn(B, N, D, dtype=f64, generator=torch.Generator().manual_seed(7))
    batch = torch.arange(B).repeat_interleave(N)
    block = batch[:, None] == batch[None, :]
    leak = block.clone()
    leak[0, N] = True
    if kind == "additive":
        block, leak = (
            torch.zeros(B * N, B * N, dtype=f64).masked_fill(~m, float("-inf"))
            for m in (block, leak)
        )
    torchdiv.divergence(_packed(weight, block), x)
    for method, probes in (("auto", None), ("structured", None), ("hutchinson", 2)):
        with pytest.raises(torchdiv.BatchInteractionError, match="softmax over samples"):
            torchdiv.divergence(_packed(weight, leak), x, method=method, num_probes=probes)
    with pytest.raises(torchdiv.BatchInteractionError, match="softmax over samples"):
        torchdiv.laplacian(lambda z: _packed(weight, leak)(z).sum((1, 2)), x)


def test_transformer_layer_inside_autocast_in_the_engines_of_backward_passes():
    """``nn.TransformerEncoderLayer`` (``need_weights=False``: PyTorch's attention) inside
    ``torch.autocast(dtype=torch.bfloat16)``: ``"reverse"`` and the Hessian Laplacian raised
    "expected scalar type BFloat16 but found Float" (the math backend below
    ``torch.func.vjp``). Against a backward pass per element of plain autograd under the
    same autocast; bfloat16 (eps 2^-8 = 3.9e-3) rounds the batch and the per-element
    evaluations differently: rtol 3e-2 (as ``test_autoregressive_flows``)."""
    from conftest import loop_diagonal
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))

    def f(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(z)
        return out.float()

    def energy(z: torch.Tensor) -> torch.Tensor:
        return f(z).square().sum((1, 2))

    def force(z: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]

    params = list(layer.parameters())
    with sdpa_kernel([SDPBackend.MATH]):
        divergence = loop_diagonal(f, x, create_graph=True).sum((1, 2))
        laplacian = loop_diagonal(force, x).sum((1, 2))
        want = torch.autograd.grad(divergence.sum(), params, allow_unused=True)
    got = torchdiv.divergence(f, x, method="reverse")
    torch.testing.assert_close(got, divergence, rtol=3e-2, atol=3e-2)
    grads = torch.autograd.grad(got.sum(), params, allow_unused=True)
    for p, a, b in zip(params, grads, want, strict=True):  # (the last norm's bias: unused)
        a, b = (torch.zeros_like(p) if g is None else g for g in (a, b))
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item() + 1e-6)
    got = torchdiv.laplacian(energy, x, method="hessian")
    torch.testing.assert_close(got, laplacian, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "write", ["add_", "item", "through a view", "data replaced", "through the storage"]
)
def test_packed_attention_weights_written_in_place_after_the_softmax_are_refused(write):
    """Weights marked exactly 0 across samples at the softmax, then copied (``clone``, which
    keeps the mark) and written in place (a constant bias added, an item set, a view
    written; ``w.data`` replaced, which keeps the version; the storage written, which keeps
    version and address): the write puts values across samples, and ``"auto"`` gave them
    (13% off the per-sample divergence for the bias; 10% for the last two) until the mark held
    the version it was read at and the product read the zeros again."""
    weight = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(6)) / 2
    x = torch.randn(B, N, D, dtype=f64, generator=torch.Generator().manual_seed(7))
    batch = torch.arange(B).repeat_interleave(N)
    mask = torch.zeros(B * N, B * N, dtype=f64).masked_fill(
        batch[:, None] != batch[None, :], float("-inf")
    )
    bias = torch.full((B * N, B * N), 0.1, dtype=f64)

    def f(z):
        h = (z @ weight).reshape(B * N, D)
        w = torch.softmax(h @ h.T / D**0.5 + mask, -1).clone()
        if write == "add_":
            w.add_(bias)
        elif write == "item":
            w[0, N] = 0.5
        elif write == "data replaced":
            w.data = (w + bias).data
        elif write == "through the storage":
            w.untyped_storage().copy_((w + bias).detach().untyped_storage())
        else:
            w.view(-1).add_(0.01)
        return (w @ h).reshape(B, N, D)

    for method in ("auto", "structured"):
        with pytest.raises(torchdiv.BatchInteractionError, match="summing over samples"):
            torchdiv.divergence(f, x, method=method)
