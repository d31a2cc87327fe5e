"""Process-wide settings torchdiv overrides while it runs f are put back, whatever the order
in which overlapping calls (threads) end."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import torchdiv
from torchdiv._core.modes import CompiledCodeEager, _Held, math_attention


def test_overlapping_holders_put_the_setting_back_in_any_order():
    setting = ["user's"]

    def override() -> str:
        prior, setting[0] = setting[0], "torchdiv's"
        return prior

    held = _Held()
    held.enter(override)
    held.enter(override)
    held.exit(lambda prior: setting.__setitem__(0, prior))  # the first to enter ends first
    assert setting == ["torchdiv's"]  # the other call still runs
    held.exit(lambda prior: setting.__setitem__(0, prior))
    assert setting == ["user's"]


def test_math_attention_puts_the_fast_path_back():
    assert torch.backends.mha.get_fastpath_enabled()
    with math_attention(), math_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled()


def test_overlapping_calls_put_the_stance_and_the_executor_flag_back_in_any_order():
    from torch._dynamo import eval_frame

    before = eval_frame._stance.stance
    optimized = torch._C._get_graph_executor_optimize()  # TorchScript's executor flag
    a, b = CompiledCodeEager(), CompiledCodeEager()
    a.__enter__()
    b.__enter__()
    assert eval_frame._stance.stance == "force_eager"
    assert not torch._C._get_graph_executor_optimize()
    a.__exit__(None, None, None)
    assert eval_frame._stance.stance == "force_eager"
    assert not torch._C._get_graph_executor_optimize()
    b.__exit__(None, None, None)
    assert eval_frame._stance.stance == before
    assert torch._C._get_graph_executor_optimize() == optimized


def _math_attention(q: torch.Tensor) -> torch.Tensor:
    """Self-attention of ``q`` on PyTorch's math backend (the engines' own)."""
    with math_attention():
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def _multi_head_attention(x: torch.Tensor) -> torch.Tensor:
    """``nn.MultiheadAttention`` over the 30 tokens of ``x``, its attention on the math
    backend."""
    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    with math_attention():
        return mha(x, x, x, need_weights=False)[0]


def test_every_op_safe_derivatives_changes_leaves_its_nodes():
    """Engines that evaluate ``f`` outside ``SafeDerivatives`` search its graph for the ops
    the mode changes (``changed_nodes``) and evaluate it again under the mode where one shows:
    every op of ``REPLACEMENTS`` (a new one must be added here) leaves its nodes, at the
    orders and modes it is replaced at, but group norm, whose contiguous copy changes no
    derivative (nothing to search for), and attention, cast as autocast casts it; the fused
    attention kernels show as ``fused``; ordinary ops show nothing."""
    from torchdiv._core.modes import REPLACEMENTS, changed_nodes
    from torchdiv._core.walk import search

    torch.manual_seed(0)
    x = torch.randn(2, 30, 4, requires_grad=True)
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    spd = (a @ a.mT + torch.eye(4, dtype=torch.float64)).requires_grad_(True)
    chol = torch.linalg.cholesky(spd.detach()).requires_grad_(True)
    b = torch.randn(3, 4, 1, dtype=torch.float64)
    calls = {
        "torch.nn.functional.layer_norm": lambda: torch.nn.functional.layer_norm(x, (4,)),
        "torch.layer_norm": lambda: torch.layer_norm(x, (4,)),
        "torch.native_layer_norm": lambda: torch.native_layer_norm(x, (4,), None, None, 1e-5)[0],
        "torch.nn.functional.instance_norm": lambda: torch.nn.functional.instance_norm(x),
        "torch.nn.functional.batch_norm": lambda: torch.nn.functional.batch_norm(
            x, None, None, training=True
        ),
        "torch.logcumsumexp": lambda: torch.logcumsumexp(x, 1),
        "torch.Tensor.logcumsumexp": lambda: x.logcumsumexp(-1),
        "torch.prod": lambda: torch.prod(x, 1) + torch.prod(x),
        "torch.Tensor.prod": lambda: x.prod(-1),
        "torch.cumprod": lambda: torch.cumprod(x, 1),
        "torch.Tensor.cumprod": lambda: x.cumprod(-1),
        "torch.linalg.householder_product": lambda: torch.linalg.householder_product(x, x[:, 0]),
        "torch.orgqr": lambda: torch.orgqr(x, x[:, 0]),
        "torch.Tensor.orgqr": lambda: x.orgqr(x[:, 0]),
        "torch.cdist": lambda: torch.cdist(x, x),  # 30 points: the Euclidean path
        "torch.cdist, 5 points": lambda: torch.cdist(x[:, :5], x[:, :5]),
        "torch.pdist": lambda: torch.pdist(x[0]),
        "torch.linalg.slogdet": lambda: torch.linalg.slogdet(spd)[1],
        "torch.slogdet": lambda: torch.slogdet(spd)[1],
        "torch.Tensor.slogdet": lambda: spd.slogdet()[1],
        "torch.logdet": lambda: torch.logdet(spd),
        "torch.Tensor.logdet": lambda: spd.logdet(),
        "torch.linalg.det": lambda: torch.linalg.det(spd),
        "torch.det": lambda: torch.det(spd),
        "torch.Tensor.det": lambda: spd.det(),
        "torch.linalg.solve": lambda: torch.linalg.solve(spd, b),
        "torch.linalg.solve_ex": lambda: torch.linalg.solve_ex(spd, b)[0],
        "torch.linalg.tensorsolve": lambda: torch.linalg.tensorsolve(spd[0], b[0, :, 0]),
        "torch.cholesky_inverse": lambda: torch.cholesky_inverse(chol),
        "torch.Tensor.cholesky_inverse": lambda: chol.cholesky_inverse(),
        "torch.linalg.eigvalsh": lambda: torch.linalg.eigvalsh(spd),
        "torch.linalg.eigh": lambda: torch.linalg.eigh(spd)[1],
        "torch.nn.functional.group_norm": lambda: torch.nn.functional.group_norm(x, 2),
        "torch.group_norm": lambda: torch.group_norm(x, 1),
        "torch.linalg.vector_norm": lambda: torch.linalg.vector_norm(x, 3, -1),
        "torch.norm": lambda: torch.norm(x, dim=-1),
        "torch.Tensor.norm": lambda: x.norm(),
        "torch.linalg.norm": lambda: torch.linalg.norm(x, dim=-1),
        "torch.linalg.matrix_norm": lambda: torch.linalg.matrix_norm(x),
        "torch.nn.functional.normalize": lambda: torch.nn.functional.normalize(x),
        "torch.cosine_similarity": lambda: torch.cosine_similarity(x, x.flip(0)),
        "torch.pairwise_distance": lambda: torch.pairwise_distance(x, x.flip(0)),
        "torch.dist": lambda: torch.dist(x, x.flip(0)),
        "torch.Tensor.dist": lambda: x.dist(x.flip(0), 3),
        "torch.renorm": lambda: torch.renorm(x, 2, 0, 1.0),
        "torch.Tensor.renorm": lambda: x.renorm(3, 1, 1.0),
        "torch.std": lambda: torch.std(x, -1),
        "torch.Tensor.std": lambda: x.std(),
        "torch.std_mean": lambda: torch.std_mean(x, -1)[0],
        "torch.copysign": lambda: torch.copysign(x, -1.0),
        "torch.Tensor.copysign": lambda: x.copysign(x.flip(0)),
        "torch.sgn": lambda: torch.view_as_real(torch.sgn(torch.complex(x, x.flip(0)))),
        "torch.Tensor.sgn": lambda: torch.view_as_real(torch.complex(x, -x).sgn()),
        "torch.mvlgamma": lambda: torch.mvlgamma(x.exp() + 2, 2),
        "torch.Tensor.mvlgamma": lambda: (x.exp() + 2).mvlgamma(3),
        "torch.special_multigammaln": lambda: torch.special.multigammaln(x.exp() + 2, 1),
        "torch.prelu": lambda: torch.prelu(x, torch.full((1,), 0.2)),
        "torch.Tensor.prelu": lambda: x.prelu(torch.full((30,), 0.2)),
        "torch.nn.functional.hardsigmoid": lambda: torch.nn.functional.hardsigmoid(x),
        "torch.nn.functional.glu": lambda: torch.nn.functional.glu(x),
        "torch.nn.functional.celu": lambda: torch.nn.functional.celu(x, 0.1),
        "torch.celu": lambda: torch.celu(x),
        "torch.celu_": lambda: torch.celu_(2 * x),
        "torch.sinc": lambda: torch.sinc(x),
        "torch.special_sinc": lambda: torch.special.sinc(x),
        "torch.Tensor.sinc": lambda: x.sinc(),
        "torch.sinc_": lambda: torch.sinc_(2 * x),
        "torch.Tensor.sinc_": lambda: (2 * x).sinc_(),
        "torch.pow": lambda: torch.pow(x, torch.full((4,), 3.0)),
        "torch.Tensor.pow": lambda: x.pow(torch.full((4,), 3.0)),
        "torch.Tensor.pow, **": lambda: x ** torch.full((4,), 3.0),
        "torch.scaled_dot_product_attention": lambda: _math_attention(x.reshape(2, 2, 15, 4)),
        "torch.nn.functional.multi_head_attention_forward": lambda: _multi_head_attention(x),
    }
    names = {entry.name for entry in REPLACEMENTS.values()}
    assert names <= set(calls), names - set(calls)
    entries = {entry.name: entry for entry in REPLACEMENTS.values()}
    # a contiguous copy; attention cast as autocast casts it
    layout_only = {
        "torch.nn.functional.group_norm",
        "torch.group_norm",
        "torch.scaled_dot_product_attention",
        "torch.nn.functional.multi_head_attention_forward",
    }
    assert {name for name, entry in entries.items() if not entry.nodes} == layout_only
    for name, call in calls.items():
        entry = entries[name.split(",")[0]]
        found = search(call(), x)
        assert not found.guarded and not found.fused, name
        if name in layout_only:
            continue
        for order, forward_mode in ((entry.forward, True), (entry.reverse, False)):
            if order is not None:
                assert search(call(), x, changed_nodes(order, forward_mode)).guarded, name
    q = x.reshape(2, 2, 15, 4)  # heads: the fused CPU kernel
    assert search(torch.nn.functional.scaled_dot_product_attention(q, q, q), x).fused
    assert not search(torch.tanh(x) @ x.mT, x, changed_nodes(3)).guarded
    reverse_first_order = {
        "CdistBackward",
        "EuclideanDistBackward",
        "CopysignBackward",
        "PreluKernelBackward",
        "CeluBackward",
    }
    assert set(changed_nodes(1, False)) == reverse_first_order


def test_vjp_is_autograd_grad_and_leaves_the_unusual_to_it():
    """``walk.vjp`` sends a plain pass to the engine directly: the same product and graph as
    ``autograd.grad``; a cotangent shaped unlike ``y`` is refused by ``autograd.grad``'s own
    check, and a tensor subclass's ``__torch_function__`` still sees the call."""
    from torchdiv._core.walk import vjp

    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tanh(x @ w)
    v = torch.randn_like(y)
    out = vjp(y, x, v, create_graph=True)
    (want,) = torch.autograd.grad(y, x, v, retain_graph=True, create_graph=True)
    assert torch.equal(out, want) and out.requires_grad
    (mine,) = torch.autograd.grad(out.sum(), w, retain_graph=True)
    assert torch.equal(mine, torch.autograd.grad(want.sum(), w, retain_graph=True)[0])
    assert vjp(y, torch.randn(2, requires_grad=True), v, False) is None  # unused: None
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        vjp(y, x, v[:2], False)

    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", ""))
            return super().__torch_function__(func, types, args, kwargs or {})

    logged = y.as_subclass(Logged)
    vjp(logged, x, v, False)
    assert "grad" in seen


def test_replacements_take_pytorch_s_values_at_the_edges():
    """Integer and bool inputs (no derivatives) and ``out=`` go to PyTorch's op (prod
    promotes to int64 there); infinities and 0-d tensors give PyTorch's values."""
    from torchdiv._core.modes import SafeDerivatives

    ints, bools = torch.full((40,), 3, dtype=torch.int32), torch.tensor([True, False])
    wide = torch.tensor([1.0, 2.0, math.inf, 2.0, -math.inf])
    out = torch.empty(3)
    with SafeDerivatives(3, "", forward_mode=False):
        got = [torch.prod(ints), torch.prod(bools), torch.logcumsumexp(wide, 0)]
        got += [torch.logcumsumexp(torch.tensor(2.0), 0), torch.cumprod(torch.tensor(3.0), 0)]
        torch.cumprod(torch.tensor([1.0, 2.0, 3.0]), 0, out=out)
    want = [torch.prod(ints), torch.prod(bools), torch.logcumsumexp(wide, 0)]
    want += [torch.tensor(2.0), torch.tensor(3.0)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 6.0]))


class _Proxy:
    """A callable whose unknown attributes raise ``KeyError`` (a config proxy's way)."""

    __slots__ = ("net",)

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __getattr__(self, name: str) -> object:
        raise KeyError(name)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.net(*args)


def test_a_callable_whose_getattr_raises_another_error_is_not_taken_for_compiled_code():
    import torchdiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 3)
    for op in (torchdiv.divergence, torchdiv.jacobian, torchdiv.laplacian):
        torch.testing.assert_close(op(_Proxy(net), x), op(net, x))
    from torchdiv.flows import log_likelihood

    velocity = lambda t, z: net(z) * t  # noqa: E731
    flow = (x, 0.0, 1.0, lambda z: -0.5 * z.square().sum(-1))
    torch.testing.assert_close(
        log_likelihood(_Proxy(velocity), *flow), log_likelihood(velocity, *flow)
    )
    with pytest.raises(ValueError, match="f writes into its input"):  # an error's context too
        torchdiv.divergence(_Proxy(lambda z: z.mul_(2)), x)  # type: ignore[arg-type]


def test_every_torch_special_op_without_a_derivative_is_listed():
    """The ``torch.special`` functions whose output PyTorch leaves without a ``grad_fn`` for an
    input that requires grad are exactly ``UNDERIVABLE_NAMES`` (a new one must be added)."""
    from torchdiv._core.modes import UNDERIVABLE_NAMES

    z = torch.rand(3, dtype=torch.float64, requires_grad=True)
    underivable = set()
    for name in dir(torch.special):
        fn = getattr(torch.special, name)
        if name.startswith("_") or not callable(fn):
            continue
        for args in ((z,), (z, 3), (z, z)):
            try:
                out = fn(*args)
            except (TypeError, RuntimeError, IndexError, ValueError):
                continue
            if isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad:
                underivable.add(name)
            break
    assert underivable == set(UNDERIVABLE_NAMES)


@pytest.mark.parametrize("name", ["airy_ai", "spherical_bessel_j0", "chebyshev_polynomial_t"])
def test_ops_pytorch_cannot_differentiate_are_refused_in_every_engine(name):
    """PyTorch returns their output as a constant: every engine of PyTorch derivatives gave 0
    through them (the Laplacian of ``bessel_j0(x).sum(-1)``: 0 by every method, ``"auto"``
    too). Now each refuses, naming the op, the recording engines too, each message starting
    with the call's name (the recorder's refusal had none, inside ``biharmonic`` it said
    ``laplacian``); a use on a constant (a table of values) is fine."""
    op = getattr(torch.special, name)
    special = (lambda z: op(z, 3)) if "polynomial" in name else op
    field = lambda x: special(x) + x  # noqa: E731
    energy = lambda x: special(x).sum(-1)  # noqa: E731
    message = f"torch.special.{name} in f has no derivative in PyTorch"
    for samples in (4, 3000):  # a tiny problem (plain autograd) and a planned one
        x = torch.rand(samples, 3, dtype=torch.float64)
        calls = [
            *(functools.partial(torchdiv.divergence, field, x, method=m) for m in EXACT),
            *(functools.partial(torchdiv.laplacian, energy, x, method=m) for m in NESTED),
            functools.partial(torchdiv.jacobian, field, x[:4]),
            functools.partial(torchdiv.value_grad_laplacian, energy, x),
            functools.partial(torchdiv.divergence, field, x, method="hutchinson", num_probes=2),
            # the recording engines (their message named "auto", which raises this one)
            functools.partial(torchdiv.divergence, field, x, method="structured"),
            functools.partial(torchdiv.laplacian, energy, x, method="taylor"),
            functools.partial(torchdiv.value_grad_laplacian, energy, x, method="taylor"),
            functools.partial(torchdiv.biharmonic, energy, x[:4]),
        ]
        for call in calls:  # named by the call (the Laplacian's and biharmonic's were not)
            with pytest.raises(NotImplementedError, match=rf"^{call.func.__name__}: {message}"):
                call()
    table = special(torch.linspace(0, 1, 3, dtype=torch.float64))
    x = torch.rand(4, 3, dtype=torch.float64)
    torch.testing.assert_close(torchdiv.divergence(lambda x: x * table, x), table.sum().expand(4))


EXACT = ("auto", "forward", "reverse")
NESTED = ("auto", "forward-over-reverse", "hessian", "grad-of-grad")


@pytest.mark.parametrize(
    "options",
    [{}, {"attn_mask": "bool"}, {"attn_mask": "float"}, {"is_causal": True}, {"scale": 0.3}],
    ids=["plain", "bool-mask", "float-mask", "causal", "scale"],
)
def test_attention_inside_autocast_is_autocast_s_own(options: dict) -> None:
    """``SafeDerivatives``' attention inside ``torch.autocast`` (its arguments cast first,
    autocast off) gives autocast's own result bit for bit, on the math backend the engines
    use, float32 arguments (and a float mask) cast to bfloat16 as autocast casts them."""
    from torchdiv._core.modes import _autocast_attention

    q = torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    masks = {"bool": torch.ones(5, 5, dtype=torch.bool).tril(), "float": torch.randn(5, 5)}
    options = {k: masks.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with math_attention(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.scaled_dot_product_attention(q, 2 * q, q + 1, **options)
        got = _autocast_attention(q, 2 * q, q + 1, **options)
    assert want.dtype == got.dtype == torch.bfloat16
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "masks",
    [(), ("key_padding_mask",), ("attn_mask",), ("attn_mask", "float_key_padding_mask")],
    ids=["plain", "padding", "attn-mask", "float-masks"],
)
def test_multi_head_attention_inside_autocast_is_autocast_s_own(masks: tuple) -> None:
    """``nn.MultiheadAttention``'s function with ``need_weights=False`` inside autocast, as
    ``SafeDerivatives`` runs it (its attention cast first): autocast's own, bit for bit."""
    from torchdiv._core.modes import _autocast_multi_head_attention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2)
    x = torch.randn(5, 3, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    options = {
        "key_padding_mask": padding,
        "attn_mask": torch.randn(5, 5),
        "float_key_padding_mask": torch.zeros(3, 5).masked_fill(padding, float("-inf")),
    }
    chosen = {k.removeprefix("float_"): options[k] for k in masks}
    args = (x, x, x, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0)
    args += (mha.out_proj.weight, mha.out_proj.bias)
    with math_attention(), torch.autocast("cpu", dtype=torch.bfloat16):
        function = torch.nn.functional.multi_head_attention_forward
        want = function(*args, need_weights=False, **chosen)[0]
        got = _autocast_multi_head_attention(*args, need_weights=False, **chosen)[0]
    assert want.dtype == got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_multi_head_attention_inside_autocast_sees_torch_s_functions_as_they_are_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``nn.MultiheadAttention`` inside ``torch.autocast`` calls the module's functions as
    PyTorch's own function would at each call: a ``F.linear`` patched at the first call (a
    LoRA or counting wrapper) is not called after the patch is undone, and one patched later
    is (a copy kept from the first call did both wrong: a Jacobian of the unpatched model)."""
    functional = torch.nn.functional
    linear = functional.linear
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(2, 12)

    def f(x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, 3, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mha(tokens, tokens, tokens, need_weights=False)[0]
        return out.float().reshape(-1, 12)

    calls = []
    monkeypatch.setattr(functional, "linear", lambda *a: calls.append(1) or linear(*a))
    torchdiv.jacobian(f, x, method="reverse")
    monkeypatch.setattr(functional, "linear", linear)
    calls.clear()
    torchdiv.jacobian(f, x, method="reverse")
    assert not calls
    monkeypatch.setattr(functional, "linear", lambda *a: 2 * linear(*a))
    got = torchdiv.jacobian(f, x, method="reverse")
    with math_attention():
        want = torch.stack([torch.autograd.functional.jacobian(f, r[None])[0, :, 0] for r in x])
    # bfloat16 (eps 2**-8) rounds the batched and the per-sample products apart; the
    # unpatched model's Jacobian is about 2x off
    assert (got - want).abs().max() <= 8 * 2**-8 * want.abs().max()
