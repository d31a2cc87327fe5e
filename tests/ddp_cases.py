"""DDP- and FSDP2-wrapped modules inside training losses of every public operator: the cases.

Two gloo processes on localhost, each with half of a float64 batch; their averaged gradients
must equal, within 1e-10 relative, the average of the two halves' gradients computed in one
process (for the exact methods that is the whole batch's gradient; the stochastic ones draw
the same probes from generators seeded alike). Every case runs two training steps on one
wrapped model (``static_graph`` treats the first specially).

A case is (wrapper, model, operator/method, loss). ``judge`` calls it ``right`` (both steps'
gradients equal one process), ``wrong`` (they differ: silently wrong) or ``error``;
``run_pairs`` reports ``crash`` or ``hang`` for a pair of processes that died or stopped
reporting (it is killed and the next case starts on a fresh pair). Used by
``tests/test_ddp.py`` (a subset) and ``bench/ddp_matrix.py`` (all of them).
"""

from __future__ import annotations

import datetime
import functools
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torchdiv

WORLD = 2
TOL = 1e-10
CASE_TIMEOUT_S = 60  # the most one case may take before its pair is killed
COLLECTIVE_TIMEOUT_S = 30  # a collective that waits longer raises (gloo)
STARTUP_S = 30  # spawning a pair and importing torch, on a busy machine
POLL_S = 1.0

WRAPPERS: dict[str, dict] = {
    "ddp": {},
    "ddp-unused": {"find_unused_parameters": True},
    "ddp-static": {"static_graph": True},
    "ddp-bucket-view": {"gradient_as_bucket_view": True},
    "ddp-no-broadcast": {"broadcast_buffers": False},
    "fsdp": {"reshard_after_forward": True},
    "fsdp-keep": {"reshard_after_forward": False},
    "fsdp-group": {},  # the children sharded as one group: fully_shard([inp, out, ...])
}
# the wrapped model compiled as a whole (torch.compile(DDP(net))), by the aot_eager backend
COMPILED = ("compiled-ddp", "compiled-fsdp")


class MLP(nn.Module):
    """A vector field with a registered buffer (DDP broadcasts it) and an optional second head."""

    def __init__(
        self, heads: bool, d: int = 4, width: int = 12, activation: Callable = torch.tanh
    ) -> None:
        super().__init__()
        self.activation = activation
        self.inp, self.out = nn.Linear(d, width), nn.Linear(width, d)
        self.head = nn.Linear(width, 1) if heads else None
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor):
        h = self.activation(self.inp(x * self.scale))
        v = self.out(h)
        return v if self.head is None else (v, self.head(h).squeeze(-1))


class ConvNet(nn.Module):
    """A convolutional vector field on (2, 3, 3) images, as MLP."""

    def __init__(self, heads: bool, c: int = 2, width: int = 4) -> None:
        super().__init__()
        self.inp = nn.Conv2d(c, width, 3, padding=1)
        self.out = nn.Conv2d(width, c, 3, padding=1)
        self.head = nn.Linear(width, 1) if heads else None
        self.register_buffer("scale", torch.linspace(0.5, 1.5, c)[:, None, None])

    def forward(self, x: torch.Tensor):
        h = torch.tanh(self.inp(x * self.scale))
        v = self.out(h)
        return v if self.head is None else (v, self.head(h.mean((-1, -2))).squeeze(-1))


MODELS = {"mlp": (MLP, (4,)), "conv": (ConvNet, (2, 3, 3))}
# an event of 2 elements: fewer directions than 3 ranks (sharded cases only, not the matrix)
TINY = {
    "mlp2": (functools.partial(MLP, d=2), (2,)),
    # piecewise linear: the structured engine's shares have no path to x (torchdiv._core.tie)
    "relu": (functools.partial(MLP, activation=torch.relu), (4,)),
    "relu2": (functools.partial(MLP, d=2, activation=torch.relu), (2,)),
    # a fused layer norm, replaced by its composite where a third derivative is taken
    # (``_core.modes.backward_passes_order``: the gradient penalty of ``loss``)
    "layernorm": (lambda heads: MLP(heads, activation=_normed_tanh()), (4,)),
    # polynomial features of negative bases by a buffer of powers (``_core.power`` replaces
    # PyTorch's pow, whose second derivatives through forward mode are nan there)
    "poly": (lambda heads: MLP(heads, activation=_PowerFeatures()), (4,)),
}


class NormedMLP(nn.Module):
    """A batch-normalized MLP in eval mode, its running statistics set (DDP broadcasts them
    before every forward: a write of buffers the forward then reads)."""

    def __init__(self, heads: bool, d: int = 4, width: int = 12) -> None:
        super().__init__()
        self.inp, self.norm, self.out = (
            nn.Linear(d, width),
            nn.BatchNorm1d(width),
            nn.Linear(width, d),
        )
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x))))


class SpectralMLP(nn.Module):
    """Spectrally normalized layers in train mode (a power iteration writes ``_u``/``_v`` at
    every forward, then reads them)."""

    def __init__(self, heads: bool, d: int = 4, width: int = 12) -> None:
        super().__init__()
        normed = nn.utils.parametrizations.spectral_norm
        self.inp, self.out = normed(nn.Linear(d, width)), normed(nn.Linear(width, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


class EMALinear(nn.Linear):
    """A linear map plus one by an exponential moving average of its weight, updated at every
    forward before it is read (a mean-teacher's EMA, kept in the layer; from zeros, so that
    it moves without optimizer steps)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.register_buffer("ema", torch.zeros(d_out, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema.lerp_(self.weight, 0.25)
        return super().forward(x) + x @ self.ema.clone().T


class Interactions(nn.Module):
    """A GNS-style interaction network on 5 particles per sample: messages on the held edges
    (buffers ``senders``/``receivers``) summed into their receivers, then a node update."""

    def __init__(self, heads: bool, hidden: int = 8) -> None:
        super().__init__()
        self.register_buffer("senders", torch.tensor([0, 1, 2, 3, 4, 0, 2, 1]))
        self.register_buffer("receivers", torch.tensor([1, 2, 3, 4, 0, 2, 4, 3]))
        self.edge = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.node = nn.Sequential(nn.Linear(2 + hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 5, 2)
        sent, received = x[:, self.senders], x[:, self.receivers]
        messages = self.edge(torch.cat([sent, received, sent - received], -1))
        summed = x.new_zeros(*x.shape[:2], messages.shape[-1])
        summed = summed.index_add(1, self.receivers, messages)
        return self.node(torch.cat([x, summed], -1))


class InvertibleLU(nn.Module):
    """Glow's LU-parametrised invertible 1x1 map ``W = P L (U + diag(sign * exp(log_s)))``
    (``inverse``: ``x W^-1``), then an MLP."""

    def __init__(self, heads: bool, d: int = 4, width: int = 12, inverse: bool = False) -> None:
        super().__init__()
        p, lower, upper = torch.linalg.lu(torch.linalg.qr(torch.randn(d, d))[0])
        s = upper.diagonal()
        self.register_buffer("p", p)
        self.register_buffer("sign", s.sign())
        self.register_buffer("mask", torch.ones(d, d).tril(-1))
        self.lower, self.upper = nn.Parameter(lower), nn.Parameter(upper.triu(1))
        self.log_s = nn.Parameter(s.abs().log())
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, d))
        self.inverse = inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(len(self.mask), dtype=x.dtype)
        upper = self.upper * self.mask.T + torch.diag(self.sign * self.log_s.exp())
        w = self.p @ (self.lower * self.mask + eye) @ upper
        return self.net(x @ (torch.inverse(w) if self.inverse else w.T))


# models whose forward writes state before reading it (DDP's buffer broadcast, FSDP2's
# unshard, their own updates), or holds indices (rev-ddp18)
WRITERS = {
    "normed": (NormedMLP, (4,)),
    "spectral": (SpectralMLP, (4,)),
    "ema": (lambda heads: nn.Sequential(EMALinear(4, 12), nn.Tanh(), nn.Linear(12, 4)), (4,)),
    "gns": (Interactions, (5, 2)),
    "glow": (InvertibleLU, (4,)),
    "glow-inverse": (functools.partial(InvertibleLU, inverse=True), (4,)),
}


class _PowerFeatures(nn.Module):
    """``sum_k c_k tanh(h)^k`` for ``k = 0..3``, the powers a buffer (DDP broadcasts it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("powers", torch.arange(4.0))
        self.register_buffer("weights", torch.tensor([0.5, 1.0, -0.7, 0.4]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(h)[..., None] ** self.powers) @ self.weights


def _normed_tanh() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(12), nn.Tanh())


def make_model(name: str, heads: bool) -> nn.Module:
    torch.manual_seed(0)
    return {**MODELS, **TINY, **WRITERS}[name][0](heads).double()


def batch(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    event = {**MODELS, **TINY, **WRITERS}[name][1]
    return torch.randn(2 * WORLD, *event, generator=g, dtype=torch.float64)


class Flow(nn.Module):
    """The velocity ``f(z) (1 + t)``, a module (the adjoint's parameters are its own: ``f``'s
    when ``f`` is a module)."""

    def __init__(self, f: Callable) -> None:
        super().__init__()
        self.f = f

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.f(z) * (1 + t)


class FirstHead(nn.Module):
    """The first head of a two-headed module, a module itself: ``log_likelihood(adjoint=True)``
    differentiates the parameters of ``f``'s module, which a closure over ``model`` would hide
    (refused: its gradients would be lost)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)[0]


def _ode(method: str, adjoint: bool = False) -> Callable:
    """``log_likelihood`` of the flow of ``f``: exact by an adaptive solver (a number of
    evaluations that differs between the ranks' halves; with ``adjoint``, in the backward
    pass too), estimated by a fixed-step one."""
    if method == "auto":
        options: dict = {"solver": "dopri5", "rtol": 1e-6, "atol": 1e-6, "adjoint": adjoint}
    else:
        generator = torch.Generator().manual_seed(2)
        options = {"solver": "rk4", "options": {"step_size": 0.5}, "num_probes": 2}
        options["generator"] = generator

    def log_likelihood(f: Callable, x: torch.Tensor) -> torch.Tensor:
        return torchdiv.flows.log_likelihood(
            Flow(f),
            x,
            0.0,
            1.0,
            lambda z: -0.5 * z.flatten(1).square().sum(-1),
            method=method,
            **options,
        )

    return log_likelihood


def _probes(fn: Callable, method: str, probes: int) -> Callable:
    return lambda f, x: fn(
        f, x, method=method, num_probes=probes, generator=torch.Generator().manual_seed(2)
    )


def _value_grad_laplacian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """The Laplacian and the gradient's square norm (a result made of a named tuple's parts)."""
    out = torchdiv.value_grad_laplacian(f, x)
    return out.laplacian.flatten(1).sum(-1) + out.gradient.flatten(1).square().sum(-1)


def _checked(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """The divergence after ``check_batch_independence`` (which changes nothing DDP sees)."""
    torchdiv.check_batch_independence(f, x)
    return torchdiv.divergence(f, x)


def operators() -> dict[str, Callable]:
    ops: dict[str, Callable] = {}
    for m in ("auto", "forward", "reverse", "structured"):
        ops[f"divergence/{m}"] = lambda f, x, m=m: torchdiv.divergence(f, x, method=m)
    for m, k in (("hutchinson", 2), ("hutch++", 3), ("xtrace", 2)):
        ops[f"divergence/{m}"] = _probes(torchdiv.divergence, m, k)
    for m in ("auto", "forward", "reverse"):
        ops[f"jacobian/{m}"] = lambda f, x, m=m: torchdiv.jacobian(f, x, method=m)
    for m in ("auto", "forward", "reverse", "structured"):
        ops[f"jacobian_diagonal/{m}"] = lambda f, x, m=m: torchdiv.jacobian_diagonal(f, x, method=m)
    ops["jacobian_diagonal/hutchinson"] = _probes(torchdiv.jacobian_diagonal, "hutchinson", 2)
    for m in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        ops[f"laplacian/{m}"] = lambda f, x, m=m: torchdiv.laplacian(f, x, method=m)
    ops["laplacian/hutchinson"] = _probes(torchdiv.laplacian, "hutchinson", 2)
    ops["estimate_divergence/hutchinson"] = lambda f, x: (
        _probes(torchdiv.estimate_divergence, "hutchinson", 2)(f, x).value
    )
    ops["value_grad_laplacian/auto"] = _value_grad_laplacian
    ops["check_batch_independence/auto"] = _checked
    ops["graph_divergence/auto"] = "graph"  # type: ignore[assignment]
    ops["log_likelihood/auto"] = _ode("auto")
    ops["log_likelihood/adjoint"] = _ode("auto", adjoint=True)
    ops["log_likelihood/hutchinson"] = _ode("hutchinson")
    return ops


FSDP_REFUSED = ("log_likelihood/adjoint",)  # a ValueError naming the way out (test_ddp.py)


def _runs(wrapper: str, op: str) -> bool:
    """Whether the case is one to run: FSDP2 refuses the adjoint."""
    return not (wrapper.startswith("fsdp") and op in FSDP_REFUSED)


LOSSES = ("alone", "with-f", "heads")


def loss(model: nn.Module, x: torch.Tensor, op_name: str, kind: str) -> torch.Tensor:
    """``kind``: the operator's result alone (the last bias then has no gradient), with
    ``f(x)``, or of one head of a two-headed module with both heads' values; ``"penalty"``
    (not in the matrix): the result alone plus the square norm of its loss's ``x``-gradient
    (``create_graph=True``: the parameters' gradients take one more derivative)."""
    op = operators()[op_name]
    if kind == "penalty":
        x = x.detach().requires_grad_(True)
        total = op(model, x).square().mean()
        (x_grad,) = torch.autograd.grad(total, x, create_graph=True)
        return total + x_grad.square().sum()
    f = FirstHead(model) if kind == "heads" else model
    if op == "graph":
        xg = x.detach().requires_grad_(True)
        out = model(xg)
        y = out[0] if kind == "heads" else out
        value = torchdiv.graph_divergence(y, xg, create_graph=True)
    else:
        out = None
        value = op(f, x)
    total = value.square().mean()
    if kind == "with-f":
        total = total + (model(x) if out is None else out).square().mean()
    elif kind == "heads":
        out = model(x) if out is None else out
        total = total + out[0].square().mean() + out[1].square().mean()
    return total


Case = tuple[str, str, str, str]  # wrapper, model, operator/method, loss


def configs(wrappers, models, ops=None) -> list[Case]:
    """Every combination (``bench/ddp_matrix.py``)."""
    ops = ops or list(operators())
    cases = [(w, m, o, k) for w in wrappers for m in models for o in ops for k in LOSSES]
    return [case for case in cases if _runs(case[0], case[2])]


def sample(second: Callable[[Case], bool] = lambda case: True) -> list[Case]:
    """The test suite's share of ``configs``: every operator/method under one DDP option and
    one FSDP2 setting, which turn with the operator's position, as do the model and the loss
    (every wrapper meets several operators, every operator both families), and the cases
    ``static_graph=True`` once got silently wrong (with the other faults' cases: those in
    ``SECOND_CASES`` by ``second``). ``second(case)``: whether to keep an
    operator's case in its second family (the families alternate with the operator's
    position; the adjoint's only family is DDP), e.g. a day's sample of them: every operator
    still runs under one family, every wrapper and both families still meet operators."""
    ddp = [w for w in WRAPPERS if w.startswith("ddp")]
    fsdp = [w for w in WRAPPERS if w.startswith("fsdp")]
    models = list(MODELS)
    cases: list[Case] = []
    for k, op in enumerate(operators()):
        pair = [
            (wrapper, models[(k + j) % 2], op, LOSSES[(k + j) % len(LOSSES)])
            for j, wrapper in enumerate((ddp[k % len(ddp)], fsdp[k % len(fsdp)]))
            if _runs(wrapper, op)
        ]
        first = pair[k % len(pair)]
        cases += [case for case in pair if case == first or second(case)]
    families = len(cases)  # then the cases of faults found once, each kept always or by second
    static = [("divergence/auto", "with-f"), ("divergence/hutchinson", "with-f"),
              ("graph_divergence/auto", "alone")]  # fmt: skip
    # the adjoint's solves under DDP's buffer broadcast (hung); the divergence alone with
    # find_unused_parameters (the last bias's gradient None, as in one process)
    cases.append(("ddp", "mlp", "log_likelihood/adjoint", "alone"))
    cases.append(("ddp-unused", "mlp", "divergence/auto", "alone"))
    # a compiled DDP or FSDP2 module as f: torchdiv's call compiled around it bypassed the
    # one-forward handling (gradients not averaged, then an error at the next step)
    cases.append(("compiled-ddp", "mlp", "divergence/reverse", "alone"))
    cases.append(("compiled-ddp", "mlp", "laplacian/forward-over-reverse", "with-f"))
    cases.append(("compiled-fsdp", "mlp", "divergence/reverse", "alone"))
    # last session's engine changes under DDP with a gradient penalty (FSDP2 cannot run one:
    # its first backward pass frees the unsharded parameters, PyTorch's error for any model):
    # the composite layer norm at the third order, and a ReLU f's recorded results tied to x
    cases += [("ddp", "layernorm", op, "penalty") for op in ("divergence/reverse",
              "divergence/forward", "laplacian/auto", "value_grad_laplacian/auto")]  # fmt: skip
    cases += [("ddp-unused", "relu", op, "penalty") for op in ("divergence/structured",
              "laplacian/taylor", "jacobian_diagonal/structured")]  # fmt: skip
    # the pow of a tensor to a buffer exponent, replaced under forward mode: under DDP's
    # buffer broadcast and FSDP2's sharding (rev-stacks11; right, a guard)
    cases += [("ddp", "poly", "laplacian/auto", "penalty"),
              ("fsdp", "poly", "divergence/forward", "with-f")]  # fmt: skip
    # the model compiled, then wrapped: DDP(torch.compile(net)), FSDP2 over compiled children
    # (rev-stacks15; right, a guard)
    cases += [("ddp-of-compiled", "mlp", "divergence/auto", "with-f"),
              ("fsdp-of-compiled", "mlp", "laplacian/taylor", "with-f")]  # fmt: skip
    cases += [("ddp-static", "mlp", op, loss) for op, loss in static]
    # state written before it is read in every forward (rev-ddp18; right, guards): DDP's
    # buffer broadcast into a batch norm's statistics, a spectral norm's power iteration, an
    # EMA, FSDP2's unshard; a GNS's held edges; Glow's LU map and its inverse
    cases += [("ddp", "normed", "divergence/auto", "with-f"),
              ("fsdp", "spectral", "laplacian/taylor", "with-f"),
              ("ddp", "ema", "divergence/hutchinson", "alone"),
              ("fsdp", "gns", "divergence/structured", "with-f"),
              ("ddp", "glow", "log_likelihood/hutchinson", "with-f"),
              ("fsdp-keep", "glow-inverse", "laplacian/auto", "alone")]  # fmt: skip
    return cases[:families] + [
        case for case in cases[families:] if case not in SECOND_CASES or second(case)
    ]


# the fault cases kept by ``sample``'s ``second`` only (a day's sample): each fault's other
# cases run always (static_graph: the divergence by auto; a compiled DDP module: reverse; the
# layer norm's third order: the Laplacian; a ReLU's recordings tied to x: the structured
# divergence)
SECOND_CASES = {
    ("ddp-static", "mlp", "divergence/hutchinson", "with-f"),
    ("ddp-static", "mlp", "graph_divergence/auto", "alone"),
    ("compiled-ddp", "mlp", "laplacian/forward-over-reverse", "with-f"),
    ("ddp", "layernorm", "divergence/reverse", "penalty"),
    ("ddp", "layernorm", "divergence/forward", "penalty"),
    ("ddp", "layernorm", "value_grad_laplacian/auto", "penalty"),
    ("ddp-unused", "relu", "laplacian/taylor", "penalty"),
    ("ddp-unused", "relu", "jacobian_diagonal/structured", "penalty"),
}


def wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper in COMPILED:
        return torch.compile(wrap(model, wrapper.removeprefix("compiled-")), backend="aot_eager")
    # the model compiled, then wrapped: DDP(torch.compile(net)), and FSDP2 over children
    # compiled in place (``child.compile()``, then ``fully_shard``: torchtitan's order)
    if wrapper == "ddp-of-compiled":
        return nn.parallel.DistributedDataParallel(torch.compile(model, backend="aot_eager"))
    if wrapper == "fsdp-of-compiled":
        for child in model.children():
            child.compile(backend="aot_eager")
        return wrap(model, "fsdp")
    options = WRAPPERS[wrapper]
    if wrapper.startswith("ddp"):
        return nn.parallel.DistributedDataParallel(model, **options)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    if wrapper == "fsdp-group":
        fully_shard(list(model.children()), mesh=mesh)
    else:
        for child in model.children():
            fully_shard(child, mesh=mesh, **options)
    return fully_shard(model, mesh=mesh, **options)


def full_grads(model: nn.Module) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for p in model.parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out.append(None if g is None else g.detach().double().flatten().tolist())
    return out


def run_config(config, rank: int) -> tuple[str, object]:
    """``("ok", [grads step 0, grads step 1])`` or ``("error", message)`` on this rank."""
    import torch.distributed as dist

    wrapper, model_name, op, kind = config
    try:
        model = wrap(make_model(model_name, kind == "heads"), wrapper)
        x = batch(model_name).chunk(WORLD)[rank]
        steps = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss(model, x, op, kind).backward()
            steps.append(full_grads(model))
        result: tuple[str, object] = ("ok", steps)
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    flags = [None] * WORLD
    dist.all_gather_object(flags, result[0])  # both ranks must agree before the next config
    return result


def reference(config) -> list[list[torch.Tensor | None]]:
    """One process's gradients at each of the two steps: the mean of the halves' (``None``
    where both have none), each half from the buffers its rank holds: its own, as its last
    step left them (a spectral norm's power iteration, an EMA, each of an adaptive solve's
    evaluations advances them: the halves one after another would share them), or rank 0's
    at the step's start where DDP broadcasts them (it does at every forward: an adaptive
    solve that takes more evaluations on one rank than the other, of a model that advances
    its buffers, leaves them apart until the next forward; no case here is such a one)."""
    wrapper, model_name, op, kind = config
    model = make_model(model_name, kind == "heads")
    ddp = wrapper.removeprefix("compiled-").removesuffix("-of-compiled")
    broadcast = ddp.startswith("ddp") and WRAPPERS.get(ddp, {}).get("broadcast_buffers", True)
    held = [[b.clone() for b in model.buffers()] for _ in range(WORLD)]
    steps = []
    for _ in range(2):
        halves, first = [], held[0]
        for rank, x in enumerate(batch(model_name).chunk(WORLD)):
            with torch.no_grad():
                for b, value in zip(
                    model.buffers(), first if broadcast else held[rank], strict=True
                ):
                    b.copy_(value)
            model.zero_grad(set_to_none=True)
            loss(model, x, op, kind).backward()
            halves.append([p.grad for p in model.parameters()])
            held[rank] = [b.clone() for b in model.buffers()]
        steps.append([
            None if all(g is None for g in half) else sum(g for g in half if g is not None) / WORLD
            for half in zip(*halves, strict=True)
        ])  # fmt: skip
    return steps


def judge(config, result) -> tuple[str, str]:
    """``(verdict, detail)`` of a case's outcome on rank 0 (see the module docstring). Under
    DDP with ``find_unused_parameters``, a gradient must be ``None`` exactly where one
    process's is (except the graph form, whose DDP searched the caller's output, which
    reaches every parameter); elsewhere ``None`` counts as zero."""
    status, payload = result
    if status != "ok":
        return status, payload
    if len(payload) != 2:  # both training steps ran and reported
        return "wrong", f"{len(payload)} steps reported, not 2"
    wrapper, _, op, _ = config
    options = WRAPPERS.get(wrapper.removeprefix("compiled-").removesuffix("-of-compiled"), {})
    strict_none = options.get("find_unused_parameters") and op != "graph_divergence/auto"
    params = list(make_model(config[1], config[3] == "heads").parameters())
    worst = 0.0
    for step, grads in zip(payload, reference(config), strict=True):
        nones = [g is None for g in grads]
        expected = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        if strict_none and [got is None for got in step] != nones:
            return "wrong", f"gradients None: {[got is None for got in step]}, not {nones}"
        for got, ref in zip(step, expected, strict=True):
            got = torch.zeros_like(ref) if got is None else torch.tensor(got, dtype=torch.float64)
            got = got.reshape(ref.shape)
            scale = max(ref.norm().item(), 1e-12)
            worst = max(worst, (got - ref).norm().item() / scale)
    return ("right" if worst <= TOL else "wrong"), f"relative error {worst:.2e}"


def _worker(rank: int, world: int, port: int, todo: list, results: Any, runner: Callable) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        for index, item in todo:
            outcome = runner(item, rank)
            if rank == 0:
                results.put((index, outcome))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pairs(
    todo: list[tuple[int, Any]],
    runner: Callable[[Any, int], Any] = run_config,
    timeout: float = CASE_TIMEOUT_S,
    report: Callable[[int, Any], None] | None = None,
    world: int = WORLD,
) -> dict[int, Any]:
    """``runner(item, rank)`` for every ``(index, item)`` of ``todo`` on ``world`` spawned gloo
    processes; returns rank 0's outcome of every index. A pair that crashes, or reports
    nothing for ``timeout`` seconds, is killed: its case gets ``("crash" | "hang", exit
    codes)`` and the rest start on a fresh pair. Never waits longer than that."""
    context = multiprocessing.get_context("spawn")
    outcomes: dict[int, Any] = {}
    remaining = list(todo)
    while remaining:
        results = context.Queue()
        port = free_port()
        workers = [
            context.Process(
                target=_worker, args=(r, world, port, remaining, results, runner), daemon=True
            )
            for r in range(world)
        ]
        for w in workers:
            w.start()
        done = 0
        deadline = time.monotonic() + timeout + STARTUP_S
        while done < len(remaining):
            try:
                index, outcome = results.get(timeout=POLL_S)
            except queue.Empty:
                codes = [w.exitcode for w in workers]
                died = any(code not in (None, 0) for code in codes)
                if not died and time.monotonic() < deadline and None in codes:
                    continue
                index, outcome = remaining[done][0], ("crash" if died else "hang", str(codes))
                outcomes[index] = outcome
                done += 1
                if report is not None:
                    report(index, outcome)
                break
            outcomes[index] = outcome
            done += 1
            deadline = time.monotonic() + timeout
            if report is not None:
                report(index, outcome)
        for w in workers:
            w.join(timeout=POLL_S)
            if w.is_alive():
                w.kill()
                w.join()
        remaining = remaining[done:]
    return outcomes


# Sharded operators (torchdiv.distributed): every rank holds the whole batch and a share of the
# directions. A case is (operator, method, model, wrapper): wrapper "ddp" lets DDP average the
# gradients, "none" averages them by hand (the rule the module documents).
SHARDED = [
    *[("divergence", m, "conv", "none") for m in ("auto", "structured", "forward", "reverse")],
    ("divergence", "auto", "mlp", "none"),  # tiny: the generic engines
    ("divergence", "structured", "mlp", "none"),  # a chain: the first rank computes it whole
    ("divergence", "hutchinson", "conv", "none"),
    ("divergence", "hutchinson-1", "mlp", "none"),  # one probe: the second rank has none
    ("divergence", "auto", "conv", "ddp"),
    ("laplacian", "auto", "mlp", "none"),
    ("laplacian", "auto", "conv", "ddp"),
    *[("divergence", m, "relu", "none") for m in ("structured", "hutchinson")],
    ("laplacian", "auto", "relu", "none"),
]
# on 3 ranks, an event of 2 elements: shares of 0, 1 and 1 directions (0, 0, 2 probes; a chain
# computed whole by the first rank), so the first or the last ranks have nothing to add
SHARDED_THREE = [
    *[("divergence", m, "mlp2", "none") for m in ("forward", "reverse", "structured")],
    ("divergence", "hutchinson-2", "mlp2", "none"),
    ("divergence", "forward", "mlp2", "ddp"),
    ("laplacian", "auto", "mlp2", "none"),
    *[("divergence", m, "relu2", "none") for m in ("structured", "auto", "hutchinson-2")],
]
SHARDED_ROUND_OFF = {"rtol": 1e-12, "atol": 1e-12}  # float64: partial sums added in another order
HUTCHINSON_PROBES = 5  # not a multiple of the ranks: shares of 2 and 3 (or "hutchinson-k")


def sharded_value(f: Callable, x: torch.Tensor, op: str, method: str, sharded: bool):
    """The operator of ``f`` at ``x``, by ``torchdiv.distributed`` or (not ``sharded``) in one
    process."""
    module = torchdiv.distributed if sharded else torchdiv
    if op == "laplacian":
        return module.laplacian(f, x)
    options: dict = {"method": method.split("-")[0]}
    if method.startswith("hutchinson"):
        probes = int(method.split("-")[1]) if "-" in method else HUTCHINSON_PROBES
        options.update(num_probes=probes, generator=torch.Generator().manual_seed(3))
    return module.divergence(f, x, **options)


def sharded_step(model: Callable, case, sharded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A training step with a gradient penalty on ``x``: ``L = mean(value^2)``, its gradient
    ``g = dL/dx`` (``create_graph=True``), then ``(L + |g|^2).backward()`` (a second backward
    pass through the operator's backward, into the parameters). Returns the value and ``g``."""
    op, method, model_name, _ = case
    x = batch(model_name).requires_grad_(True)
    value = sharded_value(model, x, op, method, sharded)
    loss = value.square().mean()
    (x_grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + x_grad.square().sum()).backward()
    return value.detach(), x_grad.detach()


def run_sharded(case, rank: int) -> tuple[str, object]:
    """``("ok", (every rank's value and x-gradient, rank-averaged parameter gradients))`` or
    ``("error", message)``, after ``sharded_step``."""
    import torch.distributed as dist

    _, _, model_name, wrapper = case
    world = dist.get_world_size()
    try:
        model = make_model(model_name, False)
        if wrapper == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        value, x_grad = sharded_step(model, case, sharded=True)
        grads = []
        for p in model.parameters():
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            if wrapper != "ddp":  # what DDP does: the mean over the ranks
                dist.all_reduce(grad)
                grad /= world
            grads.append(grad.flatten().tolist())
        outputs: list = [None] * world
        dist.all_gather_object(outputs, (value.flatten().tolist(), x_grad.flatten().tolist()))
        result: tuple[str, object] = ("ok", (outputs, grads))
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    flags = [None] * world
    dist.all_gather_object(flags, result[0])
    return result


def run_either(item: tuple[str, Any], rank: int) -> tuple[str, object]:
    """``run_sharded`` for ``("sharded", case)``, else ``run_config`` for ``("ddp", config)``:
    the DDP test's cases and the sharded ones on one pair of processes (spawning a pair costs
    ~6 s of CPU: two imports of torch)."""
    kind, case = item
    return run_sharded(case, rank) if kind == "sharded" else run_config(case, rank)


def assert_sharded_equal_one_process(case, outcome, world: int) -> None:
    """``run_sharded``'s ``outcome`` of ``case``: every rank's value and x-gradient, and the
    rank-averaged parameter gradients, equal one process's (``sharded_reference``)."""
    status, payload = outcome
    assert status == "ok", (case, payload)
    outputs, grads = payload
    value, x_grad, expected_grads = sharded_reference(case)
    assert len(outputs) == world
    for rank_value, rank_x_grad in outputs:  # the same on every rank
        for got, expected in ((rank_value, value), (rank_x_grad, x_grad)):
            got = torch.tensor(got, dtype=torch.float64)
            torch.testing.assert_close(got, expected, **SHARDED_ROUND_OFF, msg=str(case))
    for grad, expected in zip(grads, expected_grads, strict=True):
        got = torch.tensor(grad, dtype=torch.float64)
        torch.testing.assert_close(got, expected, **SHARDED_ROUND_OFF, msg=str(case))


def sharded_reference(case) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One process's value, x-gradient and parameter gradients after ``sharded_step``."""
    model = make_model(case[2], False)
    value, x_grad = sharded_step(model, case, sharded=False)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return value.flatten(), x_grad.flatten(), [g.flatten() for g in grads]
