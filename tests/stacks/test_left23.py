"""Items the twenty-second session left alone (rev-left23): the operators under
``FakeTensorMode`` (shape-only tracing, memory estimation), ``check_batch_independence`` of a
``torch.cond``, the graph forms under ``FlopCounterMode``, ``method="taylor"`` on a
whole-tensor ``max()``/``min()``/``median()``, and ``log_likelihood``'s stopped-field check.

References: each sample's derivatives in float64 by grad of grad (``laplacian_alone``,
``reference_divergence``), ``torch.autograd`` on the caller's own graph, parameter gradients
by ``assert_same_parameter_gradients``; under ``FakeTensorMode`` only shapes exist, so the
checks there are the shapes and a right value by a real call after the fake ones."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import torchdiv
from tests.conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_alone,
    reference_divergence,
    reference_jacobian,
    tanh_mlp,
)

f64 = torch.float64


# --- FakeTensorMode: shapes without values ---------------------------------------------


def _fake_call(call, d_out: int) -> torch.Tensor:
    """``call(net, x)`` on a tanh MLP 3 -> 16 -> d_out and x (5, 3) made in a fresh
    ``FakeTensorMode``, with PyTorch's warnings (a fake tensor's ``data_ptr``) as errors."""
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, d_out))
        return call(net, torch.randn(5, 3))


FAKE_SCALAR = {
    # the auto Laplacian's finiteness check read a value (.item(): DataDependentOutputException)
    "laplacian-auto": lambda f, x: torchdiv.laplacian(f, x),
    "value_grad_laplacian": lambda f, x: torchdiv.value_grad_laplacian(f, x).laplacian,
}


@pytest.mark.parametrize("name", FAKE_SCALAR)
def test_laplacians_trace_under_fake_tensor_mode(name):
    """Twice (two fake modes: nothing fake kept between calls), then a real call right."""
    for _ in range(2):
        assert _fake_call(FAKE_SCALAR[name], 1).shape == (5, 1)
    net, x = tanh_mlp(3, 16, 1), torch.randn(5, 3, dtype=f64)
    assert_close(FAKE_SCALAR[name](net, x), laplacian_alone(net, x)[:, None])


def test_estimates_trace_under_fake_tensor_mode_twice_then_real():
    """hutch++ and xtrace draw Rademacher probes from a cached sign table: made in the first
    fake mode, the next fake mode refused it ("Mixing fake modes NYI"); a real call after the
    fake ones draws real signs (hutch++ with a sketch as wide as the event: exact)."""
    for method in ("hutch++", "xtrace", "hutch++"):

        def call(f, x, m=method):
            return torchdiv.estimate_divergence(f, x, method=m, num_probes=6).value

        assert _fake_call(call, 3).shape == (5,)
    a, x = torch.randn(3, 3, dtype=f64), torch.randn(4, 3, dtype=f64)
    got = torchdiv.estimate_divergence(lambda z: z @ a.T, x, method="hutch++", num_probes=9).value
    assert_close(got, a.trace().expand(4))


def test_divergence_auto_under_fake_tensor_mode_reads_no_data_pointer():
    """The recorders keyed a tensor's memory by ``data_ptr()``, which a fake tensor warns of
    ("deprecated ... undefined behavior"): a meta storage is keyed by its storage object."""
    assert _fake_call(lambda f, x: torchdiv.divergence(f, x), 3).shape == (5,)
    assert _fake_call(lambda f, x: torchdiv.jacobian(f, x), 3).shape == (5, 3, 3)


@pytest.mark.parametrize("method", ["taylor", "structured"])
def test_recording_methods_name_fake_tensor_mode_and_the_way_out(method):
    """The recorders cannot follow a fake tensor: the error said "the torch.Tensor subclass
    FakeTensor ... a plain tensor: x.as_subclass(torch.Tensor)", a way out that does not
    exist under the mode; now it names the mode and meta tensors or ``"auto"``."""
    call = (
        (lambda f, x: torchdiv.laplacian(f, x, method="taylor"), 1)
        if method == "taylor"
        else (lambda f, x: torchdiv.divergence(f, x, method="structured"), 3)
    )
    with pytest.raises(Exception, match=r"FakeTensorMode.*x\.to\('meta'\).*method='auto'"):
        _fake_call(*call)


def test_biharmonic_under_fake_tensor_mode_is_refused_and_autograd_survives():
    """Its nested forward-over-reverse met a meta tensor that is not fake, and PyTorch's error
    (formatting a dual tensor) left autograd's dispatch keys excluded in the thread: every
    later result had no graph. Now refused up front, naming meta tensors; on meta it runs."""
    with pytest.raises(RuntimeError, match=r"biharmonic: .*FakeTensorMode.*to\('meta'\)"):
        _fake_call(lambda f, x: torchdiv.biharmonic(f, x), 1)
    z = torch.randn(2, requires_grad=True)
    assert (z * 2).requires_grad
    net = tanh_mlp(3, 8, 1).to("meta")
    assert torchdiv.biharmonic(net, torch.randn(5, 3, dtype=f64, device="meta")).shape == (5, 1)


# --- check_batch_independence of torch.cond ------------------------------------------------


def _cond(z: torch.Tensor) -> torch.Tensor:
    return torch.cond(z.abs().max() > 1, lambda t: t.sin() * 2, lambda t: t.sin(), (z,))


def test_check_batch_independence_names_torch_cond_as_the_operators_do():
    """It raised PyTorch's "There was no rule registered for HigherOrderOperator cond and mode
    <Changes object>" (the mode that puts f's changes back); now the operators' message."""
    with pytest.raises(NotImplementedError) as raised:
        torchdiv.check_batch_independence(_cond, torch.randn(4, 3))
    message = str(raised.value)
    assert message.startswith("check_batch_independence: f(x) raised NotImplementedError")
    assert "Hint: f calls torch.cond," in message and "torch.where" in message


# --- graph forms under FlopCounterMode ----------------------------------------------------


GRAPH_FORMS = {
    "graph_divergence": (torchdiv.graph_divergence, 3, reference_divergence),
    "graph_jacobian": (torchdiv.graph_jacobian, 3, reference_jacobian),
    "graph_laplacian": (torchdiv.graph_laplacian, 1, lambda f, x: laplacian_alone(f, x)[:, None]),
}


@pytest.mark.parametrize("name", GRAPH_FORMS)
def test_graph_forms_under_a_flop_counter_name_the_cause_and_the_way_out(name):
    """The counter's module tracker hooks a leaf x in the caller's forward, which PyTorch
    refuses in ``autograd.grad`` (pytorch#131753): it came out as "the graph of f(x) cannot be
    walked twice". Named now; the way out it gives (a non-leaf x) is right, with the values
    and parameter gradients of each sample alone."""
    form, d_out, reference = GRAPH_FORMS[name]
    net, x0 = tanh_mlp(3, 8, d_out), torch.randn(4, 3, dtype=f64)
    leaf = x0.clone().requires_grad_(True)
    with FlopCounterMode(display=False), pytest.raises(RuntimeError) as raised:
        form(net(leaf), leaf)
    assert str(raised.value).startswith(f"{name}: y was computed under a module tracker")
    assert "cannot be walked twice" not in str(raised.value)
    x = x0.clone().requires_grad_(True).view_as(x0)
    with FlopCounterMode(display=False) as counter:
        ours = form(net(x), x, create_graph=True)
    assert counter.get_total_flops() > 0
    expected = reference(net, x0)
    assert_close(ours, expected)
    assert_same_parameter_gradients(net, ours.square().sum(), expected.square().sum())


# --- method="taylor" on whole-tensor max / min / median -----------------------------------


def _branchy(net: nn.Module, statistic):
    """A field whose Python branch reads a batch statistic (``if x.abs().max() > 1:``)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        y = net(x)
        if statistic(x) > 1:
            y = y / 2
        return y

    return f


STATISTICS = {
    "max": lambda x: x.abs().max(),
    "max-item": lambda x: x.abs().max().item(),
    "min": lambda x: -(-x.abs()).min(),
    "median": lambda x: x.abs().median() * 3,
}


@pytest.mark.parametrize("name", STATISTICS)
def test_taylor_takes_a_batch_statistic_that_picks_the_branch(name):
    """``aten.max.default`` (and ``min``, ``median`` of every element) had no propagation
    rule: ``method="taylor"`` refused the field though the value only chose the branch."""
    net, x = tanh_mlp(3, 8, 1), torch.randn(5, 3, dtype=f64)
    f = _branchy(net, STATISTICS[name])
    ours = torchdiv.laplacian(f, x, method="taylor")
    expected = torchdiv.laplacian(f, x, method="grad-of-grad")
    assert_close(ours, expected)
    assert_same_parameter_gradients(net, ours.sum(), expected.sum())


@pytest.mark.parametrize("op", ["max", "min", "median"])
def test_taylor_rules_of_whole_tensor_extrema_reach_the_output(op):
    """With one sample the statistic is per sample, and its derivatives reach the output:
    against grad of grad (autograd spreads them over ties; here none), parameter gradients."""
    net, x = tanh_mlp(3, 8, 1), torch.randn(1, 3, dtype=f64)
    stat = getattr(torch.Tensor, op)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z) * stat(z) + stat(z.sin()) ** 2

    ours = torchdiv.laplacian(f, x, method="taylor")
    expected = laplacian_alone(f, x)[:, None]
    assert_close(ours, expected)
    assert_same_parameter_gradients(net, ours.sum(), expected.sum())


def test_taylor_still_refuses_a_whole_batch_max_in_the_output():
    """The rule lets the value through; the watch still refuses it mixing samples."""
    net, x = tanh_mlp(3, 8, 1), torch.randn(5, 3, dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError, match=r"aten\.max\.default"):
        torchdiv.laplacian(lambda z: net(z) * z.max(), x, method="taylor")


# --- log_likelihood's stopped-field check ---------------------------------------------------

odeint = pytest.importorskip("torchdiffeq").odeint
EULER = {"solver": "euler", "options": {"step_size": 0.25}}
TIMES = torch.tensor([1.0, 0.0], dtype=f64)  # log_likelihood(f, x, 0, 1): from t1 back to t0


def log_p0(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.square().sum(-1)


def _solved(field, x: torch.Tensor) -> torch.Tensor:
    """``log p0(z(t0)) - ∫ div f`` by torchdiffeq's Euler steps (as ``log_likelihood``'s),
    each divergence a per-sample grad loop of the field in float64."""

    def augmented(t, state):
        z = state[0]
        with torch.enable_grad():
            leaf = z if z.requires_grad else z.detach().requires_grad_(True)
            v = field(t, leaf)
            div = sum(
                torch.autograd.grad(v[:, i].sum(), leaf, create_graph=True)[0][:, i]
                for i in range(v.shape[1])
            )
        return v, -div

    z, delta = odeint(
        augmented, (x, x.new_zeros(len(x))), TIMES, method="euler", options=EULER["options"]
    )
    return log_p0(z[-1]) - delta[-1]


def test_the_check_leaves_a_closure_counter_as_the_solve_left_it():
    """A rotation's divergence is exactly 0 at every step, so the stopped-field check runs:
    its evaluation counted in the caller's ``nonlocal`` counter (5 for 4 Euler steps)."""
    rotation = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=f64)
    calls = 0

    def turned(t, z):
        nonlocal calls
        calls += 1
        return z @ rotation.T

    x = torch.randn(3, 2, dtype=f64)
    ours = torchdiv.flows.log_likelihood(turned, x, 0.0, 1.0, log_p0, **EULER)
    assert calls == 4
    assert_close(ours, _solved(turned, x))


def _under_no_grad(net, z):
    with torch.no_grad():
        return net(z)


PARTLY = {
    "no_grad": lambda net, z: torch.cat([net(z)[:, :1], _under_no_grad(net, z)[:, 1:]], -1),
    "detach": lambda net, z: torch.cat([net(z)[:, :1], net(z.detach())[:, 1:]], -1),
}


@pytest.mark.parametrize("method", ["auto", "reverse", "hutchinson"])
@pytest.mark.parametrize("stop", PARTLY)
def test_a_partly_stopped_field_is_refused(stop, method):
    """One component under ``no_grad`` (or detached): its term of the divergence is left out,
    the others are not, so the sum is not 0 and the check did not run: log p(x) was off by
    that term's integral, silently. Now refused, naming the component."""
    net, x = tanh_mlp(2, 8, 2), torch.randn(3, 2, dtype=f64)
    options = {"num_probes": 2} if method == "hutchinson" else {}
    with pytest.raises(ValueError, match=r"components \[1\] of f\(t, z\)"):
        torchdiv.flows.log_likelihood(
            lambda t, z: PARTLY[stop](net, z),
            x,
            0.0,
            1.0,
            log_p0,
            method=method,
            **options,
            **EULER,
        )


def test_a_stop_beside_a_piecewise_constant_component_is_not_refused():
    """A value read off the graph for logging (``.item()``) and a component piecewise constant
    in z (a comparison: derivative 0 is right): its values do not move at a small step, so the
    field is not stopped. Values and parameter gradients against the per-sample solve."""
    net, x = tanh_mlp(2, 8, 1), torch.randn(3, 2, dtype=f64)
    seen = []

    def field(t, z):
        seen.append(z.detach().abs().max().item() + z.norm().item())
        return torch.cat([net(z) * t, (z[:, 1:] > 0).to(z.dtype)], -1)

    ours = torchdiv.flows.log_likelihood(field, x, 0.0, 1.0, log_p0, **EULER)
    expected = _solved(field, x)
    assert_close(ours, expected)
    assert_same_parameter_gradients(net, ours.sum(), expected.sum())
