"""Run by tests/core/test_lazy_dynamo.py in a fresh interpreter: a compiled training loss whose
torchdiv calls are the first ones of the process, torchdiv imported before or after Dynamo
(argv[1]: "torchdiv-first" or "dynamo-first"). Prints, as JSON, whether Dynamo was imported by
``import torchdiv``, Dynamo's graph-break reasons and graph count, the losses and the parameter
gradients (two calls, two more after ``torch._dynamo.reset()``, then the eager call)."""

import importlib
import json
import sys

import torch


class Net(torch.nn.Module):
    """An MLP whose output is raised to a tensor exponent (``_core.modes._constant_power``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 8, dtype=torch.float64)
        self.b = torch.nn.Linear(8, 3, dtype=torch.float64)
        self.register_buffer("k", torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) ** self.k


def main(order: str) -> None:
    """The compiled loss's runs, torchdiv imported before Dynamo (``"torchdiv-first"``) or
    after it (``"dynamo-first"``); prints them as JSON."""
    if order == "dynamo-first":
        importlib.import_module("torch._dynamo")  # (an import statement would bind torch here)
    import torchdiv

    imported = "torch._dynamo" in sys.modules
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 3, dtype=torch.float64)
    generator = torch.Generator()

    def loss(x: torch.Tensor) -> torch.Tensor:
        exact = torchdiv.divergence(net, x, method="forward")  # traced: zero tangents constant
        drawn = torchdiv.divergence(  # a generator: eagerly as a whole (eager_when)
            net, x, method="hutchinson", num_probes=2, generator=generator
        )
        return exact.square().sum() + drawn.sum()

    step = torch.compile(loss, backend="eager")
    from torch._dynamo.utils import counters

    runs = []
    for reset in (False, True):
        if reset:
            torch._dynamo.reset()
        for _ in range(2):
            net.zero_grad()
            generator.manual_seed(1)
            value = step(x)
            value.backward()
            runs.append([value.item(), [p.grad.tolist() for p in net.parameters()]])
    net.zero_grad()
    generator.manual_seed(1)
    eager = loss(x)  # the eager call, after the compiled ones (Dynamo imported by then)
    eager.backward()
    runs.append([eager.item(), [p.grad.tolist() for p in net.parameters()]])
    print(
        json.dumps(
            {
                "imported": imported,
                "breaks": sorted(counters["graph_break"]),
                "graphs": counters["stats"]["unique_graphs"],
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":  # (not when pytest imports it for its doctests)
    main(sys.argv[1])
