"""The problems the benchmark runs: built-in net families over a range of D, or the user's model.

A ``Case`` builds its ``Problem`` lazily (one net in memory at a time). A ``Problem`` holds the
function and input at the run's dtype and device, and a float64 copy of both for the exact
reference where the model allows it (an ``nn.Module`` is copied and cast; a plain function is
used in float64 if it accepts float64 input, else the reference runs in the run's dtype).
Parameters are frozen and modules put in eval mode: every method computes the same thing, and
none pays for keeping its result differentiable.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from torchdiv._api.independence import check_batch_independence
from torchdiv._bench import ffjord, unets

Function = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """A net and its input as timed (``f``, ``x``: the case's dtype) and as checked (``f64``,
    ``x64``: float64 copies, for the exact reference)."""

    f: Function
    x: torch.Tensor
    f64: Function
    x64: torch.Tensor


@dataclass(frozen=True)
class Case:
    """One problem size: ``family`` groups cases in the plot, ``dim`` is the event size D,
    ``setting`` what else was fixed (``"batch 64, width 64"``)."""

    family: str
    title: str
    dim: int
    batch: int
    setting: str
    make: Callable[[], Problem]


@dataclass(frozen=True)
class Preset:
    """Default sizes and timing effort of ``--quick`` and ``--full`` (per family: mlp, conv)."""

    dims: tuple[int, ...]
    batch: dict[str, int]
    width: dict[str, int]
    rounds: int
    min_run_time: float


QUICK = Preset(
    (8, 32, 128),
    {
        "mlp": 64,
        "conv": 8,
        "scalar": 64,
        "ffjord": 4,
        "ffjord-multiscale": 4,
        "unet": 2,
        "unet-noattn": 2,
        "cnf": 256,
        "model": 8,
    },
    {
        "mlp": 64,
        "conv": 8,
        "scalar": 64,
        "ffjord": 8,
        "ffjord-multiscale": 8,
        "unet": 8,
        "unet-noattn": 8,
        "cnf": 64,
    },
    3,
    0.05,
)
FULL = Preset(
    (32, 128, 512),
    {
        "mlp": 128,
        "conv": 8,
        "scalar": 256,
        "ffjord": 8,
        "ffjord-multiscale": 8,
        "unet": 4,
        "unet-noattn": 4,
        "cnf": 256,
        "model": 8,
    },
    {
        "mlp": 256,
        "conv": 16,
        "scalar": 128,
        "ffjord": 64,
        "ffjord-multiscale": 64,
        "unet": 16,
        "unet-noattn": 16,
        "cnf": 64,
    },
    5,
    0.2,
)
# families with sizes of their own, unless the user gives --dims: the small CNFs of zuko's and
# torchdyn's defaults and tutorials live at 2-16 dimensions
OWN_DIMS = {"cnf": (2, 8, 16)}


def _mlp(
    dim: int, width: int, out: int, activation: Callable[[], torch.nn.Module]
) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """``dim -> width -> width -> out``, ``activation`` after each hidden layer; events
    ``(dim,)``."""
    net = torch.nn.Sequential(
        torch.nn.Linear(dim, width),
        activation(),
        torch.nn.Linear(width, width),
        activation(),
        torch.nn.Linear(width, out),
    )
    return net, (dim,)


def tanh_mlp(dim: int, width: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """``D -> width -> width -> D`` with tanh: the shape of a CNF / score-model vector field."""
    return _mlp(dim, width, dim, torch.nn.Tanh)


def conv_net(dim: int, width: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """2-channel ``s x s`` images, ``2 s^2`` closest to ``dim``; 3x3 convs ``2 -> width -> 2``."""
    side = max(1, round(math.sqrt(dim / 2)))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, width, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(width, 2, 3, padding=1),
    )
    return net, (2, side, side)


def scalar_mlp(dim: int, width: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """``D -> width -> width -> 1`` with tanh: a PINN solution or a VMC wave function."""
    return _mlp(dim, width, 1, torch.nn.Tanh)


def ffjord_odenet(dim: int, width: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """FFJORD's image ODE net (``torchdiv._bench.ffjord``): 3-channel ``s x s`` images,
    ``3 s^2`` closest to ``dim``; four 3x3 ``ConcatConv2d`` layers ``3 -> width x 3 -> 3``."""
    side = max(1, round(math.sqrt(dim / 3)))
    return ffjord.odenet((width,) * 3), (3, side, side)


def ffjord_multiscale(dim: int, width: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """FFJORD's multiscale ODE net (one squeeze, strides 1, 2, -2, 1): 3-channel ``s x s``
    images, ``s`` a multiple of 4 with ``3 s^2`` closest to ``dim``."""
    side = 4 * max(1, round(math.sqrt(dim / 3) / 4))
    return ffjord.multiscale((width,) * 3), (3, side, side)


def unet(dim: int, width: int, attention: bool = True) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """guided-diffusion's two-level U-Net (``torchdiv._bench.unets``: GroupNorm in every
    block, attention at half resolution, or none: coloured with its group norms split off
    once the images are larger than its receptive field, 31 pixels per axis) at one
    timestep: 3-channel ``s x s`` images, ``s`` even with ``3 s^2`` closest to ``dim``;
    ``width`` channels (a multiple of 4)."""
    side = 2 * max(1, round(math.sqrt(dim / 3) / 2))
    return unets.guided_unet(width, attention=attention), (3, side, side)


def small_cnf(dim: int, width: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """``D -> width -> width -> D`` with ELU: zuko's default CNF velocity (hidden features
    (64, 64), ELU), the 2-16-D flows of its and torchdyn's tutorials."""
    return _mlp(dim, width, dim, torch.nn.ELU)


FAMILIES: dict[str, tuple[str, Callable[[int, int], tuple[torch.nn.Module, tuple[int, ...]]]]] = {
    "mlp": ("tanh MLP", tanh_mlp),
    "conv": ("conv net", conv_net),
    "scalar": ("tanh MLP to a scalar", scalar_mlp),
    "ffjord": ("FFJORD ODEnet", ffjord_odenet),
    "ffjord-multiscale": ("FFJORD multiscale ODEnet", ffjord_multiscale),
    "unet": ("guided-diffusion U-Net", unet),
    "unet-noattn": ("U-Net without attention", functools.partial(unet, attention=False)),
    "cnf": ("small CNF (ELU)", small_cnf),
}
# the built-in nets with one output per sample (the others are vector fields, D -> D)
ONE_OUTPUT = ("scalar",)


def make_problem(
    model: torch.nn.Module | Function,
    event_shape: tuple[int, ...],
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Problem:
    """Input ``randn(batch, *event_shape)`` (seed 0) and the model at ``dtype`` and in float64."""
    x64 = torch.randn(batch, *event_shape, generator=torch.Generator().manual_seed(0))
    x64 = x64.double().to(device)
    x = x64.to(dtype)
    if isinstance(model, torch.nn.Module):
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return Problem(
            frozen.to(device=device, dtype=dtype), x, copy.deepcopy(frozen).double(), x64
        )
    if _accepts_float64(model, x64):
        return Problem(model, x, model, x64)
    return Problem(model, x, model, x)


def _accepts_float64(f: Function, x64: torch.Tensor) -> bool:
    try:
        y = f(x64)
    except (RuntimeError, TypeError):
        return False
    return isinstance(y, torch.Tensor) and y.dtype == torch.float64


def builtin_cases(
    families: tuple[str, ...],
    dims: tuple[int, ...],
    batch: dict[str, int],
    width: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    own_dims: bool = False,
) -> list[Case]:
    """One case per family and distinct D, nets seeded by D so every run builds the same;
    with ``own_dims``, families in ``OWN_DIMS`` take their own sizes instead of ``dims``."""
    cases = []
    for family in families:
        label, build = FAMILIES[family]
        seen = set()
        for dim in OWN_DIMS.get(family, dims) if own_dims else dims:
            torch.manual_seed(dim)
            net, shape = build(dim, width[family])
            if math.prod(shape) in seen:  # conv rounds D to 2 s^2: 8 and 9 give the same images
                continue
            seen.add(math.prod(shape))
            b, w = batch[family], width[family]
            cases.append(
                Case(
                    label,
                    f"{label}, x {(b, *shape)}, width {w}",
                    math.prod(shape),
                    b,
                    f"batch {b}, width {w}",
                    functools.partial(make_problem, net, shape, b, dtype, device),
                )
            )
    return cases


def model_case(
    spec: str, shape: tuple[int, ...], batch: int, dtype: torch.dtype, device: torch.device
) -> Case:
    """The user's model from ``module:attr`` (or ``path/to/file.py:attr``) on ``(batch, *shape)``.

    Its samples must be independent (checked with ``check_batch_independence`` when the case
    is built): every method, torchdiv's and the recipes', assumes it. A model that cannot be
    called on ``x`` alone, or whose output is no tensor (a diffusers U-Net takes ``(x, t)`` and
    returns an object), is a ``ValueError`` naming ``--model`` (the CLI's one-line exit).
    """
    model = load_model(spec)

    def make() -> Problem:
        problem = make_problem(model, shape, batch, dtype, device)
        try:
            check_batch_independence(problem.f, problem.x)
        except TypeError as exc:  # f(x) is no tensor, or f takes more than x
            raise ValueError(
                f"--model {spec} on x of shape {tuple(problem.x.shape)}: {exc}; --model must be "
                "f(x) -> a tensor: wrap a model of more arguments (a U-Net's (x, t)) in a "
                "function or module of x alone"
            ) from exc
        return problem

    title = f"{spec}, x {(batch, *shape)}"
    return Case("model", title, math.prod(shape), batch, f"{spec}, batch {batch}", make)


def load_model(spec: str) -> torch.nn.Module | Function:
    """Resolve ``module:attr`` to an ``nn.Module`` or a function ``f(x)``.

    ``attr`` may be dotted. The object may be an ``nn.Module`` instance, a class or factory
    called with no arguments (it must return a module or a function), or ``f`` itself (any
    callable with a required argument).

    Raises:
        ValueError: ``spec`` is not ``module:attr``, the module or attribute is not found, or
            the object is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be 'module:attr' or 'path/to/file.py:attr', got {spec!r}")
    obj: Any = _import(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module) and (inspect.isclass(obj) or _takes_no_args(obj)):
        obj = obj()
    if not callable(obj):
        raise ValueError(
            f"--model {spec}: expected an nn.Module, a class or factory of one, or a function "
            f"f(x), got {type(obj).__name__}"
        )
    # only callable is checked here; the runner evaluates it on the problem's x
    return cast("torch.nn.Module | Function", obj)


def _takes_no_args(obj: Any) -> bool:
    if not callable(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return not any(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def _import(name: str) -> Any:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--model: no file {name}")
        name = f"_torchdiv_bench_{path.stem}"  # never shadows an importable module of that name
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None  # a .py file always has a loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ValueError(
            f"--model: cannot import {name!r} ({exc}); run from the directory that holds it, "
            "add it to PYTHONPATH, or give a file path: path/to/file.py:attr"
        ) from exc
