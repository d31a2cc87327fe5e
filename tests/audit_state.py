"""Audit: nothing the caller passed or process-wide changes across every public call.

Run: ``PYTHONPATH=src python tests/audit_state.py [names]`` and
``PYTHONPATH=src python tests/audit_state.py --extended [names]`` (not collected by pytest:
scripts; ~2 and ~7 minutes on one thread). Both print every difference found, then
``faults: N``.

The first matrix: every public function (and its options: ``coordinates=``, ``sigma=``, an
indefinite diffusion, the caller's ``probes=``, adjoint and stderr flows, ...) x method x
{eval, train} x {x requires grad (a .grad already there) or not} x {grad mode, no_grad} x
{f fine, raising ``Exception`` at its second evaluation, ``KeyboardInterrupt`` at its first
or third} x {x a leaf, a non-contiguous view, a stateful f (a buffer written, dropout)}.

The extended matrix (audit29): every public call x model {plain, a scripted submodule, a
parametrized spectral norm, an uninitialised lazy module (refused: left as found)} x the
caller's context {plain, ``inference_mode``, CPU autocast, ``no_grad``, a non-reentrant
checkpoint around the call, non-default process-wide flags, saved-tensor hooks} x {eval,
train} x x requiring grad with a .grad x x a non-contiguous slice of a larger leaf (the leaf
audited too) x f raising at its second evaluation; parameters with a .grad already there.

Each call snapshots x, the module's parameters, grads, buffers, training flags, hooks and
attributes, the other tensors passed (``diffusion``, ``sigma``, ``probes``), the global,
Python's, NumPy's and a passed generator's RNG states and the process-wide settings
(``process_wide``: grad, inference, forward-AD, anomaly, autocast modes, default dtype,
deterministic flags, cudnn/mkldnn/fp32-precision flags, sdpa backends, MHA fast path,
saved-tensor hooks stack, dispatch and function mode stacks, functorch level, TorchScript
executor flags, thread counts, ``parametrize``'s cache, warnings filters), makes the call and
compares; the extended matrix reads the settings inside the caller's block too.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
import torchdiffeq  # noqa: F401 - its import adds warnings filters; not the audit's subject
from torch.nn.modules import module as nn_module
from torch.nn.utils import parametrize

import torchdiv
import torchdiv.distributed
import torchdiv.flows
from torchdiv._core.mixing import errors as _mixing_errors


class Net(torch.nn.Module):
    """An MLP with an eval-mode-safe batch norm (per-sample in eval, mixing in train)."""

    def __init__(self, d_out: int, stateful: bool, model: str = "net") -> None:
        super().__init__()
        self.stateful = stateful
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.drop = torch.nn.Dropout(0.5)
        a: torch.nn.Module = torch.nn.Linear(3, 6).double()
        if model == "spectral":  # a parametrized weight: its power iteration runs in training
            a = torch.nn.utils.parametrizations.spectral_norm(a)
        elif model == "lazy":  # not initialised: refused, and left as found
            a = torch.nn.LazyLinear(6, dtype=torch.float64)
        self.a = a
        self.bn = torch.nn.BatchNorm1d(6).double()
        b: torch.nn.Module = torch.nn.Linear(6, d_out).double()
        self.b = torch.jit.script(b) if model == "scripted" else b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.bn(h) if not self.training else h  # train: skip the mixing batch norm
        if self.stateful:  # a buffer written and, in training, a dropout mask drawn per call
            with torch.no_grad():
                self.count += 1
            h = self.drop(h)
        return self.b(torch.tanh(h))


def _hooks(net: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    per_module = [
        len(d)
        for m in net.modules()
        for d in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._backward_pre_hooks,
            m._state_dict_hooks,
        )
    ]
    globals_ = [
        len(nn_module._global_forward_hooks),
        len(nn_module._global_forward_pre_hooks),
        len(nn_module._global_backward_hooks),
        len(nn_module._global_backward_pre_hooks),
    ]
    tensors = [len(t._backward_hooks or {}) for t in (x, *net.parameters())]
    post = [len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in net.parameters()]
    return (*per_module, *globals_, *tensors, *post)


def _clone(p: torch.Tensor) -> torch.Tensor | str:
    if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
        return type(p).__name__  # a lazy module's, not initialised
    return p.detach().clone()


def _fp32_precisions() -> tuple[str, ...]:
    return tuple(
        str(getattr(getattr(getattr(torch.backends, b), op, None), "fp32_precision", ""))
        for b in ("cuda", "cudnn", "mkldnn")
        for op in ("matmul", "conv", "rnn")
    )


def _profiling_executor() -> bool:
    old = torch._C._jit_set_profiling_executor(True)  # (no getter: set and put back)
    torch._C._jit_set_profiling_executor(old)
    return bool(old)


def _numpy_rng() -> tuple[Any, ...]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, keys.tobytes(), pos, has_gauss, gauss


def process_wide() -> tuple[Any, ...]:
    """Process-wide (and thread-local) settings a call could leave changed."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch._C._is_fwd_grad_enabled(),
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.is_anomaly_enabled(),
        torch.is_anomaly_check_nan_enabled(),
        torch.is_autocast_enabled("cpu"),
        torch.get_autocast_dtype("cpu"),
        torch.is_autocast_cache_enabled(),
        torch._C._is_multithreading_enabled(),
        torch._C._is_view_replay_enabled(),
        torch.backends.cudnn.enabled,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.mkldnn.enabled,
        _fp32_precisions(),
        sys.getrecursionlimit(),
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch._C._autograd._top_saved_tensors_default_hooks(False),
        torch._C._autograd._saved_tensors_hooks_is_enabled(),
        torch._C._len_torch_dispatch_stack(),
        torch._C._len_torch_function_stack(),
        torch._C._functorch.maybe_current_level(),
        torch._C._get_graph_executor_optimize(),
        torch._C._jit_get_inline_everything_mode(),
        torch._C._jit_get_num_profiled_runs(),
        torch._C._jit_texpr_fuser_enabled(),
        _profiling_executor(),
        type(parametrize._cache).__name__,
        len(parametrize._cache),
        parametrize._cache_enabled,
        len(warnings.filters),
        tuple(map(str, warnings.filters)),
    )


def snapshot(
    net: torch.nn.Module, x: torch.Tensor, gen: torch.Generator, base: torch.Tensor | None = None
) -> dict[str, Any]:
    return {
        "base": None if base is None else base.detach().clone(),
        "base.grad": None if base is None or base.grad is None else base.grad.clone(),
        "x": x.detach().clone(),
        "x.meta": (x.dtype, x.requires_grad, x.is_leaf, x._version, x.grad is None, x.stride()),
        "x.grad": x.grad.clone() if x.is_leaf and x.grad is not None else None,
        "module.dict": [
            (sorted(vars(m)), [id(p) for p in m._parameters.values()]) for m in net.modules()
        ],
        "params": [_clone(p) for p in net.parameters()],
        "param.meta": [(p.requires_grad, p._version) for p in net.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "buffers": [_clone(b) for b in net.buffers()],
        "training": [m.training for m in net.modules()],
        "hooks": _hooks(net, x),
        "rng": torch.get_rng_state(),
        "gen": gen.get_state(),
        "passed": [(t.clone(), t.requires_grad, t._version) for t in PASSED],
        "pyrandom": random.getstate(),
        "numpy": _numpy_rng(),
        "globals": process_wide(),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return a is b if a is None or b is None else a == b


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key, a in before.items():
        b = after[key]
        if _same(a, b):
            continue
        if key == "globals":  # the settings that moved, by position in ``process_wide``
            moved = [
                f"[{i}]{u}->{v}"
                for i, (u, v) in enumerate(zip(a, b, strict=True))
                if not _same(u, v)
            ]
            out.append(f"globals:{';'.join(moved)}"[:300])
        elif key in ("x.meta", "param.meta"):
            out.append(f"{key}:{a}->{b}")
        else:
            out.append(key)
    return out


class Boom(Exception):
    pass


def counting(f: Callable[..., torch.Tensor], fail_at: int | None, exc: type[BaseException]):
    calls = [0]

    def g(*args: Any) -> torch.Tensor:
        calls[0] += 1
        if fail_at is not None and calls[0] >= fail_at:
            raise exc(f"evaluation {calls[0]}")
        return f(*args)

    g.module = f  # type: ignore[attr-defined]  # (the velocity module of the adjoint flows)
    return g


SQ, SC = "square", "scalar"
EXACT_DIV = ["auto", "structured", "forward", "reverse"]
STOCH = ["hutchinson", "hutch++", "xtrace"]
LAP = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad", "hutchinson"]
A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 1.5]], dtype=torch.float64)
A_INDEF = torch.tensor([[1.0, 0.5, 0.0], [0.5, -2.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.2]], dtype=torch.float64)
_PROBE_GEN = torch.Generator().manual_seed(11)
PROBES = {  # the caller's probes, drawn once for a (4, 3) x
    m: torchdiv.draw_probes(
        torch.zeros(4, 3, dtype=torch.float64), 6, method=m, generator=_PROBE_GEN
    )
    for m in ("hutchinson", "hutch++", "xtrace")
}
PASSED = [A, A_INDEF, SIGMA, *PROBES.values()]  # tensors the calls are passed besides x


def _stoch(m: str, **kw: Any) -> dict[str, Any]:
    return {"num_probes": 6, **kw} if m in STOCH else {}


def _flow_f(f):
    return lambda t, z: f(z)


class Velocity(torch.nn.Module):
    """``f(t, z) = g(z)`` as a module holding ``g``'s module (``adjoint=True`` asks for one)."""

    def __init__(self, g: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.g = g
        self.net = g.module  # type: ignore[attr-defined]

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.g(z)


def _augmented(dynamics: Any, x: torch.Tensor) -> Any:
    """One evaluation from ``initial_state(x)`` (Delta one row per divergence term)."""
    return dynamics(torch.tensor(0.0), dynamics.initial_state(x))


CALLS: list[tuple[str, str, str, Callable[..., Any]]] = [
    *[
        (
            "divergence",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.divergence(f, x, method=m, **_stoch(m, generator=g)),
        )
        for m in EXACT_DIV + STOCH
    ],
    *[
        ("jacobian", m, SQ, lambda f, x, g, m=m: torchdiv.jacobian(f, x, method=m, chunk_size=2))
        for m in ["auto", "forward", "reverse"]
    ],
    *[
        (
            "jacobian_diagonal",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.jacobian_diagonal(
                f, x, method=m, **({"num_probes": 3, "generator": g} if m == "hutchinson" else {})
            ),
        )
        for m in [*EXACT_DIV, "hutchinson"]
    ],
    *[
        (
            "laplacian",
            m,
            SC,
            lambda f, x, g, m=m: torchdiv.laplacian(
                f,
                x,
                method=m,
                chunk_size=2,
                **({"num_probes": 3, "generator": g} if m == "hutchinson" else {}),
            ),
        )
        for m in LAP
    ],
    *[
        (
            "weighted_laplacian",
            m,
            SC,
            lambda f, x, g, m=m: torchdiv.weighted_laplacian(
                f,
                x,
                diffusion=A,
                method=m,
                **({"num_probes": 3, "generator": g} if m == "hutchinson" else {}),
            ),
        )
        for m in LAP
    ],
    *[
        ("biharmonic", m, SC, lambda f, x, g, m=m: torchdiv.biharmonic(f, x, method=m))
        for m in ["auto", "taylor", "forward-over-reverse"]
    ],
    *[
        (
            "value_grad_laplacian",
            m,
            SC,
            lambda f, x, g, m=m: torchdiv.value_grad_laplacian(f, x, method=m),
        )
        for m in ["auto", "taylor", "forward-over-reverse"]
    ],
    *[
        (
            "estimate_divergence",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.estimate_divergence(
                f, x, method=m, num_probes=6, rtol=0.3, max_probes=48, generator=g
            ),
        )
        for m in STOCH
    ],
    *[
        (
            "estimate_trace",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.estimate_trace(
                lambda v: f(x.detach()).sum() * 0 + v @ A, x, method=m, num_probes=6, generator=g
            ),
        )
        for m in STOCH
    ],
    *[
        (
            "draw_probes",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.draw_probes(x, 6, method=m, generator=g),
        )
        for m in STOCH
    ],
    (
        "check_batch_independence",
        "-",
        SQ,
        lambda f, x, g: torchdiv.check_batch_independence(f, x, generator=g),
    ),
    (
        "check_batch_independence",
        "default",
        SQ,
        lambda f, x, g: torchdiv.check_batch_independence(f, x),
    ),
    *[
        (
            "graph_divergence",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.graph_divergence(
                f(x), x, method=m, **_stoch(m, generator=g)
            ),
        )
        for m in ["auto", "reverse", *STOCH]
    ],
    ("graph_jacobian", "-", SQ, lambda f, x, g: torchdiv.graph_jacobian(f(x), x)),
    ("graph_laplacian", "-", SC, lambda f, x, g: torchdiv.graph_laplacian(f(x), x)),
    *[
        (
            "flows.log_likelihood",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.flows.log_likelihood(
                _flow_f(f),
                x,
                0.0,
                0.5,
                lambda z: -0.5 * z.square().sum(-1),
                method=m,
                solver="rk4",
                options={"step_size": 0.25},
                **_stoch(m, generator=g),
            ),
        )
        for m in EXACT_DIV + STOCH
    ],
    *[
        (
            "flows.AugmentedDynamics",
            m,
            SQ,
            lambda f, x, g, m=m: _augmented(
                torchdiv.flows.AugmentedDynamics(_flow_f(f), x, method=m, **_stoch(m, generator=g)),
                x,
            ),
        )
        for m in EXACT_DIV + STOCH
    ],
    *[
        (
            "distributed.divergence",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.distributed.divergence(
                f, x, method=m, **({"num_probes": 6, "generator": g} if m == "hutchinson" else {})
            ),
        )
        for m in [*EXACT_DIV, "hutchinson"]
    ],
    ("distributed.laplacian", "-", SC, lambda f, x, g: torchdiv.distributed.laplacian(f, x)),
    # options the first matrix left out (audit29): coordinates=, sigma=, an indefinite
    # diffusion (one evaluation per sign), the caller's probes=, Gaussian probes, adjoint and
    # stderr flows, create_graph
    *[
        (
            "laplacian(coordinates=)",
            m,
            SC,
            lambda f, x, g, m=m: torchdiv.laplacian(
                f,
                x,
                method=m,
                coordinates=[0, 2],
                **({"num_probes": 3, "generator": g} if m == "hutchinson" else {}),
            ),
        )
        for m in LAP
    ],
    *[
        (
            "value_grad_laplacian(coordinates=)",
            m,
            SC,
            lambda f, x, g, m=m: torchdiv.value_grad_laplacian(f, x, method=m, coordinates=[1]),
        )
        for m in ["auto", "taylor", "forward-over-reverse"]
    ],
    (
        "graph_laplacian(coordinates=)",
        "-",
        SC,
        lambda f, x, g: torchdiv.graph_laplacian(f(x), x, coordinates=[0, 2]),
    ),
    (
        "graph_divergence(create_graph)",
        "-",
        SQ,
        lambda f, x, g: torchdiv.graph_divergence(f(x), x, create_graph=True),
    ),
    *[
        (
            "weighted_laplacian(indefinite)",
            m,
            SC,
            lambda f, x, g, m=m: torchdiv.weighted_laplacian(f, x, diffusion=A_INDEF, method=m),
        )
        for m in ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]
    ],
    *[
        (
            "weighted_laplacian(sigma=)",
            m,
            SC,
            lambda f, x, g, m=m: torchdiv.weighted_laplacian(
                f,
                x,
                sigma=SIGMA,
                method=m,
                **({"num_probes": 3, "generator": g} if m == "hutchinson" else {}),
            ),
        )
        for m in LAP
    ],
    *[
        (
            "divergence(probes=)",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.divergence(f, x, method=m, probes=PROBES[m]),
        )
        for m in STOCH
    ],
    (
        "divergence(gaussian)",
        "hutchinson",
        SQ,
        lambda f, x, g: torchdiv.divergence(
            f, x, method="hutchinson", num_probes=6, probe="gaussian", generator=g
        ),
    ),
    (
        "jacobian_diagonal(probes=)",
        "hutchinson",
        SQ,
        lambda f, x, g: torchdiv.jacobian_diagonal(
            f, x, method="hutchinson", probes=PROBES["hutchinson"]
        ),
    ),
    *[
        (
            "estimate_divergence(probes=)",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.estimate_divergence(f, x, method=m, probes=PROBES[m]),
        )
        for m in STOCH
    ],
    (
        "estimate_trace(rtol)",
        "hutchinson",
        SQ,
        lambda f, x, g: torchdiv.estimate_trace(
            lambda v: f(x.detach()).sum() * 0 + v @ A,
            x,
            num_probes=6,
            rtol=0.2,
            max_probes=24,
            generator=g,
        ),
    ),
    *[
        (
            "graph_divergence(probes=)",
            m,
            SQ,
            lambda f, x, g, m=m: torchdiv.graph_divergence(f(x), x, method=m, probes=PROBES[m]),
        )
        for m in STOCH
    ],
    *[
        (
            f"flows.log_likelihood({kw})",
            m,
            SQ,
            lambda f, x, g, m=m, kw=kw: torchdiv.flows.log_likelihood(
                Velocity(f) if kw == "adjoint" else _flow_f(f),
                x,
                0.0,
                0.5,
                lambda z: -0.5 * z.square().sum(-1),
                method=m,
                solver="rk4",
                options={"step_size": 0.25},
                **{kw: True},
                **_stoch(m, generator=g),
            ),
        )
        for m in ["auto", "hutchinson"]
        for kw in ("adjoint", "return_stderr")
    ],
]

GRAPH = {
    "graph_divergence",
    "graph_jacobian",
    "graph_laplacian",
    "graph_laplacian(coordinates=)",
    "graph_divergence(create_graph)",
    "graph_divergence(probes=)",
}
MANY = {
    "flows.log_likelihood",
    "flows.log_likelihood(adjoint)",
    "flows.log_likelihood(return_stderr)",
}  # evaluates f many times by design


def make_x(variant: str, x_rg: bool) -> torch.Tensor:
    """A leaf (with a .grad already there when it requires grad), or a non-contiguous view."""
    base = torch.randn(4, 3, dtype=torch.float64)
    if variant == "view":
        base = torch.randn(3, 4, dtype=torch.float64).requires_grad_(x_rg)
        return base.t() * 1.0 if x_rg else base.t()
    x = base.requires_grad_(x_rg)
    if x_rg:
        x.grad = torch.full_like(x, 2.0)
    return x


def one_plain_evaluation(net: torch.nn.Module, x: torch.Tensor, grad_mode: bool):
    """Global RNG state and buffers after one evaluation of ``net`` from the current state."""
    rng = torch.get_rng_state()
    twin = copy.deepcopy(net)
    with torch.set_grad_enabled(grad_mode):
        twin(x.detach())
    after = torch.get_rng_state(), [b.clone() for b in twin.buffers()]
    torch.set_rng_state(rng)
    return after


def run_one(name, method, kind, call, training, x_rg, grad_mode, fail_at, exc, variant):
    torch.manual_seed(0)
    stateful = variant == "stateful"
    net = Net(3 if kind == SQ else 1, stateful).train(training)
    net.a.weight.grad = torch.ones_like(net.a.weight)
    net.b.requires_grad_(False)
    with torch.no_grad():
        net.bn.running_mean.uniform_()
    x = make_x(variant, x_rg)
    gen = torch.Generator().manual_seed(5)
    before = snapshot(net, x, gen)
    once = one_plain_evaluation(net, x, grad_mode)
    f = counting(net, fail_at, exc)
    outcome = "ok"
    try:
        with torch.set_grad_enabled(grad_mode):
            call(f, x, gen)
    except (Exception, KeyboardInterrupt) as e:  # an audit records every outcome
        outcome = type(e).__name__ + (": " + str(e).splitlines()[0][:90] if str(e) else "")
    after = snapshot(net, x, gen)
    changed = diff(before, after)
    stoch = method in STOCH or method == "hutchinson" or name.startswith("draw")
    # expected: a call with a generator draws from it and leaves the global RNG alone
    if "gen" in changed and (stoch or (name == "check_batch_independence" and method == "-")):
        changed.remove("gen")
    state = "before"
    if stateful and ("rng" in changed or "buffers" in changed):
        one = torch.equal(after["rng"], once[0]) and all(
            torch.equal(u, v) for u, v in zip(after["buffers"], once[1], strict=True)
        )
        state = "one evaluation" if one else "other"
        changed = [c for c in changed if c not in ("rng", "buffers")]
    return outcome, changed, state


MODELS = ("net", "scripted", "spectral", "lazy")
LAZY_INIT = ("module.dict", "params", "param.meta", "hooks", "rng")  # what initialising changes
CONTEXTS = (
    "plain",
    "inference_mode",
    "autocast",
    "no_grad",
    "checkpoint",
    "caller_flags",
    "saved_hooks",
)


def make_slice(x_rg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-contiguous slice of a larger leaf (with a .grad already there when it requires
    grad); the leaf is audited too."""
    base = torch.randn(6, 5, dtype=torch.float64).requires_grad_(x_rg)
    if x_rg:
        base.grad = torch.full_like(base, 2.0)
    return base[1:5, 1:4], base


@contextlib.contextmanager
def caller_flags() -> Iterator[None]:
    """Settings a caller may have changed from the defaults, all at once: the call must leave
    them as it found them (checked inside the block), not put back the defaults."""
    prior = (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.mkldnn.enabled,
        torch.backends.cudnn.benchmark,
        torch._C._get_graph_executor_optimize(),
        torch.get_num_threads(),
    )
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        torch.backends.mkldnn.enabled = False
        torch.backends.cudnn.benchmark = True
        torch._C._set_graph_executor_optimize(False)
        torch.set_num_threads(1)
        with (
            torch.autograd.set_detect_anomaly(True, check_nan=False),
            torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False),
            torchdiv.allow_batch_interaction(),
        ):
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                yield
            finally:
                torch.use_deterministic_algorithms(False)
    finally:
        torch.backends.mha.set_fastpath_enabled(prior[0])
        torch.backends.mkldnn.enabled = prior[1]
        torch.backends.cudnn.benchmark = prior[2]
        torch._C._set_graph_executor_optimize(prior[3])
        torch.set_num_threads(prior[4])


def _saved_tensors_hooks() -> Any:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


CONTEXTS_MADE: dict[str, Callable[[], Any]] = {
    "plain": contextlib.nullcontext,
    "inference_mode": torch.inference_mode,
    "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "no_grad": torch.no_grad,
    "caller_flags": caller_flags,
    "saved_hooks": _saved_tensors_hooks,
}


def in_context(
    context: str, call: Callable[..., Any], f: Any, x: torch.Tensor, gen: Any
) -> list[str]:
    """The call made inside the caller's ``context``; the process-wide settings that the call
    changed there (read inside the block, where the caller's own settings hold)."""
    moved: list[str] = []

    def inner(z: torch.Tensor) -> Any:
        before = {"globals": process_wide(), "torchdiv.allowed": _mixing_errors._state.allowed}
        try:
            return call(f, z, gen)
        finally:
            after = {"globals": process_wide(), "torchdiv.allowed": _mixing_errors._state.allowed}
            moved.extend(f"inside:{c}" for c in diff(before, after))

    if context == "checkpoint":  # the caller's non-reentrant checkpoint around the call
        torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False)
        return moved
    with CONTEXTS_MADE[context]():
        inner(x)
    return moved


def run_extended(name, method, kind, call, model, context, training, x_rg, variant, fail_at):
    """One call of the extended matrix: a model variant, the caller's context, x a slice of a
    larger tensor or not, ``f`` raising at its second evaluation or not (grad mode on)."""
    torch.manual_seed(0)
    net = Net(3 if kind == SQ else 1, False, model).train(training)
    weight = net.a.parametrizations.weight.original if model == "spectral" else net.a.weight
    if model != "lazy":
        weight.grad = torch.ones_like(weight)
    net.b.weight.grad = torch.full_like(net.b.weight, 3.0)
    with torch.no_grad():
        net.bn.running_mean.uniform_()
    if variant == "slice":
        x, base = make_slice(x_rg)
    else:
        x, base = make_x("plain", x_rg), None
    gen = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(1)
    before = snapshot(net, x, gen, base)
    once = one_plain_evaluation(net, x, True) if model == "spectral" else None
    f = counting(net, fail_at, Boom)
    outcome, moved = "ok", []
    try:
        moved = in_context(context, call, f, x, gen)
    except Exception as e:  # an audit records every outcome
        outcome = type(e).__name__ + (": " + str(e).splitlines()[0][:90] if str(e) else "")
    after = snapshot(net, x, gen, base)
    changed = diff(before, after) + moved
    stoch = method in STOCH or method == "hutchinson" or name.startswith("draw")
    if "gen" in changed and (stoch or (name == "check_batch_independence" and method == "-")):
        changed.remove("gen")
    if once is not None and training and "buffers" in changed:  # the power iteration, once
        one = all(_same(u, v) for u, v in zip(after["buffers"], once[1], strict=True))
        if one or name in MANY or (outcome != "ok" and fail_at is not None):
            changed.remove("buffers")  # (an ODE solve evaluates f many times by design)
    if model == "lazy" and (name.startswith("estimate_trace") or name in GRAPH):
        # the script's matmat, and its f(x) for the graph forms, run f plainly, as the
        # caller's own code: that initialises the lazy module, once, as a plain call does
        changed = [c for c in changed if c.split(":")[0] not in LAZY_INIT]
    if model == "spectral" and context == "checkpoint" and name in GRAPH:
        # the caller's checkpoint recomputes its region (the script's f(x), a power
        # iteration) in each backward pass through it: PyTorch's, as for autograd.grad there
        changed = [c for c in changed if c != "buffers"]
    return outcome, changed


def main_extended(only: list[str]) -> int:
    """The extended matrix: every public call x model x the caller's context x training x
    x requiring grad (with a .grad) x x a slice of a larger tensor x f raising at its second
    evaluation. Faults: any state changed; every distinct non-ok outcome is listed to read."""
    faults, outcomes = 0, collections.Counter()
    for name, method, kind, call in CALLS:
        if only and name not in only:
            continue
        for model, context, training, x_rg, variant, fail_at in itertools.product(
            MODELS, CONTEXTS, (False, True), (False, True), ("plain", "slice"), (None, 2)
        ):
            if name in GRAPH and not x_rg:
                continue  # the graph forms need a graph from x
            outcome, changed = run_extended(
                name, method, kind, call, model, context, training, x_rg, variant, fail_at
            )
            label = (
                f"{name:26s} {method:22s} {model:8s} {context:14s} train={training:d}"
                f" x_rg={x_rg:d} {variant:5s} fail_at={fail_at}"
            )
            if changed:
                faults += 1
                print(label, f"-> {outcome} changed={changed}")
            if outcome != "ok" and not (fail_at is not None and outcome.startswith("Boom")):
                outcomes[(name, model, context, outcome[:110])] += 1
    for key, count in sorted(outcomes.items()):
        print("outcome:", *key, count)
    print("extended faults:", faults)
    return faults


def main() -> None:
    if not torch.distributed.is_initialized():  # one process: no port (runs side by side)
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    warnings.simplefilter("ignore")  # the audit looks at state, not at warnings
    only = sys.argv[1:]
    if only[:1] == ["--extended"]:
        main_extended(only[1:])
        return
    faults, states = 0, collections.Counter()
    for name, method, kind, call in CALLS:
        if only and name not in only:
            continue
        for training, x_rg, grad_mode, (fail_at, exc), variant in itertools.product(
            (False, True),
            (False, True),
            (True, False),
            ((None, Boom), (2, Boom), (1, KeyboardInterrupt), (3, KeyboardInterrupt)),
            ("plain", "view", "stateful"),
        ):
            if name in GRAPH and not (x_rg and grad_mode):
                continue  # the graph forms need a graph from x
            outcome, changed, state = run_one(
                name, method, kind, call, training, x_rg, grad_mode, fail_at, exc, variant
            )
            expected_fail = fail_at is not None and outcome.startswith(exc.__name__)
            label = (
                f"{name:26s} {method:22s} train={training:d} x_rg={x_rg:d} grad={grad_mode:d}"
                f" fail_at={fail_at} {variant}"
            )
            if variant == "stateful":
                states[(name, method, "ok" if outcome == "ok" else "raised", state)] += 1
                if (
                    outcome == "ok"
                    and state == "before"
                    and name not in ("draw_probes", "check_batch_independence")
                ):
                    print(label, "-> ok but f's state did not move")
                if state == "other" and name not in MANY:
                    faults += 1
                    print(label, f"-> {outcome}: f's state is neither before nor one evaluation")
            refused = outcome.startswith("UnsupportedOp")  # an explicit method's clear refusal
            if changed or (fail_at is None and outcome != "ok" and not refused):
                faults += 1
                print(label, f"-> {outcome} changed={changed}")
            elif fail_at is not None and not expected_fail and outcome != "ok":
                print(label, f"other outcome {outcome}")
    for key, count in sorted(states.items()):
        print("stateful f:", *key, count)
    print("faults:", faults)


if __name__ == "__main__":
    main()
