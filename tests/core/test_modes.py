"""Process-wide settings torchdiv overrides while it runs f are put back, whatever the order
in which overlapping calls (threads) end."""

from __future__ import annotations

import torch

from torchdiv._core.modes import CompiledCodeEager, _Held, math_attention


def test_overlapping_holders_put_the_setting_back_in_any_order():
    setting = ["user's"]

    def override() -> str:
        prior, setting[0] = setting[0], "torchdiv's"
        return prior

    held = _Held()
    held.enter(override)
    held.enter(override)
    held.exit(lambda prior: setting.__setitem__(0, prior))  # the first to enter ends first
    assert setting == ["torchdiv's"]  # the other call still runs
    held.exit(lambda prior: setting.__setitem__(0, prior))
    assert setting == ["user's"]


def test_math_attention_puts_the_fast_path_back():
    assert torch.backends.mha.get_fastpath_enabled()
    with math_attention(), math_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
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
