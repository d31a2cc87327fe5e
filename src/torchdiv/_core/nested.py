"""Forward mode nested in forward mode through a custom ``autograd.Function``.

PyTorch (2.13) takes the result of a custom ``autograd.Function``'s ``jvp`` as a constant at
an outer ``torch.func.jvp`` level: forward over forward of ``a²`` written as one gives 0, not
2. torchdiv's replacements with derivatives right at every order (``_core.linalg``'s
determinants and solves, ``_core.power``) are such Functions, so a Laplacian of a Laplacian by
forward over reverse twice (``biharmonic``'s ``"forward-over-reverse"``) through them was
silently wrong (``biharmonic`` of ``|x ** e|²`` 36% off, of a linear ``det`` -634 where 0).
Their ``jvp`` refuses there instead; ``biharmonic``'s ``"auto"`` then takes the outer
Laplacian by backward passes.
"""

from __future__ import annotations

from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters


class NestedForward(NotImplementedError):
    """A replacement's ``jvp`` under two ``torch.func.jvp`` levels (module docstring)."""


def refuse_nested_forward(op: str) -> None:
    """Raise ``NestedForward`` naming ``op`` where more than one ``jvp`` transform is active."""
    jvps = sum(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    if jvps > 1:
        raise NestedForward(
            f"{op} (torchdiv's replacement, whose derivatives are right at every order) under "
            "forward mode nested in forward mode: PyTorch takes a custom autograd.Function's "
            "jvp as a constant at the outer level, so the result would be wrong; use "
            "biharmonic(method='taylor') or method='auto', or backward passes for the outer "
            "derivative (around a torchdiv call: torch.func.vjp or jacrev, not jvp or jacfwd; "
            "divergence or jacobian of one: method='reverse')"
        )
