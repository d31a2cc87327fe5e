"""paramonly18: the divergence of Glow's LU 1x1 map run inverse, with and without the watch's
provenance of tensors built from parameters (``BatchAxes.built``).

``x @ inverse(P @ L @ U).T`` (d = 8, B = 16; ``P``, masks and signs as buffers, ``L``, ``U``,
``log|s|`` as parameters) then a 64-wide tanh MLP, float32, ``divergence(net, x)`` over a new
``x`` at every call. ``built``: as the package is (the inverse reads a tensor built from held
ones: watched once, the pass kept while they are the same); ``unbuilt``: the same call with
``BatchAxes._leaves`` answering ``None`` (nothing built, rev-watch18's behaviour: watched at
every call), on another instance of the same model (another structure key: the two never
share a pass). Both are timed round-robin in one process (``time_interleaved``), after a
check that they give the same divergence, and each call's watches are counted.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src .venv/bin/python bench/mixing_provenance.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch
from _common import time_interleaved, watches_in

import torchdiv
from torchdiv._core.mixing import tracker


class InvertibleLU(torch.nn.Module):
    """Glow's 1x1 map with ``W = P L (U + diag(sign(s) e^{log|s|}))`` (Kingma and Dhariwal,
    2018) on vectors; ``reverse``: ``z W^{-T}``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        u_mask = torch.ones(d, d).triu(1)
        self.register_buffer("w_p", p)
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.clone())
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_eye", torch.eye(d))
        self.w_l = torch.nn.Parameter(lower)
        self.w_s = torch.nn.Parameter(s.abs().log())
        self.w_u = torch.nn.Parameter(upper.triu(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lower = self.w_l * self.l_mask + self.l_eye
        upper = self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s))
        return z @ (self.w_p @ lower @ upper).inverse().T


def _model(d: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, d)]
    return torch.nn.Sequential(InvertibleLU(d), *layers)


@contextlib.contextmanager
def _unbuilt() -> Iterator[None]:
    """Nothing built from held tensors during the block (rev-watch18's watch)."""
    leaves = tracker.BatchAxes._leaves
    tracker.BatchAxes._leaves = lambda self, args, written: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        tracker.BatchAxes._leaves = leaves  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    built, unbuilt = _model(args.d, 64), _model(args.d, 64)
    xs = [torch.randn(args.batch, args.d) for _ in range(8)]
    at = iter(range(10**9))

    def call(net: torch.nn.Module, off: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with _unbuilt() if off else contextlib.nullcontext():
                return torchdiv.divergence(net, xs[next(at) % len(xs)])

        return run

    calls = {"built": call(built, False), "unbuilt": call(unbuilt, True)}
    for x in xs:
        with _unbuilt():
            want = torchdiv.divergence(unbuilt, x)
        torch.testing.assert_close(torchdiv.divergence(built, x), want, rtol=1e-5, atol=1e-5)
    counts = watches_in(calls)
    times = time_interleaved(calls, args.rounds, args.min_run_time)
    print(f"Glow LU inverse d={args.d} B={args.batch}, torch {torch.__version__}")
    for name, t in times.items():
        rounds = ", ".join(f"{r:.3f}" for r in t["rounds_ms"])
        print(
            f"{name:8s} median {t['median_ms']:.3f} ms  IQR {t['iqr_ms']:.3f} ms  "
            f"watches in 10 calls: {counts[name]}  rounds: {rounds}"
        )


if __name__ == "__main__":
    main()
