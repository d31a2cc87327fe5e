"""torchdiv called under the process-wide modes real tools set around a training step:
``torch.utils.flop_counter.FlopCounterMode`` counting the step's FLOPs. References: each
sample's derivatives in float64 outside any mode (``reference_divergence`` and friends: the
diagonal blocks of the cross-batch Jacobian; ``laplacian_alone``: grad of grad per sample),
parameter gradients by ``assert_same_parameter_gradients``."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules import module as nn_module
from torch.utils.flop_counter import FlopCounterMode

import torchdiv
from tests.conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_alone,
    reference_diagonal,
    reference_divergence,
    reference_jacobian,
    tanh_mlp,
)

f64 = torch.float64

# (operator, method, reference): the engines whose module-tracking hooks PyTorch refused
# ("A leaf node was passed to _will_engine_execute_node", the recordings' requires_grad read)
VECTOR = {
    "divergence-forward": (torchdiv.divergence, "forward", reference_divergence),
    "divergence-reverse": (torchdiv.divergence, "reverse", reference_divergence),
    "divergence-structured": (torchdiv.divergence, "structured", reference_divergence),
    "jacobian-forward": (torchdiv.jacobian, "forward", reference_jacobian),
    "jacobian-reverse": (torchdiv.jacobian, "reverse", reference_jacobian),
    "diagonal-forward": (torchdiv.jacobian_diagonal, "forward", reference_diagonal),
    "diagonal-structured": (torchdiv.jacobian_diagonal, "structured", reference_diagonal),
}
SCALAR = {
    "laplacian-auto": lambda f, x: torchdiv.laplacian(f, x),
    "laplacian-taylor": lambda f, x: torchdiv.laplacian(f, x, method="taylor"),
    "laplacian-forward-over-reverse": lambda f, x: torchdiv.laplacian(
        f, x, method="forward-over-reverse"
    ),
    "laplacian-grad-of-grad": lambda f, x: torchdiv.laplacian(f, x, method="grad-of-grad"),
    "value_grad_laplacian": lambda f, x: torchdiv.value_grad_laplacian(f, x).laplacian,
}


def _hooks() -> list[list]:
    """Every global module hook, in order."""
    return [
        list(hooks.items())
        for hooks in (
            nn_module._global_forward_pre_hooks,
            nn_module._global_forward_hooks,
            nn_module._global_backward_pre_hooks,
            nn_module._global_backward_hooks,
        )
    ]


@pytest.mark.parametrize("case", VECTOR)
def test_a_flop_counted_step_takes_right_values_and_parameter_gradients(case):
    op, method, reference = VECTOR[case]
    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64)
    with FlopCounterMode(display=False) as counter:
        hooks = _hooks()
        got = op(net, x, method=method)
        assert _hooks() == hooks  # the tracker's hooks are back
    assert counter.get_total_flops() > 0
    want = reference(net, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.sum(), want.sum())


@pytest.mark.parametrize("case", SCALAR)
def test_a_flop_counted_laplacian_takes_right_values_and_parameter_gradients(case):
    net, x = tanh_mlp(3, 8, 1), torch.randn(4, 3, dtype=f64)

    def u(z: torch.Tensor) -> torch.Tensor:
        return net(z).squeeze(-1)

    with FlopCounterMode(display=False) as counter:
        got = SCALAR[case](u, x)
        # the step's own forward and backward, module by module, as before the call
        (got.sum() + u(x).sum()).backward(retain_graph=True)
    want = laplacian_alone(u, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.sum(), want.sum())
    assert {"Sequential", "Sequential.0"} <= set(counter.get_flop_counts())


def test_a_flop_counter_counts_what_the_call_runs_and_keeps_its_hooks_after_an_error():
    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64)
    with FlopCounterMode(display=False) as forward:
        net(x)
    with FlopCounterMode(display=False) as counter:
        hooks = _hooks()
        torchdiv.divergence(net, x, method="reverse")
        assert counter.get_total_flops() > 3 * forward.get_total_flops()  # 3 VJPs at least

        def failing(z: torch.Tensor) -> torch.Tensor:
            net(z)
            raise ValueError("inside f")

        with pytest.raises(ValueError, match="inside f"):
            torchdiv.divergence(failing, x, method="forward")
        assert _hooks() == hooks


def test_a_step_under_comm_debug_mode_is_right_and_its_hooks_stay():
    """``CommDebugMode`` (DTensor's debugging of collectives) tracks modules by a
    ``ModTracker`` and a global full backward pre-hook, which ``torch.func`` refused."""
    from torch.distributed.tensor.debug import CommDebugMode

    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64)
    with CommDebugMode():
        hooks = _hooks()
        got = torchdiv.divergence(net, x, method="reverse")
        lap = torchdiv.laplacian(lambda z: net(z)[:, 0], x, method="taylor")
        assert _hooks() == hooks
    want = reference_divergence(net, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.sum(), want.sum())
    assert_close(lap, laplacian_alone(lambda z: net(z)[:, 0], x))


def test_a_call_outside_the_flop_counter_after_one_inside_is_right():
    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64)
    with FlopCounterMode(display=False):
        torchdiv.divergence(net, x, method="structured")
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    got = torchdiv.divergence(net, x, method="structured")
    assert_close(got, reference_divergence(net, x))


def test_the_watch_still_refuses_a_mixing_f_under_a_flop_counter():
    net, x = tanh_mlp(3, 8, 3), torch.randn(6, 3, dtype=f64)
    with FlopCounterMode(display=False):
        with pytest.raises(torchdiv.BatchInteractionError):
            torchdiv.divergence(lambda z: net(z - z.mean(0)), x)
        torchdiv.divergence(lambda z: net(z), x)  # per sample: not refused


# activation offloading around the step: torch.func's reverse mode refuses saved-tensor hooks
REFUSED = {
    "divergence-reverse": lambda net, u, x: torchdiv.divergence(net, x, method="reverse"),
    "jacobian-reverse": lambda net, u, x: torchdiv.jacobian(net, x, method="reverse"),
    "laplacian-hessian": lambda net, u, x: torchdiv.laplacian(u, x, method="hessian"),
    "biharmonic-forward-over-reverse": lambda net, u, x: torchdiv.biharmonic(
        u, x, method="forward-over-reverse"
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_method_torch_func_refuses_under_save_on_cpu_names_the_way_out(case):
    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64)

    def u(z: torch.Tensor) -> torch.Tensor:
        return net(z).sum(-1)

    fn = case.partition("-")[0]
    with torch.autograd.graph.save_on_cpu(), pytest.raises(RuntimeError) as error:
        REFUSED[case](net, u, x)
    assert str(error.value).startswith(f"{fn}: method=")
    assert "method='auto'" in str(error.value) and "save_on_cpu" in str(error.value)


def test_auto_under_offloading_hooks_is_right_and_offloads():
    net, x = tanh_mlp(3, 8, 1), torch.randn(4, 3, dtype=f64)

    def u(z: torch.Tensor) -> torch.Tensor:
        return net(z).squeeze(-1)

    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = torchdiv.laplacian(u, x)
    assert packed
    want = laplacian_alone(u, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.sum(), want.sum())


def test_a_compiled_model_under_a_flop_counter_runs_eagerly_and_right():
    """Dynamo skips every frame under a dispatch mode that does not ignore compile internals:
    torchdiv's call compiled like ``f`` (``fullgraph``) raised "found no compiled frames",
    where the compiled model alone runs eagerly there."""
    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64)
    compiled = torch.compile(net, backend="eager")
    with FlopCounterMode(display=False) as counter:
        got = torchdiv.divergence(compiled, x, method="reverse")
    assert counter.get_total_flops() > 0
    want = reference_divergence(net, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.sum(), want.sum())
