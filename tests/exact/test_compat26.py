"""Forward mode's custom-op check under ``torch.compile`` on every release (compat-new26).

``_exact.forward.Tangents`` refuses an op outside ``aten``/``prims`` whose results have no
tangent though an input has one (``torch.func.jvp`` would take it for a constant); it reads
the op's namespace from its name. Dynamo could not trace that read (``str.split`` of the
name): every ``torch.ops`` call in ``f`` raised ``Unsupported`` in a compiled call on torch
2.13, and on 2.15 ``x.T`` (``laplacian(..., coordinates=...)``) reaches the mode as the
packet ``aten.numpy_T`` too. The name is now a constant to Dynamo; the check stays.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
from tests.conftest import assert_close
from torchdiv._exact.forward import _namespace, _op_name, under_tangents


@torch.library.custom_op("torchdiv_compat26::twice", mutates_args=())
def twice(z: torch.Tensor) -> torch.Tensor:
    """``2 z``, with no derivative registered (forward mode drops its tangents)."""
    return 2 * z


@twice.register_fake
def _(z: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(z)


OPS = {
    "aten packet": (torch.ops.aten.numpy_T, "aten::numpy_T"),
    "aten overload": (torch.ops.aten.add.Tensor, "aten::add.Tensor"),
    "prims overload": (torch.ops.prims.mul.default, "prims::mul"),  # (default: no suffix)
    "custom packet": (torch.ops.torchdiv_compat26.twice, "torchdiv_compat26::twice"),
    "custom overload": (torch.ops.torchdiv_compat26.twice.default, "torchdiv_compat26::twice"),
}


@pytest.mark.parametrize("name", OPS)
def test_op_names_of_packets_overloads_and_custom_ops(name: str) -> None:
    op, expected = OPS[name]
    assert _op_name(op) == expected
    assert _namespace(op) == expected.partition("::")[0]


# f as a custom op reaches the mode: its packet, its overload, behind a transpose
CUSTOM = {
    "packet": lambda z: torch.ops.torchdiv_compat26.twice(z),
    "overload": lambda z: torch.ops.torchdiv_compat26.twice.default(z),
    "after x.T": lambda z: twice(z.T).T,
}


@pytest.mark.slow  # ~1 s of Dynamo each
@pytest.mark.parametrize("form", CUSTOM)
def test_compiled_forward_mode_still_refuses_a_custom_op_without_forward_rule(form: str) -> None:
    """Traced with ``fullgraph``, the check raises inside the graph (Dynamo's ``Unsupported``
    names it); a check skipped while compiling would return products of 0 here. A compiled
    call that may break the graph raises it as in eager."""
    x = torch.randn(4, 3, dtype=torch.float64)

    def products(x: torch.Tensor) -> torch.Tensor:
        f = under_tangents(CUSTOM[form], 1, "method='reverse'")
        return torch.func.jvp(f, (x,), (torch.ones_like(x),))[1]

    torch._dynamo.reset()
    compiled = torch.compile(products, fullgraph=True, backend="eager")
    refused = r"NoForwardRule\(.the custom op torchdiv_compat26::twice in f"
    with pytest.raises(torch._dynamo.exc.Unsupported, match=refused):
        compiled(x)
    if form == "after x.T":  # (~10 s of Dynamo, breaking the graph at each frame)
        run = lambda x: torchdiv.divergence(CUSTOM[form], x, method="forward")  # noqa: E731
        with pytest.raises(NotImplementedError, match="custom op torchdiv_compat26::twice"):
            torch.compile(run, backend="eager")(x)


@pytest.mark.slow  # ~2 s of Dynamo
def test_compiled_forward_mode_through_aten_packets() -> None:
    """``torch.ops.aten`` packets in ``f`` (and ``x.T``, a packet to Dynamo on torch 2.15)
    under ``fullgraph``: the closed form, ``sum(cos(x))``."""
    x = torch.randn(4, 3, dtype=torch.float64)

    def divergence(x: torch.Tensor) -> torch.Tensor:
        f = lambda z: torch.ops.aten.sin(z.T).T  # noqa: E731
        return torchdiv.divergence(f, x, method="forward")

    torch._dynamo.reset()
    got = torch.compile(divergence, fullgraph=True, backend="eager")(x)
    assert_close(got, x.cos().sum(-1))
