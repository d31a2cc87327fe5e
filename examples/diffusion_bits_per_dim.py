"""Bits per dimension of a small diffusers U-Net: exact divergence vs each estimator.

A diffusers ``UNet2DModel`` with self-attention at 4x4 (the blocks ``AttnDownBlock2D`` and
``AttnUpBlock2D``) is trained by rectified flow matching, as in ``pf_ode_likelihood.py``, on
the same synthetic 8x8 images, as the velocity field ``v(t, x) = unet(x, 1000 t).sample``:
diffusers models take ``(sample, timestep)`` and return an output object, so a one-line
wrapper gives torchdiv the ``f(t, x) -> tensor`` it needs. ``torchdiv.flows.log_likelihood``
then integrates the divergence along the probability-flow ODE, exactly (``"auto"``: forward
mode cannot run CPU fused attention, so reverse mode's 64 products per evaluation) and with
each estimator and its standard error.

    python examples/diffusion_bits_per_dim.py            # a few minutes on a 2-core CPU
    python examples/diffusion_bits_per_dim.py --train-steps 1 --train-batch 8 --batch 2 \
        --step-size 1                                    # seconds
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import UNet2DModel
from pf_ode_likelihood import SIDE, add_likelihood_arguments, images, likelihood_table, train
from torch import nn


class UNetVelocity(nn.Module):
    """``v(t, x)`` for ``t`` in [0, 1] from a diffusers U-Net (timesteps 0..1000)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNet2DModel(
            sample_size=SIDE,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x, 1000 * t).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=64)
    add_likelihood_arguments(parser)
    parser.set_defaults(batch=4, num_probes=18, solver="rk4", step_size=0.125)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    model = UNetVelocity()
    start = time.perf_counter()
    train(model, args.train_steps, args.train_batch, data)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    model.eval()
    likelihood_table(model, images(args.batch, data), args)


if __name__ == "__main__":
    main()
