"""Every way a module can change between two calls of the same ``f`` (issue 19's list), each
seen by the next call: a change that makes ``f`` mix samples is refused, not served from the
first call's watch (``torchdiv._taylor.cache.structure_key``, which any memo of it must keep
seeing), one that only changes values gives this call's values and parameter gradients, and
one that stops the mixing is not refused.

References are independent of the engines: a per-sample loop of ``autograd.grad`` on each
sample alone (``create_graph``, so the loss's parameter gradients are plain grad-of-grad).
float64 throughout: both sides are a few hundred flops deep, 1e-10 is round-off."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchdiv
from torchdiv import BatchInteractionError
from torchdiv._taylor.mixing import passed_before, structure

f64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


class _Centre(nn.Module):
    """Subtracts the batch mean: mixes samples."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y - y.mean(0)


class _CentredInTraining(nn.Module):
    """Subtracts the batch mean in train mode only."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y - y.mean(0) if self.training else y


class _Flagged(nn.Module):
    """Mixes samples when its flag says so."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = False

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y - y.mean(0) if self.mix else y


class _Stack(nn.Module):
    """Applies its layers in turn, a ``ModuleList`` as most repositories write a stack."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Tanh()])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z)
        return z


class _Head(nn.Module):
    """A linear layer, then its optional ``post`` submodule, ``act`` and an optional ``shift``
    buffer and ``scale`` parameter (read only when registered)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.post: nn.Module = nn.Identity()
        self.act: Callable[[torch.Tensor], torch.Tensor] = torch.tanh

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.act(self.post(self.lin(z)))
        shift, scale = self._buffers.get("shift"), self._parameters.get("scale")
        y = y if shift is None else y + shift * z
        return y if scale is None else y * scale


class _Permuted(nn.Module):
    """Moves the samples of ``tanh(lin(z))`` along the batch by an optional index: a buffer
    ``perm`` (``None`` until set, PyTorch's optional-buffer idiom), a buffer ``order`` read
    only once registered, or a plain tensor attribute ``index``."""

    def __init__(self, perm: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("perm", perm)
        self.index = torch.arange(4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(z))[self.index]
        y = y if self.perm is None else y[self.perm]
        order = self._buffers.get("order")
        return y if order is None else y[order]


_SWAP = [1, 0, 3, 2]  # swaps samples 0 and 1, 2 and 3


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), _CentredInTraining(), nn.Tanh()).double().eval()


def _head() -> _Head:
    torch.manual_seed(0)
    return _Head().double().eval()


def _mixing_cases() -> dict[str, Callable[[], tuple[Any, Callable[[], None]]]]:
    """``f`` and the change after which it mixes samples."""

    def own_train_mode():
        net = _sequential()
        return net, net.train

    def one_submodule_s_train_mode():
        net = _sequential()
        return net, net[1].train

    def submodule_replaced():
        net = _sequential()

        def change() -> None:
            net[2] = _Centre()

        return net, change

    def submodule_deleted_and_set_again():
        m = _head()

        def change() -> None:
            del m.post
            m.post = _Centre()

        return m, change

    def submodule_appended_to_a_module_list():
        torch.manual_seed(0)
        m = _Stack().double()
        return m, lambda: m.layers.append(_Centre())

    def submodule_registered():
        m = _head()
        return m, lambda: m.register_module("post", _Centre())

    def forward_replaced_on_the_instance():
        m = _head()
        plain = m.forward
        return m, lambda: setattr(m, "forward", lambda z: _Centre()(plain(z)))

    def function_attribute_swapped():
        m = _head()
        return m, lambda: setattr(m, "act", torch.flipud)  # reverses the batch

    def forward_hook_with_keywords():
        m = _head()

        def centred(module: nn.Module, args: Any, kwargs: Any, out: torch.Tensor) -> Any:
            return out - out.mean(0)

        return m, lambda: m.lin.register_forward_hook(centred, with_kwargs=True)

    def flag_written_into_the_dict():
        m = _head()
        m.post = _Flagged()
        return m, lambda: m.post.__dict__.update(mix=True)  # (no __setattr__)

    def flag_set_by_object_setattr():
        m = _head()
        m.post = _Flagged()
        return m, lambda: object.__setattr__(m.post, "mix", True)

    def class_swapped_on_the_instance():
        m = _head()

        def change() -> None:
            m.post.__class__ = _Centre  # (not in the instance's __dict__: no write to it)

        return m, change

    def flag_of_a_module_another_f_shares():
        inner = _Flagged()
        torch.manual_seed(0)
        lin = nn.Linear(3, 3).double()
        other = nn.Sequential(lin, inner)
        torchdiv.divergence(other, torch.randn(4, 3, dtype=f64))  # the other f passed
        return (lambda z: inner(torch.tanh(lin(z)))), lambda: setattr(inner, "mix", True)

    def permuted(perm: torch.Tensor | None = None) -> nn.Module:
        torch.manual_seed(0)
        return _Permuted(perm).double()

    def buffer_set_from_none():
        m = permuted()
        return m, lambda: setattr(m, "perm", torch.tensor(_SWAP))

    def buffer_replaced():
        m = permuted(torch.arange(4))
        return m, lambda: setattr(m, "perm", torch.tensor(_SWAP))

    def buffer_registered():
        m = permuted()
        return m, lambda: m.register_buffer("order", torch.tensor(_SWAP))

    def tensor_attribute_replaced():
        m = permuted()
        return m, lambda: setattr(m, "index", torch.tensor(_SWAP))

    def buffer_copied_into():
        m = permuted(torch.arange(4))
        return m, lambda: m.perm.copy_(torch.tensor(_SWAP))

    def buffer_loaded_from_a_state_dict():
        m = permuted(torch.arange(4))
        state = {**m.state_dict(), "perm": torch.tensor(_SWAP)}
        return m, lambda: m.load_state_dict(state)  # (copies into the buffer, in place)

    def tensor_attribute_written_in_place():
        m = permuted()

        def change() -> None:
            m.index[:2] = torch.tensor([1, 0])

        return m, change

    def traced_module_s_buffer_copied_into():
        with warnings.catch_warnings():  # torch.jit's own deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            m = torch.jit.trace(permuted(torch.arange(4)), torch.randn(4, 3, dtype=f64))
        return m, lambda: m.perm.copy_(torch.tensor(_SWAP))

    return {
        "buffer set from None": buffer_set_from_none,
        "traced module's buffer copied into": traced_module_s_buffer_copied_into,
        "buffer copied into": buffer_copied_into,
        "buffer loaded from a state_dict": buffer_loaded_from_a_state_dict,
        "plain tensor attribute written in place": tensor_attribute_written_in_place,
        "buffer replaced": buffer_replaced,
        "register_buffer": buffer_registered,
        "plain tensor attribute replaced": tensor_attribute_replaced,
        "train() of f": own_train_mode,
        "train() of one submodule": one_submodule_s_train_mode,
        "submodule replaced (setattr)": submodule_replaced,
        "submodule deleted, set again": submodule_deleted_and_set_again,
        "ModuleList.append": submodule_appended_to_a_module_list,
        "register_module": submodule_registered,
        "forward replaced on the instance": forward_replaced_on_the_instance,
        "function attribute swapped": function_attribute_swapped,
        "forward hook with keywords": forward_hook_with_keywords,
        "flag of a module shared with another f": flag_of_a_module_another_f_shares,
        "flag written into __dict__": flag_written_into_the_dict,
        "flag set by object.__setattr__": flag_set_by_object_setattr,
        "__class__ swapped on the instance": class_swapped_on_the_instance,
    }


CALLS = {
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    "jacobian": lambda f, x: torchdiv.jacobian(f, x),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case", _mixing_cases())
def test_a_change_that_makes_f_mix_samples_is_refused(case: str, call: str) -> None:
    """Two calls of ``f`` (watched once, then served from that watch), a change, and the
    third call mixes samples: refused, not given from the first call's watch (what a stale
    structure key gives: the sample's own block of a function of the whole batch)."""
    f, change = _mixing_cases()[case]()
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        CALLS[call](f, x)
    change()
    with pytest.raises(BatchInteractionError):
        CALLS[call](f, x)


def test_a_new_submodule_at_a_freed_one_s_address_is_seen() -> None:
    """A submodule freed and a new one of the same class put in its place that took the old
    one's ``id`` (CPython's allocator hands a freed object's memory back within a few tries):
    its flag is read from it, not from what was kept for the ``id`` (a memo keyed by ``id``
    alone served the freed module's watch, and the mixing went unrefused). Tried until an
    ``id`` comes back; every try must be refused."""
    m = _head()
    x = torch.randn(4, 3, dtype=f64)
    seen = set()
    for _ in range(300):
        m.post = _Flagged()
        for _ in range(2):
            torchdiv.divergence(m, x)
        seen.add(id(m.post))
        m.post = nn.Identity()  # the old one freed
        new = _Flagged()
        new.mix = True
        m.post = new
        with pytest.raises(BatchInteractionError):
            torchdiv.divergence(m, x)
        if id(new) in seen:
            break
    else:
        pytest.skip("no id came back")


def _stops_mixing_cases() -> dict[str, Callable[[], tuple[Any, Callable[[], None]]]]:
    """``f`` that mixes samples and the change after which it does not."""

    def eval_after_train():
        net = _sequential().train()
        return net, net.eval

    def hook_removed():
        net = _sequential()

        def centred(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            return out - out.mean(0)

        handle = net[0].register_forward_hook(centred)
        return net, handle.remove

    def mixing_submodule_deleted():
        m = _head()
        m.post = _Centre()

        def change() -> None:
            del m.post
            m.post = nn.Identity()

        return m, change

    return {
        "eval() after train()": eval_after_train,
        "hook removed": hook_removed,
        "mixing submodule replaced": mixing_submodule_deleted,
    }


@pytest.mark.parametrize("case", _stops_mixing_cases())
def test_a_change_that_stops_the_mixing_is_not_refused(case: str) -> None:
    """Refused while ``f`` mixes samples (twice: a refusal kept is kept for this structure
    only), then after the change the divergence of the per-sample reference."""
    f, change = _stops_mixing_cases()[case]()
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        with pytest.raises(BatchInteractionError):
            torchdiv.divergence(f, x)
    change()
    torch.testing.assert_close(torchdiv.divergence(f, x), _reference(f, x)[0], **TOL)


def _reference(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[Any, ...]:
    """Each sample's divergence from ``f`` of that sample alone (a row per output), with the
    graph kept: ``(divergence, weighted sum)`` for a loss's parameter gradients."""
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1].detach().requires_grad_(True)
        yi = f(xi)
        rows = [
            torch.autograd.grad(yi[0, k], xi, create_graph=True)[0][0, k] for k in range(x.shape[1])
        ]
        out.append(torch.stack(rows).sum())
    div = torch.stack(out)
    return div, (div * torch.arange(1.0, len(x) + 1, dtype=x.dtype)).sum()


class _Symmetric(nn.Module):
    """A parametrization: the weight's symmetric part."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.T) / 2


def _value_changes() -> dict[str, Callable[[nn.Module], None]]:
    """Changes of a ``_head()`` (training: its parameters require grad) after which ``f``
    computes other values, or sends gradients to other tensors, on the same calls."""

    def parameter_replaced(m: nn.Module) -> None:
        m.lin.weight = nn.Parameter(torch.randn(3, 3, dtype=f64))

    def data_swapped(m: nn.Module) -> None:
        m.lin.weight.data = torch.randn(3, 3, dtype=f64)

    def optimizer_step(m: nn.Module) -> None:
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        torch.optim.SGD(m.parameters(), lr=0.5).step()

    def state_loaded(m: nn.Module) -> None:
        torch.manual_seed(1)
        m.load_state_dict(_Head().double().state_dict())

    def parameter_registered(m: nn.Module) -> None:
        m.register_parameter("scale", nn.Parameter(torch.tensor([0.5, 2.0, 3.0], dtype=f64)))

    def buffer_registered(m: nn.Module) -> None:
        m.register_buffer("shift", torch.tensor([1.0, -2.0, 0.5], dtype=f64))

    def frozen(m: nn.Module) -> None:
        m.lin.weight.requires_grad_(False)

    def tied(m: nn.Module) -> None:
        m.post = nn.Linear(3, 3).double()
        m.post.weight = m.lin.weight

    def parametrized(m: nn.Module) -> None:
        parametrize.register_parametrization(m.lin, "weight", _Symmetric())

    def parametrization_removed(m: nn.Module) -> None:
        parametrize.register_parametrization(m.lin, "weight", _Symmetric())
        m(torch.randn(2, 3, dtype=f64))  # (one call of the parametrized module, unwatched)
        parametrize.remove_parametrizations(m.lin, "weight", leave_parametrized=False)

    return {
        "parameter replaced": parameter_replaced,
        ".data swapped": data_swapped,
        "optimizer step": optimizer_step,
        "load_state_dict": state_loaded,
        "register_parameter": parameter_registered,
        "register_buffer": buffer_registered,
        "requires_grad_(False)": frozen,
        "weight tied": tied,
        "parametrization added": parametrized,
        "parametrization removed": parametrization_removed,
    }


@pytest.mark.parametrize("method", ["auto", "reverse", "structured"])
@pytest.mark.parametrize("change", _value_changes())
def test_values_and_parameter_gradients_follow_the_change(change: str, method: str) -> None:
    """Two calls, the change, a third call: its divergence and the parameter gradients of a
    weighted sum of it are those of the changed module (per-sample reference), for every
    parameter that requires grad then, and no gradient reaches one that no longer does."""
    m = _head().train()
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(m, x, method=method)
    _value_changes()[change](m)
    for p in m.parameters():
        p.grad = None
    params = [p for p in m.parameters() if p.requires_grad]
    expected, expected_loss = _reference(m, x)
    expected_grads = torch.autograd.grad(expected_loss, params)
    got = torchdiv.divergence(m, x, method=method)
    torch.testing.assert_close(got, expected, **TOL)
    loss = (got * torch.arange(1.0, len(x) + 1, dtype=f64)).sum()
    loss.backward()
    for p, g in zip(params, expected_grads, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, **TOL)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_a_cast_module_gives_the_new_dtype_s_values() -> None:
    """A float32 module called twice, then ``.double()``: the float64 call's divergence to
    float64 round-off (a float32 plan served again would be ~1e-7 off)."""
    torch.manual_seed(0)
    m = _Head().eval()
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(m, x.float())
    m.double()
    torch.testing.assert_close(torchdiv.divergence(m, x), _reference(m, x)[0], **TOL)


@pytest.mark.parametrize(
    ("call", "method"),
    [
        (call, method)
        for call in ("divergence", "jacobian_diagonal", "jacobian")
        for method in ("auto", "reverse", "forward", "structured")
        if (call, method) != ("jacobian", "structured")  # (not a method of jacobian)
    ],
)
def test_a_module_unfrozen_after_frozen_calls_gets_its_parameter_gradients(
    call: str, method: str
) -> None:
    """Frozen calls (an evaluation loop, no graph to the parameters), then
    ``requires_grad_(True)`` (training again): the next call's output carries the graph to
    every parameter, with the per-sample reference's gradients (a plan kept from the frozen
    calls would give no gradient, or a wrong one)."""
    m = _head().train().requires_grad_(False)
    x = torch.randn(4, 3, dtype=f64)
    run = {
        "divergence": torchdiv.divergence,
        "jacobian_diagonal": torchdiv.jacobian_diagonal,
        "jacobian": torchdiv.jacobian,
    }[call]
    for _ in range(2):
        assert not run(m, x, method=method).requires_grad
    m.requires_grad_(True)
    params = list(m.parameters())
    expected_grads = torch.autograd.grad(_reference(m, x)[1], params)
    got = run(m, x, method=method)
    div = got.sum(-1) if call == "jacobian_diagonal" else got
    div = div.diagonal(dim1=-2, dim2=-1).sum(-1) if call == "jacobian" else div
    torch.testing.assert_close(div, _reference(m, x)[0], **TOL)
    grads = torch.autograd.grad((div * torch.arange(1.0, len(x) + 1, dtype=f64)).sum(), params)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, **TOL)


def test_a_weight_computed_anew_before_every_forward_keeps_the_structure() -> None:
    """``torch.nn.utils.weight_norm`` puts a new floating ``weight`` on the module before
    every forward: a value, not structure (held by identity, every call was a new structure,
    watched again); an integer index put in place of another is structure (above)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated for the parametrization)
        net = nn.utils.weight_norm(nn.Linear(3, 3).double())
    x = torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(net, x)
    at = structure(net, x, 1)
    weight = net.weight
    torch.testing.assert_close(torchdiv.divergence(net, x), _reference(net, x)[0], **TOL)
    assert net.weight is not weight  # (a new tensor)
    assert structure(net, x, 1) == at


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own
def test_a_traced_module_with_buffers_keeps_its_structure() -> None:
    """A ``torch.jit.trace``d module's buffers are read through its C++ module (its
    ``__dict__`` has no ``_buffers``) and are the same objects at every read: its structure
    stays, the watch of its first call serves the next ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Tanh()).double().eval()
    x = torch.randn(4, 3, dtype=f64)
    traced = torch.jit.trace(net, x)
    torchdiv.divergence(traced, x)
    assert passed_before(traced, x, 1) is not None


class _Counting(nn.Module):
    """Counts its forward calls in an integer scalar buffer, in place (as batch norm's
    ``num_batches_tracked`` in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.lin(z))


def test_a_count_kept_in_an_integer_scalar_keeps_the_structure() -> None:
    """An integer scalar buffer written in place at every forward is a count, not an index:
    held by identity without its version, the watch of the first call serves the next ones
    (by its version every call was watched again: 2.2x a train-mode batch norm's divergence
    under ``allow_batch_interaction``, 3.4x this module's)."""
    torch.manual_seed(0)
    net = _Counting().double()
    x = torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(net, x)
    assert passed_before(net, x, 1) is not None


def _activations() -> nn.Sequential:
    """Layers whose floats decide their values: a leaky ReLU's slope (some pre-activations
    negative: seeded), a layer norm's ``eps``, an ELU's ``alpha`` and a softplus' ``beta``
    and ``threshold``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 3),
        nn.LeakyReLU(0.1),
        nn.Linear(3, 3),
        nn.LayerNorm(3, eps=1e-5),
        nn.ELU(0.5),
        nn.Softplus(beta=1.0, threshold=20.0),
        nn.Linear(3, 3, bias=False),  # (a last bias has no divergence: no gradient)
    ).double()


def _hyperparameter_changes() -> dict[str, Callable[[nn.Sequential], None]]:
    """Changes of a float hyperparameter of one layer of ``_activations()``: values, not
    structure (``structure_key`` reads no float), so the next call must compute with the
    new value, whatever was kept from the calls before."""

    def slope(net: nn.Sequential) -> None:
        net[1].negative_slope = 0.7

    def eps(net: nn.Sequential) -> None:
        net[3].eps = 0.5

    def alpha(net: nn.Sequential) -> None:
        net[4].alpha = 3.0

    def beta(net: nn.Sequential) -> None:
        net[5].beta, net[5].threshold = 4.0, 0.5

    return {
        "LeakyReLU negative_slope": slope,
        "LayerNorm eps": eps,
        "ELU alpha": alpha,
        "Softplus beta and threshold": beta,
    }


@pytest.mark.parametrize("method", ["auto", "reverse", "structured"])
@pytest.mark.parametrize("change", _hyperparameter_changes())
def test_a_float_hyperparameter_changed_gives_the_new_values(change: str, method: str) -> None:
    """Two calls, a float hyperparameter changed, a third call: its divergence and the
    parameter gradients of a weighted sum of it are those of the changed module (per-sample
    reference); the value really moved (a result kept from before would fail)."""
    net = _activations()
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        before = torchdiv.divergence(net, x, method=method)
    _hyperparameter_changes()[change](net)
    params = list(net.parameters())
    expected, expected_loss = _reference(net, x)
    assert not torch.allclose(before, expected)
    expected_grads = torch.autograd.grad(expected_loss, params)
    got = torchdiv.divergence(net, x, method=method)
    torch.testing.assert_close(got, expected, **TOL)
    loss = (got * torch.arange(1.0, len(x) + 1, dtype=f64)).sum()
    for g, e in zip(torch.autograd.grad(loss, params), expected_grads, strict=True):
        torch.testing.assert_close(g, e, **TOL)
