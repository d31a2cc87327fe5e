"""How ``method="auto"`` plans an exact computation: which mode, and how many vectors at once.

The plan comes from one evaluation of ``f`` (the one reverse mode needs anyway), watched by a
``TorchDispatchMode`` that notes the widest per-batch tensor any op produced and whether a
convolution ran. Two measured rules (2-core CPU, ``bench/divergence_exact.py``):

* Chunking: a batched JVP or VJP carries ``k`` copies of every intermediate, so time and
  memory are best with ``k * widest`` around ``CHUNK_ELEMENTS`` (2M elements: 8 MB in float32),
  where blocks stay cache-sized; full-width blocks were up to 2.5x slower.

* Mode: reverse mode, one VJP per output element, unless the output has more elements than the
  input, or ``f`` convolves: CPU convolution-backward kernels ran about 1.3-2x slower than the
  forward ones (mkldnn), so conv nets use forward mode, unless an op without a forward-mode
  rule ran (CPU fused attention: diffusers' U-Nets), where forward mode would fail part-way.

Watching costs about 10 microseconds per op of one forward pass: 4% of a 3 ms divergence
(the benchmark's D=32 MLP), nothing next to large ones, too much for tiny ones, which skip it
(``TINY_PROBLEM``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from torchdiv._core.mixing.reads import Verdict
from torchdiv._core.mixing.tracker import BatchAxes
from torchdiv._core.modes import DispatchMode
from torchdiv._exact.state import Changes

CHUNK_ELEMENTS = 1 << 21

# Problems with at most this many (basis vectors x elements of x) take well under a
# millisecond; watching their ops would cost 10-25% (measured on the demo's 16-64-64-16 MLP),
# so they are not watched: reverse mode (forward if the output is larger), one chunk.
TINY_PROBLEM = 1 << 15

# ATen ops that PyTorch gives no forward-mode derivative (checked on CPU; the engines that run
# after forward mode fails cover any others): CPU fused attention, the oneDNN LSTM layer
# that ``nn.LSTM`` runs in float32 on the CPU (its backward is differentiable:
# ``mkldnn_rnn_layer_differentiable_backward``), and ``nn.utils.rnn.pack_padded_sequence``
# (its backward is made of index ops). Custom ops (outside aten), which
# ``torch.library`` gives none, are told by their namespace (``_exact.forward.Tangents``
# refuses them there). The Laplacian's ``"auto"`` loops over backward passes for an ``f``
# that runs one (``_laplacian.methods.fallback``).
WITHOUT_FORWARD_RULE = frozenset(
    {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten.mkldnn_rnn_layer.default,
        torch.ops.aten._pack_padded_sequence.default,
    }
)

_CONVOLUTION, _WITHOUT_FORWARD_RULE = 1, 2
_KINDS = {
    torch.ops.aten.convolution.default: _CONVOLUTION,
    torch.ops.aten._convolution.default: _CONVOLUTION,
    **dict.fromkeys(WITHOUT_FORWARD_RULE, _WITHOUT_FORWARD_RULE),
}


class Sizes:
    """What plans an engine's chunks (``chunk``): the largest per-batch tensor seen (``widest``),
    whether an op convolved, whether every op has a forward-mode rule, and for which other
    calls a watch's pass holds (``verdict``). Unwatched (the plain object), nothing was seen:
    one chunk of all vectors. ``OpSizes`` fills it by watching ``f``'s ops; a tiny problem's
    later call, which nothing watches, takes this one (a dispatch mode's set-up, ~1-2 us, was
    ~1 % of a D = 2 call)."""

    def __init__(self, batch_shape: torch.Size) -> None:
        self.batch_shape = batch_shape
        self.widest = 0
        self.convolves = False
        self.forward_rules = True
        self.verdict = Verdict()

    def chunk(self, num_basis: int) -> int:
        """Vectors per chunk so that ``chunk * widest`` stays near ``CHUNK_ELEMENTS``."""
        return max(1, min(num_basis, CHUNK_ELEMENTS // max(self.widest, 1)))


class OpSizes(Sizes, DispatchMode):
    """Records the largest per-batch tensor any op produced, whether any op convolved, and
    whether every op has a forward-mode rule.

    Per-batch means its leading dimensions are the batch shape: those are the tensors a batched
    JVP or VJP carries ``k`` copies of (weights and their views are not). With ``axes``, it
    also follows the batch dimensions (``torchdiv._core.mixing``), raising ``BatchInteractionError``
    when ``f`` mixes samples; with ``changes``, it notes what ``f`` changes outside itself
    (``_state.Changes``, whose end of watch it makes on leaving). One mode serves all three:
    each Python dispatch mode costs a round trip per ATen call, ~7 us on a 2-core CPU (a
    D -> 64 -> 64 -> D tanh MLP, D = 64, batch 4, under ``torch.func.vjp``: 0.16 ms unwatched,
    0.36 ms watched by this mode and a ``Changes`` of its own, 0.32 ms by this one alone).
    ``verdict``: for which other calls a pass of its watch holds (``BatchAxes.verdict``;
    none, ``Verdict()``, without ``axes``), known on leaving.
    """

    def __init__(
        self,
        batch_shape: torch.Size,
        axes: BatchAxes | None = None,
        changes: Changes | None = None,
    ) -> None:
        DispatchMode.__init__(self)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        Sizes.__init__(self, batch_shape)
        self.axes = axes
        self.changes = changes

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        fresh = self.changes is not None and self.changes.before(func, args, kwargs)
        carry = None if self.axes is None else self.axes.before(func, args, kwargs)
        out = func(*args, **kwargs)
        if self.axes is not None:
            self.axes.after(carry, args, out)
        if fresh:
            self.changes.made(out)  # type: ignore[union-attr]
        kind = _KINDS.get(func)  # (one lookup: hashing an OpOverload costs 0.4 us)
        if kind is not None:
            self.convolves |= kind == _CONVOLUTION
            self.forward_rules &= kind != _WITHOUT_FORWARD_RULE
        self.forward_rules &= func.namespace == "aten"
        batch = len(self.batch_shape)
        for leaf in (out,) if isinstance(out, torch.Tensor) else tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.shape[:batch] == self.batch_shape:
                self.widest = max(self.widest, leaf.numel())
        return out

    def __enter__(self) -> OpSizes:
        if self.changes is not None:
            self.changes.started()
        super().__enter__()
        return self

    def finish(self, y: Any) -> None:
        """Raise ``BatchInteractionError`` if ``f``'s result ``y`` depends on combined
        samples (``BatchAxes.finish``)."""
        if self.axes is not None:
            self.axes.finish(y)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.axes is not None:
            self.verdict = self.axes.verdict()
        self.axes = None  # let go of the tensors it followed
        super().__exit__(kind, error, traceback)
        if self.changes is not None:
            self.changes.ended(error)
