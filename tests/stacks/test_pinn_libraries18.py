"""PINN libraries as their users write problems: PINA (inputs as its ``LabelTensor``, a
``torch.Tensor`` subclass with labels, models that read them, its Lightning solver),
torchphysics (each variable a column view of one points tensor, its Lightning ``Solver``) and
NeuroMANCER (its ``gradient`` utility). torchdiv's operators against the library's own and a
float64 reference, values and parameter gradients, and a few training steps of the library's own
loop with torchdiv's operator in the residual against the same steps with the library's.
Each library is skipped where it cannot be imported."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_close, parameter_gradients, reference_laplacian

import torchdiv


def _pina() -> Any:
    pina = pytest.importorskip("pina")
    warnings.filterwarnings("ignore", module="pina")
    return pina


class HardPoisson(torch.nn.Module):
    """PINA's tutorials' hard constraint: ``x (1 - x) y (1 - y)`` times a net, on the columns a
    ``LabelTensor`` names (``x.extract``); the net on Fourier features where ``fourier``."""

    def __init__(self, fourier: bool) -> None:
        super().__init__()
        _pina()  # (skips the test without PINA)
        from pina.model import FeedForward
        from pina.model.block import FourierFeatureEmbedding

        torch.manual_seed(0)
        width = 8 if fourier else 3
        self.embed = FourierFeatureEmbedding(3, 8, sigma=1.0) if fourier else torch.nn.Identity()
        self.net = FeedForward(input_dimensions=width, output_dimensions=1, inner_size=8).double()

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        x, y = pts.extract(["x"]), pts.extract(["y"])  # type: ignore[attr-defined]
        return x * (1 - x) * y * (1 - y) * self.net(self.embed(pts))


def _plain_model(model: HardPoisson) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same function on a plain tensor (columns by position): the reference's ``f``."""

    def f(z: torch.Tensor) -> torch.Tensor:
        x, y = z[:, :1], z[:, 1:2]
        return x * (1 - x) * y * (1 - y) * model.net(model.embed(z))

    return f


def _points(requires_grad: bool) -> Any:
    """Collocation points as PINA hands them to a residual: a ``LabelTensor`` of ``x, y, t``."""
    torch.manual_seed(1)
    pts = _pina().LabelTensor(torch.rand(6, 3, dtype=torch.float64), ["x", "y", "t"])
    return pts.requires_grad_(True) if requires_grad else pts


def _by_pina(model: HardPoisson, pts: Any, spatial: bool) -> torch.Tensor:
    """PINA's own ``laplacian`` of the labelled output, over ``x, y`` or every label."""
    from pina import LabelTensor
    from pina.operator import laplacian

    x = pts if pts.requires_grad else pts.clone().requires_grad_(True)
    out = LabelTensor(model(x), ["u"])
    lap = laplacian(out, x, components=["u"], d=["x", "y"] if spatial else ["x", "y", "t"])
    return lap.as_subclass(torch.Tensor)


def _by_torchdiv(op: str, model: HardPoisson, pts: Any) -> torch.Tensor:
    """torchdiv's partial (``x, y``) or full Laplacian on the ``LabelTensor`` itself."""
    if op == "laplacian":
        return torchdiv.laplacian(model, pts)
    if op == "partial":
        return torchdiv.laplacian(model, pts, coordinates=[0, 1])
    if op == "value_grad_laplacian":  # a model that reads no label (docs/guide/limitations.md)
        return torchdiv.value_grad_laplacian(lambda z: model.net(model.embed(z)), pts)[2]
    from pina import LabelTensor

    x = pts if pts.requires_grad else pts.clone().requires_grad_(True)
    out = LabelTensor(model(x), ["u"])
    return torchdiv.graph_laplacian(out, x, coordinates=[0, 1], create_graph=True)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("fourier", [False, True], ids=["mlp", "fourier"])
@pytest.mark.parametrize("op", ["laplacian", "partial", "value_grad_laplacian", "graph"])
def test_pina_label_tensor_inputs(op: str, fourier: bool, requires_grad: bool) -> None:
    """A ``LabelTensor`` as ``x``, read by the model's ``extract``: until a review found it,
    every Laplacian but forward-over-reverse's raised PINA's ``AttributeError`` (``'LabelTensor'
    object has no attribute '_labels'``): the loop's ``.to``, the graph form's ``.permute`` and
    the partial Laplacian's shifted point met label-less ``LabelTensor``s. Values and parameter
    gradients against PINA's operator and a float64 Hessian; the caller's labels untouched."""
    model = HardPoisson(fourier)
    pts = _points(requires_grad)
    spatial = op in ("partial", "graph")
    got = _by_torchdiv(op, model, pts)
    assert type(got) is torch.Tensor and got.shape == (6, 1)
    # again: the refusal remembered, f watched for sample mixing, where PyTorch refused
    # extract's LabelTensor(...) under the watch's TorchDispatchMode
    assert_close(_by_torchdiv(op, model, pts), got)
    plain = pts.detach().as_subclass(torch.Tensor)
    f = _plain_model(model)
    if op == "value_grad_laplacian":
        f = lambda z: model.net(model.embed(z))  # noqa: E731
    if spatial:  # the Laplacian in (x, y) of u(x, y, t): t held by the closure
        t = plain[:, 2:]
        expected = reference_laplacian(lambda z: f(torch.cat([z, t], 1)), plain[:, :2])
    else:
        expected = reference_laplacian(f, plain)
    assert_close(got, expected)
    if op != "value_grad_laplacian":
        assert_close(got, _by_pina(model, pts, spatial))
    mine = parameter_gradients(model, got.square().sum())
    theirs = parameter_gradients(model, expected.square().sum())
    for a, b in zip(mine, theirs, strict=True):
        assert_close(a, b)
    assert pts.labels == ["x", "y", "t"] and pts.requires_grad == requires_grad


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
def test_pina_mixing_model_refused(requires_grad: bool) -> None:
    """PINA's hard-constraint model with its features centred over the batch (``h - h.mean(0)``):
    ``extract`` cannot run watched, and the unwatched evaluation after looked for a train-mode
    batch norm only, so the Laplacian was served silently wrong until a review found it."""
    model = HardPoisson(fourier=False)
    pts = _points(requires_grad)

    def centred(z: torch.Tensor) -> torch.Tensor:
        h = model(z)
        return h - h.mean(0)

    for _ in range(2):
        with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
            torchdiv.laplacian(centred, pts)


def test_pina_extracted_columns() -> None:
    """``x`` extracted from a bigger ``LabelTensor`` (``pts.extract(['x', 'y'])`` of ``x, y, t,
    mu``), the model reading labels of the extracted tensor: the Laplacian of each."""
    pina = _pina()
    model = HardPoisson(fourier=False)
    torch.manual_seed(2)
    big = pina.LabelTensor(torch.rand(5, 4, dtype=torch.float64), ["x", "y", "t", "mu"])
    sub = big.extract(["x", "y", "t"])
    got = torchdiv.laplacian(model, sub, coordinates=[0, 1])
    t = sub.as_subclass(torch.Tensor)[:, 2:]
    f = _plain_model(model)
    plain = sub.as_subclass(torch.Tensor)[:, :2]
    assert_close(got, reference_laplacian(lambda z: f(torch.cat([z, t], 1)), plain))


def _pina_poisson_losses(residual: Callable[[Any, Any], torch.Tensor]) -> list[float]:
    """Three steps of PINA's physics-informed solver (Lightning, Adam) on a Poisson problem
    whose residual is ``residual(input_, output_)``: the loss of each step."""
    import lightning
    from pina import Condition, Trainer
    from pina.domain import CartesianDomain
    from pina.equation import Equation
    from pina.equation.zoo import FixedValue
    from pina.model import FeedForward
    from pina.problem import SpatialProblem
    from pina.solver import PhysicsInformedSingleModelSolver

    class Poisson(SpatialProblem):  # type: ignore[misc]  # (class attributes, as PINA's)
        output_variables = ["u"]  # noqa: RUF012
        spatial_domain = CartesianDomain({"x": [0, 1], "y": [0, 1]})
        domains = {"D": spatial_domain, "boundary": spatial_domain.partial()}  # noqa: RUF012
        conditions = {  # noqa: RUF012
            "boundary": Condition(domain="boundary", equation=FixedValue(0.0)),
            "D": Condition(domain="D", equation=Equation(residual)),
        }

    problem = Poisson()
    problem.discretise_domain(16, "grid", domains=["D"])
    problem.discretise_domain(8, "grid", domains=["boundary"])
    torch.manual_seed(0)
    model = FeedForward(input_dimensions=2, output_dimensions=1, inner_size=8, n_layers=2)
    solver = PhysicsInformedSingleModelSolver(problem=problem, model=model)
    losses: list[float] = []

    trainer = Trainer(
        solver, max_epochs=3, batch_size=None, **_quiet(lightning.pytorch.Callback, losses)
    )
    trainer.train()
    return losses


def _quiet(callback: type, losses: list[float]) -> dict[str, Any]:
    """A Lightning trainer's options on the CPU, without logs, progress bars or checkpoints, a
    callback (of the Lightning package's ``Callback`` the library uses) appending each step's
    loss to ``losses``."""

    class Record(callback):  # type: ignore[misc, valid-type]
        def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    return {
        "accelerator": "cpu",
        "logger": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "callbacks": [Record()],
    }


def _forcing(pts: Any) -> torch.Tensor:
    x, y = pts.extract(["x"]), pts.extract(["y"])
    return 2 * torch.pi**2 * torch.sin(torch.pi * x) * torch.sin(torch.pi * y)


@pytest.mark.filterwarnings("ignore")  # Lightning's and PINA's advice
def test_pina_solver_trajectory() -> None:
    """PINA's Lightning loop with ``graph_laplacian`` on the ``LabelTensor``s PINA passes to the
    residual: the same losses, step by step, as with PINA's own ``laplacian`` (it raised PINA's
    ``AttributeError`` until a review found it)."""
    _pina()
    from pina.operator import laplacian

    def theirs(input_: Any, output_: Any) -> torch.Tensor:
        return laplacian(output_, input_, components=["u"], d=["x", "y"]) - _forcing(input_)

    def ours(input_: Any, output_: Any) -> torch.Tensor:
        return torchdiv.graph_laplacian(output_, input_, create_graph=True) - _forcing(input_)

    expected = _pina_poisson_losses(theirs)
    got = _pina_poisson_losses(ours)
    assert len(got) == len(expected) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-5, atol=2e-5)


class _Tagged(torch.Tensor):
    """A ``torch.Tensor`` subclass as PINA's ``LabelTensor`` is one, nothing overridden."""


@pytest.mark.parametrize("coordinates", [None, [0, 1]], ids=["all", "partial"])
def test_subclass_x_first_call_watched(coordinates: list[int] | None) -> None:
    """A subclass as ``x`` and an ``f`` that takes a mean over the batch: the first call raised
    nothing (the recording refused ``x`` before evaluating ``f``, and its fallback went
    unwatched) until a review found it; the second raised ``BatchInteractionError``."""
    x = torch.rand(5, 3, dtype=torch.float64).as_subclass(_Tagged)

    def f(z: torch.Tensor) -> torch.Tensor:
        return (z**3).sum(1, keepdim=True) * z.mean(0).sum()

    for _ in range(2):
        with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
            torchdiv.laplacian(f, x, coordinates=coordinates)


class _Columns(torch.Tensor):
    """A ``torch.Tensor`` subclass with column names whose ``extract`` builds a new instance
    from a slice, as PINA's ``LabelTensor(t[:, [i]], labels)`` does: PyTorch refuses that
    under the watch's ``TorchDispatchMode`` ("Creating a new Tensor subclass")."""

    @staticmethod
    def __new__(cls, t: torch.Tensor, names: list[str]) -> _Columns:
        return super().__new__(cls, t)  # type: ignore[call-arg]  # (an alias of t)

    def __init__(self, t: torch.Tensor, names: list[str]) -> None:
        self.names = names

    def extract(self, name: str) -> _Columns:
        """The column ``name``, a new ``_Columns`` (on ``self``'s autograd graph)."""
        i = self.names.index(name)
        return _Columns(self.as_subclass(torch.Tensor)[:, [i]], [name])


def _columns(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z``'s columns ``a`` and ``b`` (``extract`` where ``z`` is a ``_Columns``)."""
    if isinstance(z, _Columns):
        return z.extract("a").as_subclass(torch.Tensor), z.extract("b").as_subclass(torch.Tensor)
    return z[:, :1], z[:, 1:]


def _per_sample(z: torch.Tensor) -> torch.Tensor:
    a, b = _columns(z)
    return torch.sin(a) * b**2 + a**3


_MIXING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda z: _per_sample(z) - _per_sample(z).mean(0),
    "softmax": lambda z: torch.softmax(_per_sample(z), 0),
    "sort": lambda z: torch.sort(_per_sample(z), 0).values,
}


@pytest.mark.parametrize("mixing", list(_MIXING))
def test_subclass_built_in_f_mixing_refused(mixing: str) -> None:
    """``f`` builds a new instance of ``x``'s subclass (``extract``), which PyTorch refuses
    under the watch: ``f`` ran again unwatched and only a train-mode batch norm was looked for,
    so an ``f`` mixing samples by a mean, a softmax or a sort over the batch was served the
    diagonal blocks of the cross-sample Hessian, silently, until a review found it."""
    x = _Columns(torch.rand(6, 2, dtype=torch.float64), ["a", "b"])
    for _ in range(2):  # (the first call and a later one)
        with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
            torchdiv.laplacian(_MIXING[mixing], x)


def test_subclass_built_in_f_pass_not_remembered() -> None:
    """A sort along the batch of values already in order is, at that ``x``, of one sample at a
    time (a right Laplacian); the numerical check's pass holds there only, so the next call, at
    values out of order, is checked again and refused."""
    a = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)[:, None]
    ordered = torch.cat([a, torch.full_like(a, 0.5)], 1)
    f = _MIXING["sort"]
    got = torchdiv.laplacian(f, _Columns(ordered, ["a", "b"]))
    assert_close(got, reference_laplacian(_per_sample, ordered))
    with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
        torchdiv.laplacian(f, _Columns(ordered.flip(0), ["a", "b"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_subclass_built_in_f_per_sample(dtype: torch.dtype) -> None:
    """The same ``extract`` in an ``f`` of one sample at a time: passed (the numerical check's
    round-off well inside its tolerance in float32 too), the Laplacian right at each call (the
    float64 reference on plain tensors)."""
    torch.manual_seed(0)
    for _ in range(3):
        x = _Columns(torch.rand(64, 2, dtype=dtype), ["a", "b"])
        plain = x.as_subclass(torch.Tensor).double()
        expected = reference_laplacian(_per_sample, plain).to(dtype)
        assert_close(torchdiv.laplacian(_per_sample, x), expected)


def test_subclass_built_in_f_value_grad_laplacian_hint() -> None:
    """``value_grad_laplacian`` evaluates ``f`` under the dispatch mode that keeps its state
    changes to one evaluation, where ``extract`` cannot run: PyTorch's error, with a hint to
    the calls that serve its parts (docs/guide/limitations.md); they do, rightly."""
    x = _Columns(torch.rand(6, 2, dtype=torch.float64), ["a", "b"])
    with pytest.raises(RuntimeError, match=r"torchdiv\.laplacian and torchdiv\.jacobian run such"):
        torchdiv.value_grad_laplacian(_per_sample, x)
    plain = x.as_subclass(torch.Tensor)
    expected = torch.func.vmap(torch.func.jacrev(lambda z: _per_sample(z[None])[0]))(plain)
    assert_close(torchdiv.jacobian(_per_sample, x), expected)
    assert_close(torchdiv.laplacian(_per_sample, x), reference_laplacian(_per_sample, plain))


def _torchphysics() -> Any:
    tp = pytest.importorskip("torchphysics")
    return tp


def test_torchphysics_operators() -> None:
    """torchphysics' ``laplacian`` and ``div`` of an FCN in ``(x, t)`` (``x`` in R², each
    variable its own leaf as torchphysics makes them) against ``graph_laplacian`` and
    ``graph_divergence`` on the same output, and a float64 Hessian; values and parameter
    gradients. In float32: torchphysics' ``laplacian`` sums into float32 zeros whatever the
    dtype of its input."""
    tp = _torchphysics()
    space = tp.spaces.R2("x") * tp.spaces.R1("t")
    torch.manual_seed(0)
    model = tp.models.FCN(input_space=space, output_space=tp.spaces.R2("u"), hidden=(16, 16))
    x = torch.rand(8, 2).requires_grad_(True)
    t = torch.rand(8, 1).requires_grad_(True)
    u = model(tp.spaces.Points(torch.cat([x, t], 1), space)).as_tensor
    ours = torchdiv.graph_laplacian(u[:, :1], x, create_graph=True)
    assert_close(ours, tp.utils.laplacian(u[:, :1], x))
    assert_close(torchdiv.graph_divergence(u, x, create_graph=True)[:, None], tp.utils.div(u, x))
    net = model.double()
    plain = x.detach().double()

    def f(z: torch.Tensor) -> torch.Tensor:
        points = tp.spaces.Points(torch.cat([z, t.detach().double()], 1), space)
        return net(points).as_tensor[:, :1]

    expected = reference_laplacian(f, plain)
    assert_close(ours.double(), expected, scale=1e5)  # float32 against float64
    leaf = plain.clone().requires_grad_(True)
    mine = parameter_gradients(
        net, torchdiv.graph_laplacian(f(leaf), leaf, create_graph=True).sum()
    )
    theirs = parameter_gradients(net, expected.sum())
    for a, b in zip(mine, theirs, strict=True):
        assert_close(a, b)


def _torchphysics_heat_losses(laplacian: Callable[[torch.Tensor, torch.Tensor], Any]) -> list:
    """Four steps of torchphysics' Lightning ``Solver`` (Adam) on the heat equation
    ``u_t = Δ_x u`` in ``x`` in the unit square, the residual's Laplacian ``laplacian(u, x)``."""
    import pytorch_lightning as pl

    tp = _torchphysics()
    space_x, space_t = tp.spaces.R2("x"), tp.spaces.R1("t")
    domain = tp.domains.Parallelogram(space_x, [0, 0], [1, 0], [0, 1])
    domain = domain * tp.domains.Interval(space_t, 0, 1)
    torch.manual_seed(0)
    sampler = tp.samplers.RandomUniformSampler(domain, n_points=32).make_static()
    model = tp.models.FCN(input_space=space_x * space_t, output_space=tp.spaces.R1("u"))

    def residual(u: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tp.utils.grad(u, t) - laplacian(u, x)

    condition = tp.conditions.PINNCondition(module=model, sampler=sampler, residual_fn=residual)
    setting = tp.OptimizerSetting(torch.optim.Adam, lr=1e-2)
    solver = tp.solver.Solver([condition], optimizer_setting=setting)
    losses: list[float] = []

    trainer = pl.Trainer(max_steps=4, **_quiet(pl.Callback, losses))
    trainer.fit(solver)
    return losses


@pytest.mark.filterwarnings("ignore")  # Lightning's advice
def test_torchphysics_solver_trajectory() -> None:
    """torchphysics' Lightning loop on the heat equation, the residual's Laplacian by
    ``graph_laplacian`` (on ``x``, a column view torchphysics slices out of its points, a leaf)
    or by torchphysics' own: the same losses step by step."""
    tp = _torchphysics()
    expected = _torchphysics_heat_losses(tp.utils.laplacian)
    got = _torchphysics_heat_losses(lambda u, x: torchdiv.graph_laplacian(u, x, create_graph=True))
    assert len(got) == len(expected) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-5, atol=2e-5)


def _neuromancer() -> Any:
    """NeuroMANCER, imported with an empty ``wandb`` module where Weights & Biases is not
    installed (``neuromancer.trainer`` imports it at import time; nothing here logs)."""
    import importlib.util
    import sys
    import types

    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    return pytest.importorskip("neuromancer")


class _XT(torch.nn.Module):
    """NeuroMANCER's PINN tutorials' net: an ``MLP`` block on ``[x, t]``."""

    def __init__(self, insize: int = 3) -> None:
        super().__init__()
        from neuromancer.modules import blocks

        torch.manual_seed(0)
        self.net = blocks.MLP(insize=insize, outsize=1, hsizes=[16, 16], nonlin=torch.nn.Tanh)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t], -1))


def _neuromancer_heat_losses(ours: bool) -> list[float]:
    """Four Adam steps on NeuroMANCER's ``Problem`` (a ``Node``, symbolic ``variable``s, a
    ``PenaltyLoss``) for the heat equation ``u_t = 0.1 u_xx`` (its tutorial's); ``u_xx`` by
    NeuroMANCER's ``variable.grad`` twice, or by ``graph_laplacian`` in a ``variable``."""
    _neuromancer()
    from neuromancer.constraint import variable
    from neuromancer.dataset import DictDataset
    from neuromancer.loss import PenaltyLoss
    from neuromancer.problem import Problem
    from neuromancer.system import Node

    torch.manual_seed(1)
    x, t = torch.rand(16, 1).requires_grad_(True), torch.rand(16, 1).requires_grad_(True)
    data = DictDataset({"x": x, "t": t}, name="train")
    batch = data.collate_fn([data[i] for i in range(len(data))])
    node = Node(_XT(insize=2), ["x", "t"], ["u"], name="net")
    u, xv, tv = variable("u"), variable("x"), variable("t")
    if ours:
        lap = variable([u, xv], lambda y, z: torchdiv.graph_laplacian(y, z, create_graph=True))
    else:  # as NeuroMANCER's tutorials write u_xx
        lap = u.grad(xv).grad(xv)
    pde = (u.grad(tv) - 0.1 * lap == 0.0) ^ 2
    pde.name = "pde"
    problem = Problem([node], PenaltyLoss([pde], []))
    optimizer = torch.optim.Adam(problem.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = problem(batch)["train_loss"]
        losses.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


@pytest.mark.slow  # importing NeuroMANCER: 10-50 s (numba, CasADi, Lightning)
@pytest.mark.filterwarnings("ignore")
def test_neuromancer_problem_trajectory() -> None:
    """The same losses step by step with either Laplacian in NeuroMANCER's ``Problem``."""
    expected = _neuromancer_heat_losses(ours=False)
    got = _neuromancer_heat_losses(ours=True)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-5, atol=2e-7)


@pytest.mark.slow  # importing NeuroMANCER
def test_neuromancer_gradient_utility() -> None:
    """NeuroMANCER's ``gradients.gradient`` twice (its tutorials' second derivatives) against
    ``laplacian`` and ``graph_laplacian`` on the block's output, in float64; parameter
    gradients of the squared Laplacian against a float64 Hessian's."""
    _neuromancer()
    from neuromancer.gradients import gradient

    model = _XT().double()
    torch.manual_seed(2)
    x = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    t = torch.rand(6, 1, dtype=torch.float64)
    u = model(x, t)
    g = gradient(u, x)
    theirs = gradient(g[:, :1], x)[:, :1] + gradient(g[:, 1:], x)[:, 1:]
    assert_close(torchdiv.graph_laplacian(u, x, create_graph=True), theirs)
    ours = torchdiv.laplacian(lambda z: model(z, t), x)
    expected = reference_laplacian(lambda z: model(z, t), x.detach())
    assert_close(ours, theirs)
    assert_close(ours, expected)
    mine = parameter_gradients(model, ours.square().sum())
    for a, b in zip(mine, parameter_gradients(model, expected.square().sum()), strict=True):
        assert_close(a, b)
