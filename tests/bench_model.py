"""Tiny models for ``python -m torchdiv bench --model bench_model:...`` in the CLI tests."""

from __future__ import annotations

import torch

NOT_CALLABLE = 3


class TinyField(torch.nn.Module):
    """A 2-layer tanh vector field on events of any shape (flattened), built with no arguments."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.inner = torch.nn.Sequential(
            torch.nn.Linear(n, 8), torch.nn.Tanh(), torch.nn.Linear(8, n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.flatten(1)).reshape(x.shape)


def make_field() -> torch.nn.Module:
    """A factory with no arguments."""
    torch.manual_seed(0)
    return TinyField()


def field(x: torch.Tensor) -> torch.Tensor:
    """A plain function ``f(x)`` with no parameters (usable in float64 for the reference)."""
    return torch.sin(x) * x.sum(-1, keepdim=True)


def mixes_samples(x: torch.Tensor) -> torch.Tensor:
    """Not batch-independent: every sample sees the batch mean."""
    return x - x.mean(0)


def potential(x: torch.Tensor) -> torch.Tensor:
    """One scalar per sample (a PINN or VMC model): for ``--operator laplacian``."""
    return torch.tanh(x).square().sum(-1, keepdim=True)


def single_precision(x: torch.Tensor) -> torch.Tensor:
    """Computes in float32 whatever it is given."""
    return torch.sin(x.float())


def takes_time(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A velocity of ``(x, t)``, as U-Nets and CNF fields are: not ``f(x)`` on its own."""
    return x * t


def returns_a_tuple(x: torch.Tensor) -> tuple[torch.Tensor]:
    """An output that is no tensor (diffusers models return an object holding ``.sample``)."""
    return (torch.sin(x),)
