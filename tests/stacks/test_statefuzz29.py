"""A seeded stateful fuzzer of what torchdiv keeps between calls.

torchdiv remembers per structure of ``f`` (``torchdiv._taylor.cache.structure_key``): the
recordings and plans of the structured and Taylor engines, the passes of the watch for sample
mixing (``torchdiv._taylor.mixing.Passed``, its chain route), the Laplacian's choice of
engine, the square problems' engines. A memory served to an ``f`` whose state changed since
is silently wrong. Each case here builds a model (an MLP, a conv net, a CNF velocity with a
time input, a PINN with a hand-written batch norm that can be switched to centre over the
batch, a module with ``if self.flag:`` branches, a closure over a configuration object) and
runs a random sequence of steps on that one model: torchdiv calls (``divergence``,
``jacobian_diagonal``, ``jacobian``, ``laplacian``, ``value_grad_laplacian``, one- or
two-probe ``estimate_divergence`` with a seeded generator; ``"auto"`` or an explicit engine;
batch sizes drawn from a few, so that calls alternate structures) and the mutations a
training script makes (an optimizer step, ``train()``/``eval()`` of the model or one
submodule, ``requires_grad_`` flips, the whole model frozen or thawed, a submodule or
activation swapped, one replaced by its ``torch.jit.script``, a flag, integer or float
attribute set, forward hooks and pre-hooks added and removed, a parametrization, weight or
spectral norm added or removed, pruning, exact zeros written into a weight,
``load_state_dict`` of another model's state, a deep copy, a round trip through float32,
``channels_last``, a batch norm's momentum and mode, ``forward`` replaced on the instance, the
class swapped for a subclass, ``f`` wrapped in a lambda or a partial, or a ``torch.compile``d
module in the slow seeds). Calls are made with ``x`` requiring grad or not, under
``no_grad``, under ``allow_batch_interaction`` or with ``x`` a transposed view, some with
``chunk_size`` or Laplacian ``coordinates``.

After every call the result is compared, values and the gradients of a weighted sum of it in
``x`` and in every parameter, with a float64 reference built afresh from the model's state
at that call: each row of the cross-batch Jacobian by ``torch.autograd.grad`` of one output
element of one sample (``create_graph``), its diagonal blocks the per-sample Jacobians, and
each sample's Laplacian by grad of grad. The buffers ``f`` writes (a train-mode batch norm's
statistics, spectral norm's power iteration) are put back to their state before the call
first, so that the reference sees what the call saw. Where the model mixes samples (a
train-mode batch norm, the hand-written one switched, a centring hook or branch), ``"auto"``
and one-probe estimates must raise ``BatchInteractionError``; an explicit method may raise
it or give the diagonal blocks of the cross-batch derivatives (what it computes of such an
``f``).

A failing sequence is minimized (steps dropped while it still fails) and printed as a short
list of steps. Run many by hand: ``PYTHONPATH=src python tests/stacks/test_statefuzz29.py
FIRST COUNT [KIND]``.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from fuzzing import far, pick, randn, uniform_int
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import torchdiv
from torchdiv._taylor import cache
from torchdiv._taylor.cache import PlanCache

f64 = torch.float64
# float64 throughout: torchdiv's engines and the reference differ by rounding of a few dozen
# float64 operations on values of order one, ~1e-14; 1e-8 leaves room for a Laplacian's sums
# and is far below any stale value (a weight stepped by 0.05, a flipped branch)
TOL = 1e-8
SIZES = (1, 2, 3, 5)
# larger batches, where "auto" plans (not tiny: the structured engine past 2**12 basis-vector
# elements, plain autograd's rows and the chain's route past 2**15 at n = 3)
LARGE = (512, 4096)
LOOPED = 5  # the most samples whose reference loops over samples (larger: summed over them)


# --- models --------------------------------------------------------------------------------------


class HandBatchNorm(nn.Module):
    """A PINN's hand-written batch norm: running statistics, or, once ``mix`` is set, the
    batch's own (centring over the batch: it mixes samples)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = False
        self.eps = 1e-3
        self.register_buffer("mean", torch.zeros(width, dtype=f64))
        self.register_buffer("var", torch.ones(width, dtype=f64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mix:
            return (h - h.mean(0)) / (h.var(0, unbiased=False) + self.eps + 1.0).sqrt()
        return (h - self.mean) / (self.var + self.eps).sqrt()


class Pinn(nn.Module):
    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.norm = HandBatchNorm(width)
        self.act = nn.Tanh()
        self.out = nn.Linear(width, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.norm(self.inp(x))))


class Branchy(nn.Module):
    """``if self.flag:`` branches, a float scale, an integer shift and a switch that centres
    over the batch."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, width)
        self.b = nn.Linear(width, d)
        self.flag = True
        self.center = False
        self.scale = 0.5
        self.shift = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.tanh(h) if self.flag else torch.sin(h) * self.scale
        if self.shift:
            h = h.roll(self.shift, -1)
        if self.center:
            h = h - h.mean(0)
        return self.b(h) * (1.0 + self.scale)


class Centring(Branchy):
    """``Branchy`` whose forward centres over the batch: what a model's class swapped for a
    subclass may do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)
        return h - h.mean(0)


def _other_forward(self: Branchy, x: torch.Tensor) -> torch.Tensor:
    """A forward put on one ``Branchy`` object in place of its method."""
    return self.b(torch.sin(self.a(x))) * self.scale


class Velocity(nn.Module):
    """A CNF velocity ``v(t, z)``: the time concatenated to the state."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.Softplus(), nn.Linear(width, d))
        self.gain = 1.0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = t.expand(z.shape[0])[:, None].to(z.dtype)
        return self.net(torch.cat([z, tt], -1)) * self.gain


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.Tanh()
        self.bn = nn.BatchNorm2d(2)
        self.c2 = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.bn(self.act(self.c1(x))))


class Config:
    """A plain configuration object a closure reads."""

    def __init__(self) -> None:
        self.act = "tanh"
        self.scale = 0.7
        self.mix = False


# a module-level switch the configured closure's body reads (a global, not the config's)
SETTINGS = {"centre": False}
SQUARED = False


def _configured(net: nn.Module, cfg: Config, x: torch.Tensor) -> torch.Tensor:
    h = net[0](x)
    h = torch.tanh(h) if cfg.act == "tanh" else torch.sin(h)
    if cfg.mix:
        h = h - h.mean(0)
    if SETTINGS["centre"]:
        h = h - h.mean(0, keepdim=True)
    if SQUARED:
        h = h * h
    return net[1](h) * cfg.scale


def _called(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _mixing_hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return out - out.mean(0)


def _scaling_hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return out * 1.25


def _shifting_pre_hook(module: nn.Module, args: Any) -> Any:
    return (args[0] + 0.1, *args[1:])


class Scaled(nn.Module):
    """A parametrization ``W -> c W``."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.c


ACTIVATIONS: list[Callable[[], nn.Module]] = [nn.Tanh, nn.Softplus, nn.SiLU, nn.GELU, nn.ELU]


@dataclass
class Case:
    """A model, the way ``f`` is made of it and the state a training script changes."""

    kind: str
    model: nn.Module
    event: tuple[int, ...]
    wrap: str = "module"  # module, lambda (one object), fresh (a new lambda per call), partial
    cfg: Config | None = None
    compiled: Any = None  # torch.compile(model), or None
    channels_last: bool = False
    times: dict[int, torch.Tensor] = field(default_factory=dict)  # CNF: t per batch size
    held: Any = None  # the one lambda object of wrap "lambda"
    optimizer: Any = None

    def __post_init__(self) -> None:
        self.new_optimizer()

    def new_optimizer(self) -> None:
        # (leaves only: a deep copy of a scripted submodule holds non-leaf parameters)
        leaves = [p for p in self.model.parameters() if p.is_leaf]
        self.optimizer = torch.optim.SGD(leaves, lr=0.05, momentum=0.5)

    def eager(self, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f`` as the reference evaluates it: the module's own forward."""
        return self._wrapped(self.model, batch, "fresh")

    def f(self, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f`` as handed to torchdiv."""
        module = self.compiled if self.compiled is not None else self.model
        # (one lambda object kept; not the CNF's, whose time tensor is the batch's own)
        if self.wrap == "lambda" and self.kind != "cnf":
            if self.held is None:
                self.held = self._wrapped(module, batch, "fresh")
            return self.held
        return self._wrapped(module, batch, self.wrap)

    def _wrapped(self, module: Any, batch: int, wrap: str) -> Callable[..., Any]:
        if self.kind == "cnf":
            t = self.times.setdefault(batch, torch.linspace(0.1, 0.9, batch, dtype=f64))
            if wrap == "partial":
                return functools.partial(module, t)
            return lambda z: module(t, z)
        if self.kind == "config":
            cfg = self.cfg
            if wrap == "partial":
                return functools.partial(_configured, module, cfg)
            return lambda z: _configured(module, cfg, z)
        if wrap == "module":
            return module
        if wrap == "partial":
            return functools.partial(_called, module)
        return lambda z: module(z)

    def mixes(self) -> bool:
        """Whether ``f`` combines samples now."""
        for m in self.model.modules():
            if isinstance(m, HandBatchNorm) and m.mix:
                return True
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                m.training or m.running_mean is None
            ):
                return True
            own = isinstance(m, Branchy) and "forward" not in vars(m)  # (not _other_forward)
            if own and (m.center or type(m) is Centring):
                return True
            if any(h is _mixing_hook for h in m._forward_hooks.values()):
                return True
        return self.cfg is not None and (self.cfg.mix or SETTINGS["centre"])


def build(kind: str, g: torch.Generator) -> Case:
    global SQUARED
    SETTINGS["centre"], SQUARED = False, False
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
    d, width = 3, 5
    if kind == "mlp":
        acts = [pick(g, ACTIVATIONS)(), pick(g, ACTIVATIONS)()]
        model: nn.Module = nn.Sequential(
            nn.Linear(d, width), acts[0], nn.Linear(width, width), acts[1], nn.Linear(width, d)
        )
        event: tuple[int, ...] = (d,)
    elif kind == "conv":
        model, event = ConvNet(), (1, 2, 3)
    elif kind == "cnf":
        model, event = Velocity(d, width), (d,)
    elif kind == "pinn":
        model, event = Pinn(d, width), (d,)
    elif kind == "branchy":
        model, event = Branchy(d, width), (d,)
    else:
        model, event = nn.Sequential(nn.Linear(d, width), nn.Linear(width, d)), (d,)
    model = model.double().eval()
    with torch.no_grad():  # running statistics away from the identity
        for m in model.modules():
            for name, b in m.named_buffers(recurse=False):
                if b.is_floating_point():
                    b.copy_(torch.rand(b.shape, dtype=f64) * 0.5 + (0.75 if "var" in name else 0.0))
    case = Case(kind, model, event, cfg=Config() if kind == "config" else None)
    case.wrap = pick(g, ["module", "lambda", "fresh", "partial"])
    return case


# --- steps ---------------------------------------------------------------------------------------

OPS = {
    "divergence": ["auto", "auto", "structured", "forward", "reverse"],
    "jacobian_diagonal": ["auto", "auto", "structured", "reverse"],
    "jacobian": ["auto", "auto", "forward"],
    "laplacian": ["auto", "auto", "taylor", "forward-over-reverse"],
    "value_grad_laplacian": ["auto", "taylor"],
    "estimate": ["hutchinson"],
}


@dataclass(frozen=True)
class Step:
    """One step: a call (``what`` an op) or a mutation, with its own seed."""

    what: str
    seed: int
    method: str = ""
    batch: int = 0

    def __str__(self) -> str:
        if self.what in OPS:
            return f"{self.what}(method={self.method!r}, B={self.batch}) [{self.seed}]"
        return f"{self.what} [{self.seed}]"


MUTATIONS = [
    "step",
    "train",
    "eval",
    "train_one",
    "eval_one",
    "requires_grad",
    "freeze",
    "swap_module",
    "swap_activation",
    "attribute",
    "hook",
    "pre_hook",
    "mixing_hook",
    "unhook",
    "parametrize",
    "weight_norm",
    "spectral_norm",
    "unparametrize",
    "load_state_dict",
    "deepcopy",
    "float_double",
    "channels_last",
    "batch_norm",
    "mix",
    "wrap",
    "script",
    "prune",
    "unprune",
    "zero",
    "global",
    "forward",
    "class",
]


# mutations after which the structure's key stays, the model's values changed
VALUE_MUTATIONS = ["step", "zero", "load_state_dict", "float_double", "attribute", "global"]
# mutations that switch some models to mixing samples (or back)
MIXING_MUTATIONS = ["mix", "mix", "mix", "mixing_hook", "train", "eval", "batch_norm", "class"]
# (and "freeze", among the others: the frozen engines, the Laplacian's chain)


def draw_steps(g: torch.Generator, compile_ok: bool) -> list[Step]:
    """A sequence of 10-30 steps, 3 in 5 calls."""
    steps = []
    # two batch sizes a sequence alternates between, and a few calls it makes again and again,
    # so that structures are met again after mutations (what torchdiv kept for them served)
    sizes = [pick(g, list(SIZES)), pick(g, list(SIZES + LARGE))]
    ops = [pick(g, list(OPS)) for _ in range(uniform_int(g, 1, 3))]
    calls = [(op, pick(g, OPS[op]), pick(g, sizes)) for op in ops]
    for _ in range(uniform_int(g, 10, 30)):
        seed = uniform_int(g, 0, 10**6)
        if uniform_int(g, 0, 9) < 6:
            if uniform_int(g, 0, 3):
                op, method, size = pick(g, calls)
            else:
                op = pick(g, list(OPS))
                method, size = pick(g, OPS[op]), pick(g, sizes)
            steps.append(Step(op, seed, method, size))
        else:
            # 2 in 5 among the mutations that change values alone (the key stays), 1 in 5
            # among those that may make f mix samples
            options = MUTATIONS + (["compile"] if compile_ok else [])
            among = [VALUE_MUTATIONS, VALUE_MUTATIONS, MIXING_MUTATIONS, options, options]
            steps.append(Step(pick(g, pick(g, among)), seed))
    return steps


def _parents(model: nn.Module, kinds: tuple[type, ...]) -> list[tuple[nn.Module, str]]:
    """``(parent, name)`` of each submodule of one of ``kinds`` (parametrized ones by their
    module, not the parametrization's inner modules)."""
    out = []
    for parent in model.modules():
        if isinstance(parent, parametrize.ParametrizationList):
            continue
        for name, child in parent.named_children():
            if isinstance(child, kinds) and name != "parametrizations":
                out.append((parent, name))
    return out


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def mutate(case: Case, step: Step) -> str:
    """Apply the mutation ``step`` to ``case``; what it did, or ``""`` if it did nothing."""
    g = torch.Generator().manual_seed(step.seed)
    model = case.model
    what = step.what
    if what == "step":  # an optimizer step of a plain loss, in place
        batch = pick(g, list(SIZES[1:]))
        x = randn(g, batch, *case.event)
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = case.eager(batch)(x).square().mean()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return ""
        loss.backward()
        case.optimizer.step()
        case.optimizer.zero_grad(set_to_none=True)
        return "stepped"
    if what in ("train", "eval"):
        model.train(what == "train")
        return what
    if what in ("train_one", "eval_one"):
        subs = [m for m in model.modules() if m is not model]
        sub = pick(g, subs)
        sub.train(what == "train_one")
        return f"{type(sub).__name__}.{what}"
    if what == "requires_grad":
        params = list(model.parameters())
        p = pick(g, params)
        p.requires_grad_(not p.requires_grad)
        return f"requires_grad -> {p.requires_grad}"
    if what == "freeze":  # the whole model frozen, or thawed (fine-tuning, a GAN's turns)
        frozen = any(p.requires_grad for p in model.parameters())
        model.requires_grad_(not frozen)
        return "frozen" if frozen else "thawed"
    if what == "swap_module":
        slots = _parents(model, (nn.Linear, nn.Conv2d))
        parent, name = pick(g, slots)
        old = getattr(parent, name)
        if parametrize.is_parametrized(old):
            return ""
        new = copy.deepcopy(old)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(randn(g, *p.shape, scale=0.3))
        setattr(parent, name, new)
        case.new_optimizer()
        return f"swapped {name}"
    if what == "swap_activation":
        slots = _parents(model, tuple(type(a()) for a in ACTIVATIONS))
        if not slots:
            return ""
        parent, name = pick(g, slots)
        setattr(parent, name, pick(g, ACTIVATIONS)())
        return f"{name} -> {type(getattr(parent, name)).__name__}"
    if what == "attribute":
        if isinstance(model, Branchy):
            attr = pick(g, ["flag", "scale", "shift"])
            value: Any = {
                "flag": not model.flag,
                "scale": float(torch.rand((), generator=g)),
                "shift": uniform_int(g, 0, 2),
            }[attr]
            setattr(model, attr, value)
            return f"{attr} = {value}"
        if isinstance(model, Velocity):
            model.gain = float(torch.rand((), generator=g)) + 0.5
            return f"gain = {model.gain}"
        if case.cfg is not None:
            attr = pick(g, ["act", "scale"])
            value = (
                ("sin" if case.cfg.act == "tanh" else "tanh")
                if attr == "act"
                else float(torch.rand((), generator=g))
            )
            setattr(case.cfg, attr, value)
            return f"cfg.{attr} = {value}"
        return ""
    if what in ("hook", "pre_hook", "mixing_hook"):
        if what == "mixing_hook":  # (the config's f calls its net's layers, not the net)
            top = model[1] if case.kind == "config" else model
            top.register_forward_hook(_mixing_hook)
            return "mixing hook on the model"
        target = pick(g, [m for m in model.modules() if not list(m.children())])
        if isinstance(target, (nn.Linear, nn.Conv2d)) or what == "hook":
            if what == "hook":
                target.register_forward_hook(_scaling_hook)
            else:
                target.register_forward_pre_hook(_shifting_pre_hook)
            return f"{what} on {type(target).__name__}"
        return ""
    if what == "unhook":
        hooked = [
            (m, d)
            for m in model.modules()
            for d in (m._forward_hooks, m._forward_pre_hooks)
            if d and not isinstance(m, parametrize.ParametrizationList)
        ]
        hooked = [(m, d) for m, d in hooked if any(not _torchs(h) for h in d.values())]
        if not hooked:
            return ""
        m, d = pick(g, hooked)
        k = pick(g, [k for k, h in d.items() if not _torchs(h)])
        del d[k]
        return f"unhooked {type(m).__name__}"
    if what in ("parametrize", "weight_norm", "spectral_norm"):
        plain = [m for m in _linears(model) if not parametrize.is_parametrized(m)]
        if not plain:
            return ""
        m = pick(g, plain)
        if what == "parametrize":
            parametrize.register_parametrization(m, "weight", Scaled(1.1))
        elif what == "weight_norm":
            parametrizations.weight_norm(m)
        else:
            parametrizations.spectral_norm(m)
        case.new_optimizer()
        return f"{what} on {type(m).__name__}"
    if what == "unparametrize":
        done = [m for m in _linears(model) if parametrize.is_parametrized(m)]
        if not done:
            return ""
        m = pick(g, done)
        parametrize.remove_parametrizations(m, "weight")
        case.new_optimizer()
        return "unparametrized"
    if what == "load_state_dict":
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(randn(g, *p.shape, scale=0.3))
            for name, b in other.named_buffers():
                if b.is_floating_point() and not name.endswith(("_u", "_v")):
                    b.copy_(torch.rand(b.shape, generator=g, dtype=f64) * 0.5 + 0.75)
        model.load_state_dict(other.state_dict())
        return "loaded"
    if what == "deepcopy":
        case.model = copy.deepcopy(model)
        case.held = None
        if case.compiled is not None:
            case.compiled = torch.compile(case.model, backend="eager")
        case.new_optimizer()
        return "deep copy"
    if what == "float_double":
        model.float().double()
        return "float -> double"
    if what == "channels_last":
        if case.kind != "conv":
            return ""
        case.channels_last = not case.channels_last
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        return f"memory format {fmt}"
    if what == "batch_norm":
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return ""
        bn = bns[0]
        change = pick(g, ["momentum", "train", "eval"])
        if change == "momentum":
            bn.momentum = pick(g, [0.1, 0.5, None])
            return f"momentum {bn.momentum}"
        bn.train(change == "train")
        return f"bn.{change}"
    if what == "mix":
        for m in model.modules():
            if isinstance(m, HandBatchNorm):
                m.mix = not m.mix
                return f"mix = {m.mix}"
            if isinstance(m, Branchy):
                m.center = not m.center
                return f"center = {m.center}"
        if case.cfg is not None:
            case.cfg.mix = not case.cfg.mix
            return f"cfg.mix = {case.cfg.mix}"
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bns:
            bns[0].train(not bns[0].training)
            return f"bn.train({bns[0].training})"
        hooks = model._forward_hooks  # (the MLP, the CNF: a hook on the model that centres)
        mixing = [k for k, h in hooks.items() if h is _mixing_hook]
        if mixing:
            del hooks[mixing[0]]
            return "mixing hook removed"
        model.register_forward_hook(_mixing_hook)
        return "mixing hook added"
    if what == "wrap":
        case.wrap = pick(g, ["module", "lambda", "fresh", "partial"])
        case.held = None
        return f"wrap {case.wrap}"
    if what == "script":  # a layer or activation replaced by its TorchScript
        slots = _parents(model, (nn.Linear, nn.Tanh, nn.Softplus))
        slots = [(p, n) for p, n in slots if not parametrize.is_parametrized(getattr(p, n))]
        slots = [(p, n) for p, n in slots if not getattr(p, n)._forward_hooks]
        slots = [(p, n) for p, n in slots if not getattr(p, n)._forward_pre_hooks]
        if not slots:
            return ""
        parent, name = pick(g, slots)
        setattr(parent, name, torch.jit.script(getattr(parent, name)))
        case.new_optimizer()
        return f"scripted {name}"
    if what in ("prune", "unprune"):
        from torch.nn.utils import prune

        layers = [m for m in _linears(model) if not parametrize.is_parametrized(m)]
        pruned = [m for m in layers if prune.is_pruned(m)]
        if what == "unprune":
            if not pruned:
                return ""
            prune.remove(pick(g, pruned), "weight")
            case.new_optimizer()
            return "unpruned"
        if not layers:
            return ""
        m = pick(g, layers)
        torch.manual_seed(step.seed)
        prune.random_unstructured(m, "weight", amount=0.5)
        case.new_optimizer()
        return f"pruned {type(m).__name__}"
    if what == "zero":  # exact zeros in a weight, in place (a row, a column, or all but one)
        layers = _linears(model)
        m = pick(g, layers)
        w = getattr(m, "weight_orig", None)
        if w is None and parametrize.is_parametrized(m):
            return ""
        w = m.weight if w is None else w
        with torch.no_grad():
            if uniform_int(g, 0, 1):
                w[uniform_int(g, 0, w.shape[0] - 1)] = 0
            else:
                w[:, uniform_int(g, 0, w.shape[1] - 1)] = 0
        return "zeroed"
    if what == "global":
        global SQUARED
        if case.kind != "config":
            return ""
        if uniform_int(g, 0, 1):
            SETTINGS["centre"] = not SETTINGS["centre"]
            return f"SETTINGS['centre'] = {SETTINGS['centre']}"
        SQUARED = not SQUARED
        return f"SQUARED = {SQUARED}"
    if what == "forward":
        if not isinstance(model, Branchy):
            return ""
        if "forward" in vars(model):
            del model.forward
            return "forward: the class's"
        model.forward = types.MethodType(_other_forward, model)
        return "forward: another"
    if what == "class":
        if not isinstance(model, Branchy):
            return ""
        model.__class__ = Branchy if type(model) is Centring else Centring
        return f"class {type(model).__name__}"
    if what == "compile":
        if case.compiled is not None:
            case.compiled = None
            return "uncompiled"
        if case.kind == "config":  # (its f calls the net's layers, not the net)
            return ""
        case.compiled = torch.compile(case.model, backend="eager")
        return "compiled"
    raise AssertionError(what)


def _torchs(hook: Any) -> bool:
    """Whether a hook is one torch put there (a parametrization's, weight norm's)."""
    return hook not in (_scaling_hook, _shifting_pre_hook, _mixing_hook)


# --- calls and references ------------------------------------------------------------------------


def _rows(f: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(x)`` and the cross-batch Jacobian ``(B, m, B, n)``, one grad per output element of
    each sample, kept differentiable."""
    y = f(x)
    batch = x.shape[0]
    flat = y.reshape(batch, -1)
    rows = []
    for b in range(batch):
        for i in range(flat.shape[1]):
            (r,) = torch.autograd.grad(flat[b, i], x, create_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if r is None else r)
    full = torch.stack(rows).reshape(batch, flat.shape[1], batch, -1)
    return y, full


def _summed_rows(f: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(x)`` and its per-sample Jacobians ``(B, m, n)`` for an ``f`` that does not mix
    samples: one grad per output element, of its sum over the batch (each sample's own
    derivatives, as no sample reaches another's output)."""
    y = f(x)
    batch = x.shape[0]
    flat = y.reshape(batch, -1)
    rows = []
    for i in range(flat.shape[1]):
        (r,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(x) if r is None else r)
    return y, torch.stack(rows, 1).reshape(batch, flat.shape[1], -1)


def _summed_laplacians(f: Callable, x: torch.Tensor, chosen: list[int] | None) -> torch.Tensor:
    """Each sample's Laplacian of each output element ``(B, m)`` for an ``f`` that does not
    mix samples, by grad of grad of sums over the batch."""
    y = f(x)
    batch = x.shape[0]
    flat = y.reshape(batch, -1)
    zero = x.sum() * 0
    out = []
    for i in range(flat.shape[1]):
        (gr,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True, allow_unused=True)
        if gr is None:
            out.append(zero.expand(batch))
            continue
        own = gr.reshape(batch, -1)
        terms = []
        for j in range(own.shape[1]) if chosen is None else chosen:
            (h,) = torch.autograd.grad(own[:, j].sum(), x, create_graph=True, allow_unused=True)
            terms.append(zero.expand(batch) if h is None else h.reshape(batch, -1)[:, j])
        out.append(torch.stack(terms).sum(0))
    return torch.stack(out, 1)


def _blocks(full: torch.Tensor) -> torch.Tensor:
    """The diagonal blocks ``(B, m, n)`` of the cross-batch Jacobian."""
    return full.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _laplacians(f: Callable, x: torch.Tensor, chosen: list[int] | None) -> torch.Tensor:
    """Each sample's Laplacian of each output element ``(B, m)``, by grad of grad on that
    sample's own coordinates."""
    y = f(x)
    batch = x.shape[0]
    flat = y.reshape(batch, -1)
    out = []
    for b in range(batch):
        for i in range(flat.shape[1]):
            (gr,) = torch.autograd.grad(flat[b, i], x, create_graph=True, allow_unused=True)
            if gr is None:
                out.append(x.sum() * 0)
                continue
            own = gr[b].reshape(-1)
            terms = []
            for j in range(own.numel()) if chosen is None else chosen:
                (h,) = torch.autograd.grad(own[j], x, create_graph=True, allow_unused=True)
                terms.append(x.sum() * 0 if h is None else h[b].reshape(-1)[j])
            out.append(torch.stack(terms).sum())
    return torch.stack(out).reshape(batch, flat.shape[1])


def _coordinates(case: Case, step: Step) -> list[int] | None:
    """The coordinates a Laplacian call of ``step`` sums over (``None``: all); a subset drawn
    by its seed, so that calls at one structure alternate between subsets of one size (the
    loop's plans are kept by their number) and sizes."""
    g = torch.Generator().manual_seed(step.seed + 17)
    n = math.prod(case.event)
    if step.what not in ("laplacian", "value_grad_laplacian") or uniform_int(g, 0, 2):
        return None
    count = uniform_int(g, 1, n - 1)
    return sorted(torch.randperm(n, generator=g)[:count].tolist())


def _chunk(step: Step) -> int | None:
    """A chunk size for some calls (at most that many products in flight)."""
    g = torch.Generator().manual_seed(step.seed + 29)
    return None if uniform_int(g, 0, 3) else uniform_int(g, 1, 3)


def call(case: Case, step: Step, f: Callable, x: torch.Tensor) -> list[torch.Tensor]:
    """The torchdiv call of ``step``: its results, as a list of tensors."""
    if step.what == "estimate":
        probes = 1 + step.seed % 2
        gen = torch.Generator().manual_seed(step.seed)
        return [torchdiv.estimate_divergence(f, x, num_probes=probes, generator=gen).value]
    fn = getattr(torchdiv, step.what)
    chosen = _coordinates(case, step)
    extra: dict[str, Any] = {} if chosen is None else {"coordinates": chosen}
    if step.what != "value_grad_laplacian":
        extra["chunk_size"] = _chunk(step)
    out = fn(f, x, method=step.method, **extra)
    return list(out) if step.what == "value_grad_laplacian" else [out]


def reference(case: Case, step: Step, f: Callable, x: torch.Tensor) -> list[torch.Tensor]:
    """The same from ``f``'s per-sample derivatives (the diagonal blocks where it mixes)."""
    batch = x.shape[0]
    looped = batch <= LOOPED
    if step.what in ("laplacian", "value_grad_laplacian"):
        chosen = _coordinates(case, step)
        lap = (_laplacians if looped else _summed_laplacians)(f, x, chosen)
        lap = lap.reshape(batch, *case.event)
        if step.what == "laplacian":
            return [lap]
        y, jac = _jacobians(f, x, looped)
        return [y, jac.reshape(batch, *case.event, *x.shape[1:]), lap]
    y, jac = _jacobians(f, x, looped)
    if step.what == "jacobian":
        return [jac.reshape(batch, *case.event, *x.shape[1:])]
    if step.what == "jacobian_diagonal":
        return [jac.diagonal(dim1=1, dim2=2).reshape(x.shape)]
    if step.what == "divergence":
        return [jac.diagonal(dim1=1, dim2=2).sum(-1)]
    probes = 1 + step.seed % 2
    gen = torch.Generator().manual_seed(step.seed)
    v = torchdiv.draw_probes(x.detach(), probes, generator=gen).reshape(probes, batch, -1)
    return [torch.einsum("rbi,bij,rbj->b", v, jac, v) / probes]


def _jacobians(f: Callable, x: torch.Tensor, looped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not looped:
        return _summed_rows(f, x)
    y, full = _rows(f, x)
    return y, _blocks(full)


def _watched(step: Step) -> bool:
    """Whether the call must refuse an ``f`` that mixes samples (it watches)."""
    if step.what == "estimate":
        return step.seed % 2 == 0  # one probe
    return step.method == "auto"


# the explicit methods that watch nothing: of an ``f`` that mixes samples they give the batch's
# sums of products, not the diagonal blocks (documented: limitations, "All operators assume
# batch independence"), so nothing is asked of them there
UNWATCHED = ("forward", "reverse", "forward-over-reverse")


def _unchecked(step: Step) -> bool:
    """Whether a call of an ``f`` that mixes samples may give anything."""
    return step.method in UNWATCHED or (step.what == "estimate" and step.seed % 2 == 1)


def _buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


def _put_back(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The buffers as they were before the call, written through ``.data`` (their versions
    kept: the call's result may have saved them for its backward pass)."""
    with torch.no_grad():
        for b, was in saved:
            if b.shape == was.shape and not torch.equal(b, was):
                b.data.copy_(was)


STATS: dict[str, int] = {}


def _count(what: str) -> None:
    STATS[what] = STATS.get(what, 0) + 1


def check_call(case: Case, step: Step) -> str | None:
    """Run the call ``step`` and compare it with its reference; why it differs, or ``None``."""
    why = _check_call(case, step)
    _count("fault" if why is not None else "call")
    return why


def _check_call(case: Case, step: Step) -> str | None:
    g = torch.Generator().manual_seed(step.seed)
    # how the call is made: x requiring grad (most), x detached, under no_grad, under
    # allow_batch_interaction, or x a transposed view (another layout at the same shape)
    mode = pick(g, ["grad"] * 5 + ["detached", "no_grad", "allow", "strided"])
    if mode == "strided":  # (the batch dimension last in memory)
        x = randn(g, *case.event, step.batch).movedim(-1, 0).requires_grad_()
    else:
        x = randn(g, step.batch, *case.event)
    if case.channels_last and uniform_int(g, 0, 1):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    mixes = case.mixes() and step.batch > 1
    saved = _buffers(case.model)
    params = [p for p in case.model.parameters() if p.requires_grad]
    given = x.detach() if mode == "detached" else x
    try:
        if mode == "no_grad":
            with torch.no_grad():
                got = call(case, step, case.f(step.batch), given)
        elif mode == "allow":
            with torchdiv.allow_batch_interaction():
                got = call(case, step, case.f(step.batch), given)
        else:
            got = call(case, step, case.f(step.batch), given)
    except torchdiv.BatchInteractionError as exc:
        _put_back(saved)
        if case.mixes():
            _count("refused mixing")
            return None
        if mode == "allow":
            return f"refused under allow_batch_interaction: {str(exc)[:300]}"
        return f"refused an f that does not mix: {str(exc)[:300]}"
    except (RuntimeError, NotImplementedError) as exc:
        _put_back(saved)
        # a train-mode batch norm refused by name by the engines that cannot take it (torch.func's
        # transforms, the Taylor and structured engines' rules), with the way out
        if _batch_statistics(case.model) and "method='auto'" in str(exc):
            _count("refused batch statistics")
            return None
        raise
    if mixes and _watched(step) and mode != "allow":
        return "served an f that mixes samples"
    if case.mixes() and (_unchecked(step) or step.batch > LOOPED or mode == "allow"):
        _count("mixing unchecked")
        return None
    _put_back(saved)
    eager = case.eager(step.batch)

    def fresh(z: torch.Tensor) -> torch.Tensor:  # (each evaluation from the call's state)
        _put_back(saved)
        return eager(z)

    want = reference(case, step, fresh, x)
    if not all(bool(w.isfinite().all()) for w in want):  # (weight norm of a zeroed row: 0/0)
        _count("not finite")
        return None
    weights = [randn(g, *w.shape) for w in want]
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        why = far(a, b, TOL)
        if why is not None:
            return f"value {k}: {why}"
    if step.what in ("laplacian", "value_grad_laplacian") and _batch_statistics(case.model):
        # PyTorch's third derivatives of a batch norm on batch statistics are wrong (the grad of
        # grad of grad differs from central differences of the grad of grad, where torchdiv's
        # agree): no reference for the gradients of a Laplacian there
        return None
    if mode == "no_grad":
        return None
    inputs = [*params] if mode == "detached" else [*params, x]  # (none in x asked there)
    loss_got = sum((w * a.to(f64)).sum() for w, a in zip(weights, got, strict=True))
    loss_want = sum((w * b).sum() for w, b in zip(weights, want, strict=True))
    d_got = _grads(loss_got, inputs)
    d_want = _grads(loss_want, inputs)
    for k, (a, b) in enumerate(zip(d_got, d_want, strict=True)):
        why = far(a, b, TOL)
        if why is not None:
            return f"gradient {'x' if k == len(params) else f'parameter {k}'}: {why}"
    return None


def _batch_statistics(model: nn.Module) -> bool:
    """Whether one of ``model``'s batch norms normalises by the batch's statistics."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def _grads(loss: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if not inputs or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    found = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, found, strict=True)]


# --- runs ----------------------------------------------------------------------------------------

KINDS = ("mlp", "conv", "cnf", "pinn", "branchy", "config")


def forget() -> None:
    """Clear what torchdiv keeps across calls (every ``PlanCache``), so that a rerun of a
    sequence starts as the first did."""
    if not _CACHES:
        _CACHES.extend(obj for obj in gc.get_objects() if type(obj) is PlanCache)
    for kept in _CACHES:
        kept.clear()


_CACHES: list[PlanCache] = []


def plan(seed: int, kind: str | None = None, compile_ok: bool = False) -> tuple[str, list[Step]]:
    g = torch.Generator().manual_seed(seed)
    kind = kind or pick(g, list(KINDS))
    return kind, draw_steps(g, compile_ok)


def run(seed: int, kind: str, steps: list[Step]) -> tuple[int, str] | None:
    """Run ``steps`` on a fresh case of ``kind``; the index of the first failing step and why,
    or ``None``."""
    g = torch.Generator().manual_seed(seed * 7919 + 1)
    case = build(kind, g)
    for k, step in enumerate(steps):
        if step.what in OPS:
            try:
                why = check_call(case, step)
            except Exception as exc:  # (a crash is a finding too)
                why = f"raised {type(exc).__name__}: {str(exc)[:300]}"
            if why is not None:
                return k, why
        else:
            try:
                done = mutate(case, step)
            except (ValueError, RuntimeError):  # (not possible in this state: pruned, scripted)
                done = ""
            _count("mutation " + ("done" if done else "void"))
    return None


def minimized(seed: int, kind: str, steps: list[Step]) -> tuple[list[Step], str]:
    """The shortest sequence found by dropping steps while the run still fails, with why."""
    found = run(seed, kind, steps)
    assert found is not None
    steps = steps[: found[0] + 1]
    why = found[1]
    changed = True
    while changed:
        changed = False
        for k in range(len(steps) - 1):
            trial = steps[:k] + steps[k + 1 :]
            forget()
            again = run(seed, kind, trial)
            if again is not None:
                steps, why, changed = trial[: again[0] + 1], again[1], True
                break
    return steps, why


def fuzz_one(seed: int, kind: str | None = None, compile_ok: bool = False) -> str | None:
    """One seed's sequence; its minimized failure as text, or ``None``."""
    kind, steps = plan(seed, kind, compile_ok)
    if run(seed, kind, steps) is None:
        return None
    short, why = minimized(seed, kind, steps)
    lines = "\n".join(f"    {s}" for s in short)
    return f"seed {seed} ({kind}): {why}\n{lines}"


# --- tests ---------------------------------------------------------------------------------------

# the always-run seeds: the 45 quickest of the first 80 (each a sequence of 10-30 steps on one
# model, 0.02-0.07 s of CPU; 1.8 s in all), between them every kind of model, ~500 calls
# checked and ~170 refused for mixing samples
FAST = [1, 4, 5, 7, 8, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23, 26, 28, 29, 30, 31, 35, 36]
FAST += [38, 40, 42, 45, 46, 48, 50, 52, 53, 57, 58, 59, 63, 64, 65, 66, 67, 68, 69, 70, 72, 76]
# those of them that fail a key blind to the modules' state (below)
BLIND = [5, 31, 48, 58, 70, 72]


def test_fixed_seeds() -> None:
    """The fixed seeds' calls agree with their float64 references, values and gradients, after
    every mutation; between them they made calls that were checked and calls refused for
    mixing samples (a seed list that stops reaching those fails here, rather than checks
    less)."""
    before = dict(STATS)
    faults = [m for seed in FAST if (m := fuzz_one(seed)) is not None]
    assert not faults, "\n\n".join(faults)
    made = {k: STATS.get(k, 0) - before.get(k, 0) for k in STATS}
    assert made.get("call", 0) > 400 and made.get("refused mixing", 0) > 100, made
    assert {plan(seed)[0] for seed in FAST} == set(KINDS)


def test_fixed_seeds_find_a_key_blind_to_module_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed seeds fail a torchdiv whose structure key tells a module by its identity
    alone (not its train mode, flags, hooks, submodules): the pass of an earlier call served
    after a mutation that made ``f`` mix samples."""
    monkeypatch.setattr(cache, "_held", lambda f: (id(f),))
    forget()
    found = [run_once(seed) for seed in BLIND]
    forget()
    assert all(m is not None and "served an f that mixes samples" in m for m in found), found


def run_once(seed: int) -> str | None:
    """Why seed ``seed``'s sequence fails, unminimized; ``None`` if it passes."""
    kind, steps = plan(seed)
    found = run(seed, kind, steps)
    return None if found is None else f"seed {seed} ({kind}) step {found[0]}: {found[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("first", range(100, 600, 25))
def test_many_seeds(first: int) -> None:
    """Twenty-five more sequences (~7 s of CPU a chunk; each chunk in the daily sample of slow
    tests)."""
    faults = [m for seed in range(first, first + 25) if (m := fuzz_one(seed)) is not None]
    assert not faults, "\n\n".join(faults[:5])


@pytest.mark.slow
def test_seeds_with_compiled_models() -> None:
    """Sequences whose mutations include ``torch.compile`` of the model (Dynamo's eager
    backend: compiling each model costs ~1 s)."""
    faults = [m for seed in range(6000, 6012) if (m := fuzz_one(seed, compile_ok=True)) is not None]
    assert not faults, "\n\n".join(faults[:5])


if __name__ == "__main__":
    first, count = int(sys.argv[1]), int(sys.argv[2])
    only = sys.argv[3] if len(sys.argv) > 3 else None
    comp = len(sys.argv) > 4  # (a fourth argument: torch.compile among the mutations)
    for s in range(first, first + count):
        message = fuzz_one(s, only, comp)
        if message:
            print(message, "\n", flush=True)
        if (s - first) % 50 == 49:
            print("through seed", s, STATS, flush=True)
    print(STATS)
