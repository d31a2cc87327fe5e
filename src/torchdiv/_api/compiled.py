"""The sample-mixing watch for a ``torch.compile``d ``f`` whose call torchdiv runs compiled.

Where a call runs a compiled model's products as compiled graphs (``_core.modes.compiled_like_f``:
``"auto"`` where ``f``'s work is small, the stochastic methods with ``probes=``), Dynamo traces
the engine, and the watch, a dispatch mode, sees nothing there: a compiled ``f`` that centres
over the batch (``y - y.mean(0)``) or permutes it returned per-sample results that were wrong,
unrefused. The methods whose eager calls watch ``f`` watch its uncompiled original here, once
per object and structure (``_taylor.mixing.structure``: the shapes, the modules' train flags,
hooks and submodules, the integer buffers by version: ``y[self.perm]`` with ``perm`` written
in place is watched again), before the compiled call.
"""

from __future__ import annotations

from typing import Any

import torch

from torchdiv._core.mixing.errors import BatchInteractionError, allowed, unnamed
from torchdiv._core.mixing.watch import verdicts, watch_once
from torchdiv._exact.state import unchanged
from torchdiv._taylor.cache import PlanCache
from torchdiv._taylor.capture import argument
from torchdiv._taylor.mixing import passed_before, structure

# the originals of compiled ``f``s watched without mixing samples at a structure: a memo of
# its own, not ``_taylor.mixing``'s ``Passed`` (whose flags also say which engines ran ``f``:
# unknown here)
_WATCHED = PlanCache(256)


def watch_compiled(
    methods: tuple[str, ...], fn: str, f: Any, x: Any, options: dict[str, Any]
) -> bool:
    """Before the compiled call of ``fn`` with the original ``f`` of a compiled model, where
    its method (``options["method"]``, default ``"auto"``) is one of ``methods`` (those whose
    eager calls watch ``f``): evaluate ``f`` once at ``x``, watched, unless this ``f`` passed
    at this structure (here, or in an eager call's memo: ``passed_before``) or detection is
    off (``allow_batch_interaction``). ``f``'s changes (a buffer written in place, random
    numbers drawn: dropout) are put back, so that the compiled call computes what it would
    have without the watch. ``BatchInteractionError`` named for ``fn`` if ``f`` mixes samples.
    Returns whether the compiled call may run: ``False`` where the watched evaluation raised
    anything else (``f``'s own error, an op torchdiv refuses): the call then runs eagerly,
    which watches ``f`` itself and reports the error as an eager call does.

    Example:
        >>> watch_compiled(("auto",), "divergence", lambda z: z - z.mean(0), torch.randn(4, 2), {})
        Traceback (most recent call last):
        ...
        torchdiv.BatchInteractionError: divergence: f mixes samples: ...
    """
    batch_dims = options.get("batch_dims", 1)
    if options.get("method", "auto") not in methods or allowed():
        return True
    if not isinstance(x, torch.Tensor) or not isinstance(batch_dims, int):
        return False
    if not 0 <= batch_dims <= x.dim() or not x.is_floating_point():
        return False
    at = structure(f, x, batch_dims)
    if _WATCHED.get(*at) is not None or passed_before(f, x, batch_dims, at) is not None:
        return True
    z = argument(x)
    try:  # (a data-dependent initialisation's flag put back too: Glow's ActNorm ``inited``)
        with unchanged(f, z), verdicts() as seen:
            watch_once(f, z, batch_dims)
    except BatchInteractionError as error:
        raise BatchInteractionError(f"{fn}: {unnamed(str(error))}") from None
    except Exception:
        return False
    if seen.verdict.for_any_x:  # (else watched at every call: ``Verdict``)
        _WATCHED.put(*at, True)
    return True
