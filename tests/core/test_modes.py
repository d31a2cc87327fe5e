"""Process-wide settings torchdiv overrides while it runs f are put back, whatever the order
in which overlapping calls (threads) end."""

from __future__ import annotations

import torch

from torchdiv._core.modes import CompiledCodeEager, math_attention


def test_overlapping_calls_put_the_fast_path_back_in_any_order():
    assert torch.backends.mha.get_fastpath_enabled()
    a, b = math_attention(), math_attention()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # the first to enter ends first, as in two threads
    assert not torch.backends.mha.get_fastpath_enabled()  # b still runs
    b.__exit__(None, None, None)
    assert torch.backends.mha.get_fastpath_enabled()


def test_overlapping_calls_put_dynamos_stance_back_in_any_order():
    from torch._dynamo import eval_frame

    before = eval_frame._stance.stance
    a, b = CompiledCodeEager(), CompiledCodeEager()
    a.__enter__()
    b.__enter__()
    assert eval_frame._stance.stance == "force_eager"
    a.__exit__(None, None, None)
    assert eval_frame._stance.stance == "force_eager"
    b.__exit__(None, None, None)
    assert eval_frame._stance.stance == before
