"""Audit: nothing the caller passed or process-wide changes across every public call.

Run: ``PYTHONPATH=src python tests/audit_state.py`` (not collected by pytest: a script). For every
public function x method x {eval, train} x {x requires grad or not} x {grad mode, no_grad}
it snapshots x, the module's parameters, grads, buffers, training flags and hooks, the global
and a passed generator's RNG states and process-wide settings, makes the call (and once more
with ``f`` raising on its second evaluation), and prints every difference found.
"""

from __future__ import annotations

import collections
import copy
import itertools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchdiffeq  # noqa: F401 - its import adds warnings filters; not the audit's subject
from torch.nn.modules import module as nn_module

import torchdiv
import torchdiv.distributed
import torchdiv.flows


class Net(torch.nn.Module):
    """An MLP with an eval-mode-safe batch norm (per-sample in eval, mixing in train)."""

    def __init__(self, d_out: int, stateful: bool) -> None:
        super().__init__()
        self.stateful = stateful
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.drop = torch.nn.Dropout(0.5)
        self.a = torch.nn.Linear(3, 6).double()
        self.bn = torch.nn.BatchNorm1d(6).double()
        self.b = torch.nn.Linear(6, d_out).double()

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


def snapshot(net: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    return {
        "x": x.detach().clone(),
        "x.meta": (x.dtype, x.requires_grad, x.is_leaf, x._version, x.grad is None, x.stride()),
        "x.grad": x.grad.clone() if x.is_leaf and x.grad is not None else None,
        "module.dict": [
            (sorted(vars(m)), [id(p) for p in m._parameters.values()]) for m in net.modules()
        ],
        "params": [p.detach().clone() for p in net.parameters()],
        "param.meta": [(p.requires_grad, p._version) for p in net.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "buffers": [b.clone() for b in net.buffers()],
        "training": [m.training for m in net.modules()],
        "hooks": _hooks(net, x),
        "rng": torch.get_rng_state(),
        "gen": gen.get_state(),
        "globals": (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_anomaly_enabled(),
            torch.is_autocast_enabled("cpu"),
            torch.backends.cudnn.enabled,
            sys.getrecursionlimit(),
            torch.get_num_threads(),
            torch.backends.mha.get_fastpath_enabled(),
            torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch._C._len_torch_dispatch_stack(),
            torch._C._len_torch_function_stack(),
            torch._C._functorch.maybe_current_level(),
            len(warnings.filters),
            tuple(map(str, warnings.filters[:5])),
        ),
    }


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key, a in before.items():
        b = after[key]
        if isinstance(a, torch.Tensor):
            same = torch.equal(a, b)
        elif a is None or b is None:
            same = a is b
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor | None):
            same = all(
                (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
                for u, v in zip(a, b, strict=True)
            )
        else:
            same = a == b
        if not same:
            out.append(key if key not in ("globals", "x.meta", "param.meta") else f"{key}:{a}->{b}")
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

    return g


SQ, SC = "square", "scalar"
EXACT_DIV = ["auto", "structured", "forward", "reverse"]
STOCH = ["hutchinson", "hutch++", "xtrace"]
LAP = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad", "hutchinson"]
A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 1.5]], dtype=torch.float64)


def _stoch(m: str, **kw: Any) -> dict[str, Any]:
    return {"num_probes": 6, **kw} if m in STOCH else {}


def _flow_f(f):
    return lambda t, z: f(z)


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
            lambda f, x, g, m=m: torchdiv.flows.AugmentedDynamics(
                _flow_f(f), x, method=m, **_stoch(m, generator=g)
            )(torch.tensor(0.0), (x, torch.zeros(x.shape[0], dtype=x.dtype))),
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
]

GRAPH = {"graph_divergence", "graph_jacobian", "graph_laplacian"}
MANY = {"flows.log_likelihood"}  # evaluates f many times by design


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


def main() -> None:
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    warnings.simplefilter("ignore")  # the audit looks at state, not at warnings
    only = sys.argv[1:]
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
