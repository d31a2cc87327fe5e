"""State ``f`` changes through ``.data`` or in place and then computes with, put back between
the evaluations of one call: every evaluation is the function of one, and the state after the
call is what one plain evaluation leaves.

- ``.data`` assigned in ``forward`` (``n.data = n.data + 1``; the power iteration of the
  spectral norm GAN code written before ``torch.nn.utils.spectral_norm``, ``u.data =
  l2normalize(...)``; a weight shrunk by ``w.data = ...``) is no op of the dispatcher and was
  not put back: forward mode one direction a chunk, the Hutchinson Laplacian's products and
  the Laplacian's Hessian-vector products differentiated another ``f`` at each evaluation
  (values 0.005-0.49 off, parameter gradients up to 20).
- A buffer written in place and then computed with (``self.count += 1; h * self.count``, an
  exponential average of a weight updated before use) made the parameter gradients of such a
  call raise PyTorch's "modified by an inplace operation": its value put back moved its
  version counter.

Reference: one plain evaluation of a copy of the model on the batch, its per-sample
derivatives by loops of ``torch.autograd.grad`` (one sample and one output at a time), and
the parameter gradients of a squared loss through them, float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv

f64 = torch.float64
D = 3


class _Core(nn.Module):
    """An ``lgamma`` MLP 3-8-3: no Taylor rule, so that ``"auto"``'s Laplacian takes
    Hessian-vector products (one evaluation of ``f`` per chunk)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 8), nn.Linear(8, D)

    def core(self, h: torch.Tensor) -> torch.Tensor:
        return self.b(torch.lgamma(h.abs() + 1.5))


class DataCounter(_Core):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n.data = self.n.data + 1
        return self.core(self.a(x)) * self.n


class ShrunkWeight(_Core):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.a.weight.data = self.a.weight.data.clamp(-0.3, 0.3) * 0.9
        return self.core(self.a(x))


def _l2normalize(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm() + 1e-12)


class _PowerIteration(nn.Module):
    """A spectral norm as the GAN code before ``torch.nn.utils.spectral_norm`` writes it:
    ``u``, ``v`` parameters without grad set through ``.data``, ``weight`` an attribute."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__()
        self.module = module
        w = module.weight
        u = nn.Parameter(_l2normalize(w.data.new(w.shape[0]).normal_()), requires_grad=False)
        v = nn.Parameter(_l2normalize(w.data.new(w.shape[1]).normal_()), requires_grad=False)
        del module._parameters["weight"]
        module.register_parameter("weight_u", u)
        module.register_parameter("weight_v", v)
        module.register_parameter("weight_bar", nn.Parameter(w.data))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v, w = self.module.weight_u, self.module.weight_v, self.module.weight_bar
        v.data = _l2normalize(torch.mv(w.data.t(), u.data))
        u.data = _l2normalize(torch.mv(w.data, v.data))
        self.module.weight = w / u.dot(w.mv(v))
        return self.module(x)


class PowerIterated(_Core):
    def __init__(self) -> None:
        super().__init__()
        self.a = _PowerIteration(nn.Linear(D, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self.a(x))


class InPlaceCounter(_Core):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.core(self.a(x)) * self.count


class AveragedWeight(_Core):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("average", torch.zeros(8, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.average.mul_(0.5).add_(0.5 * self.a.weight.detach())
        return self.core(F.linear(x, self.average, self.a.bias))


class DecayedInForward(_Core):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.a.weight.mul_(0.9)
        return self.core(self.a(x))


class ClampedData(_Core):
    """A weight clipped in place through ``.data`` (WGAN's critic clipping, written into
    ``forward``): under ``torch.func`` the first, watched evaluation's ``.data`` shared the
    weight's version counter, the others' did not, and the parameter gradients of a call
    that evaluates ``f`` several times raised "modified by an inplace operation"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.a.weight.data.clamp_(-0.3, 0.3)
        return self.core(self.a(x))


MODELS = [DataCounter, ShrunkWeight, PowerIterated, InPlaceCounter, AveragedWeight, ClampedData]
# calls that evaluate f more than once (one chunk a direction, products, fallbacks)
CALLS = [
    ("divergence", "forward"),
    ("jacobian_diagonal", "forward"),
    ("jacobian", "forward"),
    ("laplacian", "auto"),
    ("laplacian", "forward-over-reverse"),
    ("laplacian", "hutchinson"),
    ("value_grad_laplacian", "forward-over-reverse"),
]


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; a tensor attribute computed with grad (the power iteration's weight)
    copied detached, as ``deepcopy`` refuses it."""
    memo = {
        id(t): t.detach().clone()
        for m in model.modules()
        for t in vars(m).values()
        if isinstance(t, torch.Tensor) and not t.is_leaf
    }
    return copy.deepcopy(model, memo)


def _reference(model: nn.Module, x: torch.Tensor, op: str, probes: torch.Tensor | None):
    """One evaluation of ``model`` on the batch; per sample, the derivatives ``op`` takes."""
    z = x.clone().requires_grad_(True)
    y = model(z)

    def grad(out: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(out, z, create_graph=True)[0]

    rows = []
    for i in range(x.shape[0]):
        jac = torch.stack([grad(y[i, k])[i] for k in range(D)])  # (out, in)
        if op == "jacobian":
            rows.append(jac)
        elif op in ("divergence", "jacobian_diagonal"):
            rows.append(jac.diagonal().sum() if op == "divergence" else jac.diagonal())
        else:  # a Laplacian of each output, or its Hutchinson estimate with the probes
            directions = torch.eye(D, dtype=f64) if probes is None else probes[:, i]
            scale = 1.0 if probes is None else 1.0 / len(directions)
            rows.append(
                torch.stack(
                    [
                        scale * sum((grad((jac[k] * v).sum())[i] * v).sum() for v in directions)
                        for k in range(D)
                    ]
                )
            )
    return torch.stack(rows)


def _call(model: nn.Module, x: torch.Tensor, op: str, method: str, probes: torch.Tensor):
    if op == "value_grad_laplacian":
        return torchdiv.value_grad_laplacian(model, x, method=method, chunk_size=1).laplacian
    kwargs = {"probes": probes} if method == "hutchinson" else {}
    return getattr(torchdiv, op)(model, x, method=method, chunk_size=1, **kwargs)


def _gradients(model: nn.Module, out: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), [p for _, p in named], allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads, strict=True)
    }


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("op, method", CALLS, ids=[f"{o}-{m}" for o, m in CALLS])
@pytest.mark.parametrize("model_type", MODELS, ids=[m.__name__ for m in MODELS])
def test_state_changed_in_forward_is_of_one_evaluation(model_type, op, method):
    torch.manual_seed(0)
    model = model_type().to(f64)
    x = torch.rand(3, D, dtype=f64)
    probes = torch.randn(2, 3, D, dtype=f64)
    for _ in range(2):  # (the second call from the state the first left)
        reference = _copy(model)
        out = _call(model, x, op, method, probes)
        got = _gradients(model, out)
        ref = _reference(reference, x, op, probes if method == "hutchinson" else None)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
        for name, value in _gradients(reference, ref).items():
            torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-11, msg=name)
        after, expected = _state(model), _state(reference)
        assert after.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("op, method", CALLS, ids=[f"{o}-{m}" for o, m in CALLS])
def test_a_parameter_decayed_in_place_in_forward_trains(op, method):
    """A parameter written in place under ``no_grad`` in ``forward`` (a decay step), then
    computed with: the values and parameter gradients of one evaluation (the version counter
    put back with the value: without it PyTorch's "modified by an inplace operation")."""
    torch.manual_seed(0)
    model = DecayedInForward().to(f64)
    x = torch.rand(3, D, dtype=f64)
    probes = torch.randn(2, 3, D, dtype=f64)
    reference = _copy(model)
    out = _call(model, x, op, method, probes)
    ref = _reference(reference, x, op, probes if method == "hutchinson" else None)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    got = _gradients(model, out)
    for name, value in _gradients(reference, ref).items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-11, msg=name)
    torch.testing.assert_close(model.a.weight, reference.a.weight, rtol=0, atol=0)


def test_a_buffer_written_after_the_call_still_refuses_the_backward_pass():
    """The version counter put back is that of the value put back: a write after the call
    (another value) is still PyTorch's error, not a silently stale gradient."""
    torch.manual_seed(0)
    model = InPlaceCounter().to(f64)
    x = torch.rand(3, D, dtype=f64)
    out = torchdiv.divergence(model, x, method="forward", chunk_size=1)
    model.count.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _gradients(model, out)


class ExternallyCounted(_Core):
    """A buffer written in place with a value from Python state no put-back covers (a list
    outside the model: each evaluation writes another value), then computed with."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.seen: list[None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(None)
        self.scale.fill_(float(len(self.seen)))
        return self.core(self.a(x)) * self.scale


@pytest.mark.parametrize("op, method", CALLS, ids=[f"{o}-{m}" for o, m in CALLS])
def test_a_write_that_differs_between_evaluations_is_refused(op, method):
    """Versions put back hold only where every evaluation writes what the first wrote: here
    each writes another value into a tensor an earlier evaluation's graph saved, and the
    version put back would let that graph read the later value (silently wrong parameter
    gradients): refused, naming the tensor. ``"auto"``'s Laplacian records ``f`` first (no
    Taylor rule for ``lgamma``) and falls back: the fallback's writes are compared with the
    recording's."""
    torch.manual_seed(0)
    model = ExternallyCounted().to(f64)
    x = torch.rand(3, D, dtype=f64)
    probes = torch.randn(2, 3, D, dtype=f64)
    with pytest.raises((ValueError, RuntimeError), match="wrote other values"):
        _gradients(model, _call(model, x, op, method, probes))
    assert model.scale.item() == 1.0  # (a refused call leaves the buffer as it was)


class DroppedCounter(InPlaceCounter):
    """A dropout mask (a tensor ``f`` draws anew at each evaluation) and a counter written in
    place: the recording's mask is no write a fallback must repeat."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout(x, 0.3))


def test_a_mask_drawn_in_f_is_not_a_differing_write():
    """``"auto"``'s Laplacian falls back after recording (``lgamma``): only the modules'
    tensors are compared with the recording's writes (a mask ``f`` drew was refused); since
    leftovers18 every tensor ``f`` did not make (a closure's too)."""
    torch.manual_seed(0)
    model = DroppedCounter().to(f64)
    x = torch.rand(3, D, dtype=f64)
    out = torchdiv.laplacian(model, x, method="auto")
    assert torch.isfinite(out).all() and model.count.item() == 2.0


class _Closure:
    """``f`` a function of a model, computing with a tensor held outside any module (a
    closure's), written in place at each evaluation: the same value (``count += 1``), or one
    from Python state no put-back covers (``differing``: a list's length)."""

    def __init__(self, differing: bool) -> None:
        self.model = _Core().to(f64)
        self.scale = torch.ones((), dtype=f64)
        self.seen: list[None] = []
        self.differing = differing

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(None)
        if self.differing:
            self.scale.fill_(float(len(self.seen)))
        else:
            self.scale.add_(1.0)
        return self.model.core(self.model.a(x)) * self.scale


@pytest.mark.parametrize("op, method", CALLS[:4], ids=[f"{o}-{m}" for o, m in CALLS[:4]])
def test_a_closure_write_that_differs_between_evaluations_is_refused(op, method):
    """The test above with the tensor held outside the modules: ``"auto"``'s Laplacian
    compared only the modules' tensors with the recording's writes, so its fallback's
    evaluations (2 for 1) returned the Laplacian of ``f`` with the later value (2x one
    evaluation's), silently: refused, the tensor put back."""
    torch.manual_seed(0)
    f = _Closure(differing=True)
    x = torch.rand(3, D, dtype=f64)
    probes = torch.randn(2, 3, D, dtype=f64)
    with pytest.raises((ValueError, RuntimeError), match="wrote other values"):
        _gradients(f.model, _call(f, x, op, method, probes))
    assert f.scale.item() == 1.0


@pytest.mark.parametrize("op, method", CALLS[3:5], ids=[f"{o}-{m}" for o, m in CALLS[3:5]])
def test_a_closure_counter_is_of_one_evaluation(op, method):
    """A closure's tensor that every evaluation writes alike (``count += 1``) then computes
    with: the values and parameter gradients of one evaluation, the tensor left as one
    evaluation leaves it (``"auto"``'s Laplacian records ``f``, then falls back)."""
    torch.manual_seed(0)
    f = _Closure(differing=False)
    x = torch.rand(3, D, dtype=f64)
    reference = _Closure(differing=False)
    reference.model = _copy(f.model)
    out = _call(f, x, op, method, torch.empty(0))
    ref = _reference(reference, x, op, None)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    got = _gradients(f.model, out)
    for name, value in _gradients(reference.model, ref).items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-11, msg=name)
    assert f.scale.item() == reference.scale.item() == 2.0
