"""laplacian: every Taylor rule alone and in real networks, against torch.func and closed forms."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    Cube,
    Stateful,
    assert_close,
    assert_one_state,
    laplacian_by_grad_of_grad,
    loop_diagonal,
    one_state,
    reference_laplacian,
    tanh_mlp,
)
from torch import nn
from torch.func import hessian
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import torchdiv
from torchdiv._core.modes import SafeDerivatives

EXACT = ["auto", "taylor", "forward-over-reverse", "hessian"]
f64 = torch.float64


_MIXING = torch.randn(4, 5, generator=torch.Generator().manual_seed(7), dtype=f64) / 2


def _inner(x: torch.Tensor) -> torch.Tensor:
    """A fixed affine map of a 3- or 4-element event to 5 features: every rule sees mixed
    inputs (a non-diagonal Hessian)."""
    return x @ _MIXING[: x.shape[-1]].to(x.dtype) + 0.3


# Each rule alone: u(x) = sum(w * op(inner(x))), samples in rows.
UNARY = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "softplus": F.softplus,
    "softplus_beta": lambda z: F.softplus(z, beta=3.0, threshold=1.0),
    "elu": F.elu,
    "selu": F.selu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.2),
    "hardtanh": lambda z: F.hardtanh(z, -0.5, 0.5),
    "clamp": lambda z: z.clamp(min=-0.2),
    "sin": torch.sin,
    "cos": torch.cos,
    "exp": torch.exp,
    "expm1": torch.expm1,
    "log": lambda z: torch.log(z.square() + 1),
    "log1p": lambda z: torch.log1p(z.square()),
    "sqrt": lambda z: torch.sqrt(z.square() + 1),
    "rsqrt": lambda z: torch.rsqrt(z.square() + 1),
    "reciprocal": lambda z: 1 / (z.square() + 1),
    "pow3": lambda z: z**3,
    "pow_half": lambda z: (z.square() + 1) ** 0.5,
    "pow0": lambda z: z**0,
    "pow1": lambda z: z**1,
    "square": torch.square,
    "erf": torch.erf,
    "abs": torch.abs,
    "neg": torch.neg,
    "softmax": lambda z: torch.softmax(z, -1),
    "log_softmax": lambda z: torch.log_softmax(z, -1),
}

STRUCTURAL = {
    "mul_jets": lambda z: z * z.flip(-1),
    "div_jets": lambda z: z / (z.square() + 2),
    "div_const": lambda z: z / torch.arange(1.0, 6.0, dtype=z.dtype),
    "rsub": lambda z: 1 - z**2,
    "sub_jets": lambda z: torch.tanh(z) - z**2,
    "cat_stack": lambda z: torch.cat([z**2, torch.stack([z[:, 0], z[:, 1] ** 3], -1)], -1),
    "cat_const": lambda z: torch.cat([z**2, torch.ones_like(z)], -1),
    "slice_select": lambda z: z[:, 1:4] ** 2 * z[:, 0:1] + z.select(1, 2)[:, None] ** 3,
    "split_unbind": lambda z: (
        sum(p.sum(-1) ** 2 for p in z.split(2, -1))[:, None]
        + torch.stack([t**3 for t in z.unbind(-1)], -1)
    ),
    "permute_reshape": lambda z: (z[:, :4].reshape(-1, 2, 2).transpose(1, 2) ** 2).flatten(1),
    "einsum": lambda z: torch.einsum("bi,bj->bij", z, torch.tanh(z)).flatten(1),
    "matmul_jets": lambda z: (z[:, :4].reshape(-1, 2, 2) @ z[:, 1:].reshape(-1, 2, 2)).flatten(1),
    "mean_sum": lambda z: torch.tanh(z).mean(-1, keepdim=True) * z.sum(-1, keepdim=True),
    "where": lambda z: torch.where(z > 0.3, z**2, torch.sin(z)),
    "layer_norm": lambda z: F.layer_norm(z, (5,)),
    "rms_like": lambda z: z * torch.rsqrt(z.square().mean(-1, keepdim=True) + 1e-3),
    "expand": lambda z: (z[:, :1].expand(-1, 3) ** 2 + z[:, 1:4]).pow(2),
    "pad_roll": lambda z: F.pad(z**2, (1, 2)).roll(1, -1),
    "detach": lambda z: z**2 * z.detach(),
    "var_mean": lambda z: (
        torch.var_mean(z, -1, keepdim=True)[0] * z + torch.var(z, -1, correction=0)[:, None] ** 2
    ),
    "std": lambda z: torch.std(z, -1, keepdim=True) * z,
    "vector_norm": lambda z: torch.linalg.vector_norm(z, dim=-1, keepdim=True) * z,
    "max_min": lambda z: torch.maximum(z, z.flip(-1) ** 2) + torch.minimum(z.sin(), z),
    "max_dim_amax": lambda z: z.max(-1, keepdim=True).values * z + z.amax(-1)[:, None] ** 2,
    "cumsum_index_gather": lambda z: (
        z.cumsum(-1) ** 2
        + z[:, [4, 0, 2, 2, 1]] * z.gather(1, torch.tensor([[1, 0, 3, 3, 2]]).expand(len(z), 5))
    ),
    "tan_atan": lambda z: torch.tan(0.3 * z) + torch.atan(z),
    "hyperbolic": lambda z: torch.sinh(z) * torch.cosh(0.5 * z) + torch.asinh(z),
    "logs_exps": lambda z: torch.log2(z.square() + 1) + torch.log10(z.square() + 2) + torch.exp2(z),
    "scalar_pow": lambda z: 3.0**z,
    "erfc": torch.erfc,
    "piecewise": lambda z: torch.floor(3 * z) * z + torch.sign(z) * z**2 + torch.fmod(z, 0.7) ** 2,
    "to_copy": lambda z: torch.ops.aten._to_copy(z, dtype=z.dtype) ** 3,
}


def _scalar(op):
    def u(x: torch.Tensor) -> torch.Tensor:
        z = op(_inner(x))
        w = torch.linspace(-1, 1, z[0].numel(), dtype=x.dtype)
        return (z.reshape(len(z), -1) * w).sum(-1)

    return u


@pytest.mark.parametrize("name", sorted(UNARY) + sorted(STRUCTURAL))
def test_each_rule_alone_matches_torch_func(name):
    u = _scalar({**UNARY, **STRUCTURAL}[name])
    x = torch.randn(4, 3, dtype=f64)
    assert_close(torchdiv.laplacian(u, x, method="taylor"), reference_laplacian(u, x))


@pytest.mark.parametrize("name", ["tanh", "softmax", "layer_norm", "matmul_jets", "div_jets"])
def test_vector_output_gives_one_laplacian_per_component(name):
    op = {**UNARY, **STRUCTURAL}[name]
    f = lambda x: op(_inner(x)).reshape(len(x), -1, 1)  # noqa: E731
    x = torch.randn(3, 4, dtype=f64)
    expected = reference_laplacian(f, x)
    for method in EXACT:
        assert_close(torchdiv.laplacian(f, x, method=method), expected)


class Attention(nn.Module):
    """Pre-norm self-attention over 4 tokens of width 6, then a tanh head to a scalar."""

    def __init__(self):
        super().__init__()
        self.norm, self.qkv, self.head = nn.LayerNorm(6), nn.Linear(6, 18), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.reshape(len(x), 4, 6))
        q, k, v = self.qkv(h).reshape(len(x), 4, 3, 2, 3).permute(2, 0, 3, 1, 4)
        mask = torch.ones(4, 4, dtype=torch.bool).tril()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = a.transpose(1, 2).reshape(len(x), 4, 6) + h
        return self.head(torch.tanh(out)).sum((1, 2))


class Residual(nn.Module):
    def __init__(self, d: int = 5):
        super().__init__()
        self.inner = tanh_mlp(d, 8, d)

    def forward(self, x):
        return (x + self.inner(x)).square().sum(-1)


def _batch_norm_net() -> nn.Module:  # images in eval mode: BatchNorm uses running statistics
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, 1),
    )
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def _conv_net() -> nn.Module:  # images (B, 2, 6, 6) -> scalar
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.SiLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 1),
    )


def _conv1d_net() -> nn.Module:  # (B, 2, 7) -> (B, 3): vector output
    return nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Tanh(), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(6, 3)
    )


NETS = {
    "mlp_tanh": (lambda: tanh_mlp(4, 8, 1), (3, 4)),
    "mlp_deep_gelu": (
        lambda: nn.Sequential(
            *[m for _ in range(3) for m in (nn.LazyLinear(6), nn.GELU())], nn.Linear(6, 1)
        ),
        (3, 4),
    ),
    "residual": (Residual, (3, 5)),
    "layer_norm_softmax": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Softmax(-1), nn.Linear(6, 2)),
        (3, 4),
    ),
    "attention": (Attention, (2, 24)),
    "conv2d": (_conv_net, (2, 2, 6, 6)),
    "conv1d": (_conv1d_net, (3, 2, 7)),
    "batch_norm_eval": (_batch_norm_net, (2, 2, 6, 6)),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_networks_match_torch_func_in_float64(name):
    build, shape = NETS[name]
    torch.manual_seed(0)
    net = build().to(f64)
    x = torch.randn(*shape, dtype=f64)
    net(x)  # initialise lazy modules
    expected = reference_laplacian(net, x)
    for method in EXACT:
        assert_close(torchdiv.laplacian(net, x, method=method), expected)


@pytest.mark.parametrize("name", ["mlp_tanh", "conv2d", "attention"])
def test_float32_within_float32_tolerance(name):
    build, shape = NETS[name]
    net = build()
    x = torch.randn(*shape)
    expected = reference_laplacian(net.to(f64), x.to(f64)).float()
    net.float()
    # second derivatives of float32 networks: a few hundred terms each rounded at 6e-8
    torch.testing.assert_close(torchdiv.laplacian(net, x), expected, rtol=1e-4, atol=1e-4)
    assert torchdiv.laplacian(net, x).dtype == torch.float32


def test_closed_forms():
    x = torch.randn(6, 3, dtype=f64)
    u = lambda x: torch.sin(x[:, 0]) * x[:, 1] ** 2  # noqa: E731
    assert_close(torchdiv.laplacian(u, x), torch.sin(x[:, 0]) * (2 - x[:, 1] ** 2))
    harmonic = lambda x: x[:, 0] ** 2 - x[:, 1] ** 2 + x[:, 0] * x[:, 2]  # noqa: E731
    assert_close(torchdiv.laplacian(harmonic, x), torch.zeros(6, dtype=f64))
    a = torch.tensor([0.5, -1.0, 2.0], dtype=f64)
    plane_wave = lambda x: torch.exp(x @ a)  # noqa: E731
    assert_close(torchdiv.laplacian(plane_wave, x), a.square().sum() * torch.exp(x @ a))
    norm2 = lambda x: x.square().sum(-1)  # noqa: E731
    assert_close(torchdiv.laplacian(norm2, x), torch.full((6,), 6.0, dtype=f64))


@pytest.mark.parametrize("batch_dims", [0, 1, 2])
@pytest.mark.parametrize("method", EXACT)
def test_batch_dims(batch_dims, method):
    shape = [(3, 4), (2, 3, 4), (2, 2, 3, 4)][batch_dims]
    x = torch.randn(shape, dtype=f64)
    u = lambda x: (torch.tanh(x) * x.flip(-1)).sum((-2, -1))  # noqa: E731
    expected = reference_laplacian(u, x, batch_dims)
    assert_close(torchdiv.laplacian(u, x, batch_dims=batch_dims, method=method), expected)


def test_closure_over_per_sample_tensors():
    t = torch.linspace(0.5, 2.0, 4, dtype=f64)
    x = torch.randn(4, 3, dtype=f64)
    u = lambda x: torch.sin(t * x[:, 0]) * x[:, 1] ** 2  # noqa: E731
    expected = torch.sin(t * x[:, 0]) * (2 - (t * x[:, 1]) ** 2)
    for method in EXACT:
        assert_close(torchdiv.laplacian(u, x, method=method), expected)


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_size_does_not_change_the_result(method, chunk_size):
    net = tanh_mlp(7, 9, 2)
    x = torch.randn(3, 7, dtype=f64)
    expected = reference_laplacian(net, x)
    assert_close(torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("method", EXACT)
def test_gradients_wrt_parameters_and_x_match_torch_func(method):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 1))
    net = net.to(f64)
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    params = list(net.parameters())
    loss = torchdiv.laplacian(net, x, method=method).square().sum()
    got = torch.autograd.grad(loss, [x, *params], materialize_grads=True)
    ref = reference_laplacian(net, x).square().sum()
    expected = torch.autograd.grad(ref, [x, *params], materialize_grads=True)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


def test_results_are_exact_under_no_grad_and_inference_mode():
    net = tanh_mlp(3, 5, 1)
    x = torch.randn(4, 3, dtype=f64)
    expected = reference_laplacian(net, x)
    with torch.no_grad():
        for method in EXACT:
            assert_close(torchdiv.laplacian(net, x, method=method), expected)
    with torch.inference_mode():
        assert_close(torchdiv.laplacian(net, x), expected)


@pytest.mark.parametrize("activation", [nn.SiLU, nn.Mish])
def test_nested_methods_under_no_grad_through_silu_and_mish(activation: type[nn.Module]):
    """The JVP of ``silu_backward`` (``mish_backward``) has no forward-mode formula of its own:
    under the caller's ``no_grad`` the explicit ``"forward-over-reverse"``/``"hessian"`` and
    ``value_grad_laplacian``'s raised PyTorch's "Trying to use forward AD with
    aten::silu_backward" (grad mode on: right). Now the grad-mode values, no graph."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), activation(), nn.Linear(6, 1)).to(f64)
    x = torch.randn(4, 3, dtype=f64)
    expected = reference_laplacian(net, x).detach()
    for method in EXACT:
        with torch.no_grad():
            got = torchdiv.laplacian(net, x, method=method)
        assert_close(got, expected)
        assert not got.requires_grad
    with torch.no_grad():
        got = torchdiv.value_grad_laplacian(net, x, method="forward-over-reverse")
    assert_close(got.laplacian, expected)
    assert not got.laplacian.requires_grad and not got.gradient.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_degenerate_inputs():
    x = torch.randn(3, 4, dtype=f64)
    for method in EXACT:
        constant = torchdiv.laplacian(lambda x: torch.ones(3, 2, dtype=f64), x, method=method)
        assert torch.equal(constant, torch.zeros(3, 2, dtype=f64))
        linear = torchdiv.laplacian(lambda x: x @ torch.ones(4, 2, dtype=f64), x, method=method)
        assert torch.equal(linear, torch.zeros(3, 2, dtype=f64))
        one = torch.randn(5, 1, dtype=f64)
        assert_close(torchdiv.laplacian(lambda x: x.sin(), one, method=method), -one.sin())


def test_unsupported_op_auto_falls_back_and_taylor_names_it():
    u = lambda x: torch.special.digamma(torch.lgamma(x.square() + 1) + 1).sum(-1)  # noqa: E731
    x = torch.randn(3, 4, dtype=f64)
    assert_close(torchdiv.laplacian(u, x), reference_laplacian(u, x))
    with pytest.raises(
        NotImplementedError,
        match=r"for aten\.digamma\.default, aten\.lgamma\.default .*method='auto'",
    ):
        torchdiv.laplacian(u, x, method="taylor")


def test_convolution_with_weights_computed_from_x_falls_back():
    def u(x):  # one unbatched sample: the image convolved with a kernel cut from itself
        weight = x[:4].reshape(1, 1, 2, 2)
        return F.conv2d(x.reshape(1, 1, 3, 3), weight).square().sum()

    x = torch.randn(9, dtype=f64)
    with pytest.raises(NotImplementedError, match="convolution"):
        torchdiv.laplacian(u, x, batch_dims=0, method="taylor")
    expected = hessian(u)(x).diagonal().sum()
    assert_close(torchdiv.laplacian(u, x, batch_dims=0), expected)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", ["taylor", "forward-over-reverse"])
def test_chunk_size_bounds_memory(method):
    net = tanh_mlp(64, 256, 1, dtype=torch.float32).requires_grad_(False)
    x = torch.randn(64, 64)
    sizes = {}
    for chunk_size in (None, 4):
        with _LargestTensor() as watch:
            torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size)
        sizes[chunk_size] = watch.largest
    # 64 directions in flight vs 4: the (directions x batch x width) tensors shrink 16x
    assert sizes[4] * 16 == sizes[None] == 64 * 64 * 256


def test_nothing_the_caller_passed_is_mutated():
    net = tanh_mlp(3, 5, 1).train()
    x = torch.randn(4, 3, dtype=f64)
    before = [p.detach().clone() for p in net.parameters()]
    snapshot = x.clone()
    for method in EXACT:
        torchdiv.laplacian(net, x, method=method)
    assert torch.equal(x, snapshot) and not x.requires_grad
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "taylr"}, ValueError, r"laplacian: unknown method 'taylr'; valid .*'taylor'"),
        ({"chunk_size": 0}, ValueError, "laplacian: chunk_size must be at least 1"),
        ({"num_probes": 4}, ValueError, "num_probes is only used by stochastic methods"),
        ({"batch_dims": 3}, ValueError, r"batch_dims must be in \[0, x.dim\(\)\]"),
        ({"generator": 1}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        torchdiv.laplacian(lambda x: x.sum(-1), torch.randn(2, 3), **kwargs)


def test_output_must_keep_the_batch_shape():
    with pytest.raises(ValueError, match="changed the batch shape"):
        torchdiv.laplacian(lambda x: x.sum(), torch.randn(2, 3))


def _per_sample_hessians(f, x: torch.Tensor) -> torch.Tensor:
    """``(N, m, n, n)`` Hessians of every output component, from ``torch.func`` per sample."""
    one = lambda z: f(z[None]).reshape(-1)  # noqa: E731
    return torch.vmap(torch.func.jacfwd(torch.func.jacrev(one)))(x)


HUTCHINSON_CASES = {
    "taylor": lambda: tanh_mlp(4, 6, 2),
    "fallback": lambda: lambda x: torch.lgamma(_inner(x).square() + 1)[:, :2],  # no rule
}


@pytest.mark.parametrize("case", sorted(HUTCHINSON_CASES))
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_hutchinson_equals_the_quadratic_forms_of_its_probes(case, chunk_size):
    f = HUTCHINSON_CASES[case]()
    x = torch.randn(3, 4, dtype=f64)
    probes = torchdiv.draw_probes(
        x, 7, probe="gaussian", generator=torch.Generator().manual_seed(0)
    )
    got = torchdiv.laplacian(f, x, method="hutchinson", probes=probes, chunk_size=chunk_size)
    h = _per_sample_hessians(f, x)  # (N, m, n, n)
    expected = torch.einsum("rbi,bmij,rbj->bm", probes, h, probes) / 7
    assert_close(got, expected)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_the_exact_variance(probe):
    f = tanh_mlp(5, 8, 1)
    x = torch.randn(4, 5, dtype=f64)
    h = _per_sample_hessians(f, x)[:, 0]  # (N, n, n), symmetric
    exact = h.diagonal(dim1=1, dim2=2).sum(-1)
    off_diagonal = h.square().sum((1, 2)) - h.diagonal(dim1=1, dim2=2).square().sum(-1)
    # Var(v^T H v): 2 ||H||_F^2 for Gaussian v, 2 (||H||_F^2 - sum_i H_ii^2) for Rademacher
    variance = 2 * (h.square().sum((1, 2)) if probe == "gaussian" else off_diagonal)
    g = torch.Generator().manual_seed(1)
    single = torch.stack(
        [
            torchdiv.laplacian(f, x, method="hutchinson", num_probes=1, probe=probe, generator=g)
            for _ in range(400)
        ]
    ).squeeze(-1)  # (400, N) one-probe estimates
    stderr = (variance / 400).sqrt()
    assert ((single.mean(0) - exact).abs() < 5 * stderr).all()
    # sample variance of 400 draws: relative spread about sqrt(2/400) plus kurtosis; 30% is wide
    torch.testing.assert_close(single.var(0), variance, rtol=0.3, atol=0)


def test_hutchinson_generator_and_probes_reproduce():
    f, x = tanh_mlp(3, 5, 1), torch.randn(4, 3, dtype=f64)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torchdiv.laplacian(f, x, method="hutchinson", num_probes=5, generator=g)

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    probes = torchdiv.draw_probes(x, 5)
    a = torchdiv.laplacian(f, x, method="hutchinson", probes=probes)
    assert torch.equal(a, torchdiv.laplacian(f, x, method="hutchinson", probes=probes))


def test_hutchinson_gradients_match_the_reference_estimate():
    net = tanh_mlp(3, 5, 1)
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    probes = torchdiv.draw_probes(x, 4, generator=torch.Generator().manual_seed(2))
    params = [x, *net.parameters()]
    got = torch.autograd.grad(
        torchdiv.laplacian(net, x, method="hutchinson", probes=probes).sum(),
        params,
        materialize_grads=True,
    )
    ref = torch.einsum("rbi,bmij,rbj->bm", probes, _per_sample_hessians(net, x), probes) / 4
    expected = torch.autograd.grad(ref.sum(), params, materialize_grads=True)
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "num_probes"),
        ({"num_probes": 0}, ValueError, "num_probes"),
        ({"num_probes": 2, "probe": "uniform"}, ValueError, "unknown probe 'uniform'"),
        ({"probes": torch.ones(2, 3, 3)}, ValueError, r"probes must have shape \(r,\) \+ x.shape"),
        ({"num_probes": 3, "probes": torch.ones(2, 2, 3)}, ValueError, "num_probes=3 was given"),
    ],
)
def test_hutchinson_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        torchdiv.laplacian(lambda x: x.sum(-1), torch.randn(2, 3), method="hutchinson", **kwargs)


def test_exact_methods_reject_probe_options():
    for kwargs in ({"probe": "gaussian"}, {"probes": torch.ones(1, 2, 3)}):
        with pytest.raises(ValueError, match="only used by stochastic methods"):
            torchdiv.laplacian(lambda x: x.sum(-1), torch.randn(2, 3), **kwargs)


@pytest.mark.parametrize(
    ("widest", "num_inputs", "chunk"),
    [(1000, 50, 50), (2**20, 50, 13), (2**20, 16, 16), (2**25, 9, 5), (10, 0, 1)],
)
def test_auto_plans_as_few_equal_chunks_as_the_budget_allows(widest, num_inputs, chunk):
    from torchdiv._laplacian.methods import CHUNK_ELEMENTS
    from torchdiv._taylor import Graph

    assert CHUNK_ELEMENTS == 2**24
    assert Graph(widest=widest).chunk(num_inputs, CHUNK_ELEMENTS) == chunk


# Found in review: each of these gave a wrong answer or an error before.


def test_constant_padding_with_a_nonzero_value():
    u = lambda z: (F.pad(z**2, (1, 1), value=3.0) ** 2).sum(-1)  # noqa: E731
    x = torch.randn(3, 4, dtype=f64)
    for method in EXACT:
        assert_close(torchdiv.laplacian(u, x, method=method), reference_laplacian(u, x))


@pytest.mark.parametrize("method", EXACT)
def test_gradients_through_layer_norm_match_finite_differences(method):
    """The gradient of a Laplacian is a third derivative; PyTorch's fused layer norm gets it
    wrong (pytorch/pytorch#175754), so nested autodiff runs it as primitives."""
    w = torch.linspace(-1, 1, 4, dtype=f64)
    u = lambda z: (torch.tanh(F.layer_norm(z, (4,))) * w).sum(-1)  # noqa: E731
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    (grad,) = torch.autograd.grad(torchdiv.laplacian(u, x, method=method).sum(), x)
    h, expected = 1e-5, torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        step = e.view_as(x)
        plus = torchdiv.laplacian(u, (x + step).detach(), method="taylor").sum()
        minus = torchdiv.laplacian(u, (x - step).detach(), method="taylor").sum()
        expected.view(-1)[i] = (plus - minus) / (2 * h)
    # central differences: error O(h^2) = 1e-10 times third derivatives, plus eps / h = 2e-11
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "grad-of-grad", "hessian"])
def test_parameter_gradients_through_instance_norm_match_a_grad_of_grad_loop(method):
    """PyTorch's third derivative through ``instance_norm`` (a ``native_batch_norm`` over a
    reshaped input) is wrong, as fused layer norm's: the parameter gradients of the Laplacian
    were 20-230% off in every method; the reference differentiates the same map written as
    mean and variance by a grad-of-grad loop."""
    torch.manual_seed(0)
    w1 = torch.randn(2, 32, dtype=f64, requires_grad=True)
    w2 = torch.randn(32, 1, dtype=f64, requires_grad=True)

    def by_hand(h):
        centred = h - h.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + 1e-5)

    def net(norm):
        def u(z):
            h = norm(torch.tanh(z @ w1).view(-1, 4, 8)).reshape(-1, 32)
            return (h**3 @ w2).squeeze(-1)

        return u

    def gradient(z):
        leaf = z if z.requires_grad else z.detach().requires_grad_(True)
        return torch.autograd.grad(net(by_hand)(leaf).sum(), leaf, create_graph=True)[0]

    x = torch.randn(16, 2, dtype=f64)
    expected = loop_diagonal(gradient, x, create_graph=True).sum(-1)  # grad of grad, row by row
    expected_grads = torch.autograd.grad(expected.square().sum(), [w1, w2])
    for _ in range(2):  # the first call and the remembered one
        got = torchdiv.laplacian(net(F.instance_norm), x, method=method)
        assert_close(got, expected)
        for a, b in zip(
            torch.autograd.grad(got.square().sum(), [w1, w2]), expected_grads, strict=True
        ):
            assert_close(a, b)


@pytest.mark.parametrize("method", ["auto", "grad-of-grad", "forward-over-reverse"])
def test_parameter_gradients_through_logcumsumexp_match_a_loop_of_prefixes(method):
    """PyTorch's third derivative of ``logcumsumexp`` by reverse mode is ``nan``: the
    grad-of-grad loop (``"auto"``'s engine at this size, no Taylor rule) gave ``nan``
    parameter gradients. The reference writes each prefix's ``logsumexp`` by hand and
    differentiates it by a grad-of-grad loop; the values are also checked against the
    fused op at a range where a shift by the global maximum would underflow."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    def prefixes(h):
        return torch.stack([torch.logsumexp(h[:, : i + 1], -1) for i in range(h.shape[1])], 1)

    x = torch.randn(4, 3, dtype=f64)
    want = laplacian_by_grad_of_grad(lambda z: prefixes(net(z)).sum(-1), x)
    got = torchdiv.laplacian(lambda z: torch.logcumsumexp(net(z), -1).sum(-1), x, method=method)
    assert_close(got, want)
    params = list(net.parameters())
    grads = torch.autograd.grad(got.square().sum(), params)
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), params), strict=True):
        assert_close(a, b)
    wide = torch.tensor([[-1000.0, 0.0, -2000.0, 5.0], [3.0, 2.0, 1.0, 0.0]], dtype=f64)
    fused = torch.logcumsumexp(wide, -1)
    with SafeDerivatives(3, ""):
        assert_close(torch.logcumsumexp(wide, -1), fused)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "hessian"])
def test_logcumsumexp_of_spread_arguments_through_forward_mode(method):
    """PyTorch's forward-mode formula of ``logcumsumexp`` normalises by the maximum over the
    whole dimension: a prefix whose entries lie far below a later maximum loses every digit
    (its JVP 1e-17 where it is 0.9 at spreads of ~100), so the nested methods' Laplacian was
    off by 20-960% in float64 (and ``"auto"``'s, which took forward-over-reverse above ten
    inputs: the Taylor engine had no rule; it now records the prefixes), and the forward
    engine's Jacobian by 17%. Reference: each prefix's ``logsumexp`` written out,
    differentiated by the loop."""
    torch.manual_seed(0)
    w1, w2 = 5 * torch.randn(12, 8, dtype=f64), torch.randn(8, 1, dtype=f64)

    def prefixes(h):
        return torch.stack([torch.logsumexp(h[:, : i + 1], -1) for i in range(h.shape[1])], 1)

    x = torch.randn(4, 12, dtype=f64)
    w1.requires_grad_(True)
    want = laplacian_by_grad_of_grad(lambda z: (prefixes(z @ w1) @ w2)[:, 0], x)
    head = lambda z: (torch.logcumsumexp(z @ w1, -1) @ w2)[:, 0]  # noqa: E731
    got = torchdiv.laplacian(head, x, method=method)
    assert_close(got, want)
    # the parameter gradient of a loss on it (third derivatives through the replacement)
    (want_grad,) = torch.autograd.grad(want.sum(), w1)
    (got_grad,) = torch.autograd.grad(got.sum(), w1)
    assert_close(got_grad, want_grad)
    w1.requires_grad_(False)
    if method == "auto":
        jac = torchdiv.jacobian(lambda z: torch.logcumsumexp(z @ w1, -1), x, method="forward")
        assert_close(jac, torchdiv.jacobian(lambda z: prefixes(z @ w1), x, method="reverse"))


@pytest.mark.parametrize("dim", [1, -2])
def test_taylor_records_logcumsumexp_along_a_dim_other_than_the_last(dim):
    """The replacement masked a permuted view of its input (``masked_fill``), which copies it
    contiguous first, an op the Taylor engine has no rule for: ``method="taylor"`` refused
    ``logcumsumexp`` along any dimension but the last, naming ``aten.contiguous``, an op the
    caller never wrote. Reference: each prefix's ``logsumexp`` written out, by the loop."""
    torch.manual_seed(0)

    def prefixes(h):
        return torch.stack([torch.logsumexp(h[:, : i + 1], 1) for i in range(h.shape[1])], 1)

    x = 3 * torch.randn(3, 4, 5, dtype=f64)
    want = laplacian_by_grad_of_grad(lambda z: prefixes(z).pow(2).sum((1, 2)), x)
    got = torchdiv.laplacian(
        lambda z: torch.logcumsumexp(z, dim).pow(2).sum((1, 2)), x, method="taylor"
    )
    assert_close(got, want)


def test_no_grad_inside_f_is_a_stop_gradient_as_in_reverse_mode():
    def u(z):
        with torch.no_grad():
            s = z.square().sum(-1, keepdim=True)
        return (z**2 / (s + 1)).sum(-1)

    x = torch.randn(3, 4, dtype=f64)
    s = x.square().sum(-1)
    expected = 2 * 4 / (s + 1)  # the Laplacian of sum(z^2) / c with c held constant
    for method in ("auto", "taylor"):
        assert_close(torchdiv.laplacian(u, x, method=method), expected)


class Dropout(nn.Module):
    """A training-mode dropout between two layers, and a buffer counting forward calls."""

    def __init__(self):
        super().__init__()
        self.net = tanh_mlp(4, 16, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return self.net[2:](F.dropout(self.net[:2](x), 0.5, training=True))


def test_random_ops_and_mutations_happen_once_whatever_the_chunks():
    net, x = Dropout().to(f64), torch.randn(3, 4, dtype=f64)
    results = []
    for chunk_size in (None, 1, 3):
        torch.manual_seed(0)
        results.append(torchdiv.laplacian(net, x, method="taylor", chunk_size=chunk_size))
    assert_close(results[1], results[0])
    assert_close(results[2], results[0])
    assert net.calls.item() == 3  # one forward evaluation per call


@pytest.mark.parametrize(
    ("method", "chunk_size", "head", "n"),
    [
        ("forward-over-reverse", 1, None, 4),
        ("forward-over-reverse", 2, None, 4),
        ("hessian", 1, None, 4),
        ("hessian", 3, None, 4),
        # "auto": no Taylor rule for lgamma, more than ten inputs: forward-over-reverse
        ("auto", 4, "lgamma", 12),
        ("auto", None, "lgamma", 12),
    ],
)
def test_every_chunk_differentiates_one_evaluation(method, chunk_size, head, n):
    """The nested methods evaluate ``f`` once per chunk of directions: each from the state
    the first found (``_exact.state.Once``). Without it every chunk saw another buffer and
    mask (1e-2-0.5 off) and the buffer moved once per chunk; several tangents in a chunk
    raised vmap's randomness error, whose hint named ``'auto'`` to a call of ``'auto'``."""
    last = (lambda y: torch.lgamma(y.square() + 1).sum(-1)) if head else (lambda y: y[:, 0])
    net, x = Stateful(n, 3, head=last), torch.randn(5, n, dtype=f64)
    once, state = one_state(net, x, seed=4)
    torch.manual_seed(4)
    got = torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size)
    assert_close(got, laplacian_by_grad_of_grad(once, x))
    assert_one_state(net, once, state)


@pytest.mark.parametrize(("method", "chunk_size"), [("forward-over-reverse", 2), ("hessian", 1)])
def test_parameter_gradients_through_chunks_of_a_stateful_f(method, chunk_size):
    """Training through a chunked nested method: spectral norm (its power iteration writes
    its vectors, cloned before use) and a dropout, the Laplacian and its parameter gradients
    against the grad-of-grad loop of one evaluation at the same seed."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8)),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(8, 1),
    ).to(f64)
    x = torch.randn(5, 4, dtype=f64)
    results = []
    for run in ("call", "reference"):
        copy = deepcopy(net)
        torch.manual_seed(1)
        if run == "call":
            lap = torchdiv.laplacian(copy, x, method=method, chunk_size=chunk_size)[:, 0]
        else:
            lap = laplacian_by_grad_of_grad(lambda z, copy=copy: copy(z)[:, 0], x)
        params = [p for name, p in copy.named_parameters() if name != "3.bias"]
        results.append((lap, torch.autograd.grad(lap.sum(), params), copy))
    (lap, grads, copy), (want, want_grads, reference) = results
    assert_close(lap, want)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b)
    for (_, a), (_, b) in zip(copy.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(a, b)  # the power iteration's vectors moved once


@pytest.mark.parametrize(("method", "chunk_size"), [("forward-over-reverse", 1), ("hessian", 2)])
def test_parametrized_weights_inside_parametrize_cached(method, chunk_size):
    """Inside ``parametrize.cached()`` (an RNN's or a tied weight's training loop), a weight
    first computed under the engines' transforms was cached as a transform's wrapper, and
    the next chunk's or call's nested transforms failed PyTorch's internal assert ("level <=
    current_level"). Values and parameter gradients of two calls against the grad-of-grad
    loop; the block's own forward after them, and its gradients, as a plain one's. The block
    computes the weight once (the first call's, cached since optim27, as a plain forward's):
    each backward pass but the last through it retains its graph, as plain code must."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(3, 8)), nn.Tanh(), nn.Linear(8, 1)
    ).to(f64)
    x = torch.randn(4, 3, dtype=f64)
    params = list(net.parameters())
    want = laplacian_by_grad_of_grad(lambda z: net(z)[:, 0], x)
    want_grads = torch.autograd.grad(want.sum(), params, allow_unused=True, materialize_grads=True)
    y_want = net(x)
    with nn.utils.parametrize.cached():
        for _ in range(2):
            lap = torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size)[:, 0]
            assert_close(lap, want)
            grads = torch.autograd.grad(
                lap.sum(), params, allow_unused=True, materialize_grads=True, retain_graph=True
            )
            for a, b in zip(grads, want_grads, strict=True):
                assert_close(a, b)
        assert nn.utils.parametrize._cache_enabled == 1  # put back after each call
        y = net(x)
        assert_close(y, y_want)
        torch.autograd.grad(y.sum(), params)
    assert nn.utils.parametrize._cache_enabled == 0 and not nn.utils.parametrize._cache


@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian", "grad-of-grad"])
def test_the_empty_event_check_evaluates_the_same_function(method):
    """A scalar event is checked for sample mixing by one more evaluation: from the state
    the method's evaluation starts from (before: two buffers' moves, two masks)."""
    net, x = Stateful(1, 1), torch.randn(6, dtype=f64)
    once, state = one_state(net, x[:, None], seed=6)
    torch.manual_seed(6)
    got = torchdiv.laplacian(lambda z: net(z[:, None])[:, 0], x, method=method)
    assert_close(got, laplacian_by_grad_of_grad(lambda z: once(z)[:, 0], x[:, None]))
    assert_one_state(net, once, state)


def test_ops_with_out_arguments_are_not_replayed():
    """Training-mode spectral norm updates its vectors with ``out=`` ops, which autograd
    refuses to replay with grad enabled; their captured results are reused."""
    torch.manual_seed(0)
    net = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4)).to(f64).train()
    x = torch.randn(3, 4, dtype=f64)

    def field():  # a fresh copy: every forward call updates the power-iteration vectors
        copy = deepcopy(net)
        return lambda z: torch.tanh(copy(z)).square().sum(-1)

    expected = torchdiv.laplacian(field(), x, method="forward-over-reverse")
    for method in ("auto", "taylor"):
        assert_close(torchdiv.laplacian(field(), x, method=method), expected)


@pytest.mark.parametrize(
    ("u", "op"),
    [
        (lambda z: F.group_norm(z.reshape(1, 2, 2), 1, weight=z[:2]).square().sum(), "group_norm"),
        (lambda z: (2.0**z * 0.0**z).sum(), r"pow\.Scalar with base 0\.0"),
    ],
)
def test_a_rule_that_cannot_take_its_arguments_falls_back_or_names_the_op(u, op):
    x = torch.rand(4, dtype=f64) + 0.5
    with pytest.raises(NotImplementedError, match=rf"laplacian: method='taylor' .*{op}.*'auto'"):
        torchdiv.laplacian(u, x, batch_dims=0, method="taylor")
    assert_close(torchdiv.laplacian(u, x, batch_dims=0), hessian(u)(x).diagonal().sum())


@pytest.mark.parametrize("shape", [(3, 0), (0, 4)])
@pytest.mark.parametrize("method", [*EXACT, "hutchinson"])
def test_empty_batches_and_events(shape, method):
    options = {"num_probes": 2} if method == "hutchinson" else {}
    u = lambda z: z.square().sum(-1, keepdim=True)  # noqa: E731
    out = torchdiv.laplacian(u, torch.randn(shape), method=method, **options)
    assert out.shape == (shape[0], 1) and not out.any()


def test_hessian_method_honours_chunk_size():
    net = tanh_mlp(64, 256, 1, dtype=torch.float32).requires_grad_(False)
    x = torch.randn(64, 64)
    sizes = {}
    for chunk_size in (None, 4):
        with _LargestTensor() as watch:
            torchdiv.laplacian(net, x, method="hessian", chunk_size=chunk_size)
        sizes[chunk_size] = watch.largest
    # chunks of 4 directions: the products shrink 16x; what stays is the assembled Hessians
    assert sizes[4] == 64 * 64 * 64 < sizes[None] == 64 * 64 * 256


_W = torch.linspace(-1, 1, 9, dtype=f64).reshape(3, 3)


def _residual_in_place(z):
    h = z @ _W
    h += z  # aten.add_ on a tensor nothing else shares
    return (torch.tanh(h) ** 2).sum(-1)


def _write_through_a_view(z):
    h = z @ _W
    v = h.view(-1)
    h.mul_(2)  # v sees the write: a replay of out-of-place ops could not
    return (torch.tanh(v.view_as(z)) ** 3).sum(-1)


def test_in_place_ops_on_unshared_tensors_are_propagated():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 2, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 1),
    ).to(f64)
    x = torch.randn(3, 1, 4, 4, dtype=f64)
    assert_close(torchdiv.laplacian(net, x, method="taylor"), reference_laplacian(net, x))
    z = torch.randn(4, 3, dtype=f64)
    expected = reference_laplacian(_residual_in_place, z)
    assert_close(torchdiv.laplacian(_residual_in_place, z, method="taylor"), expected)


def _powers_in_place(z: torch.Tensor) -> torch.Tensor:
    h = torch.sin(z @ _W)
    h.pow_(3)  # pow_.Scalar, Tensor ** number: recorded as pow.Scalar, number ** Tensor
    h.transpose_(0, 1)
    return (h.T * z).sum(-1)


def test_in_place_power_and_transpose_are_propagated():
    """``pow_.Scalar`` was recorded as the out-of-place op of the same overload name,
    ``pow.Scalar`` (``number ** Tensor``), whose rule took the jet for the base:
    ``method="taylor"`` refused ``h.pow_(3)``; ``transpose_`` had no out-of-place op."""
    z = torch.randn(4, 3, dtype=f64)
    expected = reference_laplacian(_powers_in_place, z)
    assert_close(torchdiv.laplacian(_powers_in_place, z, method="taylor"), expected)


def test_in_place_ops_on_shared_memory_are_refused_and_auto_falls_back():
    z = torch.randn(4, 3, dtype=f64)
    with pytest.raises(NotImplementedError, match=r"aten\.mul_\.Tensor"):
        torchdiv.laplacian(_write_through_a_view, z, method="taylor")
    expected = reference_laplacian(_write_through_a_view, z)
    assert_close(torchdiv.laplacian(_write_through_a_view, z), expected)


def _cosine(z: torch.Tensor) -> torch.Tensor:
    """``F.cosine_similarity`` clamps its norms in place under ``NoGradGuard``: autograd keeps
    their history through that write."""
    return nn.functional.cosine_similarity(z[:, :2], z[:, 2:] + 1, dim=-1)


def _clamped_under_no_grad(z: torch.Tensor) -> torch.Tensor:
    h = z * 2
    with torch.no_grad():
        h.clamp_(-50, 50)  # never binds here: forward and reverse mode agree (Limitations)
    return (torch.tanh(h) * z).sum(-1)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of clamp_
@pytest.mark.parametrize("f", [_cosine, _clamped_under_no_grad])
@pytest.mark.parametrize("n", [5, 300])  # tiny: the loop; larger: the Taylor engine
def test_a_write_under_no_grad_to_what_depends_on_x_is_refused_and_auto_falls_back(f, n):
    """The recording engines took the written tensor for a constant: Laplacians of
    ``cosine_similarity`` 100% off, divergences through it 24% off, silently. Since
    rev-leftovers12 the recorders run ``cosine_similarity``'s composite (no write), so the
    Taylor and structured engines give the loop's values through it; a write of ``f``'s own
    under ``no_grad`` is still refused."""
    z = torch.randn(n, 4, dtype=f64)
    expected = torchdiv.laplacian(f, z, method="grad-of-grad")
    field = lambda v: v * f(v)[:, None]  # noqa: E731
    want = torch.func.vmap(torch.func.jacrev(lambda v: field(v[None])[0]))(z)
    if f is _cosine:
        assert_close(torchdiv.laplacian(f, z, method="taylor"), expected)
        got = torchdiv.divergence(field, z, method="structured")
        assert_close(got, want.diagonal(0, -2, -1).sum(-1))
    else:
        with pytest.raises(NotImplementedError, match=r"under no_grad \(a write autograd"):
            torchdiv.laplacian(f, z, method="taylor")
        with pytest.raises(NotImplementedError, match=r"under no_grad"):
            torchdiv.divergence(field, z, method="structured")
    assert_close(torchdiv.laplacian(f, z), expected)
    value = torchdiv.value_grad_laplacian(f, z)
    assert_close(value.laplacian, expected)
    assert_close(torchdiv.divergence(field, z), want.diagonal(0, -2, -1).sum(-1))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_custom_autograd_function_is_not_taken_for_a_constant(requires_grad):
    """Its forward runs with autograd off, like a no_grad block: the capture used to record
    it as a constant and the Laplacian came out 0."""
    x = torch.randn(3, 4, dtype=f64, requires_grad=requires_grad)
    u = lambda z: Cube.apply(z).sum(-1)  # noqa: E731
    assert_close(torchdiv.laplacian(u, x), 6 * x.detach().sum(-1))
    with pytest.raises(NotImplementedError, match=r"custom autograd\.Function"):
        torchdiv.laplacian(u, x, method="taylor")
