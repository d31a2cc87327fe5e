"""Regressions from the adversarial review of method="structured" (and "auto" choosing it).

Every test states the behaviour the issue or the API contract asks for, and failed before its
fix; the comments say what was wrong. References are float64 closed forms or the generic
methods.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import torchdiv
from torchdiv._bench.memory import peak_memory_mb

f64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_gelu_tanh_approximation_is_not_dropped() -> None:
    # factors._Walker._factors calls DERIVATIVES[op](a, y, *args[1:]) without node.kwargs:
    # gelu's `approximate` is keyword-only in ATen, so the exact-erf derivative is used.
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=f64)
    f = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    expected = torchdiv.divergence(f, x, method="reverse")
    _close(torchdiv.divergence(f, x, method="structured"), expected)
    _close(torchdiv.divergence(f, x), expected)


@pytest.mark.parametrize(("shape", "batch_dims"), [((1, 3, 5), 1), ((3, 5), 0)])
def test_linear_on_several_rows_of_one_sample(shape: tuple[int, ...], batch_dims: int) -> None:
    # With one sample every tensor passes _per_sample, so mm on a (T, D) block is taken as
    # Shared(W) on a D-wide event instead of I_T (x) W: tr(W) instead of T tr(W).
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).to(f64)
    x = torch.randn(shape, dtype=f64)
    expected = torchdiv.divergence(lin, x, batch_dims=batch_dims, method="reverse")
    _close(expected.reshape(-1), 3 * lin.weight.trace().reshape(1))
    _close(torchdiv.divergence(lin, x, batch_dims=batch_dims), expected)
    residual = lambda x: x + lin(x)  # noqa: E731
    _close(
        torchdiv.divergence(residual, x, batch_dims=batch_dims),
        torchdiv.divergence(residual, x, batch_dims=batch_dims, method="reverse"),
    )


def test_score_function_differentiating_inside_f() -> None:
    # f = grad E (score matching): the backward ops autograd runs inside f read saved
    # tensors through new tensor objects, so the recorder sees them as constants and the
    # divergence (the Laplacian of E) comes out wrong instead of falling back.
    torch.manual_seed(0)
    energy = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(f64)

    def score(x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]

    x = torch.randn(4, 5, dtype=f64, requires_grad=True)
    expected = torchdiv.divergence(score, x, method="reverse")
    _close(torchdiv.divergence(score, x), expected)


def test_buffer_read_then_updated_in_place() -> None:
    # capture() drops the kept values when f mutates anything, and values()/propagate()
    # replay the graph reading the buffer's *new* value: the divergence is taken at a
    # different function than the one f computed.
    torch.manual_seed(0)
    w = torch.randn(5, 5, dtype=f64)
    buf = torch.zeros(5, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w + buf)
        buf.add_(1.0)
        return y @ w

    x = torch.randn(4, 5, dtype=f64)
    y = torch.tanh(x @ w)
    expected = ((1 - y**2) * torch.diagonal(w @ w)).sum(1)  # at buf = 0
    buf.zero_()
    _close(torchdiv.divergence(f, x), expected)


def test_auto_fallback_runs_side_effects_once() -> None:
    # "auto" now captures f (one call) and, when the plan fails, runs the generic engine
    # (another call): a training-mode BatchNorm updates its running statistics twice.
    # Before issue 7, auto ran f's side effects once.
    torch.manual_seed(0)
    # (train-mode batch norm mixes samples: the opt-out lets the call through)
    net = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 5))
    with torchdiv.allow_batch_interaction():
        torchdiv.divergence(net, torch.randn(8, 5))
    assert net[1].num_batches_tracked.item() == 1


def test_custom_function_probe_does_not_call_f_again() -> None:
    # capture._custom_function re-runs f whenever x does not require grad and f computes
    # anything from x with autograd off (an ordinary no_grad block): f's side effects
    # (counters, RNG, running statistics) happen twice.
    w = torch.randn(5, 5)
    calls = []

    def f(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        with torch.no_grad():
            scale = x.norm()
        return torch.tanh(x @ w) * scale

    torchdiv.divergence(f, torch.randn(4, 5), method="structured")
    assert len(calls) == 1


def test_leaky_relu_slope_in_float64() -> None:
    # elementwise._leaky_relu builds torch.where(x > 0, 1.0, slope) in the default dtype
    # (float32) before casting: a float64 divergence is wrong in the 9th digit.
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=f64)
    expected = (x > 0).to(f64).sum(1) + 0.2 * (x <= 0).to(f64).sum(1)
    f = lambda x: F.leaky_relu(x, 0.2)  # noqa: E731
    torch.testing.assert_close(torchdiv.divergence(f, x), expected, rtol=1e-14, atol=1e-14)


def test_empty_batch_keeps_the_graph() -> None:
    # _planned returns x.new_zeros(...) for an empty x: no grad_fn, so a training loss
    # over an empty mini-batch cannot call backward (it could before, and with "reverse").
    net = nn.Linear(3, 3)
    x = torch.randn(0, 3, requires_grad=True)
    torchdiv.divergence(net, x, method="reverse").sum().backward()
    torchdiv.divergence(net, x).sum().backward()


def test_result_is_not_a_stride_zero_view() -> None:
    # cycle.trace returns total.expand(N) when no path is per-sample: the caller gets a
    # tensor whose elements share memory, and in-place updates raise.
    a = torch.tensor([[2.0, 1.0], [7.0, -5.0]])
    div = torchdiv.divergence(lambda x: x @ a.T, torch.randn(3, 2))
    div += 1
    torch.testing.assert_close(div, torch.full((3,), -2.0))


def test_chunk_size_bounds_memory_of_bottleneck_chain() -> None:
    # cycle._join multiplies adjacent shared matrices unconditionally: a D -> 2 -> D linear
    # bottleneck becomes a dense D x D matrix whatever chunk_size says (reverse: D/8 VJPs of
    # 8 rows).
    torch.manual_seed(0)
    d = 1500
    a, b = torch.randn(d, 2) / d**0.5, torch.randn(2, d)
    f = lambda x: torch.tanh(x @ a @ b)  # noqa: E731
    x = torch.randn(2, d)
    reverse = peak_memory_mb(lambda: torchdiv.divergence(f, x, method="reverse", chunk_size=8))
    structured = peak_memory_mb(lambda: torchdiv.divergence(f, x, chunk_size=8))
    assert structured < 4 * reverse + 1.0, (structured, reverse)


def test_index_select_is_a_movement_factor() -> None:
    # _MOVEMENT lists index_select, but _movement replaces every tensor other than the
    # source by -1, the index included: the op always fails ("INDICES element is out of
    # DATA bounds"), and method="structured" raises for a graph it claims to support.
    torch.manual_seed(0)
    w = torch.randn(5, 5, dtype=f64)
    idx = torch.tensor([4, 0, 1, 1, 2])
    f = lambda x: torch.tanh(x.index_select(1, idx)) @ w  # noqa: E731
    x = torch.randn(3, 5, dtype=f64)
    _close(
        torchdiv.divergence(f, x, method="structured"), torchdiv.divergence(f, x, method="reverse")
    )


def test_deep_chain_does_not_hit_the_recursion_limit() -> None:
    # _Walker.paths recurses once per op: a 400-layer MLP raises RecursionError, which is
    # reported as "no propagation rule for maximum recursion depth exceeded".
    layers: list[nn.Module] = []
    for _ in range(400):
        layers += [nn.Linear(3, 3), nn.Tanh()]
    net = nn.Sequential(*layers).to(f64)
    x = torch.randn(2, 3, dtype=f64)
    _close(
        torchdiv.divergence(net, x, method="structured"),
        torchdiv.divergence(net, x, method="reverse"),
    )


# Second review: capture (views, repeated writes, batch norm statistics, generators, torch.func
# transforms, custom Functions that detach, backward passes around the call), chains.

D = 24


def _reference_diagonal(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobian diagonal of ``f`` at ``x`` (batch_dims=1) by plain autograd."""
    x = x.detach().clone().requires_grad_(True)
    y = f(x)
    out = torch.zeros_like(x)
    for i in range(x.shape[1]):
        (g,) = torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)
        out[:, i] = g[:, i]
    return out


def _reference_divergence(f, x: torch.Tensor) -> torch.Tensor:
    return _reference_diagonal(f, x).sum(-1)


class _NumpyCube(torch.autograd.Function):
    """x**3 computed outside torch, as in PyTorch's "extending with numpy" tutorial."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.detach().numpy() ** 3)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_custom_function_that_detaches_its_input(method: str) -> None:
    # capture._Recorder.refuse flags a custom Function only when an op *reads x* with grad
    # and forward grad off; aten.detach is in _CONSTANT_RESULTS (reads_x is False for it), so
    # a forward that starts with x.detach() (needed for .numpy()) is never seen: its output
    # is a constant and the divergence comes out 0 instead of falling back.
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    x = torch.randn(32, D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(_NumpyCube.apply(x) @ w)

    _close(torchdiv.divergence(f, x, method="reverse"), _reference_divergence(f, x))
    if method == "structured":  # no replay can run the Function: refuse, as documented
        with pytest.raises(NotImplementedError):
            torchdiv.divergence(f, x, method=method)
    else:
        _close(torchdiv.divergence(f, x, method=method), _reference_divergence(f, x))


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_vmap_over_divergence_is_not_silently_zero(method: str) -> None:
    # Under torch.func transforms the dispatch mode sees the unwrapped tensors, not the x
    # passed to capture (another id): nothing depends on x and the result is 0 for every
    # sample. Before issue 7, "auto" raised here (torch.func refuses requires_grad_) instead
    # of returning a wrong number.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(80, 32), nn.Tanh(), nn.Linear(32, 80)).to(f64)
    x = torch.randn(4, 80, dtype=f64)
    expected = _reference_divergence(net, x)
    try:
        got = vmap(lambda xi: torchdiv.divergence(net, xi, batch_dims=0, method=method))(x)
    except (RuntimeError, NotImplementedError):
        return  # refusing is acceptable; a wrong value is not
    _close(got, expected)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_torch_func_grad_of_divergence_wrt_parameters(method: str) -> None:
    # torch.func.grad over functional_call: the parameters are GradTrackingTensors, the
    # recorder keeps their unwrapped values by reference, and the replayed divergence is
    # not differentiable w.r.t. the wrapped ones: the training gradient is wrong.
    # method="reverse" gives the right gradient.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, D)).to(f64)
    x = torch.randn(32, D, dtype=f64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], m: str) -> torch.Tensor:
        return torchdiv.divergence(lambda z: functional_call(net, p, (z,)), x, method=m).sum()

    expected = grad(loss)(params, "reverse")
    try:
        got = grad(loss)(params, method)
    except (RuntimeError, NotImplementedError):
        return  # refusing is acceptable; a wrong gradient is not
    for name in params:
        _close(got[name], expected[name])


def _check_buffer_case(f, x: torch.Tensor, buf: torch.Tensor, diag: bool = False) -> None:
    reference = _reference_diagonal if diag else _reference_divergence
    op = torchdiv.jacobian_diagonal if diag else torchdiv.divergence
    start = buf.clone()
    expected = reference(f, x)
    after_one_call = buf.clone()
    for method in ("auto", "structured"):
        buf.copy_(start)
        _close_or_refused(lambda m=method: op(f, x, method=m), expected, method)
        _close(buf, after_one_call)


def _close_or_refused(call, expected: torch.Tensor, method: str) -> None:
    """``"auto"`` must be right; ``"structured"`` may refuse what it cannot replay exactly
    (writes to tensors f read before), with ``NotImplementedError``."""
    try:
        _close(call(), expected)
    except NotImplementedError as exc:
        assert method == "structured" and "read before" in str(exc), exc


@pytest.mark.parametrize("diag", [False, True])
def test_buffer_written_twice(diag: bool) -> None:
    # keep_outside snapshots the buffer at its first write only: after `buf.add_` the
    # recorder maps id(buf) to the add_ node (a Ref), so the second write is skipped
    # (`id(tensor) in self.refs`), and the reads between the two writes replay the kept
    # output of add_, i.e. the live buffer after *both* writes.
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    buf = torch.zeros(D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w + buf)
        buf.add_(1.0)
        z = torch.tanh(y @ w + buf)
        buf.add_(1.0)
        return torch.tanh(z @ w + buf)

    _check_buffer_case(f, torch.randn(32, D, dtype=f64), buf, diag)


def test_buffer_written_through_a_view() -> None:
    # `buf[:5].add_(1)`: the slice is a recorded output (a Ref), so keep_outside skips it
    # (`id(tensor) in self.refs`): the buffer is neither snapshotted for earlier readers nor
    # restored by Graph.undo.
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    buf = torch.zeros(D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w + buf)
        buf[:5].add_(1.0)
        return torch.tanh(y @ w + buf)

    _check_buffer_case(f, torch.randn(32, D, dtype=f64), buf)


def test_buffer_written_through_a_view_then_fallback_runs_it_once() -> None:
    # The same write, then an op without a rule: "auto" falls back after Graph.undo, which
    # has no snapshot of the buffer, so the update happens twice.
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    buf = torch.zeros(D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w + buf)
        buf[:5].add_(1.0)
        return torch.cummax(y @ w, -1).values

    torchdiv.divergence(f, torch.randn(32, D, dtype=f64))
    _close(buf, torch.tensor([1.0] * 5 + [0.0] * (D - 5), dtype=f64))


def test_outside_view_read_then_buffer_written() -> None:
    # A closure holding a view of the buffer: readers are keyed by id(view) but the write is
    # to id(buf), so the reads of the view are not rewritten to the snapshot and the replay
    # reads the updated values.
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    buf = torch.zeros(D, dtype=f64)
    view = buf[:]

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w + view)
        buf.add_(1.0)
        return torch.tanh(y @ w)

    _check_buffer_case(f, torch.randn(32, D, dtype=f64), buf)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_batch_norm_running_statistics_move_once(method: str) -> None:
    # aten.native_batch_norm writes running_mean/var without marking them in its schema
    # (no `Tensor(a!)`): _written misses them, Graph.undo cannot restore them, _kept does
    # not keep the call, and values() replays it (f mutated num_batches_tracked, so the
    # values are recomputed): the statistics move 2x ("structured", which then refuses) or
    # 3x ("auto": capture, replay, generic engine) instead of once. The first review's test
    # checked num_batches_tracked only.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.Tanh(), nn.Linear(D, D))
    net = net.to(f64).train()
    x = torch.randn(32, D, dtype=f64)
    net(x)
    once = net[1].running_mean.clone(), net[1].running_var.clone()
    net[1].reset_running_stats()
    with (
        contextlib.suppress(NotImplementedError),  # "structured" refuses; f still ran once
        torchdiv.allow_batch_interaction(),  # train-mode batch norm mixes samples
    ):
        torchdiv.divergence(net, x, method=method)
    _close(net[1].running_mean, once[0])
    _close(net[1].running_var, once[1])


class _Velocity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).to(f64)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(z.shape[0], 1)], 1))


def test_structured_flow_with_adjoint() -> None:
    # The adjoint solve evaluates the dynamics inside autograd's backward pass, where
    # torch._C._current_graph_task_id() != -1 for every op: _Recorder.refuse takes that for
    # "a backward pass (autograd.grad) inside f", so method="structured" raises for a plain
    # MLP (and "auto" silently loses the structured engine for the whole backward solve).
    # Suggested: compare with the task id at capture's entry, not with -1.
    from torchdiv.flows import log_likelihood

    torch.manual_seed(0)
    f = _Velocity()
    x = torch.randn(8, 4, dtype=f64)

    def base(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z**2).sum(-1)

    grads = {}
    for method in ("reverse", "structured"):
        f.zero_grad()
        log_likelihood(f, x, 0.0, 1.0, base, method=method, adjoint=True).sum().backward()
        grads[method] = [p.grad.clone() for p in f.parameters()]
    for got, expected in zip(grads["structured"], grads["reverse"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_no_grad_block_inside_f_called_from_a_custom_function_forward() -> None:
    # A custom Function's forward runs with forward-mode AD off (torchdiffeq's adjoint solve
    # does, for instance); capture enables grad around f but not forward AD, so an ordinary
    # no_grad block in f is taken for "a custom autograd.Function" and "structured" refuses
    # a graph it plans outside the Function. (An inference_mode block misfires the same way.)
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    x = torch.randn(32, D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = x.norm(dim=1, keepdim=True)
        return torch.tanh(x @ w) * scale

    class Outer(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return torchdiv.divergence(f, x, method="structured")

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
            pass

        @staticmethod
        def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
            return g

    _close(Outer.apply(x), torchdiv.divergence(f, x, method="structured"))


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_in_place_write_to_x_inside_f(method: str) -> None:
    # f doubles x in place: the recorder records a functional mul and maps id(x) to it, but
    # values() replays (f mutated something) reading Ref(-1) = the already doubled x, so the
    # plan is evaluated at 4 x instead of 2 x: a silently wrong divergence. Every method now
    # refuses an f that writes into its input, naming the op (tests/api/test_no_mutation.py).
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    x0 = torch.randn(32, D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return torch.tanh(x @ w)

    x = x0.clone()
    with pytest.raises(ValueError, match=r"writes into its input x in place \(aten\.mul_"):
        torchdiv.divergence(f, x, method=method)
    assert torch.equal(x, x0)


def test_structured_divergence_under_non_reentrant_checkpoint() -> None:
    # Same root cause as the adjoint: torch.utils.checkpoint recomputes f during backward,
    # where the graph task id is set, so the recomputation refuses ("structured") or takes
    # the generic engine ("auto": CheckpointError, the recomputed tensors differ from the
    # saved ones).
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, D)).to(f64)
    x = torch.randn(32, D, dtype=f64)
    expected = torch.autograd.grad(torchdiv.divergence(net, x).sum(), net[0].weight)[0]
    for method in ("auto", "structured"):
        out = checkpoint(
            lambda z, m=method: torchdiv.divergence(net, z, method=m), x, use_reentrant=False
        )
        _close(torch.autograd.grad(out.sum(), net[0].weight)[0], expected)


def test_torch_func_grad_of_laplacian_wrt_parameters() -> None:
    # The Laplacian's Taylor engine shares the capture: the same unwrapped parameters give
    # a wrong training gradient under torch.func.grad ("forward-over-reverse" is right).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(f64)
    x = torch.randn(16, 8, dtype=f64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], m: str) -> torch.Tensor:
        u = lambda z: functional_call(net, p, (z,)).squeeze(-1)  # noqa: E731
        return torchdiv.laplacian(u, x, method=m).sum()

    expected = grad(loss)(params, "forward-over-reverse")
    try:
        got = grad(loss)(params, "auto")
    except (RuntimeError, NotImplementedError):
        return
    for name in params:
        _close(got[name], expected[name])


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # cummax's batched backward
def test_fallback_restores_an_explicit_generator() -> None:
    # Graph.undo restores the global generators (_random_states) only: noise drawn from a
    # torch.Generator that f owns is drawn again by the fallback, so the generator moves
    # twice (the generic engines alone move it once, as f does).
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 5
    x = torch.randn(32, D, dtype=f64)
    gen = torch.Generator().manual_seed(0)

    def f(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen, dtype=f64)
        return torch.cummax(torch.tanh(x @ w) + noise, -1).values  # no rule: falls back

    f(x)
    once = gen.get_state()
    gen.manual_seed(0)
    torchdiv.divergence(f, x)
    assert torch.equal(gen.get_state(), once)


@pytest.mark.parametrize("write", ["diagonal_zero", "setitem", "fill_view"])
def test_in_place_write_through_a_view_of_a_tensor_made_in_f(write: str) -> None:
    # A weight with its diagonal zeroed inside f (a hollow layer, the classic trick for
    # cheap exact divergences), or a mask filled through a slice: the write goes to a view
    # (a recorded output, skipped by keep_outside), it is kept not replayed, but the base
    # tensor is read through its own node, which values() replays (f mutated something)
    # without the write: the plan sees an unmasked weight and the result is silently wrong.
    # Suggested: compare tensor._version (shared by views) at every read with the version
    # recorded with the Ref; a changed constant is read as a snapshot, a changed dependent
    # tensor makes the graph unsupported.
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 3
    x = torch.randn(32, D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        if write == "diagonal_zero":
            m = w.clone()
            m.diagonal().zero_()
            return torch.tanh(x @ m) @ m
        mask = torch.ones(D, dtype=f64)
        if write == "setitem":
            mask[:5] = 2.0
        else:
            mask[:4].fill_(0.0)
        return torch.tanh(x @ w) @ (w * mask)

    expected = _reference_diagonal(f, x)
    for method in ("auto", "structured"):
        _close_or_refused(
            lambda m=method: torchdiv.jacobian_diagonal(f, x, method=m), expected, method
        )
        _close_or_refused(
            lambda m=method: torchdiv.divergence(f, x, method=m), expected.sum(-1), method
        )


def test_view_of_buffer_made_before_the_write_and_read_after_it() -> None:
    # keep_outside rewrites the readers of the buffer to its snapshot, the view op included:
    # a view taken before the write and read after it replays the old values, where f read
    # the updated ones.
    torch.manual_seed(0)
    w = torch.randn(D, D, dtype=f64) / 3
    buf = torch.zeros(D, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        v = buf.view(D)
        y = torch.tanh(x @ w + v)
        buf.add_(1.0)
        return torch.tanh(y @ w + v)

    _check_buffer_case(f, torch.randn(32, D, dtype=f64), buf)


@pytest.mark.parametrize("diag", [False, True])
def test_addmm_whose_bias_is_its_own_input(diag: bool) -> None:
    # factors._Walker._matmul took addmm(a, a, W) = beta a + alpha a W for the one factor W
    # (the bias read no further): the identity path through the bias was lost, tr(D W)
    # instead of tr(D (beta I + alpha W)) (an error of 1.0-2.0 per sample).
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=f64)  # past TINY_PROBLEM: "auto" plans it too
    weight = torch.randn(16, 16, dtype=f64) / 4
    f = lambda x: torch.tanh(torch.addmm(x, x, weight, beta=2.0, alpha=0.5))  # noqa: E731
    op = torchdiv.jacobian_diagonal if diag else torchdiv.divergence
    expected = op(f, x, method="reverse")
    _close(op(f, x, method="structured"), expected)
    _close(op(f, x), expected)


_BIASES_FROM_X = {  # a bias computed from x by a path of its own (not the factor's input)
    "addmm(tanh x, x, W)": lambda x, w, v: torch.addmm(torch.tanh(x), x, w, beta=0.5),
    "addmm(sin(x) V, tanh x, W)": lambda x, w, v: torch.tanh(
        torch.addmm(torch.sin(x) @ v, torch.tanh(x), w, alpha=2.0)
    ),
    "linear + linear": lambda x, w, v: torch.tanh(
        F.linear(torch.tanh(x), w) + F.linear(x, v, torch.cos(v[0]))
    ),
    "baddbmm(tanh x, x, W)": lambda x, w, v: torch.baddbmm(
        torch.tanh(x)[:, None], x[:, None], w.expand(len(x), -1, -1)
    )[:, 0],
}


@pytest.mark.parametrize("method", ["structured", "auto"])
@pytest.mark.parametrize("case", list(_BIASES_FROM_X))
def test_a_matmul_whose_bias_depends_on_x_by_another_path(case: str, method: str) -> None:
    # reviewed after a dependent addmm bias was made to end the chain (factors._Walker._matmul):
    # divergences and their weight gradients against per-sample autograd Jacobians.
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=f64)
    w = (torch.randn(5, 5, dtype=f64) / 3).requires_grad_()
    v = torch.randn(5, 5, dtype=f64) / 3
    f = functools.partial(_BIASES_FROM_X[case], w=w, v=v)
    got = torchdiv.divergence(f, x, method=method)
    want = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda z: f(z[None])[0], xi, create_graph=True)
            .diagonal()
            .sum()
            for xi in x
        ]
    )
    _close(got, want)
    _close(torch.autograd.grad(got.sum(), w)[0], torch.autograd.grad(want.sum(), w)[0])


@pytest.mark.parametrize("method", ["structured", "auto"])
def test_a_reshape_of_an_empty_map_in_a_conv_net(method: str) -> None:
    # locality._groups matched element counts of the reshape's dimensions, and ran past the
    # end of a shape holding a 0 (IndexError); an empty tensor now ends the analysis.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1).to(f64)
    x = torch.randn(2, 2, 8, 8, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        empty = z[:, :, :0].reshape(2, 2, 8, 0)  # no rows of features
        return torch.tanh(conv(z)) + torch.cat([empty, torch.tanh(z)], -1)

    expected = torchdiv.jacobian_diagonal(f, x, method="reverse")
    _close(torchdiv.jacobian_diagonal(f, x, method=method), expected)
