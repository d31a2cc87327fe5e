"""Forward mode's custom-op check in frames Dynamo compiles on their own (rev-merges26c).

After a graph break (a refusal's traceback, a ``print`` in ``f``) Dynamo compiles each frame it
runs on its own, ``Tangents.__torch_function__`` and ``_check_tangents`` among them, and keeps
them for later calls with guards on a tensor argument's dtype, shape and dispatch keys but not
on whether it carries a tangent (torch 2.13 and 2.15). Compiled once for a custom op applied to
a constant (no input tangent: nothing to refuse), that code was reused for the same op applied
to ``x``: the check was skipped and ``jvp`` took the op for a constant (divergence 0, eager
refuses). Compiled once for a refused op, it refused an op with a forward rule afterwards. The
mode's own frames now always run eagerly there (Dynamo still inlines them into the frames it
traces, where the tangents are the graph's own).
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
from tests.conftest import assert_close
from torchdiv._exact.forward import NoForwardRule, under_tangents


@torch.library.custom_op("torchdiv_merges26c::twice", mutates_args=())
def twice(z: torch.Tensor) -> torch.Tensor:
    """``2 z``, with no derivative registered (forward mode drops its tangents)."""
    return 2 * z


@twice.register_fake
def _(z: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(z)


_LIB = torch.library.Library("torchdiv_merges26c_rule", "DEF")
_LIB.define("thrice(Tensor z) -> Tensor")
# composite: forward mode differentiates its decomposition (a forward rule outside aten)
_LIB.impl("thrice", lambda z: 3 * z, "CompositeImplicitAutograd")


def test_compiled_check_not_reused_from_a_constant_input() -> None:
    """``twice`` of a constant first (its check compiled with no input tangent), then of ``z``:
    refused as in eager, not products of 0 (``2 z`` drops its tangent)."""
    x = torch.randn(3, 4, dtype=torch.float64)
    f = under_tangents(lambda z: twice(torch.ones_like(z)) + twice(z), 1, "method='reverse'")

    def products(x: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(f, (x,), (torch.ones_like(x),))[1]

    torch._dynamo.reset()
    with pytest.raises(NoForwardRule, match="torchdiv_merges26c::twice"):
        torch.compile(products, backend="eager")(x)


_CHOSEN = {"op": torch.ops.torchdiv_merges26c.twice}  # (a global: f's frames look it up)


def _divergence(x: torch.Tensor) -> torch.Tensor:
    return torchdiv.divergence(lambda z: _CHOSEN["op"](z), x, method="forward")


@pytest.mark.slow  # ~5 s of Dynamo: the public call breaks the graph at its refusal
# (frames compiled on their own after it: Dynamo warns at _core/basis.py's maybe_get_level,
# an error under pytest's -W error only; a separate, loud fault, in rev-merges26c's notes)
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin")
def test_compiled_divergence_after_a_refusal_takes_an_op_with_a_forward_rule() -> None:
    """An op chosen by a flag: refused for ``twice``, then the composite ``thrice`` (compiled
    frames of the refusal reused) gives ``3 n``, as in eager."""
    x = torch.randn(3, 4, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(_divergence, backend="eager")
    _CHOSEN["op"] = torch.ops.torchdiv_merges26c.twice
    with pytest.raises(NotImplementedError, match="torchdiv_merges26c::twice"):
        compiled(x)
    _CHOSEN["op"] = torch.ops.torchdiv_merges26c_rule.thrice
    assert_close(compiled(x), torch.full((3,), 12.0, dtype=torch.float64))
