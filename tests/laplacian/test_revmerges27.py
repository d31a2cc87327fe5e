"""rev-merges27: value_grad_laplacian's forward-over-reverse gradient (now the Hessian
products' primal, qmc27) at ``batch_dims=2``, a vector-valued ``f``, chunks, and a
train-mode dropout, against float64 loops of ``torch.autograd.grad``; the dispatch mode's
``mul.Scalar`` of an efficient zero tensor (fuzz27)."""

import pytest
import torch

import torchdiv
from torchdiv._core import walk
from torchdiv._core.modes import _zero_times_scalar


def _loop(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients and Laplacians of every output component, ``batch_dims=2``:
    float64 loops of ``autograd.grad`` with graphs (to ``x`` and ``f``'s parameters)."""
    flat = x.reshape(-1, x.shape[-1])
    gradients, laplacians = [], []
    for s in range(flat.shape[0]):
        xi = flat[s : s + 1]
        y = f(xi.reshape(1, 1, -1)).reshape(-1)
        rows, diag = [], []
        for i in range(y.numel()):
            (g,) = torch.autograd.grad(y[i], xi, create_graph=True)
            g = g.reshape(-1)
            rows.append(g)
            diag.append(
                sum(
                    torch.autograd.grad(g[j], xi, create_graph=True)[0][0, j]
                    for j in range(g.numel())
                )
            )
        gradients.append(torch.stack(rows))
        laplacians.append(torch.stack(diag))
    return torch.stack(gradients), torch.stack(laplacians)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_over_reverse_gradient_batch_dims_2_vector_valued(chunk_size):
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        return torch.tanh(x @ w) * x.sum(-1, keepdim=True)

    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = torchdiv.value_grad_laplacian(
        f, x, batch_dims=2, method="forward-over-reverse", chunk_size=chunk_size
    )
    x_ref = x.detach().clone().requires_grad_()
    gradient, laplacian = _loop(f, x_ref)
    assert out.gradient.shape == (2, 3, 4, 3)
    # float64, a handful of flops per entry: 1e-12
    torch.testing.assert_close(
        out.gradient.reshape(gradient.shape), gradient, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        out.laplacian.reshape(laplacian.shape), laplacian, rtol=1e-12, atol=1e-12
    )
    loss = out.gradient.square().sum() + out.laplacian.square().sum()
    loss_ref = gradient.square().sum() + laplacian.square().sum()
    got = torch.autograd.grad(loss, (w, x))
    want = torch.autograd.grad(loss_ref, (w, x_ref))
    for a, b in zip(
        got, want, strict=True
    ):  # float64 third derivatives summed over ~50 terms: 1e-10
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_over_reverse_one_dropout_mask(chunk_size):
    """Value, gradient and Laplacian of one function: ``sum(drop(x) * x)`` has gradient
    ``2 m x`` and Laplacian ``2 Σ m`` for the scaled mask ``m`` the value used."""
    drop = torch.nn.Dropout(0.5)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.manual_seed(1)
    out = torchdiv.value_grad_laplacian(
        lambda z: (drop(z) * z).sum(-1), x, method="forward-over-reverse", chunk_size=chunk_size
    )
    mask = out.gradient / (2 * x)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    torch.testing.assert_close(out.value, (mask * x * x).sum(-1))  # float64 defaults
    torch.testing.assert_close(out.laplacian, 2 * mask.sum(-1))


@pytest.mark.parametrize(
    ("dtype", "scalar"), [(torch.float32, 2.5), (torch.float32, 2.5j), (torch.bool, 3)]
)
def test_zero_times_scalar_is_a_zero_tensor_of_the_promoted_dtype(dtype, scalar):
    zero = torch._efficientzerotensor(3, dtype=dtype)
    out = _zero_times_scalar(zero, scalar)
    assert out._is_zerotensor()
    assert out.dtype == torch.ops.aten.mul.Scalar(zero, scalar).dtype


@pytest.fixture
def small_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk bound of 100 nodes (as tests/core/test_scale27.py): a 64-step loop is past it."""
    monkeypatch.setattr(walk, "_FLOOR", 16)
    monkeypatch.setattr(walk, "_stack_bytes", lambda: 100 * walk._BYTES_PER_NODE)


class _Deep(torch.nn.Module):
    """64 residual steps (past the bound), an FFT (no Taylor rule: ``"auto"`` loops over
    backward passes at 3 inputs), a buffer counting its evaluations and an optional dropout."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        self.drop = torch.nn.Dropout(p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.count += 1
        h = self.drop(z)
        for _ in range(64):
            h = h + 0.01 * torch.tanh(self.lin(h))
        return torch.fft.fft(h).real.sum(-1)


def test_past_the_bound_the_laplacian_changes_buffers_once(small_stack: None) -> None:
    """The loop's evaluation (the walk stopped) and forward over reverse's: f's buffer moved
    twice (the first call refused by ``wrote_alike``, later ones silently one extra step)."""
    torch.manual_seed(0)
    net, x = _Deep(), torch.randn(5, 3, dtype=torch.float64)
    expected = []
    for b in range(len(x)):  # float64 per-sample loop of autograd.grad twice
        xb = x[b].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xb[None])[0], xb, create_graph=True)
        expected.append(
            sum(torch.autograd.grad(g[i], xb, retain_graph=True)[0][i] for i in range(3))
        )
    for call in range(1, 4):
        net.count.zero_()
        out = torchdiv.laplacian(net, x)
        assert net.count.item() == 1, call
        # float64: rounding only, through 64 steps
        torch.testing.assert_close(out, torch.stack(expected), rtol=1e-10, atol=1e-10)


def test_past_the_bound_the_laplacian_draws_once(small_stack: None) -> None:
    """A dropout's generator drawn from as by one evaluation of f, at every call."""
    net, x = _Deep(0.5), torch.randn(5, 3, dtype=torch.float64)
    for call in range(3):
        torch.manual_seed(3)
        torchdiv.laplacian(net, x)
        after = torch.rand(4)
        torch.manual_seed(3)
        net(x)
        assert torch.equal(after, torch.rand(4)), call


class _DeepField(_Deep):
    """``_Deep`` without the FFT: a square field (divergence, diagonal) of 64 steps."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.count += 1
        h = self.drop(z)
        for _ in range(64):
            h = h + 0.01 * torch.tanh(self.lin(h))
        return h


@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal", "laplacian"])
def test_past_the_bound_later_calls_change_buffers_once(small_stack: None, operator: str) -> None:
    """Later calls evaluate f unwatched first (plain autograd's rows; the Laplacian's loop,
    remembered as faster at 3 inputs), whose walk stops: the engine after it evaluated f
    again, its buffer moved twice a call (silently: a running average one step ahead)."""
    torch.manual_seed(0)
    net, x = _DeepField(), torch.randn(5, 3, dtype=torch.float64)
    calls = {
        "divergence": lambda: torchdiv.divergence(net, x),
        "jacobian_diagonal": lambda: torchdiv.jacobian_diagonal(net, x),
        "laplacian": lambda: torchdiv.laplacian(lambda z: net(z).sum(-1), x),
    }
    for call in range(4):
        net.count.zero_()
        calls[operator]()
        assert net.count.item() == 1, call


@pytest.mark.parametrize("fft", [False, True])
def test_past_the_bound_value_grad_laplacian_auto(small_stack: None, fft: bool) -> None:
    """``"auto"``'s loop (remembered as faster, or the Taylor engine's fallback at an FFT)
    raised ``GraphTooDeep`` at every later call: the three separately now, right, ``f``'s
    buffer moved once a call."""
    torch.manual_seed(0)
    net, x = (_Deep() if fft else _DeepField()), torch.randn(5, 3, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z) if fft else net(z).sum(-1)

    gradients, laplacians = [], []
    for b in range(len(x)):  # float64 per-sample loop of autograd.grad twice
        xb = x[b].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xb[None])[0], xb, create_graph=True)
        gradients.append(g.detach())
        laplacians.append(
            sum(torch.autograd.grad(g[i], xb, retain_graph=True)[0][i] for i in range(3))
        )
    for call in range(3):
        net.count.zero_()
        out = torchdiv.value_grad_laplacian(f, x)
        assert net.count.item() == 1, call
        # float64: rounding only, through 64 steps
        torch.testing.assert_close(out.gradient, torch.stack(gradients), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.laplacian, torch.stack(laplacians), rtol=1e-10, atol=1e-10)
