"""Exact divergence of a tiny HuggingFace GPT-2 decoder (SDPA, default ``use_cache``) over
``inputs_embeds`` ``(B, L, E)``: ``torchdiv.divergence`` (``"auto"``) against the ``jacrev``
recipes, full-batch ``jacrev`` with its diagonal blocks read and ``vmap(jacrev)`` of one
sample; float32, medians and spreads of repeated runs in one process (rev-seq21).

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src python bench/seq21_hf_decoder.py
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
import transformers
from torch.func import jacrev, vmap

import torchdiv

B, L, E = 8, 8, 32


def _timed(run: Callable[[], torch.Tensor], repeats: int = 7) -> tuple[float, float, torch.Tensor]:
    out = run()  # warm-up (and the plan torchdiv keeps for the structure)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times), out


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=E, n_layer=2, n_head=2, vocab_size=10, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2Model(config).eval()
    x = torch.randn(B, L, E)
    f = lambda z: model(inputs_embeds=z).last_hidden_state  # noqa: E731
    n = L * E

    def full_jacrev() -> torch.Tensor:
        blocks = jacrev(f)(x).reshape(B, n, B, n).diagonal(dim1=0, dim2=2)  # (n, n, B)
        return blocks.diagonal().sum(-1)

    def per_sample() -> torch.Tensor:
        one = lambda z: f(z[None])[0].reshape(n)  # noqa: E731
        return vmap(jacrev(one))(x).reshape(B, n, n).diagonal(dim1=1, dim2=2).sum(-1)

    recipes = {
        "torchdiv auto": lambda: torchdiv.divergence(f, x),
        "jacrev, full batch": full_jacrev,
        "vmap(jacrev)": per_sample,
    }
    reference = None
    for name, run in recipes.items():
        try:
            median, spread, out = _timed(run)
        except Exception as exc:  # a recipe that cannot run this model
            print(f"{name:20s} failed: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        reference = out if reference is None else reference
        error = (out - reference).abs().max().item()
        print(f"{name:20s} {median * 1e3:8.1f} ms (spread {spread * 1e3:.1f}), vs auto {error:.1e}")


if __name__ == "__main__":
    main()
