"""torchdiv at the scale limits users hit (scale27): deep autograd graphs.

Once Python has touched an autograd node (any walk of ``next_functions``), PyTorch 2.13 frees
the graph recursively through the nodes' Python objects, ~210 bytes of C stack a node: a
recurrent loop of 10^4 steps (a chain of 40,000 nodes) crashed the process with a
segmentation fault when its graph was freed after torchdiv's walk (``"auto"``'s later calls,
``hutchinson``, ``jacobian_diagonal``, ``graph_divergence``). Walks now stop at what this
thread's stack can free (``walk.walked``): ``"auto"`` then takes its reverse engine, the
graph forms refuse with the way out. The fast tests lower the bound (``_stack_bytes``); the
slow one runs the real loop in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

import torchdiv
from torchdiv._core import walk


def _loop(steps: int, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """``h <- h + 0.05 tanh(W h + b)``, ``steps`` times (one cell: a recurrent loop)."""

    class Loop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = torch.nn.Linear(3, 3, dtype=dtype)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for _ in range(steps):
                h = h + 0.05 * torch.tanh(self.cell(h))
            return h

    torch.manual_seed(0)
    return Loop()


@pytest.fixture
def small_stack(monkeypatch: pytest.MonkeyPatch) -> int:
    """A bound of 100 nodes: a 64-step loop (~256 nodes) is past it."""
    monkeypatch.setattr(walk, "_FLOOR", 16)
    monkeypatch.setattr(walk, "_stack_bytes", lambda: 100 * walk._BYTES_PER_NODE)
    return 100


def _reference(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The divergence by a float64 per-sample loop of ``autograd.grad``, row by row."""
    out = []
    for b in range(len(x)):
        xb = x[b].detach().clone().requires_grad_(True)
        yb = net(xb[None])[0]
        rows = [torch.autograd.grad(yb[i], xb, retain_graph=True)[0][i] for i in range(len(xb))]
        out.append(torch.stack(rows).sum())
    return torch.stack(out)


def test_a_walk_stops_at_the_bound(small_stack: int) -> None:
    net, x = _loop(64), torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = net(x)
    with pytest.raises(walk.GraphTooDeep, match=r"method='reverse'.*ulimit -s"):
        walk.search(y, x)
    with pytest.raises(walk.GraphTooDeep, match=f"more than {small_stack} nodes"):
        list(walk.nodes(y.grad_fn))
    with pytest.raises(walk.GraphTooDeep):
        walk.towards(y, x)
    assert len(list(walk.nodes(_loop(2)(x).grad_fn))) < small_stack  # (a small graph: walked)


def test_leaves_do_not_count(small_stack: int) -> None:
    """A wide graph, mostly leaves (300 parameters stacked: their ``AccumulateGrad`` nodes make
    no children's Python objects), is walked whole: counting every node stopped it (10^4
    modules summed: 40,005 nodes, paths ~6 long, took the fallback at every call, 2.6x)."""
    weights = [torch.nn.Parameter(torch.randn((), dtype=torch.float64)) for _ in range(300)]
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tanh(x) * torch.stack(weights).sum()
    assert len(list(walk.nodes(y.grad_fn))) > 300 > small_stack
    assert walk.search(y, x).others  # (walked, the leaves found)
    assert len(walk.towards(y, x)) == 3  # (x's leaf, tanh and the product)


@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal", "hutchinson"])
def test_auto_takes_the_reverse_engine_past_the_bound(small_stack: int, operator: str) -> None:
    """Every call (the first watched, the later ones unwatched: a walk, stopped), right."""
    net, x = _loop(64), torch.randn(5, 3, dtype=torch.float64)
    expected = _reference(net, x)
    for _ in range(3):
        if operator == "hutchinson":  # all three basis vectors as probes: exact
            probes = torch.eye(3, dtype=x.dtype).expand(5, 3, 3).transpose(0, 1) * 3**0.5
            value = torchdiv.divergence(net, x, method="hutchinson", probes=probes)
        elif operator == "divergence":
            value = torchdiv.divergence(net, x)
        else:
            value = torchdiv.jacobian_diagonal(net, x).sum(-1)
        # float64: rounding only, through 64 steps
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)


def test_the_graph_form_refuses_past_the_bound(small_stack: int) -> None:
    net, x = _loop(64), torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(walk.GraphTooDeep, match="not graph_divergence"):
        torchdiv.graph_divergence(net(x), x)
    # the way out the message names: the function form, reverse mode
    torch.testing.assert_close(
        torchdiv.divergence(net, x.detach(), method="reverse"), _reference(net, x)
    )


def _laplacian_reference(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """The Laplacian of scalar ``f`` by a float64 per-sample loop of ``autograd.grad`` twice."""
    out = []
    for b in range(len(x)):
        xb = x[b].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xb[None])[0], xb, create_graph=True)
        out.append(sum(torch.autograd.grad(g[i], xb, retain_graph=True)[0][i] for i in range(3)))
    return torch.stack(out)


def test_the_laplacian_s_loop_gives_way_past_the_bound(small_stack: int) -> None:
    """``"auto"`` loops over backward passes where the Taylor engine cannot run ``f`` (an FFT)
    and the event is small: the loop's walk stops, forward over reverse (no walk) takes over
    at every call; ``"grad-of-grad"`` itself refuses, naming the methods that walk nothing."""
    net = _loop(64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(net(z)).real.sum(-1)

    x = torch.randn(5, 3, dtype=torch.float64)
    expected = _laplacian_reference(f, x)
    for _ in range(3):
        # float64: rounding only, through 64 steps
        torch.testing.assert_close(torchdiv.laplacian(f, x), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(walk.GraphTooDeep, match="method='taylor' or 'forward-over-reverse'"):
        torchdiv.laplacian(f, x, method="grad-of-grad")


@pytest.mark.slow
def test_a_loop_of_ten_thousand_steps_does_not_crash() -> None:
    """The real size, the default stack: without the bound the second call's walk made the
    graph's deletion overflow the C stack (the process died of SIGSEGV)."""
    script = (
        "import torch, torchdiv\n"
        "cell = torch.nn.Linear(4, 4)\n"
        "def f(h):\n"
        "    for _ in range(10_000):\n"
        "        h = h + 0.01 * torch.tanh(cell(h))\n"
        "    return h\n"
        "x = torch.randn(8, 4)\n"
        "for _ in range(2):\n"
        "    d = torchdiv.divergence(f, x)\n"
        "    del d\n"
        "print('done')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr[-2000:]
