"""The structure key's classes of a module (``_taylor.cache._classes``) after the module's
class is given other bases between calls: before, the key read the bases it first met through
weak references (a freed one: ``AttributeError`` from every later call; a live one: its
attributes for the new base's). Reference: the closed form of ``tanh`` / ``sin``'s
elementwise divergence, ``sum(f'(x))``."""

from __future__ import annotations

import gc

import torch
from conftest import assert_close

import torchdiv


def test_a_class_given_new_bases_between_calls():
    class Base(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(z)

    class Net(Base):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return super().forward(z)

    class Sine(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.sin(z)

    net, x = Net(), torch.randn(3, 2, dtype=torch.float64)
    assert_close(torchdiv.divergence(net, x), (1 - torch.tanh(x) ** 2).sum(-1))
    Net.__bases__ = (Sine,)
    del Base
    gc.collect()
    assert_close(torchdiv.divergence(net, x), torch.cos(x).sum(-1))
