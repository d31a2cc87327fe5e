"""Items earlier sessions left (rev-left24): integer-list picks of grid columns with
``batch_dims=2`` followed as picks, as slices are; the Laplacian chain kept across a call under
anomaly detection, saved-tensor hooks or autocast. Values and parameter gradients against
float64 per-sample grad-of-grad loops."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, laplacians_by_grad_of_grad

import torchdiv
from torchdiv._laplacian import methods as _laplacian
from torchdiv._taylor.cache import PlanCache

f64 = torch.float64


def _column_net() -> torch.nn.Module:
    """A per-point ``(x, t) -> u`` net, applied column by column of a ``(T, X, 2)`` grid."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        f64
    )


def _put_back(net: torch.nn.Module, z: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``u[:, [j]] = net(z[:, [i]])`` for each ``i``, ``j`` of ``range(X)`` and ``order``."""
    u = net(z).clone()
    for i, j in zip(range(z.shape[1]), order, strict=True):
        u[:, [j]] = net(z[:, [i]])
    return u


def _one_hot(z: torch.Tensor, i: int) -> torch.Tensor:
    return torch.tensor([i])


# per-column programs whose sample i is net(x_i): each column picked by integer indices
PER_COLUMN = {
    "list_loop": lambda net, z: torch.cat([net(z[:, [i]]) for i in range(z.shape[1])], 1),
    "index_select_loop": lambda net, z: torch.cat(
        [net(z.index_select(1, _one_hot(z, i))) for i in range(z.shape[1])], 1
    ),
    "put_back": lambda net, z: _put_back(net, z, list(range(z.shape[1]))),
    "index_copy": lambda net, z: net(z).index_copy(1, _one_hot(z, 1), net(z[:, [1]])),
}
# picks of one column that reach other columns' places: refused
MIXING = {
    "expanded": lambda net, z: net(z[:, [0]]).expand(-1, z.shape[1], -1),
    "repeated": lambda net, z: net(z[:, [0]]).repeat(1, z.shape[1], 1),
    "reordered": lambda net, z: torch.cat([net(z[:, [i]]) for i in range(z.shape[1])][::-1], 1),
    "one_twice": lambda net, z: torch.cat([net(z[:, [i]]) for i in [0, 0, 2, 3]], 1),
    "beside_the_batch": lambda net, z: net(z[:, [0]]) + net(z),
    "put_elsewhere": lambda net, z: _put_back(net, z, [1, 0, 2, 3]),
    "put_everywhere": lambda net, z: net(z).index_copy(
        1, torch.arange(4), net(z[:, [0]]).expand(-1, 4, -1)
    ),
    "index_copy_elsewhere": lambda net, z: net(z).index_copy(1, _one_hot(z, 1), net(z[:, [0]])),
}


@pytest.mark.parametrize("method", ["auto", "taylor"])
@pytest.mark.parametrize("name", sorted(PER_COLUMN))
def test_integer_list_picks_of_grid_columns_are_picks(name: str, method: str) -> None:
    """``x[:, [i]]`` (and ``index_select`` of one column, puts back into column ``i``) on a
    ``(T, X, 2)`` grid with ``batch_dims=2`` is sample ``i`` of the second batch dimension, as
    ``x[:, i:i + 1]`` is: until rev-left24 refused as "batch dimensions transposed" or a
    put into other samples' places. The per-point loop's Laplacians and their parameter
    gradients."""
    net = _column_net()
    x = torch.rand(2, 4, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    got = torchdiv.laplacian(lambda z: PER_COLUMN[name](net, z), x, batch_dims=2, method=method)
    want = laplacians_by_grad_of_grad(net, x.reshape(-1, 2)).reshape(got.shape)
    assert_close(got, want)
    assert_same_parameter_gradients(net, (got**2).sum(), (want**2).sum())


@pytest.mark.parametrize("name", sorted(MIXING))
def test_integer_list_picks_reaching_other_columns_are_refused(name: str) -> None:
    """A column picked by integer indices and expanded, repeated, joined out of order, twice,
    beside the whole batch or written into other columns' places mixes samples."""
    net = _column_net()
    x = torch.rand(2, 4, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.laplacian(lambda z: MIXING[name](net, z), x, batch_dims=2)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("mode", ["anomaly", "saved_tensor_hooks", "autocast"])
def test_the_chain_is_taken_again_after_a_call_under_a_debugging_mode(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A frozen tanh / sigmoid chain at 6 inputs (``"auto"`` loops for ``_laplacian.chain``
    alone): one call under anomaly detection, saved-tensor hooks or autocast, where the chain
    gives way, left the chain off at that structure for good until rev-left24 (every later
    call recorded ``f`` for the Taylor engine). Recorded once; float32 values equal the float64
    loop's (autocast's call in bfloat16 aside)."""
    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    capture, recorded = _laplacian.capture, []
    monkeypatch.setattr(
        _laplacian, "capture", lambda *a, **k: recorded.append(1) or capture(*a, **k)
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Sigmoid(),
        torch.nn.Linear(16, 1),
    ).to(f64)
    net.requires_grad_(False)
    x = torch.randn(8, 6, dtype=f64)
    want = laplacians_by_grad_of_grad(net, x).float()  # (float32: autocast casts it alone)
    net, x = net.float(), x.float()
    around = {
        "anomaly": lambda: torch.autograd.detect_anomaly(check_nan=False),
        "saved_tensor_hooks": lambda: torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t
        ),
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }[mode]
    for call in range(4):
        if call == 2:
            with around():
                torchdiv.laplacian(net, x)
        else:
            assert_close(torchdiv.laplacian(net, x), want)
    assert len(recorded) == 1
