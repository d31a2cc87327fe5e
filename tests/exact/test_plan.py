"""What method="auto" plans: mode and chunk size from one watched evaluation of f."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    central_difference,
    directional_gradient,
    reference_diagonal,
    reference_divergence,
    reference_jacobian,
    shifted,
    tanh_mlp,
)

import torchdiv
from torchdiv._core import crossover
from torchdiv._exact import plan as _plan
from torchdiv._exact.autograd import LOOP_ROWS, GraphJacobian
from torchdiv._exact.dispatch import evaluate
from torchdiv._exact.forward import ForwardJacobian
from torchdiv._exact.reverse import ReverseJacobian


def _planned(f, x, batch_dims):
    """The engine and chunk size ``"auto"`` runs ``f`` with."""
    return evaluate(f, x, batch_dims, "auto", None, lambda engine, chunk: (engine, chunk))[0]


def test_op_sizes_sees_the_widest_intermediate_and_convolutions():
    net = tanh_mlp(4, 32, 4, torch.float32)  # its 32 x 32 weight is larger than a (8, 32) layer
    with _plan.OpSizes(torch.Size([8])) as sizes:
        net(torch.randn(8, 4))
    assert sizes.widest == 8 * 32 and not sizes.convolves
    conv = torch.nn.Conv2d(2, 5, 3, padding=1)
    with _plan.OpSizes(torch.Size([3])) as sizes:
        conv(torch.randn(3, 2, 4, 4))
    assert sizes.widest == 3 * 5 * 16 and sizes.convolves


def test_chunk_keeps_chunk_times_widest_near_the_budget():
    sizes = _plan.OpSizes(torch.Size([4]))
    for widest, num_basis, chunk in [(1 << 15, 256, 64), (10, 7, 7), (1 << 30, 7, 1)]:
        sizes.widest = widest
        assert sizes.chunk(num_basis) == chunk


def test_square_mlp_uses_reverse_mode_chunked_by_its_widest_layer():
    net = tanh_mlp(256, 512, 256, torch.float32)
    engine, chunk = _planned(net, torch.randn(64, 256), batch_dims=1)
    assert isinstance(engine, ReverseJacobian)
    assert chunk == _plan.CHUNK_ELEMENTS // (64 * 512)


def test_conv_net_uses_forward_mode():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 3, padding=1)
    )
    engine, chunk = _planned(net, torch.randn(8, 3, 16, 16), batch_dims=1)
    assert isinstance(engine, ForwardJacobian)
    assert chunk == _plan.CHUNK_ELEMENTS // (8 * 8 * 16 * 16)


def test_more_outputs_than_inputs_uses_forward_mode():
    for batch in (2, 512):
        engine, chunk = _planned(tanh_mlp(16, 8, 64), torch.randn(batch, 16).double(), 1)
        assert isinstance(engine, ForwardJacobian) and 1 <= chunk <= 16


def test_tiny_problems_are_watched_once_then_go_in_one_chunk(monkeypatch):
    """The first call of each ``f`` object at a structure is watched for sample mixing."""
    f, x = torch.nn.Tanh(), torch.randn(64, 16)  # 16k elements
    _planned(f, x, batch_dims=1)
    monkeypatch.setattr(_plan.OpSizes, "__enter__", lambda self: pytest.fail("watched"))
    engine, chunk = _planned(f, x, batch_dims=1)
    assert isinstance(engine, ReverseJacobian) and chunk == 16
    with pytest.raises(pytest.fail.Exception, match="watched"):
        _planned(torch.nn.Tanh(), x, batch_dims=1)  # another object: watched


def test_small_conv_nets_above_the_tiny_size_use_forward_mode():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    engine, chunk = _planned(conv, torch.randn(8, 2, 8, 8), batch_dims=1)  # the demo's size
    assert isinstance(engine, ForwardJacobian) and chunk == 128


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_conv_net_with_fused_attention_runs_forward_mode_on_the_math_backend():
    """CPU fused attention has no forward-mode rule: the generic engines run attention on the
    math backend, whose ops have one, so a conv net takes forward mode as any other."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).double()

    def f(x):  # (B, 8, 8, 8): a convolution, then attention over the 64 pixels, 8 features
        h = conv(x).flatten(2).transpose(1, 2).contiguous()[:, None]  # fused kernel
        out = torch.nn.functional.scaled_dot_product_attention(h, h, h)
        return out[:, 0].transpose(1, 2).reshape(x.shape)

    x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    with _plan.OpSizes(torch.Size([4])) as sizes:
        f(x)
    assert sizes.convolves and not sizes.forward_rules  # the fused kernel, outside the engines
    engine, _ = _planned(f, x, batch_dims=1)
    assert isinstance(engine, ForwardJacobian)
    want = torchdiv.divergence(f, x, method="reverse")
    assert_close(torchdiv.divergence(f, x, method="forward"), want)


def test_tiny_square_problems_take_plain_autograd_unwatched_after_a_watch(monkeypatch):
    net, x = tanh_mlp(2, 8, 2), torch.randn(64, 2).double()

    def run():
        return evaluate(net, x, 1, "auto", None, lambda e, c: (e, c), square=True)[0]

    assert type(run()[0]) is ReverseJacobian  # the first call: watched, torch.func
    monkeypatch.setattr(_plan.OpSizes, "__enter__", lambda self: pytest.fail("watched"))
    engine, chunk = run()
    assert type(engine) is GraphJacobian and chunk == 2


def test_square_problems_up_to_rows_problem_take_rows_once_a_planned_watch_passed():
    """Above ``TINY_PROBLEM``, up to ``ROWS_PROBLEM``: the first call is planned and watched,
    later ones go by plain autograd rows; not a conv net (its backward is the slower side),
    nor a larger problem, nor a function that mixes samples (its watch raises every time)."""
    net = tanh_mlp(16, 8, 16)
    x = torch.randn(256, 16, dtype=torch.float64)
    assert _plan.TINY_PROBLEM < 16 * x.numel() <= crossover.ROWS_PROBLEM

    def run(f, z):
        return type(evaluate(f, z, 1, "auto", None, lambda e, c: (e, c), square=True)[0][0])

    assert run(net, x) is ReverseJacobian
    assert run(net, x) is GraphJacobian
    assert_close(torchdiv.divergence(net, x, method="reverse"), reference_divergence(net, x))
    assert run(net, torch.randn(512, 16, dtype=torch.float64)) is ReverseJacobian  # larger
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    image = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    assert _plan.TINY_PROBLEM < 64 * image.numel() <= crossover.ROWS_PROBLEM
    assert [run(conv, image) for _ in range(2)] == [ForwardJacobian] * 2
    mixes = lambda z: net(z - z.mean(0))  # noqa: E731
    for _ in range(2):
        with pytest.raises(torchdiv.BatchInteractionError):
            run(mixes, x)


@pytest.mark.parametrize("d", [LOOP_ROWS, LOOP_ROWS + 1])  # one pass per row; batched
def test_tiny_divergence_and_its_parameter_gradients_by_plain_autograd(d):
    """Values and parameter gradients against jacrev and float64 finite differences."""
    net = tanh_mlp(d, 8, d)
    x = torch.randn(16, d, dtype=torch.float64)
    div = torchdiv.divergence(net, x)
    assert div.requires_grad  # parameters require grad: a graph for the training loss
    assert_close(div, reference_divergence(net, x))
    assert_close(torchdiv.jacobian_diagonal(net, x), reference_diagonal(net, x))
    _assert_parameter_gradient_matches_differences(div, net, net, x)


def _assert_parameter_gradient_matches_differences(div, net, f, x) -> None:
    """``div``'s gradient along random directions of ``net``'s parameters against a float64
    central difference of the reference divergence of ``f``."""
    params = list(net.parameters())
    directions = [torch.randn_like(p) for p in params]
    analytic = directional_gradient(div, params, directions)

    def moved(t):
        with shifted(params, directions, t), torch.no_grad():
            return reference_divergence(f, x).sum()

    numeric = central_difference(moved).item()
    assert abs(analytic - numeric) <= 1e-8 * max(1.0, abs(numeric))


@pytest.mark.parametrize("event", [(1,), (2,), (1, 2)])
def test_tiny_entries_read_off_rows_after_the_watch(monkeypatch, event):
    """At most ``LOOP_ROWS`` rows, plain autograd reads each row's diagonal entry off its
    product (``GraphJacobian.entries``): values, parameter gradients and each share's part
    (``torchdiv.distributed``) as the block path gives them, the result a tensor of its own
    (written in place, the next call is unchanged)."""
    from torchdiv._core.basis import Share
    from torchdiv._exact.dispatch import diagonal_and_output

    d = event[-1]
    net = tanh_mlp(d, 8, d)
    g = lambda z: net(z.reshape(len(z), d)).reshape(z.shape)  # noqa: E731
    x = torch.randn(16, *event, dtype=torch.float64)
    torchdiv.divergence(g, x)  # the first call: watched, torch.func
    read = []
    entries = GraphJacobian.entries
    monkeypatch.setattr(GraphJacobian, "entries", lambda *a: read.append(1) or entries(*a))
    div = torchdiv.divergence(g, x)
    assert read, "the rows' entries were not read"
    assert_close(div, reference_divergence(g, x))
    assert_close(torchdiv.jacobian_diagonal(g, x), reference_diagonal(g, x))
    _assert_parameter_gradient_matches_differences(div, net, g, x)
    with torch.no_grad():
        div.add_(100.0)
    assert_close(torchdiv.divergence(g, x), reference_divergence(g, x))
    parts = [
        diagonal_and_output("divergence", g, x, 1, "auto", None, True, Share(i, 2))[0]
        for i in range(2)
    ]
    assert_close(parts[0] + parts[1], reference_divergence(g, x))


def test_tiny_problems_evaluate_f_outside_safe_derivatives_unless_its_graph_needs_them():
    """Plain autograd evaluates ``f`` outside ``SafeDerivatives`` once it passed a watch; an
    op the mode replaces (``cdist``: PyTorch's ``_cdist_backward`` has no derivative, so a
    divergence's parameter gradient raised) shows in the graph: ``f`` is evaluated again
    under the mode, and later calls start there; where the watched first call's
    ``torch.func`` evaluation ran the replacement, they start there at once (the second call
    evaluated ``f`` twice). Values and parameter gradients as a reference by ``torch.func``
    over the replacement, at every call (float64)."""
    from torchdiv._core.modes import _cdist
    from torchdiv._taylor import mixing

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()

    def f(z, distance=torch.cdist):
        points = lin(z).reshape(-1, 2, 2)
        return distance(points, points).reshape(-1, 4) + z.sin()

    x = torch.randn(6, 4, dtype=torch.float64)
    want = reference_divergence(lambda z: f(z, _cdist), x)
    (want_grad,) = torch.autograd.grad(want.sum(), lin.weight)
    for _ in range(3):  # watched, under the mode (torch.func); then under the mode at once
        div = torchdiv.divergence(f, x)
        assert_close(div, want)
        assert_close(torch.autograd.grad(div.sum(), lin.weight)[0], want_grad)
        assert not mixing.passed_before(f, x, 1).plain
    for _ in range(2):  # without an op the mode changes, f stays outside it
        assert_close(torchdiv.divergence(lin, x), reference_divergence(lin, x))
        assert mixing.passed_before(lin, x, 1).plain


def test_cotangents_written_in_place_or_results_aliasing_them_never_reach_the_next_call():
    """Tiny problems' cotangents are new at each call (copies of kept blocks, ``basis``): a
    user's in-place write to a Jacobian diagonal that autograd returned as the cotangent
    itself (a copy of ``x``) changed later calls' values when one tensor served every call
    (1.57, 3.14, 6.27 for the same divergence; so did a gradient hook inside ``f`` scaling
    its incoming gradient in place, which every method now refuses:
    ``tests/exact/test_implicit_layers.py``)."""
    x = torch.randn(8, 4, dtype=torch.float64)
    shift, w = torch.randn(4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    g = lambda z: torch.tanh(z @ w)  # noqa: E731
    for _ in range(3):
        diagonal = torchdiv.jacobian_diagonal(lambda z: z + shift, x)
        assert_close(diagonal, torch.ones_like(x))
        diagonal.mul_(0.5)  # the caller scales the result in place
        assert_close(torchdiv.divergence(g, x), reference_divergence(g, x))


class _Switch:
    """A plain object (weakly referenced: ``identity`` holds it by identity alone)."""

    wide = 0


def test_jacobian_remembers_a_square_output_and_survives_a_stale_guess(monkeypatch):
    # (a plain object's int attribute, which the structure key does not hold: its bool, str
    # and None attributes are held since rev-train23; a dictionary's
    # entry is held since leftovers19, a new structure watched again, not a stale guess; an
    # object without weak references, a ``SimpleNamespace``, since rev-merges19e: ``f`` is
    # not told by what it holds, watched at every call)
    scale = _Switch()

    def f(x):  # the same code object (site) with an output that changes size
        return torch.cat([x.sin(), x.cos()], -1) if scale.wide else x.sin()

    x = torch.randn(8, 2, dtype=torch.float64)
    assert_close(torchdiv.jacobian(f, x), reference_jacobian(f, x))
    # from the second call on, plain autograd rows: torch.func's engines are not built
    monkeypatch.setattr(ReverseJacobian, "__init__", lambda *a: pytest.fail("reverse mode"))
    assert_close(torchdiv.jacobian(f, x), reference_jacobian(f, x))
    scale.wide = 1  # a stale guess: rows of a larger output, still exact
    assert_close(torchdiv.jacobian(f, x), reference_jacobian(f, x))


def test_a_tiny_problems_first_watched_call_is_planned_as_the_later_ones():
    """The first call of a tiny problem is watched for sample mixing only: a conv net keeps
    reverse mode (the watch saw a convolution), so a seeded estimate repeats exactly (it
    differed between the first call and the next, as DDP's reference found)."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3, padding=1)
    ).double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)

    def estimate():
        seeded = torch.Generator().manual_seed(2)
        return torchdiv.jacobian_diagonal(
            conv, x, method="hutchinson", num_probes=2, generator=seeded
        )

    first = estimate()
    assert torch.equal(first, estimate())


def test_a_one_block_jacobian_is_the_callers_to_write_to():
    """A Jacobian of one block is that block (no copy), unless the block overlaps itself
    (forward mode through ``expand``: stride 0): every result takes an in-place write, and
    the next call is unchanged."""
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.randn(3, 3, dtype=torch.float64)
    cases = [
        (lambda z: torch.tanh(z @ w), "reverse"),
        (lambda z: z[:, :1].expand(-1, 3), "forward"),
    ]
    for f, method in cases:
        for _ in range(2):
            jac = torchdiv.jacobian(f, x, method=method)
            assert_close(jac, reference_jacobian(f, x))
            jac.add_(1.0)
