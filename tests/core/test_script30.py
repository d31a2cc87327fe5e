"""The TorchScript walk's memos (``_core.script``): the names each code reads, remembered per
code object (``per_code``), and which classes hold nothing of the user's (``_foreign``), read
once per class; what they keep must never serve a later walk stale."""

from __future__ import annotations

import functools

import torch

from torchdiv._core import script


def test_per_code_remembers_each_code_and_is_bounded(monkeypatch):
    calls: list[object] = []

    @script.per_code
    def names(code):
        calls.append(code)
        return code.co_names

    monkeypatch.setattr(script, "_PER_CODE", 3)
    codes = [compile(f"a{i}.b", "<t>", "eval") for i in range(5)]
    assert names(codes[0]) == ("a0", "b") and names(codes[0]) == ("a0", "b")
    assert calls == [codes[0]]  # (the second read remembered)
    for code in codes:
        assert names(code) == code.co_names  # (past the bound: forgotten, read again, right)
    assert len(calls) == 5


def test_foreign_classes():
    class Holder:
        pass

    class Items(list):  # (a class of the user's on a built-in one: its own namespace)
        pass

    assert script._foreign(functools.partial) and script._foreign(int)
    assert script._foreign(torch.nn.Linear) and script._foreign(torch.nn.Module)
    assert not script._foreign(Holder) and not script._foreign(Items)


def test_methods_follow_names_through_the_mro_and_see_a_replaced_method():
    scripted = torch.jit.script(torch.nn.Tanh())

    class Base(torch.nn.Module):
        def forward(self, z):
            return self.helper(z)

        @staticmethod
        def helper(z):
            return z

    class Net(Base):
        def forward(self, z):
            return super().forward(z)

    net = Net()
    assert script.scripted(net) == []

    def helper(z):
        return scripted(z)

    Base.helper = staticmethod(helper)  # (a method replaced on a base class between calls)
    assert script.scripted(net) == [scripted]
