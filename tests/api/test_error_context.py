"""Errors from inside ``f`` keep PyTorch's message and type, chained to the original, and add
torchdiv's context (the call, shapes and dtypes, method, engine) and a hint; torchdiv's own
argument errors are not wrapped, and the automatic fallbacks still switch engines."""

from __future__ import annotations

import errno
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdiv

f64 = torch.float64
CONTEXT = (
    r"\[torchdiv\] in {fn}\(f, x, \.\.\., batch_dims=1, method='{method}'\) with x of shape "
    r"\(8, 3\) and dtype torch\.float64"
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))  # float32


@pytest.mark.parametrize(
    ("fn", "method"),
    [
        ("divergence", "auto"),
        ("divergence", "forward"),
        ("divergence", "reverse"),
        ("divergence", "structured"),
        ("jacobian", "auto"),
        ("jacobian_diagonal", "auto"),
        ("laplacian", "auto"),
        ("laplacian", "forward-over-reverse"),
    ],
)
def test_a_dtype_mismatch_keeps_its_type_and_says_model_to(fn: str, method: str) -> None:
    x = torch.randn(8, 3, dtype=f64)
    with pytest.raises(RuntimeError) as info:
        getattr(torchdiv, fn)(_net(), x, method=method)
    message = str(info.value)
    assert message.startswith(f"{fn}: f(x) raised RuntimeError: mat1 and mat2 must have the same")
    assert info.match(CONTEXT.format(fn=fn, method=method))
    assert info.match(r"f was evaluated by (torch\.func|plain autograd|the structured recorder)")
    assert info.match(r"Hint: f's parameters are torch\.float32 but x is torch\.float64.*model\.to")
    assert type(info.value) is RuntimeError
    cause = info.value.__cause__  # PyTorch's own error, with its traceback
    assert isinstance(cause, RuntimeError) and "[torchdiv]" not in str(cause)
    assert str(cause).startswith("mat1 and mat2 must have the same dtype")


def test_estimate_divergence_too() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)^estimate_divergence: f\(x\) raised.*model\.to"):
        torchdiv.estimate_divergence(_net(), torch.randn(8, 3, dtype=f64), num_probes=4)


def test_a_function_of_t_and_x_gets_the_lambda_hint() -> None:
    net = _net()
    with pytest.raises(TypeError, match=r"missing 1 required positional argument") as info:
        torchdiv.divergence(lambda t, x: net(x), torch.randn(8, 3))
    assert info.match(r"^divergence: f\(x\) raised TypeError")
    assert info.match(r"Hint: torchdiv calls f\(x\) with the batch alone.*lambda x: f\(t, x\)")
    assert isinstance(info.value.__cause__, TypeError)


class _Flow(nn.Module):
    def __init__(self, mistake: str) -> None:
        super().__init__()
        self.net, self.mistake = _net().to(f64), mistake

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.mistake == "t[:, None]":
            return self.net(z) * t[:, None]
        if self.mistake == "cat([z, t])":  # (the net would take the time as a fourth input)
            return self.net(torch.cat([z, t], -1))
        return self.net(z)


@pytest.mark.parametrize(
    ("f", "x", "error", "hint"),
    [
        (_Flow("t[:, None]"), torch.randn(8, 3, dtype=f64), IndexError, r"t is a 0-dim tensor"),
        (_Flow("cat([z, t])"), torch.randn(8, 3, dtype=f64), RuntimeError, r"t is a 0-dim"),
        (_net().to(f64), torch.randn(8, 3, dtype=f64), TypeError, r".*calls f\(t, z\)"),
        (_Flow("none"), torch.randn(8, 3), RuntimeError, r"f's parameters are torch\.float64"),
    ],
)
def test_flow_mistakes(f, x: torch.Tensor, error: type, hint: str) -> None:
    pytest.importorskip("torchdiffeq")
    normal = lambda z: -0.5 * z.square().sum(-1)  # noqa: E731
    with pytest.raises(error) as info:
        torchdiv.flows.log_likelihood(f, x, 0.0, 1.0, normal, solver="euler",
                                      options={"step_size": 0.5})  # fmt: skip
    assert info.match(r"^log_likelihood: f\(t, z\) raised")
    assert info.match(rf"(?s)\[torchdiv\] in log_likelihood\(f, x, .*shape \(8, 3\).*Hint: {hint}")
    assert type(info.value) is error and isinstance(info.value.__cause__, error)


def test_torchdiv_argument_errors_are_not_wrapped() -> None:
    with pytest.raises(ValueError, match=r"^divergence: f\(x\) changed the batch shape") as info:
        torchdiv.divergence(lambda x: x[:2], torch.randn(8, 3))
    assert "[torchdiv]" not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(ValueError, match=r"^jacobian: unknown method 'fast'"):
        torchdiv.jacobian(_net(), torch.randn(8, 3), method="fast")


class _Legacy(torch.autograd.Function):
    """No ``setup_context``: torch.func refuses it, plain autograd runs it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos()


def test_the_automatic_fallback_still_switches_engines() -> None:
    # torch.func raises a RuntimeError for the legacy Function; "auto" must catch it (not a
    # wrapped error) and answer with plain autograd
    x = torch.randn(64, 16, dtype=f64)
    assert_close(torchdiv.divergence(_Legacy.apply, x), x.cos().sum(-1))
    assert_close(torchdiv.jacobian_diagonal(_Legacy.apply, x), x.cos())
    with pytest.raises(RuntimeError, match=r"^divergence: f\(x\) raised RuntimeError") as info:
        torchdiv.divergence(_Legacy.apply, x, method="forward")  # no fallback asked for
    assert info.match(r"evaluated by torch\.func")


def test_an_unknown_keyword_keeps_pythons_message_with_the_function_name():
    with pytest.raises(TypeError, match=r"^jacobian\(\) got an unexpected keyword argument 'foo'"):
        torchdiv.jacobian(lambda x: x, torch.randn(2, 3), foo=1)  # type: ignore[call-arg]


class _SampleError(Exception):
    """The caller's own exception, with a field a handler reads (its default, 0)."""

    def __init__(self, message: str, sample: int = 0) -> None:
        super().__init__(message)
        self.sample = sample


def _raises_its_own(x: torch.Tensor) -> torch.Tensor:
    error = _SampleError("sample 3 is bad", sample=3)
    if sys.version_info >= (3, 11):
        error.add_note("a note")
    else:  # (Python 3.10: no ``add_note``; the attribute 3.11's sets, pyvers31)
        error.__notes__ = ["a note"]
    raise error


def _raises_import_error(x: torch.Tensor) -> torch.Tensor:
    raise ImportError("no backend", name="backend")


@pytest.mark.parametrize(
    ("fn", "method"),
    [
        ("divergence", "auto"),
        ("divergence", "reverse"),
        ("jacobian", "forward"),
        ("laplacian", "grad-of-grad"),
        ("biharmonic", "auto"),  # (a Laplacian's error, renamed)
    ],
)
def test_an_error_of_f_keeps_its_attributes(fn: str, method: str) -> None:
    """The error raised in ``f``'s place is made anew from its type and the longer message:
    its attributes were the constructor's defaults, or missing (``error.sample`` read 0 for
    3; an ``ImportError``'s ``name`` was ``None``; the notes were gone). They are carried
    over, the message starts with the call."""
    x = torch.randn(8, 3, dtype=f64)
    with pytest.raises(_SampleError, match=rf"^{fn}: f\(x\) raised _SampleError") as info:
        getattr(torchdiv, fn)(_raises_its_own, x, method=method)
    assert info.value.sample == 3
    assert info.value.__notes__ == ["a note"]
    assert not hasattr(info.value, "_torchdiv_in_f")  # (torchdiv's own mark left behind)
    with pytest.raises(ImportError, match=rf"^{fn}: f\(x\) raised ImportError") as imported:
        getattr(torchdiv, fn)(_raises_import_error, x, method=method)
    assert imported.value.name == "backend"


class _SlottedError(Exception):
    """The caller's own exception keeping its field in ``__slots__``."""

    __slots__ = ("sample",)


def _raises_slotted(x: torch.Tensor) -> torch.Tensor:
    error = _SlottedError("sample 3 is bad")
    error.sample = 3
    raise error


def _raises_os_error(x: torch.Tensor) -> torch.Tensor:
    raise FileNotFoundError(errno.ENOENT, "no such file", "weights.pt")


def test_an_error_of_f_keeps_its_slots_and_errno() -> None:
    """Attributes outside ``__dict__`` were lost on the error raised in ``f``'s place: a
    ``__slots__`` field (``AttributeError`` on reading it) and an ``OSError``'s ``errno``
    (``None``: a handler's ``error.errno == errno.ENOENT`` failed)."""
    x = torch.randn(8, 3, dtype=f64)
    with pytest.raises(_SlottedError, match=r"^divergence: f\(x\) raised") as info:
        torchdiv.divergence(_raises_slotted, x)
    assert info.value.sample == 3
    with pytest.raises(FileNotFoundError, match=r"^divergence: f\(x\) raised") as os_info:
        torchdiv.divergence(_raises_os_error, x)
    assert os_info.value.errno == errno.ENOENT
    assert "no such file" in str(os_info.value)  # (the message: the original's, with context)


def test_a_tensor_of_the_default_dtype_made_inside_f_is_named_not_the_parameters() -> None:
    """A ridge layer's ``torch.eye(p)`` (float64 by default here) against float32 parameters
    and ``x``: the hint said "f's parameters are torch.float32 but x is torch.float32"."""
    lin = torch.nn.Linear(3, 3)

    def ridge(x: torch.Tensor) -> torch.Tensor:
        h = lin(x)
        a = h[:, :, None] * h[:, None, :] + torch.eye(3, dtype=f64)  # (a default-dtype eye)
        return torch.linalg.solve(a, h[..., None])[..., 0]

    with pytest.raises(RuntimeError) as info:
        torchdiv.divergence(ridge, torch.randn(4, 3))
    assert info.match(r"Hint: f's parameters and x are torch\.float32: f makes a tensor of")
    assert info.match("dtype=x.dtype")


@pytest.mark.parametrize("fn", ["biharmonic", "laplacian"])
def test_an_error_of_a_nested_call_is_named_by_the_call_made(fn: str) -> None:
    """``biharmonic`` calls ``laplacian`` inside ``laplacian``: the error of ``f`` comes out
    named ``biharmonic`` (it was named ``laplacian``), the context line naming the call that
    raised it."""
    with pytest.raises(RuntimeError) as info:
        getattr(torchdiv, fn)(_net(), torch.randn(8, 3, dtype=f64))
    assert info.match(rf"^{fn}: f\(x\) raised RuntimeError")
    assert info.match(
        r"\[torchdiv\] in laplacian\(f, x, \.\.\., batch_dims=1, method='(taylor|auto)'"
    )
    assert info.match(r"Hint: f's parameters are torch\.float32")


@pytest.mark.parametrize(
    ("fn", "way"),
    [
        ("divergence", "method='reverse'"),
        ("laplacian", "method='grad-of-grad' or 'taylor'"),
        ("distributed.laplacian", "method='grad-of-grad' or 'taylor'"),
        ("biharmonic", "chunk_size=1"),
    ],
)
def test_vmaps_randomness_error_gets_a_way_out_that_runs(fn: str, way: str) -> None:
    """Off the CPU forward mode's vmap keeps its randomness error (CUDA's fused dropout
    draws another mask under vmap); the hint names a method of ``fn`` that runs such an
    ``f`` (it named ``'auto'`` also to a call of ``'auto'``). The GPU is not needed here:
    the hint is read off PyTorch's message."""
    from torchdiv._api.reporting import _hint

    message = "vmap: called random operation while in randomness error mode."
    hint = _hint(fn, message, _net(), torch.randn(8, 3), "f(x)")
    assert hint is not None and f"Use {way}, " in hint and "chunk_size=1" in hint
    assert "'auto'" not in hint.split("Use ")[1]


# ----------------------------------------------------------------------------- checkpoint


def _checkpointed(module: nn.Module, reentrant: bool):
    from torch.utils.checkpoint import checkpoint

    return lambda z: checkpoint(module, z, use_reentrant=reentrant)


@pytest.mark.parametrize(
    ("fn", "method", "module"),
    [
        ("divergence", "forward", "net"),
        ("jacobian", "forward", "net"),
        ("jacobian_diagonal", "forward", "net"),
        ("divergence", "reverse", "net"),
        ("laplacian", "forward-over-reverse", "scalar"),
    ],
)
def test_a_non_reentrant_checkpoint_is_refused_at_the_call_with_the_way_out(fn, method, module):
    """Forward mode's products would only fail in the caller's backward pass
    (``CheckpointError``); the ``torch.func`` transforms refuse the checkpoint's hooks."""
    net = _net()
    f = net if module == "net" else (lambda z: net(z).sum(-1))
    with pytest.raises(
        RuntimeError, match=rf"(?s)^{fn}: .*use_reentrant=False\).*Use method='auto'"
    ):
        getattr(torchdiv, fn)(_checkpointed(f, False), torch.randn(8, 3), method=method)


@pytest.mark.parametrize(
    ("fn", "method"),
    [("divergence", "auto"), ("jacobian", "reverse"), ("laplacian", "grad-of-grad")],
)
def test_a_reentrant_checkpoint_gets_the_operator_and_the_way_out(fn, method):
    net = _net()
    f = net if fn != "laplacian" else (lambda z: net(z).sum(-1))
    with pytest.raises(
        RuntimeError, match=rf"(?s)^{fn}: .*Pass use_reentrant=False to torch\.utils\.checkpoint"
    ):
        getattr(torchdiv, fn)(_checkpointed(f, True), torch.randn(8, 3), method=method)


def test_auto_differentiates_through_a_non_reentrant_checkpoint():
    """Values and parameter gradients against a per-row ``autograd.grad`` loop on the
    module without the checkpoint (float32: ``tolerances``)."""
    net = _net()
    x = torch.randn(8, 3)
    div = torchdiv.divergence(_checkpointed(net, False), x, method="auto")
    (grad,) = torch.autograd.grad(div.sum(), net[0].weight)
    leaf = x.clone().requires_grad_(True)
    y = net(leaf)
    rows = [torch.autograd.grad(y[:, i].sum(), leaf, create_graph=True)[0][:, i] for i in range(3)]
    expected = sum(rows)
    (expected_grad,) = torch.autograd.grad(expected.sum(), net[0].weight)
    assert_close(div, expected, rtol=2e-5, atol=2e-5)
    assert_close(grad, expected_grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse"])
def test_biharmonics_own_check_of_f_is_raised_once_under_its_name(method):
    """The output check fires inside the outer Laplacian's ``f``; it was wrapped again, with a
    context line naming ``laplacian``, which the caller did not call."""
    with pytest.raises(TypeError) as info:
        torchdiv.biharmonic(
            lambda z: (z.to(torch.complex128) ** 2).sum(-1),
            torch.randn(3, 4, dtype=f64),
            method=method,
        )
    expected = (
        "biharmonic: f(x) must be a real floating tensor to be differentiated, got "
        "torch.complex128; differentiate torch.view_as_real(f(x)) instead"
    )
    assert str(info.value).startswith(expected)


def _hooked_net(inputs: int, hooked: bool = True) -> nn.Module:
    """A K-FAC optimiser's capture: a full backward hook on a hidden layer's module."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(inputs, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    net.append(nn.Linear(8, 1)).double()
    if hooked:
        net[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return net


@pytest.mark.parametrize(
    ("fn", "way"),
    [
        ("laplacian", "method='auto' or 'grad-of-grad':"),
        ("value_grad_laplacian", "method='auto', or laplacian(f, x, method="),
    ],
)
def test_a_modules_full_backward_hook_is_named_with_a_way_that_runs(fn, way) -> None:
    """PyTorch runs a module's full backward hook as an ``autograd.Function`` without
    ``setup_context``: forward over reverse refuses it. The hint names the hook (not an
    ``autograd.Function`` of the caller's) and a way that runs: ``"auto"``, past the loop's
    ten inputs too (it raised there, forward mode's error: now it loops where forward mode
    cannot run ``f``), with the values and parameter gradients of the Taylor engine on the
    net without the hook (float64)."""
    net, x = _hooked_net(11), torch.randn(4, 11, dtype=f64)
    with pytest.raises(RuntimeError, match=r"setup_context") as info:
        getattr(torchdiv, fn)(net, x, method="forward-over-reverse")
    hint = str(info.value).partition("\nHint: ")[2]
    assert "full backward hook" in hint and way in hint
    got = torchdiv.laplacian(net, x) if fn == "laplacian" else torchdiv.value_grad_laplacian(net, x)
    got = got if fn == "laplacian" else got.laplacian
    plain = _hooked_net(11, hooked=False)
    want = torchdiv.laplacian(plain, x, method="taylor")
    assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), list(net.parameters()), allow_unused=True)
    wanted = torch.autograd.grad(want.square().sum(), list(plain.parameters()), allow_unused=True)
    for a, b in zip(grads, wanted, strict=True):  # (None: the output bias, unused by both)
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


def test_a_dtype_hint_names_no_parameter_of_xs_own_dtype() -> None:
    """A float32 net holding a complex128 kernel (an S4D layer built in float64, then cast:
    ``.float()`` leaves complex parameters alone) meets float32 ``x``: the hint said "f's
    parameters are torch.float32 but x is torch.float32"; now it names no parameter."""
    net = nn.Linear(3, 3)
    net.kernel = nn.Parameter(torch.randn(3, 3, dtype=torch.complex128))
    f = lambda z: net(z) + (z.to(torch.complex64) @ net.kernel).real  # noqa: E731
    with pytest.raises(RuntimeError) as info:
        torchdiv.divergence(f, torch.randn(4, 3), method="reverse")
    assert "Hint: f computes in another dtype but x is torch.float32" in str(info.value)
