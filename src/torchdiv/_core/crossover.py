"""Whether ``"auto"`` traces a generic engine into a compiled graph or records ``f`` eagerly.

Inside a region Dynamo traces, ``"auto"`` cannot watch an evaluation of ``f`` to plan (no host
syncs, no dispatch modes), so it decides from what Dynamo knows at trace time: the shapes of
``x`` and, when ``f`` is a module, its parameters. Traced, the generic engines (reverse mode
for divergences and diagonals, forward over reverse for Laplacians) cost one product per input
element: ``n x B x W`` multiply-adds for ``n`` inputs per sample, ``B`` samples and ``W``
multiply-adds of ``f`` per sample. Recorded (structured, Taylor), ``f`` costs a few passes of
``B x W`` plus a fixed cost of recording and planning, and the call is one graph break.

Both choices give the same values and derivatives; the rule only decides which is faster.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.nn.utils.parametrize import ParametrizationList

from torchdiv._core.checks import unwrapped

# "auto" traces where n x B x W is at most this. Compiled training steps, one thread
# (bench/compile_crossover.py, inductor, float32; traced / recorded step time, two runs):
# traced 0.58-0.98x from 2.3M to 8.7M multiply-adds (MLPs of width 64 at n = 8, 16, 20 and of
# width 256 at n = 2, B = 64; a PINN of width 64 at n = 2, B = 256; a conv net on 4 x 4
# images, n = 48, 0.67x and 1.10x), 1.02-1.05x at 9.8M (the PINN at n = 8), 1.02-1.42x from
# 11.2M to 21.8M, 1.4-7.4x beyond.
TRACED_WORK = 10 << 20
# "auto" with a ``torch.compile``d model as f, called from eager code (no graph break at stake:
# recording runs the original module eagerly, as the eager call does) traces where n x B x W is
# at most this. Eager training steps, compiled model as f, traced / eager "auto" (thread CPU
# time, bench/compile_model_crossover.py, inductor, float32): traced 0.73-0.75x at 2.3M and 2.7M
# (a PINN of width 64 at n = 2, B = 256; an MLP of width 64 at n = 8, B = 64), 1.07x at 6.4M
# (the same MLP at n = 16; 1.12x in an earlier run), 1.29x at 8.7M (n = 20), 1.19x at 9.8M
# (the PINN at n = 8), more beyond; the conv net on 4 x 4 images (6.3M, 0.91x) and the
# width-256 MLP at n = 2 (8.6M, 0.81x) gained from tracing, and record here (1.01-1.02x)
COMPILED_F_WORK = 4 << 20
# Square problems (traces, diagonals, Jacobians as large as their input) up to this size go
# by plain autograd rows once a watched evaluation of this very ``f`` at the structure of
# ``x`` passed without a convolution (``_exact.dispatch._engines``; for
# diagonals, below a work too: ``_structured.rows_diagonal``): a D = 16 tanh MLP at
# batch 256 (2**16) took 2.0 ms by rows against 3.0 ms watched and planned, one thread; at
# D = 32 (2**18) the divergences and diagonals of a net the structured engine cannot plan were
# even (rows 0.95-0.99x), and the dense Jacobian took 3.1 ms by rows against 3.5 ms watched
# and planned (the recipes 3.0-3.1 ms; ``bench/rows_threshold.py``).
ROWS_PROBLEM = 1 << 18
# Square problems up to this size whose graph is a chain (an MLP: ``_exact.chain``) go by plain
# autograd's rows too, from the top layer's rows (``unit_products``: a third of a
# D -> 64 -> 64 -> D MLP's flops saved), once a watched evaluation passed and until a plain one
# shows another graph (``Passed.chain``). Dense Jacobians of a tanh MLP of width 64, frozen, one
# thread, thread CPU time (a loaded machine): D = 64, B = 256 (2**20) 2.8 ms by the chain's
# rows against 5.7-7.3 ms by ``torch.func``'s reverse mode (``is_grads_batched`` 5.7); D = 16,
# B = 4096 (2**20) 12.8 against 19.1; at 2**22 the rows won at D = 64, B = 1024 (16.7 against
# 31.6) and lost at D = 32, B = 4096 (54 against 50: the whole (k, N, W) block at once, where
# reverse mode chunks it); at 2**24 even
CHAIN_ROWS_PROBLEM = 1 << 20
# at most this many cotangents go by one backward pass each rather than one batched pass
# (2-core CPU, D -> 64 -> 64 -> D tanh MLP, rows of a D = 2 event: 0.74-0.86x the time of the
# batched pass at batch 256 and 4096; at D = 3-4 about even at batch 256), a chain's by its
# formulas from the top layer's rows (``_exact.chain.unit_products``); a diagonal of at most
# this many entries per sample goes by them at any work (``_structured.rows_diagonal``)
LOOP_ROWS = 2
# W assumed for an ``f`` whose parameters are not seen (a function, a module without
# parameters), per element of a sample: the rule on shapes alone is then n x (elements of x)
# <= 2**14, as before f's work was read (a width-64 MLP's W per input element at n = 16: 390)
UNSEEN_WORK_PER_ELEMENT = TRACED_WORK >> 14


def traced(f: Any, x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``"auto"`` runs a generic engine traced into a compiled graph instead of
    recording ``f``: Dynamo traces the call and ``n x B x W <= TRACED_WORK`` (module
    docstring; ``W``: ``work_per_sample``). ``f`` may be torchdiv's wrapper of the caller's
    ``f`` (``checks.unwrapped``): the public call and the engine inside decide alike."""
    return torch.compiler.is_compiling() and traceable(f, x, batch_dims)


def traceable(f: Any, x: torch.Tensor, batch_dims: int, limit: int = TRACED_WORK) -> bool:
    """Whether ``n x B x W <= limit``: with ``TRACED_WORK``, ``traced`` would hold if Dynamo
    traced the call. Asked outside a compiled region of a ``torch.compile``d ``f`` with
    ``COMPILED_F_WORK`` (``modes.compiled_like_f``: such a call runs compiled or eagerly as a
    whole; where it runs compiled, ``traced`` holds inside, ``COMPILED_F_WORK`` being lower)."""
    return work(f, x, batch_dims) <= limit


def work(f: Any, x: torch.Tensor, batch_dims: int, found: Held | str | None = "read") -> int:
    """``n x B x W``: the multiply-adds of one product per input element over the batch (the
    generic engines' work for a divergence, diagonal or Jacobian; ``W``: ``work_per_sample``),
    for ``n`` elements per sample and ``B`` samples; ``found``: ``held(f)``, if read already."""
    n = math.prod(x.shape[batch_dims:])
    return n * math.prod(x.shape[:batch_dims]) * work_per_sample(f, n, found)


class Held(NamedTuple):
    """What a module's parameters tell of its work (``held``)."""

    elements: int  # of all parameters
    width: int  # the first weight's input width (its second dimension)
    kernel: bool  # a parameter of more than 2 dimensions: a convolution's kernel
    grad: bool  # a parameter requires grad


def held(f: Any) -> Held | None:
    """``Held`` of ``f`` a module or a module's bound method (through torchdiv's wrapper,
    ``checks.unwrapped``) with parameters; ``None`` for anything else. One walk of the
    submodules' ``_parameters`` (a third of the time of ``parameters()``' generators,
    4-14 us for a 3-layer MLP; read at every eager call of ``"auto"``'s diagonal:
    ``_structured.rows_diagonal``); a parameter held by several submodules counts once per
    holder (each applies it), a submodule held twice once, as ``modules()`` gives it."""
    module = unwrapped(f)
    if not isinstance(module, torch.nn.Module):  # (a module's missing attribute: an exception)
        module = getattr(module, "__self__", module)  # a bound method such as net.forward
    if not isinstance(module, torch.nn.Module):
        return None
    count, width, kernel, grad = 0, 0, False, False
    todo, seen = [module], set()  # ``modules()``' order (depth first), without its generators
    while todo:
        m = todo.pop()
        if id(m) in seen:  # (held twice, or a cycle)
            continue
        seen.add(id(m))
        held_here = list(m._parameters.values())
        if isinstance(m, ParametrizationList):  # (the largest original first: weight_norm's
            # g, (out, 1), was read as a first weight of width 1, its v's shape the weight's:
            # the work 16x too high at D = 16, a diagonal left to the slower engine, 1.31x)
            held_here.sort(key=lambda p: 0 if p is None else -p.numel())
        for p in held_here:
            if p is None:
                continue
            count += p.numel()
            dims = p.dim()
            if width == 0 and dims >= 2:
                width = p.shape[1]  # Linear's in_features, ConvNd's in_channels (per group)
            kernel = kernel or dims > 2
            grad = grad or p.requires_grad
        todo.extend(c for c in reversed(m._modules.values()) if c is not None)
    return Held(count, width, kernel, grad) if count else None


def work_per_sample(f: Any, n: int, found: Held | str | None = "read") -> int:
    """Multiply-adds of ``f`` per sample of ``n`` elements, estimated from its parameters
    (``held``, unless ``found`` gives it): their number times how often the first weight is
    applied per sample (``n`` over its input width: 1 for an MLP, the pixels of a conv net's
    input; each weight is used once per output position, so later layers that downsample
    are counted high). ``f`` a module or a module's bound method; anything else:
    ``UNSEEN_WORK_PER_ELEMENT x n``. Read while Dynamo traces: parameter shapes are static
    (Dynamo guards them: a swapped parameter of another shape recompiles), nothing is
    computed on a tensor."""
    seen = held(f) if isinstance(found, str) else found
    if seen is None:
        return UNSEEN_WORK_PER_ELEMENT * n
    return seen.elements * max(1, n // max(seen.width, 1))
