"""What the structure key reads of a module's attributes whatever else it holds (percall25).

Until percall25 the key read a module's attributes of other types than its flags, numbers,
functions, tensors and plain containers (an ``OrderedDict`` configuration, a set, an ``Enum``)
only where the module held more (or fewer) attributes besides those than a bare
``nn.Module``: a module that also lacked one of torch's own (a hook dictionary deleted, as a
module made without ``nn.Module.__init__``'s full set may) held as many, and such a
configuration's flag, set to mix samples, was served by the pass of its old value. Now every
attribute but torch's own, by name, is read.
"""

from __future__ import annotations

import collections

import pytest
import torch
from test_module_key21 import _Centred, _made, _served_then_refused, _x

from torchdiv._taylor import cache


@pytest.mark.parametrize("call", ["divergence", "jacobian_diagonal"])
def test_a_configuration_is_read_in_a_module_short_of_one_of_torch_s_own(call: str) -> None:
    """An ``OrderedDict`` configuration's flag, in a module without ``_state_dict_pre_hooks``
    (as many attributes as a bare module besides its told ones): three calls served, the
    flag set to centre the batch, the fourth refused (on main: ``DID NOT RAISE``)."""
    torch.manual_seed(0)
    m = _made(_Centred(3, collections.OrderedDict(centre=False)))
    del m._state_dict_pre_hooks
    assert len(vars(m)) - 2 == len(cache._MODULE_OWN)  # (its flags: training, one hook's)
    _served_then_refused(m, lambda: m.cfg.update(centre=True), call, _x(8, 3))
