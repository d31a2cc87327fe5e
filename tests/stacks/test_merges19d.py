"""Review rev-merges19d of two merges: rev-amp19 (float32 precision settings: the mixing
check under a caller's ``torch.func`` transform, kept structured products, mixed-dtype
chains) and rev-cfm19 (``graph_*`` naming inference mode / ``no_grad``).

Faults found, each a test here:

* the mixing check under a caller's transform took bfloat16's ``sqrt(eps)`` (0.088 of the
  largest element) as its tolerance wherever float32 matrix products were set to
  ``"medium"``: a model adding ``0.03`` or ``0.1`` of the batch mean of its features passed
  (leaking 0.027 and 0.083 of the largest element), its per-sample divergences returned
  silently, where bfloat16's own round-off in the check's VJPs was 0.003-0.019 and under
  ``"highest"`` everything from ``1e-3`` up was refused. The check now evaluates its VJPs
  with float32 products at full precision, so float32's tolerance holds under every setting;
* ``graph_*`` on a ``y`` that requires no grad named the wrong cause: made in a ``no_grad``
  block before a call with gradients on, it blamed a copy of ``x``; made from ``x.detach()``
  with the call under ``no_grad``, it blamed ``no_grad`` alone.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import torchdiv
from tests.stacks.test_precision19 import _fp32_precision_kept

Tensor = torch.Tensor


class _WeaklyMixing(torch.nn.Module):
    """A tanh MLP whose hidden features get ``coupling`` times their batch mean added (a
    batch-statistics feature with a small weight)."""

    def __init__(self, coupling: float) -> None:
        super().__init__()
        self.coupling = coupling
        self.a, self.h, self.b = (
            torch.nn.Linear(8, 64),
            torch.nn.Linear(64, 64),
            torch.nn.Linear(64, 8),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.h(h + self.coupling * h.mean(0)))
        return self.b(h)


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
@pytest.mark.parametrize("coupling", [1e-3, 3e-2, 1e-1])
def test_a_weak_batch_coupling_is_refused_under_reduced_precision(
    precision: str, coupling: float
) -> None:
    """Under ``vmap`` over an ensemble, ``coupling`` of the batch mean (well above
    bfloat16's round-off from ``3e-2``, and above float32's from ``1e-3``) is refused under
    every float32 matrix-product precision. (Fails before the fix on a CPU with bfloat16
    products only: elsewhere ``"medium"`` changes nothing.)"""
    torch.manual_seed(0)
    members = [_WeaklyMixing(coupling) for _ in range(2)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(32, 8)

    def member(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return torchdiv.divergence(lambda z: functional_call(members[0], (p, b), (z,)), x)

    with _fp32_precision_kept():
        torch.set_float32_matmul_precision(precision)
        before = _settings()
        with pytest.raises(torchdiv.BatchInteractionError):
            vmap(member)(params, buffers)
        assert _settings() == before  # (put back, the legacy read too)


def _settings(legacy: bool = True) -> tuple[str, ...]:
    """The float32 precision settings (the legacy read raises once the parent is set)."""
    b = torch.backends
    leaves = (
        b,
        b.mkldnn,
        b.mkldnn.matmul,
        b.mkldnn.conv,
        b.mkldnn.rnn,
        b.cuda.matmul,
        b.cudnn.conv,
    )
    read = (torch.get_float32_matmul_precision(),) if legacy else ()
    return (*read, *(leaf.fp32_precision for leaf in leaves))


def test_an_independent_ensemble_passes_under_inherited_bfloat16() -> None:
    """``torch.backends.fp32_precision = "bf16"`` (every CPU op inheriting it): an
    independent ensemble is not refused, and every setting is put back after, inherited
    ones as inherited: written back as read ("bf16"), the CPU's convolutions stayed
    bfloat16 once the caller set the parent back (a later float32 conv net's divergence
    1.4e-3 off in the full suite)."""
    torch.manual_seed(0)
    members = [_WeaklyMixing(0.0) for _ in range(2)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(32, 8)
    saved = torch.backends.fp32_precision
    start = _settings(legacy=False)
    with _fp32_precision_kept():
        try:
            torch.backends.fp32_precision = "bf16"
            before = _settings(legacy=False)
            out = vmap(
                lambda p, b: torchdiv.divergence(
                    lambda z: functional_call(members[0], (p, b), (z,)), x
                )
            )(params, buffers)
            assert _settings(legacy=False) == before
        finally:
            torch.backends.fp32_precision = saved
        assert _settings(legacy=False) == start
    assert out.shape == (2, 32)


# ------------------------------------------- graph_* where y requires no grad (rev-cfm19)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_graph_form_on_a_y_made_under_no_grad_names_it_outside_no_grad() -> None:
    """``y`` computed in a ``no_grad`` block, ``graph_divergence`` called after it with
    gradients on: the error blamed a copy of ``x`` ("pass the tensor you computed y from"),
    which ``y`` was computed from."""
    net, x = _net(), torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        y = net(x)
    with pytest.raises(ValueError, match=r"no_grad.*enable_grad.*\(f, x\)"):
        torchdiv.graph_divergence(y, x)


def test_graph_form_under_no_grad_on_a_y_from_a_detached_copy_names_both_causes() -> None:
    """``y`` computed with gradients on, but from ``x.detach()`` (a parameter-free field),
    and the call under ``no_grad`` (an evaluation loop): the error named ``no_grad`` alone,
    and told to call inside ``enable_grad``, which changes nothing (the graph form runs
    under ``no_grad`` when ``y`` has a graph: checked here against ``jacrev``)."""
    net, x = _net(), torch.randn(4, 3, requires_grad=True)
    y = torch.sin(x.detach())
    with torch.no_grad(), pytest.raises(ValueError, match=r"detached copy of x"):
        torchdiv.graph_divergence(y, x)
    y = net(x)
    with torch.no_grad():
        got = torchdiv.graph_divergence(y, x)
    want = vmap(torch.func.jacrev(net))(x.detach()).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(got, want)
