"""The stopped-field check of ``log_likelihood`` (rev-left23) through a legacy checkpoint: a
custom ``autograd.Function`` that runs its block under ``no_grad`` and recomputes it in a
backward pass without a graph (guided-diffusion's ``CheckpointFunction``). Its reverse pass of
a reverse pass lacks that path, so the check cannot tell a stopped component there: the
field is not refused, and its likelihood equals the same field's without the checkpoint
(the guided U-Net's probability-flow test, daily, was refused until the check knew it)."""

from __future__ import annotations

import torch

from torchdiv._bench.unets import checkpoint
from torchdiv.flows import log_likelihood

f64 = torch.float64


def test_a_legacy_checkpoint_is_not_taken_for_a_stopped_field():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    layer = layer.to(f64)  # (trained: the checkpoint differentiates its parameters)

    def field(on: bool):
        def f(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return checkpoint(lambda h: layer(h) * t, [z], layer, on)

        return f

    def base(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(1)

    x = torch.randn(5, 3, dtype=f64)
    solve = {"solver": "rk4", "options": {"step_size": 0.25}}
    plain = log_likelihood(field(False), x, 0.0, 1.0, base, **solve)
    got = log_likelihood(field(True), x, 0.0, 1.0, base, **solve)
    torch.testing.assert_close(got, plain)
